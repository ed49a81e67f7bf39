"""TensorBoard logs: the fan-out observer, per-group learning rates, the missing-package error, and (when
the tensorboard package is installed) the scalars a real tiny run writes and evaluate's confusion image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from helpers import experiment, multi_label_run, write_experiment
from transferctl.cli import app
from transferctl.training.observers import FanOutObserver
from transferctl.training.phases import PhasePlan
from transferctl.training.tensorboard import group_learning_rates

runner = CliRunner()
BODY = PhasePlan(1, "body", 2, 1.0e-2, 0.1, "train", ("layer3", "layer4", "head"), ("stem", "layer1", "layer2"))


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def notice(self, message: str) -> None:
        self.calls.append(("notice", message))

    def run_started(self, run_dir: Path) -> None:
        self.calls.append(("run_started", run_dir))

    def phase_started(self, plan: PhasePlan, batches_per_epoch: int) -> None:
        self.calls.append(("phase_started", plan.name))

    def batch_done(self, index: int, count: int, running_loss: float) -> None:
        self.calls.append(("batch_done", index))

    def epoch_done(self, row: dict[str, Any]) -> None:
        self.calls.append(("epoch_done", row["epoch"]))


def test_fan_out_passes_every_event_to_each_observer_in_order() -> None:
    first, second = Recorder(), Recorder()
    fan = FanOutObserver(first, second)
    fan.notice("hi")
    fan.run_started(Path("run"))
    fan.phase_started(BODY, 3)
    fan.batch_done(0, 3, 1.0)
    fan.epoch_done({"epoch": 1})
    expected = [("notice", "hi"), ("run_started", Path("run")), ("phase_started", "body"), ("batch_done", 0), ("epoch_done", 1)]
    assert first.calls == expected and second.calls == expected


def test_learning_rate_of_every_trained_group() -> None:
    lrs = group_learning_rates(BODY, {"lr_head": 5.0e-3, "lr_backbone": 5.0e-4})
    assert lrs == {"layer3": pytest.approx(5.0e-4), "layer4": pytest.approx(5.0e-4), "head": 5.0e-3}
    assert group_learning_rates(None, {"lr_head": 1.0}) == {}


def tensorboard_experiment(data: Path, tmp_path: Path) -> Path:
    raw = experiment(data, tmp_path / "runs", logging={"tensorboard": True})
    return write_experiment(tmp_path / "e.yaml", raw)


def test_missing_package_is_one_line_naming_the_extra(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("transferctl.training.tensorboard.tensorboard_available", lambda: False)
    config = tensorboard_experiment(tiny_split_data, tmp_path)
    result = runner.invoke(app, ["train", str(config), "--quiet"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "logging.tensorboard" in lines[0] and "pip install transferctl[tensorboard]" in lines[0]
    assert not (tmp_path / "runs").exists()  # refused before any run directory was made


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_training_writes_epoch_scalars_and_evaluate_adds_the_confusion_matrix(tiny_split_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install transferctl[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tensorboard_experiment(tiny_split_data, tmp_path)
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(config), "--run-dir", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    found = scalars(run / "tensorboard")
    for tag in ("loss/train", "loss/val", "accuracy/train", "accuracy/val", "speed/images_per_second", "speed/data_seconds"):
        assert [step for step, _ in found[tag]] == [1, 2], tag
    for tag in ("balanced_accuracy/val", "macro_f1/val"):  # the newer columns of every row, too
        assert [step for step, _ in found[tag]] == [1, 2], tag
    assert [step for step, _ in found["lr/head"]] == [2]  # phase 1's head is solved: no learning rate
    # phase 1 trains the head only; phase 2 every group, the body at lr x 0.1
    assert [step for step, _ in found["lr/layer4"]] == [2]
    assert found["lr/layer4"][0][1] == pytest.approx(found["lr/head"][0][1] * 0.1)
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 2

    evaluated = runner.invoke(app, ["evaluate", str(run), "--split", "val", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "eval/val/confusion_matrix" in events.Tags()["images"]
    image = events.Images("eval/val/confusion_matrix")[-1]
    assert image.step == 2 and image.width > 100 and image.height > 100
    assert "eval/val/accuracy" in events.Tags()["scalars"]
    assert runner.invoke(app, ["evaluate", str(run), "--split", "val", "--device", "cpu", "--checkpoint", "last"]).exit_code == 0
    events.Reload()
    assert {"eval/val/accuracy", "eval/val-last/accuracy"} <= set(events.Tags()["scalars"])  # named as the report's file


def test_resume_may_switch_logs_on_and_accepts_runs_from_before_the_logging_section(tmp_path: Path) -> None:
    from transferctl.config import config_from_dict, config_to_dict
    from transferctl.training.resume import incompatibilities
    from transferctl.training.tensorboard import run_wants_tensorboard

    now = config_to_dict(config_from_dict({"data": {"root": "d"}, "logging": {"tensorboard": True}}))
    before = {key: value for key, value in now.items() if key != "logging"}
    assert incompatibilities(before, now, 1, "config.yaml") == []
    write_experiment(tmp_path / "config.yaml", before)
    assert not run_wants_tensorboard(tmp_path)
    assert run_wants_tensorboard(tmp_path, ["logging.tensorboard=true"])
    assert not run_wants_tensorboard(tmp_path / "nowhere")


def test_compare_refuses_too_when_the_package_is_missing(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("transferctl.training.tensorboard.tensorboard_available", lambda: False)
    config = tensorboard_experiment(tiny_split_data, tmp_path)
    result = runner.invoke(app, ["compare", str(config), "--strategies", "scratch,fine_tune", "--seeds", "1", "--out", str(tmp_path / "cmp"), "-q"])
    assert result.exit_code == 1 and "pip install transferctl[tensorboard]" in result.stderr


def test_every_number_of_a_row_is_a_scalar_named_by_metric_and_split(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install transferctl[tensorboard])")
    from transferctl.training.tensorboard import TensorBoardObserver

    row = {"phase": "body", "phase_index": 1, "epoch": 1, "global_epoch": 3, "lr_head": 0.01, "lr_backbone": 0.001, "improved": True,
           "train_loss": 0.9, "val_loss": 0.8, "val_acc": 0.7, "val_balanced_acc": 0.6, "val_macro_f1": 0.5, "ema_val_loss": 0.75,
           "ema_val_acc": 0.72, "ema_val_balanced_acc": 0.62, "ema_val_macro_f1": 0.52, "seconds": 2.0, "head_weight_decay": 0.0001}  # fmt: skip
    board = TensorBoardObserver()
    board.run_started(tmp_path)
    board.phase_started(BODY, 1)
    board.epoch_done(row)
    board.close()
    expected = {
        "loss/train": 0.9, "loss/val": 0.8, "accuracy/val": 0.7, "balanced_accuracy/val": 0.6, "macro_f1/val": 0.5,
        "loss/ema_val": 0.75, "accuracy/ema_val": 0.72, "balanced_accuracy/ema_val": 0.62, "macro_f1/ema_val": 0.52,
        "speed/seconds": 2.0, "epoch/head_weight_decay": 0.0001, "lr/head": 0.01, "lr/layer3": 0.001, "lr/layer4": 0.001,
    }  # fmt: skip
    found = scalars(tmp_path / "tensorboard")
    assert set(found) == set(expected)  # no flags, no text, no step or schedule position
    assert found == {tag: [(3, pytest.approx(value))] for tag, value in expected.items()}


def test_one_observer_logs_each_run_into_its_own_directory(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install transferctl[tensorboard])")
    from transferctl.training.tensorboard import TensorBoardObserver

    board = TensorBoardObserver()
    for index, run in enumerate((tmp_path / "a", tmp_path / "b")):
        board.run_started(run)
        board.phase_started(BODY, 1)
        board.epoch_done({"global_epoch": 1, "val_acc": 0.5 + index, "lr_head": 0.01})
    board.close()
    assert scalars(tmp_path / "a" / "tensorboard")["accuracy/val"] == [(1, 0.5)]
    assert scalars(tmp_path / "b" / "tensorboard")["accuracy/val"] == [(1, 1.5)]


def test_a_multi_label_evaluation_logs_its_precision_recall_curves_and_map(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install transferctl[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = multi_label_run(tmp_path, logging={"tensorboard": True})
    evaluated = CliRunner().invoke(app, ["evaluate", str(run), "--split", "val", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["eval/val/pr_curves"]
    assert {"eval/val/map", "eval/val/micro_f1", "eval/val/subset_accuracy", "eval/val/accuracy"} <= set(events.Tags()["scalars"])
