from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from runs_helpers import constant_run, train_tiny_run
from transferctl.cli import app
from transferctl.inference.error_gallery import CSV_COLUMNS, Mistake, top_losses_figure
from transferctl.testing.synthetic import tiny_dataset

runner = CliRunner()

# Seven classes (sorted folder names) and a head that outputs these logits for every image: all are cyan.
SEVEN = ["blue", "cyan", "green", "orange", "purple", "red", "yellow"]
LOGITS = [0.5, 2.0, 0.0, 1.0, -1.0, 0.2, -0.5]


def invoke(*args: object):  # noqa: ANN201 - typer's Result
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(module_tmp_path: Path) -> Path:
    return train_tiny_run(module_tmp_path / "trained")


@pytest.fixture(scope="module")
def constant(trained: Path, module_tmp_path: Path) -> tuple[Path, Path]:
    """A run that predicts cyan with known probabilities for every image, and 7 classes of 2 images each."""
    data = tiny_dataset(module_tmp_path / "seven", n_classes=7, per_class=2, layout="flat")
    return constant_run(trained, module_tmp_path / "constant", SEVEN, LOGITS), data


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return list(reader)


def test_the_csv_lists_the_misclassified_images_by_loss(constant: tuple[Path, Path]) -> None:
    run, data = constant
    result = invoke("evaluate", run, "--data", data, "--split", "all", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    csv_path = run / "eval" / "seven-all-misclassified.csv"
    assert Path(report["misclassified_csv"]) == csv_path and report["misclassified"] == 12
    rows = read_rows(csv_path)

    p = dict(zip(SEVEN, np.exp(LOGITS) / np.exp(LOGITS).sum()))
    assert len(rows) == 12 and all(row["true"] != "cyan" and row["predicted"] == "cyan" for row in rows)  # the cyan images are right
    assert {Path(row["path"]).parent.name for row in rows} == set(SEVEN) - {"cyan"} and all(Path(row["path"]).is_file() for row in rows)
    assert all(Path(row["path"]).parent.name == row["true"] for row in rows)
    for row in rows:
        assert float(row["confidence"]) == pytest.approx(p["cyan"], rel=1e-5)
        assert float(row["loss"]) == pytest.approx(-math.log(p[row["true"]]), rel=1e-5)  # the cross-entropy of the image
    losses = [float(row["loss"]) for row in rows]
    assert losses == sorted(losses, reverse=True) and [row["true"] for row in rows[:2]] == ["purple", "purple"]
    assert "seven-all-misclassified.csv" in result.stderr


def test_top_losses_draws_the_worst_images_as_files(constant: tuple[Path, Path]) -> None:
    run, data = constant
    result = invoke("evaluate", run, "--data", data, "--split", "all", "--device", "cpu", "--top-losses", "5")
    assert result.exit_code == 0, result.output
    png = run / "eval" / "seven-all-top-losses.png"
    report = json.loads((run / "eval" / "seven-all.json").read_text())
    assert Path(report["top_losses_png"]) == png and f"the worst in {png}" in result.stderr.replace("\n", "")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 300

    rows = [Mistake(Path(row["path"]), row["true"], row["predicted"], float(row["confidence"]), float(row["loss"])) for row in read_rows(Path(report["misclassified_csv"]))]
    figure = top_losses_figure(rows[:5], "worst")
    assert len(figure.axes) == 5
    assert figure.axes[0].get_title() == f"cyan / {rows[0].true} / {rows[0].confidence:.2f}"
    with Image.open(rows[0].path) as original:  # the file's own pixels, not a normalised tensor
        expected = np.asarray(original.convert("RGB"))
    assert np.array_equal(np.asarray(figure.axes[0].images[0].get_array()), expected)
    assert len(top_losses_figure(rows, "all").axes) == 12


def test_the_default_draws_up_to_sixteen(constant: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transferctl.inference import error_gallery

    drawn = []
    monkeypatch.setattr(error_gallery, "top_losses_figure", lambda rows, title: drawn.append(top_losses_figure(rows, title)) or drawn[-1])
    run, _ = constant
    data = tiny_dataset(tmp_path / "many", n_classes=7, per_class=4, layout="flat")  # 24 wrong: 16 drawn
    result = invoke("evaluate", run, "--data", data, "--split", "all", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["misclassified"] == 24 and len(read_rows(Path(report["misclassified_csv"]))) == 24
    assert len(drawn) == 1 and len(drawn[0].axes) == 16
    assert Path(report["top_losses_png"]).is_file()


def test_top_losses_zero_writes_no_picture(constant: tuple[Path, Path]) -> None:
    run, data = constant
    png = run / "eval" / "seven-val-top-losses.png"
    png.parent.mkdir(exist_ok=True)
    png.write_bytes(b"an earlier evaluation's picture")
    result = invoke("evaluate", run, "--data", data, "--split", "val", "--device", "cpu", "--top-losses", "0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["top_losses_png"] is None and not png.exists()
    assert Path(report["misclassified_csv"]).is_file()


def test_the_runs_own_evaluation_lists_each_mistake_once(trained: Path) -> None:
    result = invoke("evaluate", trained, "--split", "val", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    wrong = report["images"] - sum(row[i] for i, row in enumerate(report["confusion_matrix"]))
    assert report["misclassified"] == wrong == len(read_rows(Path(report["misclassified_csv"])))
    assert (report["top_losses_png"] is None) == (wrong == 0)


@pytest.mark.parametrize("value", ["-1", "many", "2.5"])
def test_a_top_losses_that_is_not_a_count_is_a_usage_error_naming_it(value: str, tmp_path: Path) -> None:
    """As --top-k and --batch-size: refused while the command line is read, before any run is opened."""
    result = invoke("evaluate", tmp_path / "no-run", "--top-losses", value)
    assert result.exit_code == 2 and "Invalid value for '--top-losses'" in result.stderr and "Traceback" not in result.output


def test_evaluate_run_refuses_a_negative_top_losses_in_one_line(tmp_path: Path) -> None:
    from transferctl.errors import ConfigError
    from transferctl.inference.evaluate import evaluate_run

    with pytest.raises(ConfigError) as refused:
        evaluate_run(tmp_path, top_losses=-1)
    assert str(refused.value).count("\n") == 0 and str(refused.value).startswith("--top-losses: -1 is not a number of images")


def test_the_rows_agree_with_predicts_probabilities_with_tta(trained: Path, tmp_path: Path) -> None:
    """Red and green swapped: the model's confident answers become the mistakes, with real, varied probabilities."""
    import shutil

    data = shutil.copytree(trained.parent / "data", tmp_path / "swapped")
    for split in (data / name for name in ("train", "val", "test")):
        (split / "red").rename(split / "was_red")
        (split / "green").rename(split / "red")
        (split / "was_red").rename(split / "green")
    result = invoke("evaluate", trained, "--data", data, "--split", "all", "--device", "cpu", "--tta", "flip", "--json")
    assert result.exit_code == 0, result.output
    rows = read_rows(Path(json.loads(result.stdout)["misclassified_csv"]))
    assert rows

    predicted = invoke("predict", trained, data, "--top-k", "3", "--tta", "flip", "--device", "cpu")
    assert predicted.exit_code == 0, predicted.output
    records = {str(Path(record["path"]).resolve()): record for record in map(json.loads, predicted.stdout.splitlines())}
    losses = []
    for row in rows:
        record = records[str(Path(row["path"]).resolve())]
        probability = dict(record["top"])
        assert row["predicted"] == record["label"] != row["true"]
        assert float(row["confidence"]) == pytest.approx(record["score"], rel=1e-4)
        assert float(row["loss"]) == pytest.approx(-math.log(probability[row["true"]]), rel=1e-4)
        losses.append(float(row["loss"]))
    assert losses == sorted(losses, reverse=True)
    wrong = [path for path, record in records.items() if record["label"] != Path(path).parent.name]
    assert sorted(wrong) == sorted(str(Path(row["path"]).resolve()) for row in rows)  # every mistake, and only those
