"""Multi-label quality on real images: each strategy's default beside the plain PyTorch loop, on digit composites.

    python scripts/multi_label.py [--seeds 0,1,2] [--work DIR] [--json] [--quick] [--split-seed 0]

The base is scripts/quality.py's: scikit-learn's handwritten digits 0-4 as 32x32 PNGs and a resnet18 trained
from scratch on them with `transferctl train` (weights: none). The target is multi-label, made of the
digits 5-9 (`sklearn.datasets.load_digits`, offline):

1. Each image is a 2x2 grid of 8x8 cells (16x16, upscaled to 32x32 as quality.py's digits): two cells, at
   random, hold two digit images drawn at random (the same digit twice is possible, and is one label), the
   other two are blank. Its labels are the digits it shows, in a label file (`labels.csv`: path,label,split
   with cells such as `5|7`) beside an `images/` folder. TRAIN_POOL images a digit feed the training
   composites (100 by default: each image once), the other ~140 a digit feed the validation ones (400:
   each image once before any is used again). All of it is fixed by --split-seed.
2. The base run is transferred with `transferctl train`, `weights: run:<base>` and `data.labels` set to
   the file (a multi-label run by itself: BCEWithLogitsLoss, early stopping on val_map), under each
   strategy at its DEFAULT schedule: feature_extract, feature_extract with `backbone.cut: layer3`,
   fine_tune and scratch, once per seed. As in quality.py the experiment file sets only image_size 32
   and augment none.
3. References on the same images and the same frozen base body, in fp32: the plain ten-line loop (a
   linear layer with BCEWithLogitsLoss on the frozen features, full batch, Adam lr 1e-2, 300 steps),
   scikit-learn's one-vs-rest LogisticRegressionCV (C from 17 values by 5-fold cross-validation on the
   training images, scored by average precision), each on the penultimate features and on layer3's,
   and the plain loop fine-tuning every layer from the base weights (BCE, Adam 1e-3, 30 epochs, batch 32).

Every row is the best epoch's validation mAP (scikit-learn's `average_precision_score`, macro over the
classes with a validation image, as `val_map`), mean ± sample sd over the seeds, except logistic
regression, fitted once with C chosen on the training images. The transferctl rows also give the val
micro-F1 that `transferctl evaluate --split val` reports at the thresholds each run tuned on val. Under
the table each default is set beside the plain loop it should reach. The table goes to stdout (--json:
the JSON, table on stderr).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo import transferctl  # noqa: E402
from quality import BASE_DIGITS, TARGET_DIGITS, Objective, base_network, benchmark_parser, experiment_files  # noqa: E402
from quality import Settings as QualitySettings  # noqa: E402
from quality import (  # noqa: E402
    finetune_loop, fit_quietly, frozen_features, ink_image, linear_loop, logistic_probe, mean_sd, parse_seeds, run_and_print, table_row, timed, train_base,
    write_digits,
)  # fmt: skip

STRATEGIES: dict[str, list[str]] = {
    "feature_extract": ["strategy=feature_extract"],
    "feature_extract, cut layer3": ["strategy=feature_extract", "backbone.cut=layer3"],
    "fine_tune": ["strategy=fine_tune"],
    "scratch": ["strategy=scratch"],
}
# The plain loop each default should reach: the same frozen body, or every layer trained.
LOOP_OF = {
    "feature_extract": "plain loop: linear head",
    "feature_extract, cut layer3": "plain loop: linear head, layer3",
    "fine_tune": "plain loop: fine-tune all layers",
    "scratch": "plain loop: fine-tune all layers",
}
CELL = 8  # load_digits' images are 8x8


@dataclass(frozen=True)
class Settings:
    """How much data and training: the full benchmark, or --quick's smoke version."""

    seeds: tuple[int, ...] = (0, 1, 2)
    train_pool: int = 40  # digit images a class kept for the training composites; the others feed val
    train_composites: int = 100
    val_composites: int = 400
    loop_steps: int = 300
    finetune_epochs: int = 30
    split_seed: int = 0
    base: QualitySettings = QualitySettings()  # the base set and its training (quality.py's)


QUICK = Settings(seeds=(0, 1), train_pool=4, train_composites=10, val_composites=20, loop_steps=20, finetune_epochs=2,
                 base=QualitySettings(seeds=(0, 1), base_per_class=12, base_epochs=1))  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "a few composites, a few epochs")
    parser.add_argument("--split-seed", type=int, default=0, help="which digit images make which composites, and the base's images (default 0)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    seeds = settings.seeds if args.seeds is None else parse_seeds(parser, args.seeds)
    base = QualitySettings(**{**asdict(settings.base), "split_seed": args.split_seed})
    args.settings = Settings(**{**asdict(settings), "seeds": seeds, "split_seed": args.split_seed, "base": base})
    return args


# --------------------------------------------------------------------------- data


def draw_pairs(pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` pairs of image indices from the pool, every image once before any is used a second time."""
    needed = 2 * count
    rounds = -(-needed // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(rounds)])[:needed].reshape(count, 2)


def composite(inks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two 8x8 digits in two random cells of a blank 2x2 grid (16x16 ink levels)."""
    grid = np.zeros((2 * CELL, 2 * CELL))
    for ink, cell in zip(inks, rng.choice(4, size=len(inks), replace=False)):
        row, col = divmod(int(cell), 2)
        grid[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL] = ink
    return grid


def write_composites(root: Path, settings: Settings) -> Path:
    """The multi-label target: images/ of 32x32 composites of the digits 5-9, and labels.csv (path,label,split)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(settings.split_seed)
    pools: dict[str, list[int]] = {"train": [], "val": []}
    for digit in TARGET_DIGITS:  # training and validation composites draw from disjoint images
        indices = rng.permutation(np.flatnonzero(digits.target == digit))
        pools["train"] += indices[: settings.train_pool].tolist()
        pools["val"] += indices[settings.train_pool :].tolist()
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, count in (("train", settings.train_composites), ("val", settings.val_composites)):
        for number, pair in enumerate(draw_pairs(np.array(pools[split]), count, rng)):
            path = f"images/{split}-{number:04d}.png"
            ink_image(composite(digits.images[pair], rng)).save(root / path)
            rows.append((path, "|".join(sorted({str(digits.target[index]) for index in pair})), split))
    labels = root / "labels.csv"
    with labels.open("w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows([("path", "label", "split"), *rows])
    return labels


def load_composites(labels: Path, transform: Any) -> dict[str, Any]:
    """The label file's images through the base's transform, with multi-hot targets (classes sorted by name)."""
    import torch
    from PIL import Image

    with labels.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    classes = sorted({name for row in rows for name in row["label"].split("|")})
    data: dict[str, Any] = {}
    for split in ("train", "val"):
        chosen = [row for row in rows if row["split"] == split]
        data[split] = torch.stack([transform(Image.open(labels.parent / row["path"]).convert("RGB")) for row in chosen])
        data[f"{split}_y"] = torch.tensor([[float(name in row["label"].split("|")) for name in classes] for row in chosen])
    return data


# --------------------------------------------------------------------------- the plain-PyTorch references


def mean_average_precision(scores: Any, targets: Any) -> float:
    """scikit-learn's macro average precision over the classes with a positive image (as transferctl's val_map)."""
    from sklearn.metrics import average_precision_score

    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    present = targets.sum(axis=0) > 0
    return float(average_precision_score(targets[:, present], scores[:, present], average="macro"))


def binary_cross_entropy(logits: Any, targets: Any) -> Any:
    import torch

    return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)


MULTI_LABEL = Objective(loss=binary_cross_entropy, score=lambda logits, targets: mean_average_precision(logits.detach(), targets), outputs=lambda targets: targets.shape[1])


def logistic_ovr(train: Any, train_y: Any, val: Any, val_y: Any, seed: int) -> float:
    """One LogisticRegressionCV a class (one-vs-rest), C chosen by average precision on folds of the training images."""
    from sklearn.multiclass import OneVsRestClassifier

    counts = np.asarray(train_y).sum(axis=0)
    folds = min(5, int(min(counts.min(), len(train_y) - counts.max())))  # each fold needs a positive and a negative
    probe = fit_quietly(OneVsRestClassifier(logistic_probe(folds, seed, "average_precision")), train, train_y)
    return mean_average_precision(probe.decision_function(np.asarray(val)), val_y)


def reference_rows(base_run: Path, labels: Path, settings: Settings) -> dict[str, dict[str, list[float]]]:
    """Every reference, every seed (the frozen features once: they do not depend on the seed)."""
    model, transform = base_network(base_run)
    images = load_composites(labels, transform)
    rows: dict[str, dict[str, list[float]]] = {}
    for depth, label in (("penultimate", ""), ("layer3", ", layer3")):
        train, val = frozen_features(model, images["train"], depth), frozen_features(model, images["val"], depth)
        features = (train, images["train_y"], val, images["val_y"])
        rows[f"plain loop: linear head{label}"] = timed(lambda seed: linear_loop(*features, seed, settings.loop_steps, objective=MULTI_LABEL), settings.seeds, "maps")
        rows[f"LogisticRegressionCV one-vs-rest{label}"] = timed(lambda seed: logistic_ovr(*features, seed), settings.seeds, "maps")
    rows["plain loop: fine-tune all layers"] = timed(
        lambda seed: finetune_loop(base_run, images, seed, settings.finetune_epochs, objective=MULTI_LABEL), settings.seeds, "maps"
    )
    return rows


# --------------------------------------------------------------------------- the table


def against_loop(default: list[float], loop: list[float]) -> str:
    """A default beside its plain loop: above, within noise (the two spreads combined) or below, in points of mAP."""
    (default_mean, default_sd), (loop_mean, loop_sd) = mean_sd(default), mean_sd(loop)
    gap, noise = 100 * (default_mean - loop_mean), 100 * (default_sd**2 + loop_sd**2) ** 0.5
    word = "above" if gap > noise else "within noise of" if gap >= -noise else "BELOW"
    return f"{word} the loop: {gap:+.1f} points (noise {noise:.1f})"


def table(result: dict[str, Any]) -> str:
    data = result["data"]
    lines = [
        f"# digits {BASE_DIGITS[0]}-{BASE_DIGITS[-1]} -> multi-label composites of {TARGET_DIGITS[0]}-{TARGET_DIGITS[-1]}: "
        f"{data['train']} training, {data['val']} val composites; base resnet18 val acc {result['base']['best_val_acc']:.3f}; "
        f"seeds {','.join(map(str, result['settings']['seeds']))}",
        "| row | best val mAP (mean ± sd) | per seed | val micro-F1 at the run's tuned thresholds | s per run |",
        "| --- | --- | --- | --- | --- |",
    ]
    rows = {row["name"]: row for row in result["rows"]}
    for row in result["rows"]:
        name = f"transferctl {row['name']}" if row["kind"] == "transferctl" else row["name"]
        micro_f1 = "{:.3f} ± {:.3f}".format(*mean_sd(row["micro_f1"])) if row.get("micro_f1") else "-"
        lines.append(table_row(name, row["maps"], row["seconds"], (micro_f1,)))
    lines.append("")
    for name, loop in LOOP_OF.items():
        if name in rows and loop in rows:
            lines.append(f"- transferctl {name} vs {loop}: {against_loop(rows[name]['maps'], rows[loop]['maps'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver


def run_benchmark(work: Path, settings: Settings, say: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    # Features the head-only runs cache stay in the work folder, out of the user's cache.
    os.environ["TRANSFERCTL_CACHE"] = str(work / "cache")
    base_data, _ = write_digits(work / "data", settings.base, BASE_DIGITS)
    labels = write_composites(work / "data" / "multi_label", settings)
    base_yaml, target_yaml = experiment_files(work, base_data, labels.parent, settings.base)
    base = train_base(base_yaml, settings.base, say)
    weights = f"run:{base['run_dir']}"
    trained: dict[str, dict[str, list[float]]] = {name: {"maps": [], "micro_f1": [], "seconds": []} for name in STRATEGIES}
    for seed in settings.seeds:
        for name, overrides in STRATEGIES.items():  # interleaved: a slow spell of the machine hits every row alike
            sets = [arg for override in (*overrides, f"seed={seed}", f"backbone.weights={weights}", f"data.labels={labels}") for arg in ("--set", override)]
            summary = transferctl("train", str(target_yaml), *sets, "--quiet")
            trained[name]["maps"].append(summary["best_val_map"])
            trained[name]["seconds"].append(summary["seconds"])
            # evaluate scores val at the thresholds the run tuned there (flattering, as docs/experiment-file.md says).
            trained[name]["micro_f1"].append(transferctl("evaluate", summary["run_dir"], "--split", "val")["micro_f1"])
            say(f"seed {seed} {name}: best val mAP {summary['best_val_map']:.3f}, micro-F1 {trained[name]['micro_f1'][-1]:.3f}, in {summary['seconds']:.0f} s")
    say("references: the plain loops and logistic regression on the same frozen body")
    references = reference_rows(Path(base["run_dir"]), labels, settings)
    splits = [line.rsplit(",", 1)[-1] for line in labels.read_text(encoding="utf-8").splitlines()[1:]]
    return {
        "settings": {**asdict(settings), "base": asdict(settings.base)},
        "data": {"train": splits.count("train"), "val": splits.count("val"), "labels": str(labels)},
        "base": {"best_val_acc": base["best_val_acc"], "seconds": base["seconds"]},
        "rows": [{"name": name, "kind": "transferctl", **row} for name, row in trained.items()]
        + [{"name": name, "kind": "reference", **row} for name, row in references.items()],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_print("multi_label", parse_args(argv), run_benchmark, table, argv)


if __name__ == "__main__":
    main()
