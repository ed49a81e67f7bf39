"""CPU training with freed memory kept in the process (malloc_tuning.py) against glibc's default, in one run.

    python scripts/bench_allocator.py [--pairs 6] [--steps 12] [--batch 32] [--size 224]

The setting lasts for a process's life, so every measurement is its own child process: transferctl's
training step (bench_optimizer.training_steps: runtime.prepare_model, then engine.train_one_epoch on a fixed
batch; resnet18, precision auto, the fine-tuning optimizer) for --steps steps after two warm-up steps, once as transferctl runs it
("kept") and once with allocator.keep_freed_memory switched off ("returned", glibc's default). Each pair
runs both, the order alternating from pair to pair, so drifting speed hits both alike. Prints each
setting's median images/s, page faults per step and peak RSS, every child's images/s, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SETTINGS = ("returned", "kept")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(setting: str, args: argparse.Namespace) -> dict[str, float]:
    import resource

    from bench_optimizer import training_steps
    from transferctl.training import runtime as runtime_module

    if setting == "returned":
        runtime_module.keep_freed_memory = lambda: False
    run = training_steps(fused=True, batch=args.batch, size=args.size)
    run(2)  # warm-up: oneDNN picks its kernels, the heap grows to its working size
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = run(args.steps)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"images_per_second": args.steps * args.batch / seconds, "faults_per_step": (usage.ru_minflt - faults) / args.steps,
            "peak_rss_mb": usage.ru_maxrss / 1024}  # fmt: skip


def measure(setting: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", setting, "--steps", str(args.steps), "--batch", str(args.batch), "--size", str(args.size)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{setting} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{setting}: {result['images_per_second']:.1f} img/s, {result['faults_per_step']:.0f} faults/step", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    runs: dict[str, list[dict[str, float]]] = {setting: [] for setting in SETTINGS}
    for pair in range(args.pairs):
        for setting in SETTINGS if pair % 2 == 0 else reversed(SETTINGS):
            runs[setting].append(measure(setting, args))
    print(f"# resnet18 training step, batch {args.batch}, {args.size} px, precision auto; {args.pairs} pairs, order alternating")
    print("| freed memory | images/s (median) | each child | page faults per step | peak RSS MB | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    reference = statistics.median(run["images_per_second"] for run in runs["returned"])
    for setting, results in runs.items():
        speed = statistics.median(run["images_per_second"] for run in results)
        faults = statistics.median(run["faults_per_step"] for run in results)
        peak = statistics.median(run["peak_rss_mb"] for run in results)
        each = ", ".join(f"{run['images_per_second']:.1f}" for run in results)
        print(f"| {setting} | {speed:.1f} | {each} | {faults:.0f} | {peak:.0f} | {speed / reference:.2f}x |")


if __name__ == "__main__":
    main()
