"""The fine-tuning kit on real images: what each option of issue 21 does against the defaults, on digits.

    python scripts/kit.py [--seeds 0,1,2] [--work DIR] [--json] [--quick] [--only NAME,...]

The data and the base are scripts/quality.py's: scikit-learn's 1,797 handwritten digits as 32x32 PNGs, a
resnet18 trained from scratch on the digits 0-4, transferred with `weights: run:<base>` to the digits 5-9
(20 training images a class, the other ~160 a class validate). A second target is made imbalanced by
keeping 4 training images of the digits 7, 8 and 9 (20 of 5 and 6) and a fifth of their validation images:
there accuracy is mostly the common digits', and balanced accuracy (the mean of the per-class recalls)
is what a user with rare classes cares about. On the balanced target the two are the same number.

Each row trains `fine_tune` (the strategy that trains the body, which every option acts on) from the base
with one option set through `--set`, beside the defaults, on both targets, once per seed, interleaved.
The body phase takes at least BODY_STEPS steps instead of the default 300, so that the table fits in
about half an hour on two cores; every row has the same schedule, so the comparison is like with like.
The experiment file sets `image_size: 32` and `augment: none` (a flip turns a digit into another);
the rows that add an augmentation policy add the flips with it, as `data.augment` does.
`tta flip` is `transferctl evaluate --tta flip` on the default run of each seed.

Each cell is the best epoch's value (val acc, and val_balanced_acc where the run writes it), mean ± sd
over the seeds. The table goes to stdout (--json: the JSON, table on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo import transferctl  # noqa: E402
from quality import Settings as QualitySettings  # noqa: E402
from quality import benchmark_parser, experiment_files, parse_seeds, run_and_print, write_digits  # noqa: E402

BODY_STEPS = 100
RARE_DIGITS = ("7", "8", "9")
RARE_KEPT = 4
# Each row: the --set overrides of one option, beside the defaults. Names are what a user would write.
OPTIONS: dict[str, list[str]] = {
    "defaults": [],
    "loss.label_smoothing: 0.1": ["loss.label_smoothing=0.1"],
    "loss.class_weights: balanced": ["loss.class_weights=balanced"],
    "data.sampler: balanced": ["data.sampler=balanced"],
    # In the body phase: the head phase trains on cached features, which hold no images to mix.
    "schedule[1].mixup: {alpha: 0.2}": ["schedule.1.mixup.alpha=0.2"],
    "schedule[1].cutmix: {alpha: 1.0}": ["schedule.1.cutmix.alpha=1.0"],
    "ema: {decay: 0.99}": ["ema.decay=0.99"],
    "data.augment: trivialaugment": ["data.augment=trivialaugment"],
    "data.random_erasing: 0.25": ["data.random_erasing=0.25"],
}
TTA_ROW = "defaults + evaluate --tta flip"


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...] = (0, 1, 2)
    body_steps: int = BODY_STEPS
    quality: QualitySettings = QualitySettings()
    only: tuple[str, ...] = ()  # option rows to run (defaults always); empty: all


QUICK = Settings(seeds=(0, 1), body_steps=4, quality=QualitySettings(seeds=(0, 1), base_per_class=12, base_epochs=1, target_train=RARE_KEPT + 1, target_val=4))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "a few images, a few steps")
    parser.add_argument("--only", default="", help="comma-separated option rows to run beside the defaults (default: all)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.seeds is not None:
        settings = Settings(**{**asdict(settings), "seeds": parse_seeds(parser, args.seeds), "quality": settings.quality})
    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = [name for name in only if name not in OPTIONS]
    if unknown:
        parser.error(f"--only: unknown rows {unknown}; the rows are: {', '.join(OPTIONS)}")
    args.settings = Settings(seeds=settings.seeds, body_steps=settings.body_steps, quality=settings.quality, only=only)
    return args


def imbalanced_copy(target: Path, out: Path) -> Path:
    """The target with RARE_KEPT training images of each RARE_DIGITS class and a fifth of their validation
    images: rare in both, as in the data people have, so accuracy and balanced accuracy part ways."""
    shutil.copytree(target, out)
    for digit in RARE_DIGITS:
        for extra in sorted((out / "train" / digit).glob("*.png"))[RARE_KEPT:]:
            extra.unlink()
        validating = sorted((out / "val" / digit).glob("*.png"))
        for extra in validating[max(1, len(validating) // 5) :]:
            extra.unlink()
    return out


def best(rows: list[dict[str, Any]], suffix: str) -> float | None:
    """The best value of any column ending in `suffix` (val_acc, ema_val_acc, ...) over the epochs."""
    values = [value for row in rows for key, value in row.items() if key.endswith(suffix) and key.startswith(("val_", "ema_val_")) and isinstance(value, (int, float))]
    return max(values) if values else None


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def tta_numbers(run_dir: Path) -> tuple[float, float]:
    """evaluate --tta flip on the val split: (accuracy, balanced accuracy = the mean of the per-class recalls)."""
    report = transferctl("evaluate", str(run_dir), "--split", "val", "--tta", "flip")
    return report["accuracy"], statistics.mean(row["recall"] for row in report["per_class"])


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def run_benchmark(work: Path, settings: Settings, say: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    os.environ["TRANSFERCTL_CACHE"] = str(work / "cache")
    base_data, balanced = write_digits(work / "data", settings.quality)
    targets = {"balanced": balanced, "imbalanced": imbalanced_copy(balanced, work / "data" / "imbalanced")}
    base_yaml, target_yaml = experiment_files(work, base_data, balanced, settings.quality)
    say(f"base: resnet18 from scratch on digits 0-4, {settings.quality.base_epochs} epochs")
    base = transferctl("train", str(base_yaml), "--quiet")
    say(f"base: val acc {base['best_val_acc']:.3f} in {base['seconds']:.0f} s")
    options = {name: sets for name, sets in OPTIONS.items() if name == "defaults" or not settings.only or name in settings.only}
    cells: dict[str, dict[str, dict[str, list[float]]]] = {}
    for seed in settings.seeds:
        for target_name, target in targets.items():
            for name, overrides in options.items():  # interleaved: a slow spell of the machine hits every row alike
                common = ["strategy=fine_tune", f"seed={seed}", f"backbone.weights=run:{base['run_dir']}", f"data.root={target}",
                          f"schedule.1.min_steps={settings.body_steps}"]  # fmt: skip
                sets = [arg for override in (*common, *overrides) for arg in ("--set", override)]
                cell = cells.setdefault(name, {}).setdefault(target_name, {"acc": [], "balanced_acc": [], "seconds": []})
                try:
                    summary = transferctl("train", str(target_yaml), *sets, "--quiet")
                except SystemExit as failure:  # an option this checkout lacks, or a diverged run: its cells stay empty ("-")
                    say(f"seed {seed} {target_name} {name}: {failure}")
                    continue
                rows = metric_rows(Path(summary["run_dir"]))
                cell["acc"].append(summary["best_val_acc"])
                balanced_acc = best(rows, "balanced_acc")
                if balanced_acc is not None:
                    cell["balanced_acc"].append(balanced_acc)
                cell["seconds"].append(summary["seconds"])
                say(f"seed {seed} {target_name} {name}: val acc {summary['best_val_acc']:.3f}" + (f", balanced {balanced_acc:.3f}" if balanced_acc is not None else ""))
                if name == "defaults":
                    tta = cells.setdefault(TTA_ROW, {}).setdefault(target_name, {"acc": [], "balanced_acc": [], "seconds": []})
                    try:
                        accuracy, balanced_tta = tta_numbers(Path(summary["run_dir"]))
                    except SystemExit as failure:  # a checkout without --tta: the row stays empty
                        say(f"seed {seed} {target_name} {TTA_ROW}: {failure}")
                        continue
                    tta["acc"].append(accuracy)
                    tta["balanced_acc"].append(balanced_tta)
    counts = {name: {split: sum(1 for _ in (folder / split).rglob("*.png")) for split in ("train", "val")} for name, folder in targets.items()}
    return {"settings": {**asdict(settings), "quality": asdict(settings.quality)}, "data": counts, "base_val_acc": base["best_val_acc"],
            "cells": cells, "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def table(result: dict[str, Any]) -> str:
    counts = result["data"]
    lines = [
        f"# fine_tune from a base on digits 0-4 (val acc {result['base_val_acc']:.3f}) to 5-9, body at least {result['settings']['body_steps']} steps; "
        f"balanced: {counts['balanced']['train']} training images, imbalanced: {counts['imbalanced']['train']} ({RARE_KEPT} of {', '.join(RARE_DIGITS)}); "
        f"val: {counts['balanced']['val']} and {counts['imbalanced']['val']} images; seeds {','.join(map(str, result['settings']['seeds']))}",
        "| option | balanced: val acc | balanced: val balanced acc | imbalanced: val acc | imbalanced: val balanced acc | s per run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, by_target in result["cells"].items():
        balanced, imbalanced = by_target.get("balanced", {}), by_target.get("imbalanced", {})
        seconds = balanced.get("seconds", []) + imbalanced.get("seconds", [])
        cells = [mean_sd(target.get(key, [])) for target in (balanced, imbalanced) for key in ("acc", "balanced_acc")]
        lines.append(f"| {name} | {' | '.join(cells)} | {statistics.mean(seconds):.1f} |" if seconds else f"| {name} | {' | '.join(cells)} | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_print("kit", parse_args(argv), run_benchmark, table, argv)


if __name__ == "__main__":
    main()
