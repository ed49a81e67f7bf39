"""Test-time augmentation on trained runs: plain, `--tta flip`, and five crops, on each run's validation images.

    python scripts/bench_tta.py RUN_DIR [RUN_DIR ...] [--json]

Five crops are the centre and the four corner crops of the resized image (torchvision's FiveCrop), their
softmax probabilities averaged: the multi-crop evaluation that `--tta` would offer if it paid. It is
measured here, not offered, because on scikit-learn's digits (scripts/quality.py's runs) it did not: the
numbers are in docs/commands.md (Test-time augmentation). Nothing is written into the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

MODES = ("plain", "flip", "five_crops")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories written by `transferctl train`")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document on stdout")
    return parser.parse_args(argv)


def accuracies(run_dir: Path) -> dict[str, float]:
    """Each mode's accuracy on the run's validation split, with its best checkpoint, on the CPU in fp32."""
    import torch
    from torchvision import transforms as T

    from transferctl.data.folders import ImageDataset, discover, make_loader
    from transferctl.inference.trained_model import eval_transform, inference_runtime, load_trained_model
    from transferctl.inference.tta import averaged_probabilities, view_logits
    from transferctl.runs.listing import read_run_config
    from transferctl.training.runtime import predict_logits

    config = read_run_config(run_dir)
    model, classes, pre = load_trained_model(run_dir)
    splits = discover(config.data.root, config.data.val_fraction, config.seed, config.data.on_bad_image)
    assert splits.classes == classes, f"{run_dir}: its data's classes changed"
    model, runtime = inference_runtime(model, "cpu", "fp32")
    plain_loader = make_loader(ImageDataset(splits.val, eval_transform(pre)), 64, False, 0, 0, False)
    views, labels = view_logits(model, plain_loader, runtime, "flip")
    interpolation = T.InterpolationMode(pre.interpolation)
    crops = T.Compose([
        T.Resize(pre.resize, interpolation=interpolation, antialias=True), T.ToTensor(), T.Normalize(pre.mean, pre.std),
        T.FiveCrop(pre.crop), lambda five: torch.stack(five),
    ])  # fmt: skip
    crop_loader = make_loader(ImageDataset(splits.val, crops), 64, False, 0, 0, False)
    flat = ((images.flatten(0, 1), labels) for images, labels in crop_loader)  # (B, 5, C, H, W) -> (5B, C, H, W)
    crop_logits, _ = predict_logits(model, flat, runtime)
    five = crop_logits.reshape(len(labels), 5, -1).softmax(-1).mean(1)
    predicted = {"plain": views[0].argmax(1), "flip": averaged_probabilities(views).argmax(1), "five_crops": five.argmax(1)}
    return {mode: float((predicted[mode] == labels).float().mean()) for mode in MODES}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = {str(run): accuracies(run) for run in args.runs}
    means = {mode: statistics.mean(row[mode] for row in rows.values()) for mode in MODES}
    result = {"runs": rows, "mean": means}
    lines = [f"{'run':<50} " + " ".join(f"{mode:>10}" for mode in MODES)]
    lines += [f"{Path(run).name:<50} " + " ".join(f"{row[mode]:>10.4f}" for mode in MODES) for run, row in rows.items()]
    lines.append(f"{'mean':<50} " + " ".join(f"{means[mode]:>10.4f}" for mode in MODES))
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
