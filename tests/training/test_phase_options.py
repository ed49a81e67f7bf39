"""Phase options: gradual unfreezing (unfreeze_every), layer-wise lr decay, until_plateau, bn, and how
`check` shows them; a run that unfreezes gradually resumes exactly, mid-step or at a step boundary."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from helpers import experiment, write_experiment
from transferctl.training import train as train_module
from transferctl.cli import app
from transferctl.cli import err as cli_err
from transferctl.config import config_from_dict
from transferctl.training.engine import EpochStats
from transferctl.errors import ConfigError, TrainingInterrupted
from transferctl.training.phases import PhasePlan, group_lrs, plan_phases, stages_of
from transferctl.training.resume import resume
from transferctl.training.train import train
from transferctl.training.observers import SilentObserver

GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def phase_plan(**options: Any) -> PhasePlan:
    raw = {"data": {"root": "d"}, "schedule": [{"name": "p", "epochs": 7, "train": "all", "lr": 1.0, **options}]}
    return plan_phases(config_from_dict(raw), GROUPS)[0]


def test_layer_decay_scales_each_group_by_its_distance_from_the_head() -> None:
    lrs = group_lrs(phase_plan(layer_decay=0.5, backbone_lr_mult=0.1), GROUPS)
    assert lrs["head"] == 1.0
    assert lrs["layer4"] == pytest.approx(0.1 * 0.5)
    assert lrs["layer3"] == pytest.approx(0.1 * 0.25)
    assert lrs["stem"] == pytest.approx(0.1 * 0.5**5)


def test_without_layer_decay_the_body_shares_one_rate() -> None:
    lrs = group_lrs(phase_plan(backbone_lr_mult=0.1), GROUPS)
    assert len({lrs[g] for g in GROUPS[:-1]}) == 1 and lrs["stem"] == pytest.approx(0.1)


def test_gradual_unfreezing_adds_one_group_from_the_top_every_k_epochs() -> None:
    stages = stages_of(phase_plan(unfreeze_every=2), GROUPS)
    assert [(s.first_epoch, s.last_epoch) for s in stages] == [(1, 2), (3, 4), (5, 6), (7, 7)]
    assert [s.plan.trainable for s in stages] == [
        ("head",), ("layer4", "head"), ("layer3", "layer4", "head"), ("layer2", "layer3", "layer4", "head")
    ]
    assert stages[1].plan.frozen == ("stem", "layer1", "layer2", "layer3")


def test_gradual_unfreezing_stops_at_the_named_groups_and_the_last_step_runs_on() -> None:
    plan = plan_phases(
        config_from_dict({"data": {"root": "d"}, "schedule": [{"name": "p", "epochs": 9, "train": "last:2", "lr": 1.0, "unfreeze_every": 1}]}), GROUPS
    )[0]
    stages = stages_of(plan, GROUPS)
    assert [s.plan.trainable for s in stages] == [("head",), ("layer4", "head"), ("layer3", "layer4", "head")]
    assert (stages[-1].first_epoch, stages[-1].last_epoch) == (3, 9)


def test_until_plateau_is_the_phase_patience() -> None:
    assert phase_plan(until_plateau={"patience": 2}).patience == 2
    assert phase_plan().patience is None


@pytest.mark.parametrize("bad", [{"layer_decay": 0}, {"layer_decay": 1.5}, {"unfreeze_every": 0}, {"until_plateau": {"patience": 0}}, {"until_plateau": {}}])
def test_bad_phase_options_are_config_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"schedule\[0\]"):
        phase_plan(**bad)


class Recorder(SilentObserver):
    def __init__(self, stop_after: int | None = None) -> None:
        self.notices: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.stop_after = stop_after

    def notice(self, message: str) -> None:
        self.notices.append(message)

    def epoch_done(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.stop_after is not None and len(self.rows) == self.stop_after:
            os.kill(os.getpid(), signal.SIGINT)  # caught by the trainer: it stops before the next epoch


GRADUAL = [{"name": "gradual", "epochs": 4, "train": "last:2", "lr": 1.0e-2, "unfreeze_every": 2, "layer_decay": 0.5}]


def test_a_gradual_phase_trains_what_each_step_says(tiny_split_data: Path, tmp_path: Path) -> None:
    config = config_from_dict(experiment(tiny_split_data, tmp_path / "runs", schedule=GRADUAL))
    recorder = Recorder()
    summary = train(config, tmp_path / "run", recorder)
    assert summary["epochs"] == 4
    assert [n for n in recorder.notices if ": training " in n] == ["phase 'gradual' epoch 1: training head", "phase 'gradual' epoch 3: training layer4, head"]
    assert [row["lr_backbone"] for row in recorder.rows][:2] == [None, None]
    assert recorder.rows[2]["lr_backbone"] == pytest.approx(1.0e-2 * 0.5)
    best = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    first = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert torch.equal(best["layer3.0.conv1.weight"], first["layer3.0.conv1.weight"])  # last:2 stops at layer4


@pytest.mark.parametrize("stop_after", [2, 3])  # at a step boundary, and in the middle of the second step
def test_a_gradual_phase_resumes_exactly(tiny_split_data: Path, tmp_path: Path, stop_after: int, heeded_sigint: None) -> None:
    torch.set_num_threads(1)
    config = config_from_dict(experiment(tiny_split_data, tmp_path / "runs", schedule=GRADUAL))
    whole = Recorder()
    train(config, tmp_path / "whole", whole)
    with pytest.raises(TrainingInterrupted):
        train(config, tmp_path / "cut", Recorder(stop_after=stop_after))
    rest = Recorder()
    resume(tmp_path / "cut", observer=rest)
    assert len(rest.rows) == 4 - stop_after
    for want, got in zip(whole.rows[stop_after:], rest.rows):
        assert (got["epoch"], got["lr_head"], got["lr_backbone"]) == (want["epoch"], want["lr_head"], want["lr_backbone"])
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)


def test_until_plateau_overrides_early_stopping_patience(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Validation never improves: a phase with until_plateau {patience: 1} ends after its second epoch,
    # the next phase runs its full length (early_stopping.patience stays null).
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: EpochStats(1.0, 0.5, 6, 0.01))
    schedule = [
        {"name": "head", "epochs": 5, "train": "head", "lr": 1.0e-2, "until_plateau": {"patience": 1}},
        {"name": "body", "epochs": 3, "train": "all", "lr": 1.0e-2},
    ]
    config = config_from_dict(experiment(tiny_split_data, tmp_path / "runs", schedule=schedule))
    recorder = Recorder()
    train(config, tmp_path / "run", recorder)
    assert [(row["phase"], row["epoch"]) for row in recorder.rows] == [("head", 1), ("head", 2), ("body", 1), ("body", 2), ("body", 3)]


def test_check_shows_unfreezing_layer_decay_bn_and_plateau(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = [
        {"name": "head", "epochs": 3, "train": "head", "lr": 1.0e-3, "until_plateau": {"patience": 2}},
        {"name": "body", "epochs": 6, "train": "all", "lr": 1.0e-3, "unfreeze_every": 2, "layer_decay": 0.7, "bn": "frozen"},
    ]
    path = write_experiment(tmp_path / "e.yaml", experiment(tiny_split_data, tmp_path / "runs", schedule=schedule))
    result = CliRunner().invoke(app, ["check", str(path), "--json"])
    assert result.exit_code == 0, result.output
    import json

    phases = json.loads(result.stdout)["phases"]
    assert phases[0]["plateau_patience"] == 2 and phases[1]["plateau_patience"] is None
    body = phases[1]
    assert body["layer_decay"] == 0.7 and body["batchnorm"]["trained groups"] == "frozen (eval)"
    assert [step["train"][0] for step in body["unfreeze_steps"]] == ["head", "layer4", "layer3"]
    assert body["lr"]["layer3"] == pytest.approx(1.0e-3 * 0.7**2)
    monkeypatch.setattr(cli_err, "width", 220)  # room for every column without wrapping
    table = CliRunner().invoke(app, ["check", str(path)])
    assert table.exit_code == 0, table.output
    for text in ("+layer4 from epoch 3", "layer_decay 0.7", "plateau of 2 epochs", "frozen (eval)"):
        assert text in table.output
