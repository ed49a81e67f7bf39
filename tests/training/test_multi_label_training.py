"""Multi-label runs end to end: the task from the label file, BCEWithLogitsLoss, mAP/F1/subset accuracy per
epoch (checked against scikit-learn on the best checkpoint's own validation scores), early stopping on
val_map, the thresholds tuned on val, and the single-label options refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from helpers import assert_resume_matches, experiment, one_thread, write_experiment  # noqa: F401 - one_thread: a fixture
from transferctl.cli import app
from transferctl.config import LossConfig, load_config
from transferctl.testing.synthetic import write_multi_label_dataset
from transferctl.training.loss import build_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def labels(module_tmp_path: Path) -> Path:
    return write_multi_label_dataset(module_tmp_path / "data", images=48, size=16)


def multi_label_experiment(labels: Path, tmp_path: Path, **sections: object) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = experiment(labels.parent, tmp_path / "runs", data={"labels": str(labels)}, **sections)
    return write_experiment(tmp_path / "experiment.yaml", raw)


def test_the_loss_is_bce_with_logits_and_balanced_weighs_each_classes_positives() -> None:
    labels = [(0,), (0, 1), (0,), (0, 2)]
    plain = build_loss(LossConfig(), labels, ["a", "b", "c"], multi_label=True)
    assert isinstance(plain, torch.nn.BCEWithLogitsLoss) and plain.pos_weight is None
    balanced = build_loss(LossConfig(class_weights="balanced"), labels, ["a", "b", "c"], multi_label=True)
    assert balanced.pos_weight.tolist() == [0.0, 3.0, 3.0]  # negatives over positives: 0/4, 3/1, 3/1
    assert build_loss(LossConfig(class_weights=[1, 2, 3]), labels, ["a", "b", "c"], multi_label=True).pos_weight.tolist() == [1, 2, 3]


@pytest.fixture(scope="module")
def multi_label_run(labels: Path, module_tmp_path: Path) -> Path:
    from transferctl.training.train import train

    return Path(train(load_config(multi_label_experiment(labels, module_tmp_path / "run")))["run_dir"])


def test_a_multi_label_run_records_its_task_metrics_and_thresholds(labels: Path, multi_label_run: Path) -> None:
    from sklearn.metrics import average_precision_score, f1_score

    from transferctl.data.folders import ImageDataset
    from transferctl.data.label_files import discover_data
    from transferctl.inference.trained_model import eval_transform, load_trained_model

    run = multi_label_run
    summary = json.loads((run / "summary.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["task"] == "multi_label" and config["early_stopping"]["metric"] == "val_map" and summary["metric"] == "val_map"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"val_map", "val_micro_f1", "val_macro_f1", "val_acc"} <= set(row) and "val_balanced_acc" not in row for row in rows)
    best = max(rows, key=lambda row: row["val_map"])
    assert summary["best_epoch"] == best["global_epoch"] and summary["best_val_map"] == best["val_map"]
    # The best checkpoint's validation scores give the row's numbers by scikit-learn's definitions.
    model, classes, preprocessing = load_trained_model(run)
    splits = discover_data(labels.parent, 0.2, 0, labels=labels)
    dataset = ImageDataset(splits.val, eval_transform(preprocessing), len(classes))
    with torch.no_grad():
        scores = torch.sigmoid(model(torch.stack([dataset[i][0] for i in range(len(dataset))]))).numpy()
    targets = dataset.targets
    present = targets.sum(axis=0) > 0
    assert best["val_map"] == pytest.approx(average_precision_score(targets[:, present], scores[:, present], average="macro"), abs=1e-5)
    assert best["val_micro_f1"] == pytest.approx(f1_score(targets, scores >= 0.5, average="micro", zero_division=0), abs=1e-6)
    assert best["val_acc"] == pytest.approx(np.mean(((scores >= 0.5) == targets.astype(bool)).all(axis=1)))
    # Thresholds tuned on those scores are stored with the run: in summary.json and in best.pt's best row.
    assert sorted(summary["thresholds"]) == classes and all(0 < value < 1 for value in summary["thresholds"].values())
    checkpoint = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert checkpoint["best"]["thresholds"] == [summary["thresholds"][name] for name in classes]


def test_a_feature_extractor_solves_a_multi_label_head(labels: Path, tmp_path: Path) -> None:
    from helpers import Notices
    from transferctl.training.train import train

    path = multi_label_experiment(labels, tmp_path, strategy="feature_extract", schedule=[{"name": "head", "epochs": 2, "train": "head", "lr": 0.01}])
    heard = Notices()
    summary = train(load_config(path), observer=heard)
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["head_weight_decay"] is not None and rows[0]["val_map"] > 0.9  # the colours' patches are easy to see
    assert any("held-out mAP" in line for line in heard.lines)  # the run's classifier: chosen for ranking
    fine_tune = multi_label_experiment(labels, tmp_path / "fine_tune", schedule=[{"name": "head", "epochs": 1, "train": "head", "lr": 0.01},
                                                                                 {"name": "body", "epochs": 1, "train": "all", "lr": 0.001}])  # fmt: skip
    heard = Notices()
    train(load_config(fine_tune), observer=heard)
    assert any("held-out loss" in line for line in heard.lines)  # the body is fine-tuned through it: small logits


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.label_smoothing=0.1", "loss.label_smoothing: is for single-label runs (task: multi_label)"),
        ("data.sampler=balanced", "data.sampler: balanced draws by each image's one class"),
        ("mixup={alpha: 0.2}", "mixup: mixes one-class targets"),
        ("early_stopping.metric=balanced_acc", "early_stopping.metric: balanced_acc needs one label an image"),
    ],
)
def test_single_label_options_are_refused_for_a_multi_label_run_in_one_line(labels: Path, tmp_path: Path, override: str, message: str) -> None:
    result = CliRunner().invoke(app, ["check", str(multi_label_experiment(labels, tmp_path)), "--set", override])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output


def test_a_multi_label_metric_on_single_label_data_is_one_line(tmp_path: Path, tiny_split_data: Path) -> None:
    path = write_experiment(tmp_path / "experiment.yaml", experiment(tiny_split_data, tmp_path / "runs"))
    result = CliRunner().invoke(app, ["check", str(path), "--set", "early_stopping.metric=val_map"])
    assert result.exit_code == 1 and "early_stopping.metric: val_map is for multi-label runs" in result.output, result.output


def test_a_resumed_multi_label_run_ends_as_the_uninterrupted_one_with_its_thresholds(labels: Path, tmp_path: Path, heeded_sigint: None) -> None:
    config = load_config(multi_label_experiment(labels, tmp_path))
    assert_resume_matches(config, tmp_path, stop_after=1)
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("reference", "stopped")]
    assert summaries[0]["thresholds"] == summaries[1]["thresholds"]


def test_check_says_the_run_is_multi_label_and_counts_an_image_for_each_of_its_labels(tmp_path: Path) -> None:
    lines = ["path,label"] + [f"images/{n:04d}.png,{'common|rare' if n == 0 else 'common'}" for n in range(16)]
    labels = write_multi_label_dataset(tmp_path / "data", images=16, size=16)
    labels.write_text("\n".join(lines) + "\n")  # 'rare' on one image of sixteen: imbalanced
    result = CliRunner().invoke(app, ["check", str(multi_label_experiment(labels, tmp_path))])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert "2 classes, multi-label (a sigmoid each)" in text
    assert "imbalanced labels, the smallest (rare, 1 image)" in text and "consider loss.class_weights: balanced" in text
    assert "data.sampler" not in text.split("imbalanced labels")[1].split("note:")[0]


def test_show_and_runs_give_a_multi_label_runs_val_map(multi_label_run: Path) -> None:
    summary = json.loads((multi_label_run / "summary.json").read_text())
    shown = CliRunner().invoke(app, ["show", str(multi_label_run)])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stderr.split())
    assert "best val mAP" in text and f"best: val_map {summary['best_val_map']:.4f}, val_acc (every label right)" in text
    listed = CliRunner().invoke(app, ["runs", str(multi_label_run.parent)])
    assert listed.exit_code == 0 and "val mAP" in listed.stderr and f"{summary['best_val_map']:.4f}" in listed.stderr


def test_train_prints_a_multi_label_rows_val_map_beside_its_val_acc(multi_label_run: Path) -> None:
    from transferctl.cli.train import _best_numbers
    from transferctl.training.progress import epoch_line

    rows = [json.loads(line) for line in (multi_label_run / "metrics.jsonl").read_text().splitlines()]
    assert f"val_acc {rows[0]['val_acc']:.4f} val_map {rows[0]['val_map']:.4f} (" in epoch_line(rows[0])
    summary = json.loads((multi_label_run / "summary.json").read_text())
    assert _best_numbers(summary) == f"val_map {summary['best_val_map']:.4f}, val_acc {summary['best_val_acc']:.4f}"
    assert "val_map" not in epoch_line({key: value for key, value in rows[0].items() if key != "val_map"})
