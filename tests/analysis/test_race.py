"""recommend's race: successive halving over real training runs, here with a stand-in trainer (no torch)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from transferctl.config import BackboneConfig, ExperimentConfig
from transferctl.errors import Problem, TrainingError, TrainingInterrupted
from transferctl.analysis.race import END_TO_END, RaceSetup, describe, race, race_config, race_schedule


def setup(budget: float = 600.0) -> RaceSetup:
    return RaceSetup(Path("/data/flowers"), 0.25, 7, BackboneConfig(name="resnet18", weights="DEFAULT"), 32, "cpu", "fp32", budget)


class StandIn:
    """Trains nothing: answers each strategy's accuracy (higher with more epochs) and claims `pace` s an epoch."""

    def __init__(self, accuracy: dict[str, float], pace: float = 0.0, diverges: str | None = None, per_epoch: float = 0.01) -> None:
        self.accuracy, self.pace, self.diverges, self.per_epoch = accuracy, pace, diverges, per_epoch
        self.calls: list[tuple[str, int, Path]] = []

    def __call__(self, config: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
        epochs = sum(phase.epochs for phase in config.schedule or [])
        self.calls.append((config.strategy, epochs, run_dir))
        run_dir.mkdir(parents=True)
        if config.strategy == self.diverges:
            raise TrainingError(Problem("schedule[0] (all), epoch 1", "the loss became nan"))
        score = min(1.0, self.accuracy[config.strategy] + self.per_epoch * epochs)
        return {"best_val_acc": score, "final_val_acc": score, "train_seconds": self.pace * epochs, "epochs": epochs}


def test_rounds_halve_the_field_and_double_the_schedule_up_to_the_default_one() -> None:
    trainer = StandIn({"fine_tune": 0.8, "pretrained_init": 0.7, "scratch": 0.5})
    result = race(setup(), END_TO_END, lambda message: None, trainer)
    assert [(strategy, epochs) for strategy, epochs, _ in trainer.calls] == [
        ("fine_tune", 2), ("scratch", 1), ("pretrained_init", 1),  # an eighth of 3 + 5 and of 10 epochs, at least one a phase
        ("fine_tune", 2), ("pretrained_init", 3),  # the better half, rounded up, a quarter of their schedules
        ("fine_tune", 8),  # the last one: as much as the budget pays for, here its whole default schedule
    ]  # fmt: skip
    assert result.last_run("fine_tune").epochs == 8 and result.last_run("fine_tune").fraction == 1.0
    assert result.last_run("scratch").round == 0
    assert result.ended.startswith("one candidate left") and not result.notes
    assert not trainer.calls[0][2].parent.exists()  # the temporary folder is gone


def test_a_tie_keeps_the_cheaper_candidate_and_a_diverged_one_drops_out() -> None:
    trainer = StandIn({"fine_tune": 0.6, "pretrained_init": 0.6, "scratch": 0.9}, diverges="scratch", per_epoch=0.0)
    result = race(setup(), END_TO_END, lambda message: None, trainer)
    assert result.last_run("scratch").best_val_acc is None and "nan" in (result.last_run("scratch").failure or "")
    assert [s for s, _, _ in trainer.calls[3:]] == ["fine_tune", "pretrained_init", "fine_tune"]
    tied = StandIn({"fine_tune": 0.2, "pretrained_init": 0.9, "scratch": 0.9}, per_epoch=0.0)
    race(setup(), END_TO_END, lambda message: None, tied)
    assert tied.calls[-1][0] == "scratch"  # the same cost and estimate: scratch, which needs no base
    assert result.ended.startswith("one candidate left")


def test_a_round_that_would_overrun_the_budget_is_not_started() -> None:
    trainer = StandIn({"fine_tune": 0.8, "pretrained_init": 0.7, "scratch": 0.5}, pace=10.0)
    messages: list[str] = []
    result = race(setup(budget=50.0), END_TO_END, messages.append, trainer)
    assert len(trainer.calls) == 3  # round 2 would take twice round 1's 2 + 1 epochs of fine_tune and pretrained_init
    assert result.ended.startswith("budget: round 2 (fine_tune, pretrained_init) would take about 60s")
    assert any("race round 1: scratch: best val acc" in m for m in messages) and not result.notes


def test_the_last_one_left_trains_the_largest_share_the_budget_pays_for() -> None:
    trainer = StandIn({"scratch": 0.5}, pace=10.0)  # an eighth of 10 epochs: 1 epoch, 10 s
    race(setup(budget=75.0), ("scratch",), lambda message: None, trainer)
    assert [epochs for _, epochs, _ in trainer.calls] == [1, 5]  # a half (50 s) fits the 65 s left, all (100 s) does not


def test_the_first_round_runs_whatever_the_budget_and_says_so() -> None:
    trainer = StandIn({"scratch": 0.5}, pace=30.0)
    result = race(setup(budget=5.0), ("scratch",), lambda message: None, trainer)
    assert trainer.calls == trainer.calls[:1] and trainer.calls[0][:2] == ("scratch", 1)
    assert "the first round alone took" in result.notes[0] and "--race-size" in result.notes[0]


def test_an_interrupted_race_says_there_is_nothing_to_resume() -> None:
    def interrupted(config: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
        raise TrainingInterrupted(Problem(str(run_dir), "stopped by SIGINT", f"resume with: transferctl train --resume {run_dir}"))

    with pytest.raises(TrainingInterrupted, match="stopped during the race") as caught:
        race(setup(), ("scratch",), lambda message: None, interrupted)
    assert "--resume" not in str(caught.value)


def test_schedules_are_the_defaults_scaled_with_their_phases_and_rates() -> None:
    from transferctl.config import default_schedule

    head, body = race_schedule("fine_tune", 0.5)
    assert (head.train, head.epochs, body.train, body.epochs) == ("head", 2, "all", 3)
    assert body.backbone_lr_mult == default_schedule("fine_tune")[1].backbone_lr_mult  # the default's rates, kept
    assert [(p.name, p.epochs, p.lr) for p in race_schedule("scratch", 0.25)] == [("all", 3, 1.0e-3)]
    assert race_schedule("scratch", 1.0) == default_schedule("scratch")  # the last round: what training will train
    for full, quarter in zip(default_schedule("fine_tune"), race_schedule("fine_tune", 0.25)):
        minimum = getattr(full, "min_steps", None)  # a default's least number of steps is scaled too
        assert getattr(quarter, "min_steps", None) == (None if minimum is None else round(minimum / 4))
    assert describe(race_schedule("fine_tune", 0.25)).startswith("head 1 + body 1")


def test_a_race_run_trains_the_data_as_training_will_split_it(tmp_path: Path) -> None:
    config = race_config(setup(), "pretrained_init", race_schedule("pretrained_init", 0.5), tmp_path)
    assert config.seed == 7 and config.data.val_fraction == 0.25 and config.data.image_size == 32
    assert config.backbone.weights == "DEFAULT" and config.strategy == "pretrained_init"
    assert config.output.dir == tmp_path and config.early_stopping.patience is None and config.data.augment == "standard"
    assert race_config(replace(setup(), augment="none"), "scratch", race_schedule("scratch", 0.5), tmp_path).data.augment == "none"
    assert sum(phase.epochs for phase in config.schedule or []) == 5


class MultiLabelStandIn(StandIn):
    """A multi-label run's summary: val_map ranks as `accuracy` says, subset accuracy (val_acc) the other way round."""

    def __call__(self, config: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
        summary = super().__call__(config, run_dir)
        return {**summary, "task": "multi_label", "best_val_map": summary["best_val_acc"], "best_val_acc": 1.0 - summary["best_val_acc"]}


def test_a_multi_label_race_ranks_by_val_map() -> None:
    messages: list[str] = []
    trainer = MultiLabelStandIn({"fine_tune": 0.5, "pretrained_init": 0.7, "scratch": 0.2})
    result = race(setup(), END_TO_END, messages.append, trainer)
    assert [s for s, _, _ in trainer.calls[3:]] == ["pretrained_init", "fine_tune", "pretrained_init"]  # by val_map, not subset accuracy
    last = result.last_run("pretrained_init")
    assert last.metric == "val_map" and last.best_val_acc == pytest.approx(0.7 + 0.01 * 10) and last.final_val_acc is None
    assert any("best val mAP 0.7" in message for message in messages)
