from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from runs_helpers import constant_run, train_tiny_run
from transferctl.cli import app
from transferctl.inference.evaluate import calibration_bins, compute_metrics, expected_calibration_error
from transferctl.testing.synthetic import tiny_dataset

runner = CliRunner()

# Seven classes (sorted folder names) and a head that outputs these logits for every image.
SEVEN = ["blue", "cyan", "green", "orange", "purple", "red", "yellow"]
LOGITS = [0.5, 2.0, 0.0, 1.0, -1.0, 0.2, -0.5]  # argmax cyan; top 5 leave out purple and yellow

NUMBER = {"type": "number"}
REPORT_SCHEMA = {
    "type": "object",
    "required": [
        "run_dir", "checkpoint", "data_root", "split", "classes", "images", "accuracy", "top5_accuracy", "loss",
        "macro_f1", "weighted_f1", "ece", "per_class", "confusion_matrix", "calibration", "confusion_png",
    ],
    "properties": {
        "split": {"enum": ["val", "test", "train", "all"]},
        "classes": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "images": {"type": "integer", "minimum": 1},
        "accuracy": NUMBER, "loss": NUMBER, "macro_f1": NUMBER, "weighted_f1": NUMBER, "ece": NUMBER,
        "top5_accuracy": {"type": ["number", "null"]},
        "per_class": {"type": "array", "items": {
            "type": "object", "required": ["class", "precision", "recall", "f1", "support"],
            "properties": {"class": {"type": "string"}, "precision": NUMBER, "recall": NUMBER, "f1": NUMBER, "support": {"type": "integer"}},
        }},
        "confusion_matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
        "calibration": {"type": "array", "minItems": 15, "maxItems": 15, "items": {
            "type": "object", "required": ["lower", "upper", "count", "accuracy", "confidence"],
        }},
    },
}  # fmt: skip


def invoke(*args: str):  # noqa: ANN201 - typer's Result
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(module_tmp_path: Path) -> Path:
    return train_tiny_run(module_tmp_path / "trained")


@pytest.fixture(scope="module")
def seven_class_data(module_tmp_path: Path) -> Path:
    """7 classes, 6 images each, except cyan with 3 (three of its train images removed)."""
    root = tiny_dataset(module_tmp_path / "seven" / "data", n_classes=7, layout="split", test=True)
    for path in sorted((root / "train" / "cyan").iterdir())[:3]:
        path.unlink()
    return root


# ---------------------------------------------------------------------------------------------
# Metrics on arrays, against hand-computed values


def test_ece_of_a_hand_computed_case() -> None:
    confidence = np.array([0.95, 0.95, 0.62, 0.61, 0.25])
    correct = np.array([True, False, True, True, False])
    bins = calibration_bins(confidence, correct)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 5
    # Bins of width 1/15: 0.95 -> (14/15, 1], 0.62 and 0.61 -> (9/15, 10/15], 0.25 -> (3/15, 4/15].
    assert [i for i, b in enumerate(bins) if b["count"]] == [3, 9, 14]
    expected = 2 / 5 * abs(0.5 - 0.95) + 2 / 5 * abs(1.0 - 0.615) + 1 / 5 * abs(0.0 - 0.25)
    assert expected_calibration_error(bins) == pytest.approx(expected) == pytest.approx(0.384)


def test_ece_puts_certainty_in_the_last_bin_and_is_zero_when_calibrated() -> None:
    bins = calibration_bins(np.array([1.0, 1.0, 0.5, 0.5]), np.array([True, True, True, False]))
    assert bins[-1]["count"] == 2 and bins[7]["count"] == 2  # 0.5 is in (7/15, 8/15]
    assert expected_calibration_error(bins) == pytest.approx(0.0)


def test_metrics_of_a_hand_computed_case() -> None:
    classes = ["a", "b", "c"]
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]))
    labels = np.array([0, 1, 1, 2])
    report = compute_metrics(logits, labels, classes)
    assert report["accuracy"] == pytest.approx(0.75)
    assert report["top5_accuracy"] is None  # only 3 classes
    assert report["loss"] == pytest.approx(-(math.log(0.7) + math.log(0.8) + math.log(0.3) + math.log(0.6)) / 4)
    assert report["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    a, b, c = report["per_class"]
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(0.5), pytest.approx(1.0), 1)
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == (pytest.approx(1.0), pytest.approx(0.5), pytest.approx(2 / 3), 2)
    assert c["f1"] == pytest.approx(1.0)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1.0) / 3)
    assert report["weighted_f1"] == pytest.approx((2 / 3 * 1 + 2 / 3 * 2 + 1.0 * 1) / 4)


def test_top5_accuracy_when_there_are_more_than_five_classes() -> None:
    logits = np.tile(np.arange(7, dtype=float), (2, 1))  # class 6 most likely, 0 and 1 outside the top 5
    report = compute_metrics(logits, np.array([0, 2]), [str(i) for i in range(7)])
    assert report["accuracy"] == 0.0 and report["top5_accuracy"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# The command on runs whose predictions are known


def test_evaluate_json_numbers_of_a_run_with_known_predictions(trained: Path, seven_class_data: Path, tmp_path: Path) -> None:
    run = constant_run(trained, tmp_path / "constant", SEVEN, LOGITS)
    result = invoke("evaluate", run, "--data", seven_class_data, "--split", "all", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # exactly one JSON document, nothing else on stdout
    jsonschema.validate(report, REPORT_SCHEMA)

    p = np.exp(LOGITS) / np.exp(LOGITS).sum()
    support = {name: (3 if name == "cyan" else 6) for name in SEVEN}
    n = sum(support.values())
    assert report["images"] == n == 39 and report["classes"] == SEVEN
    assert report["accuracy"] == pytest.approx(3 / 39)
    assert report["top5_accuracy"] == pytest.approx((3 + 4 * 6) / 39)
    assert report["loss"] == pytest.approx(sum(-math.log(p[i]) * support[c] for i, c in enumerate(SEVEN)) / n, rel=1e-5)
    assert report["ece"] == pytest.approx(abs(3 / 39 - p[1]), rel=1e-5)
    assert report["confusion_matrix"] == [[0, support[c], 0, 0, 0, 0, 0] for c in SEVEN]
    cyan = report["per_class"][1]
    assert (cyan["precision"], cyan["recall"], cyan["f1"]) == (pytest.approx(3 / 39), 1.0, pytest.approx(1 / 7))
    assert all(row["f1"] == 0.0 for row in report["per_class"] if row["class"] != "cyan")
    assert report["macro_f1"] == pytest.approx(1 / 49) and report["weighted_f1"] == pytest.approx(1 / 91)

    assert json.loads((run / "eval" / "data-all.json").read_text()) == report  # --data's folder name first
    png = run / "eval" / "data-all-confusion.png"
    assert Path(report["confusion_png"]) == png
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300
        colours = len(image.convert("RGB").getcolors(maxcolors=1 << 24) or [])
    assert colours > 50  # a heat map with text and a colour bar, not a blank canvas


def test_evaluate_on_the_validation_split_reproduces_training(trained: Path) -> None:
    """The best checkpoint scored on val must give the val metrics training recorded for it."""
    summary = json.loads((trained / "summary.json").read_text())
    result = invoke("evaluate", trained, "--split", "val", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["split"] == "val" and report["images"] == 3
    assert report["accuracy"] == pytest.approx(summary["best_val_acc"], abs=1e-6)
    assert report["loss"] == pytest.approx(summary["best_val_loss"], rel=1e-4)


def test_evaluate_defaults_to_test_split_and_prints_a_table(trained: Path) -> None:
    result = invoke("evaluate", trained, "--device", "cpu", "--checkpoint", "last")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "precision" in result.stderr and "macro F1" in result.stderr and "red" in result.stderr
    report = json.loads((trained / "eval" / "test-last.json").read_text())
    assert report["split"] == "test" and report["checkpoint"].endswith("last.pt")
    assert (trained / "eval" / "test-last-confusion.png").stat().st_size > 5000


def test_evaluations_of_other_data_or_checkpoints_never_replace_the_runs_own(trained: Path, tmp_path: Path) -> None:
    import shutil

    from transferctl.runs.listing import describe_run

    run = shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    holdout = tiny_dataset(tmp_path / "my holdout", n_classes=3, layout="split")
    for args in ([], ["--data", holdout], ["--checkpoint", "last"], ["--data", holdout, "--checkpoint", run / "checkpoints" / "best.pt"],
                 ["--precision", "bf16"]):  # fmt: skip
        assert invoke("evaluate", run, "--split", "val", "--device", "cpu", *args).exit_code == 0
    names = sorted(path.name for path in (run / "eval").glob("*.json"))
    assert names == ["my_holdout-val.json", "val-bf16.json", "val-last.json", "val.json"]  # best.pt given by path is the best checkpoint
    assert json.loads((run / "eval" / "my_holdout-val.json").read_text())["data_root"] == str(holdout.resolve())
    assert set(describe_run(run).evaluations) == {"val", "my_holdout-val", "val-last", "val-bf16"}


def test_a_data_tree_with_other_classes_is_refused(trained: Path, tmp_path: Path) -> None:
    other = tiny_dataset(tmp_path / "other", n_classes=4, layout="flat")  # red, green, blue, yellow
    (other / "blue").rename(other / "navy")
    result = invoke("evaluate", trained, "--data", other, "--device", "cpu")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --data")
    assert "missing blue" in lines[0] and "extra navy, yellow" in lines[0]


def test_data_with_a_name_too_long_or_in_a_symlink_loop_is_one_line(trained: Path, tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for data, reason in ((tmp_path / ("n" * 300), "has a name of 300 bytes"), (loop, "runs into a symlink loop")):
        result = invoke("evaluate", trained, "--data", data, "--device", "cpu")
        assert result.exit_code == 1 and "Traceback" not in result.output  # File name too long was a traceback
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --data: {tmp_path}/") and reason in lines[0]


def test_missing_run_checkpoint_and_split_are_user_errors(trained: Path, tmp_path: Path) -> None:
    result = invoke("evaluate", tmp_path / "nowhere")
    assert result.exit_code == 1 and "not a transferctl run directory" in result.stderr
    result = invoke("evaluate", trained, "--checkpoint", tmp_path / "missing.pt")
    assert result.exit_code == 1 and "missing.pt" in result.stderr
    assert invoke("evaluate", trained, "--split", "holdout").exit_code == 2


def test_split_all_reads_a_flat_tree_too_small_to_split(trained: Path, tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path / "few", n_classes=3, per_class=1, layout="flat")  # one image a class: no validation share
    result = invoke("evaluate", trained, "--data", data, "--split", "all", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 3
    assert "no validation image" not in result.stderr  # about a split that --split all does not draw


def test_a_split_the_data_does_not_have(trained: Path, tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path / "no_test", n_classes=3, layout="split")
    result = invoke("evaluate", trained, "--data", data, "--split", "test", "--device", "cpu")
    assert result.exit_code == 1 and "has no test images" in result.stderr


def test_an_unreadable_image_follows_the_runs_on_bad_image_policy(trained: Path, tmp_path: Path) -> None:
    import shutil

    data = tiny_dataset(tmp_path / "data", n_classes=3, layout="split", test=True)
    broken = data / "test" / "red" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = invoke("evaluate", trained, "--data", data, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["skipped_images"] == [str(broken)] and report["images"] == 3
    assert f"note: data.root: skipped 1 unreadable image: {broken}" in result.stderr  # not only inside the JSON

    strict = tmp_path / "strict-run"
    shutil.copytree(trained, strict)
    config = strict / "config.yaml"
    config.write_text(config.read_text().replace("on_bad_image: skip", "on_bad_image: error"))
    result = invoke("evaluate", strict, "--data", data, "--device", "cpu")
    assert result.exit_code == 1 and "broken.png" in result.stderr


# ---------------------------------------------------------------------------------------------
# Test-time augmentation (--tta)


def test_tta_reports_the_averaged_numbers_beside_the_plain_ones(trained: Path) -> None:
    from rich.console import Console

    from transferctl.cli.evaluate import render_report

    plain = json.loads(invoke("evaluate", trained, "--split", "val", "--json", "--device", "cpu").stdout)
    result = invoke("evaluate", trained, "--split", "val", "--json", "--device", "cpu", "--tta", "flip")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    jsonschema.validate(report, REPORT_SCHEMA)
    assert plain["tta"] == "none" and "plain" not in plain
    assert report["tta"] == "flip"
    for key in ("accuracy", "loss", "macro_f1", "ece"):
        assert report["plain"][key] == pytest.approx(plain[key])
    assert report["plain"]["confusion_matrix"] == plain["confusion_matrix"]
    assert report["loss"] != pytest.approx(plain["loss"])  # the top-level numbers are the averaged probabilities'
    # Its own files, named for it: the plain evaluation's stay as they were.
    assert json.loads((trained / "eval" / "val-tta-flip.json").read_text()) == report
    assert (trained / "eval" / "val-tta-flip-confusion.png").is_file()
    assert json.loads((trained / "eval" / "val.json").read_text())["tta"] == "none"

    console = Console(record=True, width=200)
    console.print(render_report(report))
    text = console.export_text()
    assert f"with --tta flip: accuracy {report['accuracy']:.4f}" in text and f"without:         accuracy {plain['accuracy']:.4f}" in text


@pytest.mark.parametrize("blocked", ["-confusion.png", ".json"])
def test_a_report_file_that_cannot_be_written_is_one_line_naming_it(trained: Path, tmp_path: Path, blocked: str) -> None:
    data = shutil.copytree(trained.parent / "data", tmp_path / "blocked")  # its own report name: blocked-val
    in_the_way = trained / "eval" / f"blocked-val{blocked}"
    in_the_way.mkdir(parents=True)  # a folder where the file goes: the rename fails, as on a full or read-only disk
    try:
        result = invoke("evaluate", trained, "--data", data, "--split", "val", "--device", "cpu")
    finally:
        in_the_way.rmdir()
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().count("\n") == 0 and f"error: {in_the_way}: cannot write" in result.stderr


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="chmod does not stop root from writing")
def test_a_read_only_eval_folder_is_one_line_naming_the_file(trained: Path) -> None:
    folder = trained / "eval"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    try:
        result = invoke("evaluate", trained, "--split", "val", "--device", "cpu")
    finally:
        folder.chmod(0o755)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().count("\n") == 0 and f"error: {folder}{os.sep}val" in result.stderr and "cannot write" in result.stderr


def test_an_unknown_tta_is_one_line(trained: Path) -> None:
    result = invoke("evaluate", trained, "--tta", "crop", "--device", "cpu")
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "--tta: 'crop' is not a test-time augmentation" in result.stderr


# ---------------------------------------------------------------------------------------------
# Multi-label runs


@pytest.fixture(scope="module")
def multi_label(module_tmp_path: Path) -> Path:
    from helpers import multi_label_run

    return multi_label_run(module_tmp_path / "multi-label")


def multi_label_scores(run: Path, checkpoint: str = "best", flip: bool = False) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Every image of the run's label file, its sigmoid scores (with flip: averaged with its mirror image's) and multi-hot targets."""
    import torch

    from transferctl.data.folders import ImageDataset
    from transferctl.data.label_files import discover_data
    from transferctl.inference.trained_model import eval_transform, load_trained_model

    model, classes, preprocessing = load_trained_model(run, checkpoint)
    splits = discover_data(run.parent / "data", 0.2, 0, labels=run.parent / "data" / "labels.csv")
    samples = splits.train + splits.val + splits.test
    dataset = ImageDataset(samples, eval_transform(preprocessing), len(classes))
    with torch.no_grad():
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        scores = model(images).sigmoid()
        scores = (scores + model(images.flip(-1)).sigmoid()) / 2 if flip else scores
    return [path for path, _ in samples], scores.double().numpy(), dataset.targets


def test_a_multi_label_evaluation_matches_scikit_learn_at_the_tuned_thresholds(multi_label: Path) -> None:
    import torch
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_recall_fscore_support

    from transferctl.inference.evaluate import evaluate_run

    result = evaluate_run(multi_label, split="all", device="cpu")
    report = json.loads(result.json_path.read_text())
    paths, scores, targets = multi_label_scores(multi_label)
    thresholds = np.asarray(torch.load(multi_label / "checkpoints" / "best.pt", weights_only=True)["best"]["thresholds"])
    predicted = scores >= thresholds
    assert report["task"] == "multi_label" and report["images"] == len(paths) == 48 and report["thresholds_tuned"] and not result.notices
    assert report["map"] == pytest.approx(average_precision_score(targets, scores, average="macro"), abs=1e-6)
    assert report["micro_f1"] == pytest.approx(f1_score(targets, predicted, average="micro"), abs=1e-9)
    assert report["macro_f1"] == pytest.approx(f1_score(targets, predicted, average="macro"), abs=1e-9)
    assert report["subset_accuracy"] == report["accuracy"] == pytest.approx(accuracy_score(targets, predicted))
    at_half = report["at_default_threshold"]
    assert at_half["threshold"] == 0.5 and at_half["micro_f1"] == pytest.approx(f1_score(targets, scores >= 0.5, average="micro"), abs=1e-9)
    assert at_half["subset_accuracy"] == pytest.approx(accuracy_score(targets, scores >= 0.5)) != report["subset_accuracy"]  # tuning shows
    precision, recall, f1, support = precision_recall_fscore_support(targets, predicted, zero_division=0)
    for column, row in enumerate(report["per_class"]):
        assert row["ap"] == pytest.approx(average_precision_score(targets[:, column], scores[:, column]), abs=1e-6)
        assert [row["precision"], row["recall"], row["f1"], row["support"], row["threshold"]] == pytest.approx(
            [precision[column], recall[column], f1[column], support[column], thresholds[column]], abs=1e-9)  # fmt: skip
    assert report["loss"] == pytest.approx(-np.mean(targets * np.log(scores) + (1 - targets) * np.log(1 - scores)), abs=1e-6)
    assert result.png_path.name == "all-pr-curves.png" and Image.open(result.png_path).format == "PNG" and "confusion_matrix" not in report


def test_the_multi_label_gallery_lists_images_with_any_wrong_label_by_mean_bce(multi_label: Path) -> None:
    import csv

    from transferctl.inference.evaluate import evaluate_run

    result = evaluate_run(multi_label, split="all", device="cpu", top_losses=3)
    paths, scores, targets = multi_label_scores(multi_label)
    classes = result.report["classes"]
    tuned = json.loads((multi_label / "summary.json").read_text())["thresholds"]
    thresholds = np.asarray([tuned[name] for name in classes])
    losses = -np.mean(targets * np.log(scores) + (1 - targets) * np.log(1 - scores), axis=1)
    wrong = [i for i in range(len(paths)) if ((scores[i] >= thresholds) != targets[i].astype(bool)).any()]
    rows = list(csv.DictReader(Path(result.report["misclassified_csv"]).open()))
    assert list(rows[0]) == ["path", "true", "predicted", "loss"] and len(rows) == result.report["misclassified"] == len(wrong) > 0
    assert [row["path"] for row in rows] == [str(paths[i]) for i in sorted(wrong, key=lambda i: -losses[i])]
    assert [float(row["loss"]) for row in rows] == pytest.approx(sorted(losses[wrong], reverse=True), rel=1e-5)
    for row in rows:
        i = [str(path) for path in paths].index(row["path"])
        assert row["true"] == "|".join(name for name, hot in zip(classes, targets[i]) if hot)
        assert row["predicted"] == "|".join(name for name, score, cut in zip(classes, scores[i], thresholds) if score >= cut)
    assert Image.open(result.report["top_losses_png"]).format == "PNG"


def test_multi_label_tta_scores_the_averaged_sigmoids_beside_the_plain_ones(multi_label: Path) -> None:
    from sklearn.metrics import average_precision_score

    from transferctl.inference.evaluate import evaluate_run

    report = evaluate_run(multi_label, split="all", device="cpu", tta="flip").report
    _, flipped, targets = multi_label_scores(multi_label, flip=True)
    _, plain, _ = multi_label_scores(multi_label)
    assert report["map"] == pytest.approx(average_precision_score(targets, flipped, average="macro"), abs=1e-6)
    assert report["plain"]["map"] == pytest.approx(average_precision_score(targets, plain, average="macro"), abs=1e-6) != report["map"]


def test_the_multi_label_table_and_the_default_thresholds_note(multi_label: Path) -> None:
    result = invoke("evaluate", multi_label, "--split", "all", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "mAP" in result.stderr and "(at 0.5: micro F1" in result.stderr and "with a wrong label:" in result.stderr and "note:" not in result.stderr
    last = invoke("evaluate", multi_label, "--split", "all", "--device", "cpu", "--checkpoint", "last", "--json")
    assert last.exit_code == 0, last.output
    report = json.loads(last.stdout)
    assert last.stderr.count("note:") == 1 and "thresholds were tuned for epoch 1" in " ".join(last.stderr.split())
    assert not report["thresholds_tuned"] and {row["threshold"] for row in report["per_class"]} == {0.5}
    assert report["micro_f1"] == report["at_default_threshold"]["micro_f1"]


def test_a_single_label_run_on_data_with_several_labels_an_image_is_one_line(multi_label: Path, tmp_path: Path) -> None:
    from helpers import experiment
    from transferctl.config import config_from_dict
    from transferctl.training.train import train

    data = multi_label.parent / "data"
    rows = (data / "labels.csv").read_text().splitlines()
    single = data / "single.csv"
    single.write_text("\n".join([rows[0], *(row.split("|")[0] for row in rows[1:])]) + "\n")
    head = {"name": "head", "epochs": 1, "train": "head", "lr": 0.1, "solver": "minibatch"}
    train(config_from_dict(experiment(data, tmp_path / "runs", data={"labels": str(single)}, schedule=[head])), tmp_path / "run")
    shutil.copy(data / "labels.csv", single)  # now with cat|dog cells
    result = invoke("evaluate", tmp_path / "run", "--device", "cpu")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "this run was trained with one label an image" in lines[0], result.output
