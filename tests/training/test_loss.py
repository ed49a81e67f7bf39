"""training/loss.py and the options for imbalanced classes end to end: the loss section, data.sampler,
the balanced metrics in every row, early stopping and best.pt on them, and check's warning."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import experiment, imbalanced_dataset, one_thread, write_experiment  # noqa: F401 - one_thread: a fixture
from transferctl.cli import app
from transferctl.config import LossConfig, config_from_dict
from transferctl.errors import ConfigError
from transferctl.training.loss import build_loss
from transferctl.training.train import describe, prepare, train

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def data(module_tmp_path: Path) -> Path:
    return imbalanced_dataset(module_tmp_path / "data")


def rows_of(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def test_balanced_class_weights_are_scikit_learns_on_the_training_labels() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.repeat([0, 1, 2], [12, 12, 1])
    loss = build_loss(LossConfig(class_weights="balanced", label_smoothing=0.1), labels, CLASSES)
    assert loss.label_smoothing == 0.1
    np.testing.assert_allclose(loss.weight.numpy(), compute_class_weight("balanced", classes=np.arange(3), y=labels), rtol=1e-6)
    assert build_loss(LossConfig(class_weights=[1, 2, 3]), labels, CLASSES).weight.tolist() == [1.0, 2.0, 3.0]
    plain = build_loss(LossConfig(), labels, CLASSES)
    assert plain.weight is None and plain.label_smoothing == 0.0  # the defaults: plain cross-entropy


def test_a_list_of_class_weights_must_have_one_per_class() -> None:
    with pytest.raises(ConfigError) as error:
        build_loss(LossConfig(class_weights=[1, 2]), np.arange(3), CLASSES)
    assert str(error.value) == "loss.class_weights: has 2 weights for 3 classes (give one weight per class, in this order: red, green, blue)"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.class_weights=[1, 2]", "loss.class_weights: has 2 weights for 3 classes"),
        ("loss.class_weights=heavy", "loss.class_weights: must be none, balanced or a list of weights above 0"),
        ("loss.class_weights=[1, 0, 1]", "loss.class_weights: must be none, balanced or a list of weights above 0"),
        ("loss.class_weights=[1, true, 1]", "loss.class_weights: must be none, balanced or a list of weights above 0"),
        ("loss.label_smoothing=1", "loss.label_smoothing: Input should be less than 1"),
        ("loss.label_smoothing=-0.1", "loss.label_smoothing: Input should be greater than or equal to 0"),
        ("data.sampler=weighted", "data.sampler: Input should be 'shuffle' or 'balanced'"),
        ("early_stopping.metric=f1", "early_stopping.metric: Input should be 'auto', 'val_acc', 'val_loss', 'balanced_acc', 'macro_f1', 'val_map' or 'micro_f1'"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_field(data: Path, tmp_path: Path, override: str, message: str) -> None:
    path = write_experiment(tmp_path / "exp.yaml", experiment(data, tmp_path / "runs"))
    result = CliRunner().invoke(app, ["check", str(path), "--set", override])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output


@pytest.mark.parametrize(
    "sections",
    [
        {"loss": {"label_smoothing": 0.1}},
        {"loss": {"class_weights": "balanced"}},
        {"loss": {"class_weights": [1.0, 1.0, 12.0]}},
        {"data": {"sampler": "balanced"}},
        {"loss": {"label_smoothing": 0.1, "class_weights": "balanced"}, "data": {"sampler": "balanced"}, "early_stopping": {"metric": "macro_f1"}},
    ],
)
def test_each_option_trains_and_every_row_has_the_balanced_metrics(data: Path, tmp_path: Path, sections: dict[str, Any]) -> None:
    summary = train(config_from_dict(experiment(data, tmp_path / "runs", **sections)))
    rows = rows_of(summary)
    assert len(rows) == 2
    assert all(0.0 <= row["val_balanced_acc"] <= 1.0 and 0.0 <= row["val_macro_f1"] <= 1.0 for row in rows)
    assert all(math.isfinite(row["train_loss"]) for row in rows)
    csv_header = (Path(summary["run_dir"]) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_balanced_acc", "val_macro_f1"} <= set(csv_header)


def test_the_loss_changes_what_the_minibatch_loop_minimises(data: Path, tmp_path: Path) -> None:
    minibatch = [{"name": "head", "epochs": 1, "train": "head", "lr": 1.0e-2, "solver": "minibatch"}]
    plain = rows_of(train(config_from_dict(experiment(data, tmp_path / "a", schedule=minibatch))))
    smoothed = rows_of(train(config_from_dict(experiment(data, tmp_path / "b", schedule=minibatch, loss={"label_smoothing": 0.5}))))
    assert smoothed[0]["train_loss"] != plain[0]["train_loss"]
    assert smoothed[0]["val_loss"] != plain[0]["val_loss"] or smoothed[0]["val_acc"] == plain[0]["val_acc"]


def test_the_run_uses_the_balanced_sampler_and_the_loss(data: Path, tmp_path: Path) -> None:
    from transferctl.training.train import Session

    config = config_from_dict(experiment(data, tmp_path / "runs", data={"sampler": "balanced"}, loss={"class_weights": "balanced"}))
    session = Session.start(prepare(config))
    sampler = session.loaders["train"].sampler
    assert sampler.weights is not None
    labels = [label for _, label in session.experiment.splits.train]
    drawn = [labels[index] for epoch in range(1, 11) for index, _ in (sampler.set_epoch(epoch), list(sampler))[1]]
    assert 0.2 < drawn.count(0) / len(drawn) < 0.5  # blue (label 0): 1 of 25 training images, drawn about a third of the time
    assert session.experiment.loss.weight[0] > 10 * session.experiment.loss.weight[1]
    plain = Session.start(prepare(config_from_dict(experiment(data, tmp_path / "runs"))))
    assert plain.loaders["train"].sampler.weights is None


def test_check_warns_about_imbalanced_classes_and_names_what_helps(data: Path, tmp_path: Path) -> None:
    notices = describe(prepare(config_from_dict(experiment(data, tmp_path / "runs"))))["data"]["notices"]
    assert notices == [
        "data.root (training images): imbalanced classes, the smallest (blue, 1 image) has less than a tenth of the largest (red, 12); "
        "consider loss.class_weights: balanced, data.sampler: balanced, early_stopping.metric: balanced_acc"
    ]
    chosen = experiment(data, tmp_path / "runs", loss={"class_weights": [1, 1, 5]}, data={"sampler": "balanced"}, early_stopping={"metric": "macro_f1"})
    assert describe(prepare(config_from_dict(chosen)))["data"]["notices"] == []
    path = write_experiment(tmp_path / "exp.yaml", experiment(data, tmp_path / "runs"))
    shown = CliRunner().invoke(app, ["check", str(path)])
    assert shown.exit_code == 0 and "imbalanced classes" in shown.output


def test_early_stopping_and_best_pt_follow_balanced_acc(data: Path, tmp_path: Path) -> None:
    schedule = [{"name": "head", "epochs": 4, "train": "head", "lr": 1.0e-3, "solver": "minibatch"}]
    raw = experiment(data, tmp_path / "runs", schedule=schedule, early_stopping={"metric": "balanced_acc", "patience": 1})
    summary = train(config_from_dict(raw))
    rows = rows_of(summary)
    scores = [row["val_balanced_acc"] for row in rows]
    best = max(range(len(rows)), key=lambda index: (scores[index], -index))
    assert summary["best_epoch"] == rows[best]["global_epoch"] and summary["metric"] == "balanced_acc"
    # The phase ended at the first epoch that did not raise balanced accuracy (patience 1), or ran all its epochs.
    ended = next((index + 1 for index in range(1, len(scores)) if scores[index] <= max(scores[:index])), 4)
    assert len(rows) == ended
    assert torch.load(Path(summary["run_dir"]) / "checkpoints" / "best.pt", weights_only=True)["global_epoch"] == rows[best]["global_epoch"]
