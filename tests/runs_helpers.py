"""Run directories for the evaluate, predict and runs tests: one real tiny run, and copies of it whose
predictions are known exactly because their head ignores the image."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import experiment, write_experiment
from transferctl.testing.synthetic import tiny_dataset

ONE_EPOCH = [{"name": "head", "epochs": 1, "train": "head", "lr": 1.0e-2}]  # for tests that need any trained run


def train_tiny_run(base: Path, **sections: object) -> Path:
    """Train the tiny 3-class experiment (red, green, blue; 4/1/1 images per class) into base/run."""
    from transferctl.config import load_config
    from transferctl.training.train import train

    data = tiny_dataset(base / "data", n_classes=3, layout="split", test=True)
    config = write_experiment(base / "experiment.yaml", experiment(data, base / "runs", **sections))
    train(load_config(config), base / "run")
    return base / "run"


def constant_run(source: Path, dest: Path, classes: list[str], logits: list[float]) -> Path:
    """A copy of a run whose best checkpoint outputs `logits` for every image.

    The head is rebuilt for len(classes) outputs with zero weights and `logits` as its bias, so the
    output is exactly the bias whatever the features are: every metric can be computed by hand.
    """
    import torch

    shutil.copytree(source, dest)
    path = dest / "checkpoints" / "best.pt"
    checkpoint = torch.load(path, weights_only=True)
    head = checkpoint["backbone"]["head"]
    features = checkpoint["model"][f"{head}.weight"].shape[1]
    checkpoint["model"][f"{head}.weight"] = torch.zeros(len(classes), features)
    checkpoint["model"][f"{head}.bias"] = torch.tensor(logits, dtype=torch.float32)
    checkpoint["classes"] = list(classes)
    torch.save(checkpoint, path)
    return dest
