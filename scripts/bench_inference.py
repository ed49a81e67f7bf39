"""Inference speed of `precision: auto` against fp32, in the same run: the model alone, and `predict` end to end.

    python scripts/bench_inference.py [--images 256] [--rounds 5] [--batch 32]

The model alone: resnet18 forward passes on a fixed 224 px batch (no data loading), as the performance
issue's table measured them: fp32 in the default layout (the usual tutorial loop), fp32 channels-last,
and transferctl's inference runtime under `precision: auto` (runtime.make_runtime + prepare_model with
training=False: channels-last, bf16 autocast where the CPU has bf16 units). Then `predict` end to end:
transferctl's Predictor on --images generated 320 px PNGs (decoding included) with `--precision fp32`
(predict's default) and `--precision auto`. Settings alternate for --rounds rounds; each prints its
median images/s and its ratio to fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="PNGs for the end-to-end predict rows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="forward passes per round for the model-alone rows")
    return parser.parse_args(argv)


def interleaved(settings: dict[str, Callable[[], float]], rounds: int, unit: str = "img/s") -> dict[str, list[float]]:
    """The speed (in unit) of every setting, each round running them all in turn (so drifting speed hits all alike)."""
    speeds: dict[str, list[float]] = {name: [] for name in settings}
    for measure in settings.values():
        measure()  # warm-up: oneDNN picks and caches its kernels on the first pass
    for _ in range(rounds):
        for name, measure in settings.items():
            speeds[name].append(measure())
            print(f"{name}: {speeds[name][-1]:.1f} {unit}", file=sys.stderr)
    return speeds


def forward_speed(model: Any, runtime: Any, batch: Any, steps: int) -> Callable[[], float]:
    import torch

    from transferctl.training.runtime import to_device

    images, _ = to_device(batch, torch.zeros(0, dtype=torch.long), runtime)

    @torch.no_grad()
    def measure() -> float:
        started = time.perf_counter()
        for _ in range(steps):
            with runtime.autocast():
                model(images)
        return steps * len(images) / (time.perf_counter() - started)

    return measure


def predict_speed(predictor: Any, paths: list[str], batch: int) -> Callable[[], float]:
    def measure() -> float:
        started = time.perf_counter()
        count = sum(1 for _ in predictor.predict(paths, batch))
        return count / (time.perf_counter() - started)

    return measure


def model_settings(args: argparse.Namespace) -> dict[str, Callable[[], float]]:
    import torch
    import torchvision

    from transferctl.training.runtime import Runtime, make_runtime, prepare_model

    batch = torch.randn(args.batch, 3, 224, 224)
    settings = {}
    for name, runtime in (
        ("fp32, default layout", Runtime(torch.device("cpu"), "fp32", channels_last=False)),
        ("fp32, channels-last", Runtime(torch.device("cpu"), "fp32", channels_last=True)),
        ("precision auto", None),
    ):
        model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
        runtime = runtime or make_runtime("cpu", "auto", model)
        label = f"{name} ({runtime.precision}, channels-last)" if name == "precision auto" else name
        settings[label] = forward_speed(prepare_model(model, runtime, training=False), runtime, batch, args.steps)
    return settings


def predict_settings(args: argparse.Namespace, work: Path) -> dict[str, Callable[[], float]]:
    import torchvision

    from transferctl.data.preprocessing import Preprocessing
    from transferctl.training.runtime import make_runtime, prepare_model
    from transferctl.inference.trained_model import eval_transform
    from transferctl.inference.predict import Predictor
    from transferctl.testing.synthetic import SOURCE_CLASSES, write_image_folder

    root = write_image_folder(work / "images", SOURCE_CLASSES, max(1, args.images // len(SOURCE_CLASSES)), 320, seed=0, layout="flat")
    paths = sorted(str(p) for p in root.rglob("*.png"))
    transform = eval_transform(Preprocessing(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    settings = {}
    for precision in ("fp32", "auto"):
        model = torchvision.models.resnet18(weights=None, num_classes=len(SOURCE_CLASSES)).eval()
        runtime = make_runtime("cpu", precision, model)
        predictor = Predictor(prepare_model(model, runtime, training=False), list(SOURCE_CLASSES), transform, runtime)
        settings[f"--precision {precision} ({runtime.precision})"] = predict_speed(predictor, paths, args.batch)
    return settings


def table(what: str, speeds: dict[str, list[float]], unit: str = "images/s") -> str:
    """A markdown table; the first setting is the reference of the ratios."""
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    reference = next(iter(medians.values()))
    lines = [f"| {what} | {unit} (median) | per round | ratio |", "| --- | --- | --- | --- |"]
    for name, median in medians.items():
        lines.append(f"| {name} | {median:.1f} | {', '.join(f'{v:.1f}' for v in speeds[name])} | {median / reference:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = interleaved(model_settings(args), args.rounds)
    from bench import scratch_folder  # beside this script: run it as scripts/bench_inference.py

    with scratch_folder("transferctl-bench-inference-") as work:
        predict = interleaved(predict_settings(args, work), args.rounds)
    print(f"# resnet18, 224 px, batch {args.batch}, {args.rounds} interleaved rounds")
    print(table("model alone", model))
    print(f"\n# predict end to end: {args.images} PNGs of 320 px, decoded ahead on the default threads")
    print(table("predict", predict))


if __name__ == "__main__":
    main()
