"""Does training the head on cached features cost accuracy when augmentation is on? Measured on the demo.

    python scripts/cache_accuracy.py [--base demo/runs/demo-base-...] [--seeds 5] [--epochs 18]

With `augment: none` the cached head phase equals the uncached one (tests/training/test_feature_cache.py). With
`augment: standard` it cannot: without the cache every epoch runs the backbone on new random crops, with it
each epoch draws one of `data.cached_views` views computed once (view 0 the clean centre crop). This
trains the demo's feature_extract task (its base run's weights, the target shapes, `augment: standard`)
for --epochs epochs on seeds 0 .. --seeds-1 three ways: `cache: off`, `cached_views: 1` (the default) and
`cached_views: 4`, and prints each one's mean final and best val accuracy, every seed's final one, and
its wall time. Needs a base run: `make demo` leaves one in demo/runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import scratch_folder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"cache: off": {"cache": "off"}, "cached_views: 1 (default)": {"cache": "memory", "cached_views": 1},
            "cached_views: 4": {"cache": "memory", "cached_views": 4}}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=None, help="the base run (default: the newest demo/runs/demo-base-*)")
    parser.add_argument("--data", type=Path, default=ROOT / "demo" / "data" / "target", help="the target data (default: the demo's)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=18)
    args = parser.parse_args(argv)
    if args.base is None:
        bases = sorted((ROOT / "demo" / "runs").glob("demo-base-*"))
        if not bases:
            parser.error("no demo/runs/demo-base-* run: run `make demo` first, or pass --base RUN")
        args.base = bases[-1]
    return args


def experiment(args: argparse.Namespace, seed: int, data_fields: dict[str, Any], out: Path) -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "configs" / "demo-target.yaml").read_text(encoding="utf-8"))
    raw.update(seed=seed, strategy="feature_extract", output={"dir": str(out)})
    raw["backbone"]["weights"] = f"run:{args.base}"
    raw["data"].update(root=str(args.data), augment="standard", **data_fields)
    raw["schedule"] = [{"name": "head", "epochs": args.epochs, "train": "head", "lr": 3.0e-3}]
    return raw


def main(argv: list[str] | None = None) -> None:
    from transferctl.config import config_from_dict
    from transferctl.training.train import train

    args = parse_args(argv)
    results: dict[str, dict[str, list[float]]] = {name: {"final": [], "best": [], "seconds": []} for name in VARIANTS}
    with scratch_folder("transferctl-cache-accuracy-") as out:
        for seed in range(args.seeds):
            for name, fields in VARIANTS.items():  # interleaved: a slow spell hits every variant alike
                started = time.perf_counter()
                summary = train(config_from_dict(experiment(args, seed, fields, out)))
                results[name]["seconds"].append(time.perf_counter() - started)
                results[name]["final"].append(summary["final_val_acc"])
                results[name]["best"].append(summary["best_val_acc"])
    print(f"# feature_extract on {args.data} from {args.base.name}, augment: standard, {args.epochs} epochs, seeds 0-{args.seeds - 1}")
    print("| variant | final val acc (mean) | best val acc (mean) | final, per seed | seconds per run |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        per_seed = ", ".join(f"{100 * a:.1f}" for a in r["final"])
        print(f"| {name} | {100 * statistics.mean(r['final']):.1f}% | {100 * statistics.mean(r['best']):.1f}% | {per_seed} | {statistics.mean(r['seconds']):.1f} |")


if __name__ == "__main__":
    main()
