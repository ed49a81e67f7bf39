"""On a CUDA GPU: bf16 (fp16 with loss scaling where bf16 is absent), fp16 asked for, and torch.compile, in
real training runs; evaluate and predict on the GPU against the CPU; a resume from an epoch held in memory
(its optimizer state copied to the CPU) into the fused CUDA step. Skipped without a GPU; `bash
scripts/gpu_check.sh` runs them on a lent one. The same code paths have CPU tests in test_engine.py,
test_resume.py and test_train.py."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from helpers import experiment
from transferctl.config import config_from_dict
from transferctl.training.runtime import make_runtime
from transferctl.errors import TrainingInterrupted
from transferctl.training.resume import resume
from transferctl.runs.rundir import RunDir
from transferctl.training.train import train
from transferctl.training.observers import SilentObserver

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def train_on_gpu(data: Path, runs: Path, **sections: object) -> dict:
    return train(config_from_dict(experiment(data, runs, device="cuda", **sections)))


def test_auto_precision_on_this_gpu() -> None:
    runtime = make_runtime("cuda", "auto", torchvision.models.resnet18(num_classes=3))
    assert runtime.precision == ("bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16") and runtime.channels_last


def test_auto_precision_learns_the_tiny_colours(tiny_split_data: Path, tmp_path: Path) -> None:
    schedule = [{"name": "all", "epochs": 6, "train": "all", "lr": 1e-3}]
    summary = train_on_gpu(tiny_split_data, tmp_path / "runs", precision="auto", strategy="scratch", schedule=schedule)
    assert summary["best_val_acc"] == pytest.approx(1.0)


def test_fp16_trains_with_loss_scaling_and_keeps_the_scaler(tiny_split_data: Path, tmp_path: Path) -> None:
    summary = train_on_gpu(tiny_split_data, tmp_path / "runs", precision="fp16")
    rows = RunDir(Path(summary["run_dir"])).metrics()
    assert all(math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"]) for row in rows)
    scaler = torch.load(summary["checkpoints"]["last"], weights_only=True)["scaler"]
    assert scaler is not None and 0 < scaler["scale"] <= 2.0**16


def test_compile_trains_as_without_it(tiny_split_data: Path, tmp_path: Path) -> None:
    plain = train_on_gpu(tiny_split_data, tmp_path / "plain", precision="fp32")
    compiled = train_on_gpu(tiny_split_data, tmp_path / "compiled", precision="fp32", compile=True)
    for mine, theirs in zip(RunDir(Path(compiled["run_dir"])).metrics(), RunDir(Path(plain["run_dir"])).metrics(), strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-2)  # kernels may sum in another order
    weights = torch.load(compiled["checkpoints"]["last"], weights_only=True)["model"]
    assert weights.keys() == torch.load(plain["checkpoints"]["last"], weights_only=True)["model"].keys()


def test_evaluate_and_predict_on_the_gpu_agree_with_the_cpu(tiny_split_data: Path, tmp_path: Path) -> None:
    from transferctl.inference.evaluate import evaluate_run
    from transferctl.inference.predict import load_predictor

    run = Path(train_on_gpu(tiny_split_data, tmp_path / "runs", precision="auto")["run_dir"])
    on_gpu, on_cpu = (evaluate_run(run, "last", device=device, precision="fp32").report for device in ("cuda", "cpu"))
    assert on_gpu["accuracy"] == pytest.approx(on_cpu["accuracy"]) and on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=1e-3)
    paths = sorted(str(path) for path in (tiny_split_data / "val").rglob("*.png"))
    gpu_records, cpu_records = (list(load_predictor(run, "last", device, "fp32", 3).predict(paths, 4)) for device in ("cuda", "cpu"))
    assert [r["label"] for r in gpu_records] == [r["label"] for r in cpu_records]
    for mine, theirs in zip(gpu_records, cpu_records):
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-3)


class StopAfterSecondEpoch(SilentObserver):
    def epoch_done(self, row: dict[str, Any]) -> None:
        if row["global_epoch"] == 2:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_run_stopped_in_an_epoch_held_in_memory_resumes_on_the_gpu(tiny_split_data: Path, tmp_path: Path, heeded_sigint: None) -> None:
    # Held epochs are copied to the CPU (checkpoint_timing.py); the fused CUDA step must get its state back on the GPU.
    schedule = [{"name": "all", "epochs": 4, "train": "all", "lr": 1e-3}]
    raw = experiment(tiny_split_data, tmp_path / "runs", device="cuda", precision="fp32", strategy="scratch", schedule=schedule, output={"checkpoint_seconds": 3600})
    train(config_from_dict(raw), tmp_path / "whole")
    with pytest.raises(TrainingInterrupted):
        train(config_from_dict(raw), tmp_path / "cut", StopAfterSecondEpoch())
    held = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert held["global_epoch"] == 2 and all(t.device.type == "cpu" for s in held["optimizer"]["state"].values() for t in s.values())

    resume(tmp_path / "cut")

    resumed, whole = RunDir(tmp_path / "cut").metrics(), RunDir(tmp_path / "whole").metrics()
    assert [r["global_epoch"] for r in resumed] == [1, 2, 3, 4]
    for mine, theirs in zip(resumed, whole, strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-2)  # cuDNN may sum in another order
