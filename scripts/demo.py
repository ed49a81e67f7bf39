"""`make demo`: transfer learning end to end, offline, in a few minutes on 2 CPU cores.

1. Generate a source dataset (shapes) and a smaller, related target dataset (pairs of shapes).
2. Train a base resnet18 from scratch on the source: our stand-in for an ImageNet model.
3. Transfer it to the target with `weights: run:<base run>` under feature_extract and fine_tune,
   and train scratch on the target for comparison, with the same number of epochs each.
4. Print the three results side by side.
Every step runs the real `transferctl` command line, exactly as a user would.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
# Each strategy gets the same epochs on the target, so the comparison is fair. Target epochs are cheap (a
# few batches each), and with 18 of them scratch has had its chance to catch up.
TARGET_EPOCHS = 18
HEAD_EPOCHS = 4  # fine_tune: the new head learns something before the body unfreezes
TARGET_SCHEDULES = {
    "feature_extract": f"[{{name: head, epochs: {TARGET_EPOCHS}, train: head, lr: 3.0e-3}}]",
    "fine_tune": f"[{{name: head, epochs: {HEAD_EPOCHS}, train: head, lr: 3.0e-3}}, "
                 f"{{name: body, epochs: {TARGET_EPOCHS - HEAD_EPOCHS}, train: all, lr: 1.0e-3, backbone_lr_mult: 0.1}}]",
    "scratch": f"[{{name: all, epochs: {TARGET_EPOCHS}, train: all, lr: 2.0e-3}}]",
}  # fmt: skip


def transferctl(*args: str) -> dict:
    """Run the CLI with --json; progress lines stream to our stderr, the summary comes back."""
    command = [sys.executable, "-m", "transferctl", *args, "--json"]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(command[2:])}` failed with exit code {done.returncode}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "demo", help="where data and runs go (default: demo/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console = Console(stderr=True)

    from transferctl.testing.synthetic import make_transfer_pair

    source, target = make_transfer_pair(args.out / "data", seed=args.seed, overwrite=True)
    runs = args.out / "runs"
    common = ["--set", f"seed={args.seed}", "--set", f"output.dir={runs}"]
    console.rule("base task: resnet18 from scratch on the source shapes")
    base = transferctl("train", str(CONFIGS / "demo-base.yaml"), "--set", f"data.root={source}", *common)

    results = {}
    for strategy, schedule in TARGET_SCHEDULES.items():
        console.rule(f"target task: {strategy}")
        started = time.perf_counter()
        results[strategy] = transferctl(
            "train", str(CONFIGS / "demo-target.yaml"), *common,
            "--set", f"data.root={target}", "--set", f"strategy={strategy}",
            "--set", f"backbone.weights=run:{base['run_dir']}", "--set", f"schedule={schedule}",
            "--set", f"name=demo-{strategy.replace('_', '-')}",
        )  # fmt: skip
        results[strategy]["wall"] = time.perf_counter() - started
    print_results(console, base, results)


def print_results(console: Console, base: dict, results: dict[str, dict]) -> None:
    any_run = Path(next(iter(results.values()))["run_dir"])
    chance = 1 / len(json.loads((any_run / "classes.json").read_text(encoding="utf-8")))
    table = Table(title=f"target task, {TARGET_EPOCHS} epochs each (chance: {chance:.2f})")
    for column in ("strategy", "first epoch", "best", "final", "best epoch", "seconds"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for strategy, summary in results.items():
        first = _first_epoch_accuracy(Path(summary["run_dir"]))
        table.add_row(strategy, f"{first:.3f}", f"{summary['best_val_acc']:.3f}", f"{summary['final_val_acc']:.3f}", str(summary["best_epoch"]), f"{summary['seconds']:.1f}")
    console.print(f"base run (resnet18 from scratch on the source): val acc {base['best_val_acc']:.3f}, {base['run_dir']}")
    Console().print(table)
    console.print(f"val accuracy per run; the runs are in {any_run.parent} (try: transferctl runs {any_run.parent})")


def _first_epoch_accuracy(run_dir: Path) -> float:
    first = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[0]
    return float(json.loads(first)["val_acc"])


if __name__ == "__main__":
    main()
