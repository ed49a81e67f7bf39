"""Label files (data.labels): a CSV or JSONL of path,label[,split] beside a folder of images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import Notices, StopAfter, experiment, head_only, write_experiment
from transferctl.config import load_config
from transferctl.data.folders import changed_images, data_notices, split_fingerprint
from transferctl.data.label_files import discover_data, label_file_digest
from transferctl.errors import ConfigError, DataError
from transferctl.testing.synthetic import tiny_dataset
from transferctl.training.feature_cache import CacheSpec

# tiny_dataset's flat folders, relabelled by the file: the classes come from the file, not the folders.
LABELS = {"red": "warm", "green": "cool"}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """tmp_path/images/{red,green}/000N.png, six each."""
    return tiny_dataset(tmp_path / "images", n_classes=2, layout="flat")


def rows(images: Path) -> list[dict[str, str]]:
    return [{"path": f"{folder}/{n:04d}.png", "label": label} for folder, label in LABELS.items() for n in range(6)]


def write_csv(path: Path, table: list[dict[str, str]], columns: tuple[str, ...] = ("path", "label")) -> Path:
    lines = [",".join(columns)] + [",".join(row.get(column, "") for column in columns) for row in table]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, table: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in table))
    return path


def read(images: Path, labels: Path, on_bad_image: str = "skip"):
    return discover_data(images, 0.2, 0, on_bad_image, labels=labels)


def test_a_csv_gives_the_classes_and_samples_of_its_rows(images: Path, tmp_path: Path) -> None:
    splits = read(images, write_csv(tmp_path / "labels.csv", rows(images)))
    assert splits.classes == ["cool", "warm"]
    assert splits.layout == "labels" and not splits.skipped and not splits.test
    samples = splits.train + splits.val
    assert len(samples) == 12 and {label for _, label in splits.val} == {0, 1}  # seeded, per class, as a flat folder
    assert all(splits.classes[label] == LABELS[path.parent.name] for path, label in samples)
    assert read(images, tmp_path / "labels.csv").val == splits.val  # the same seed, the same split


def test_the_split_column_overrides_the_seeded_split(images: Path, tmp_path: Path) -> None:
    table = rows(images)
    for row, split in zip(table, ["val", "test"] * 2):  # red/0000 val, red/0001 test, red/0002 val, red/0003 test
        row["split"] = split
    splits = read(images, write_csv(tmp_path / "labels.csv", table, ("path", "label", "split")))
    assert sorted(p.name for p, _ in splits.test) == ["0001.png", "0003.png"]
    assert {"0000.png", "0002.png"} <= {p.name for p, _ in splits.val if p.parent.name == "red"}
    assert len(splits.train) + len(splits.val) + len(splits.test) == 12


BAD_ROWS = [
    ({"path": "red/0099.png", "label": "warm"}, "no such image"),
    ({"path": "red/0000.png", "label": "warm"}, "duplicated path"),
    ({"path": "green/0000.png", "label": ""}, "empty label"),
    ({"path": "green/0001.png", "label": "cool", "split": "holdout"}, "unknown split 'holdout' (train, val or test)"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_ROWS, ids=["missing", "duplicated", "empty label", "unknown split"])
def test_each_kind_of_bad_row_is_skipped_and_named(images: Path, tmp_path: Path, bad: dict[str, str], reason: str) -> None:
    table = [row for row in rows(images) if row["path"] != bad["path"] or "duplicated" in reason] + [bad]
    splits = read(images, write_csv(tmp_path / "labels.csv", table, ("path", "label", "split")))
    assert [item.reason for item in splits.skipped] == [f"line {len(table) + 1}: {reason}"]
    assert len(splits.train) + len(splits.val) == len(table) - 1  # every other row is used
    (notice,) = data_notices(splits)
    assert notice.startswith("data.labels: skipped 1 bad row:") and reason in notice


@pytest.mark.parametrize(("bad", "reason"), BAD_ROWS, ids=["missing", "duplicated", "empty label", "unknown split"])
def test_each_kind_of_bad_row_stops_with_on_bad_image_error(images: Path, tmp_path: Path, bad: dict[str, str], reason: str) -> None:
    table = [row for row in rows(images) if row["path"] != bad["path"] or "duplicated" in reason] + [bad]
    with pytest.raises(DataError) as raised:
        read(images, write_csv(tmp_path / "labels.csv", table, ("path", "label", "split")), "error")
    text = str(raised.value)
    assert len(text.splitlines()) == 1 and "labels.csv: 1 bad row" in text and reason in text and "data.on_bad_image: skip" in text


def test_an_unreadable_image_is_a_bad_row(images: Path, tmp_path: Path) -> None:
    (images / "red" / "0005.png").write_bytes(b"not a png")
    splits = read(images, write_csv(tmp_path / "labels.csv", rows(images)))
    assert [item.path.name for item in splits.skipped] == ["0005.png"] and splits.skipped[0].reason.startswith("line 7: ")


@pytest.mark.parametrize("outside", ["../elsewhere.png", "red/../../elsewhere.png", "/etc/passwd"])
def test_a_path_leaving_data_root_is_refused_in_one_line(images: Path, tmp_path: Path, outside: str) -> None:
    labels = write_csv(tmp_path / "labels.csv", [*rows(images), {"path": outside, "label": "warm"}])
    with pytest.raises(DataError) as raised:
        read(images, labels)
    text = str(raised.value)
    assert len(text.splitlines()) == 1
    assert text.startswith(f"data.labels: {labels} line 14: ") and "leaves data.root" in text


def test_a_jsonl_file_works_the_same(images: Path, tmp_path: Path) -> None:
    table = rows(images)
    table[0]["split"] = "test"
    from_csv = read(images, write_csv(tmp_path / "labels.csv", table, ("path", "label", "split")))
    from_jsonl = read(images, write_jsonl(tmp_path / "labels.jsonl", [*table, {"path": "red/0099.png", "label": "warm"}]))
    assert (from_jsonl.classes, from_jsonl.train, from_jsonl.val, from_jsonl.test) == (from_csv.classes, from_csv.train, from_csv.val, from_csv.test)
    assert [item.reason for item in from_jsonl.skipped] == ["line 13: no such image"]


def test_a_csv_without_the_columns_is_one_line(images: Path, tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("file,class\nred/0000.png,warm\n")
    with pytest.raises(DataError, match=r"the header lacks path, label .*path,label\[,split\]"):
        read(images, tmp_path / "labels.csv")


def test_the_cache_key_and_the_resume_fingerprint_cover_the_label_files_content(images: Path, tmp_path: Path) -> None:
    labels = write_csv(tmp_path / "labels.csv", rows(images))
    before = read(images, labels)
    labels.write_text(labels.read_text() + "\n")  # the same rows: the samples are alike, the file is not
    after = read(images, labels)
    assert after.train == before.train and before.label_digest != after.label_digest == label_file_digest(labels)
    spec = CacheSpec("resnet18", "w", None, "fc", {}, "none", 1, 0, "fp32")
    keys = {CacheSpec(**{**spec.__dict__, "labels": digest}).key(before.train) for digest in (None, before.label_digest, after.label_digest)}
    assert len(keys) == 3
    notice = changed_images(split_fingerprint(before), split_fingerprint(after))
    assert notice is not None and notice.startswith("data.labels: the label file differs")
    assert changed_images(split_fingerprint(after), split_fingerprint(read(images, labels))) is None


def test_data_labels_is_relative_to_the_experiment_file_and_a_csv_or_jsonl(images: Path, tmp_path: Path) -> None:
    write_csv(tmp_path / "labels.csv", rows(images))
    path = write_experiment(tmp_path / "experiment.yaml", experiment(Path("images"), tmp_path / "runs", data={"labels": "labels.csv"}))
    assert load_config(path).data.labels == tmp_path / "labels.csv"
    for wrong in ("labels.txt", "7"):
        with pytest.raises(ConfigError, match=r"data.labels: must be a \.csv or \.jsonl file"):
            load_config(path, [f"data.labels={wrong}"])


def test_a_csv_run_trains_evaluates_and_caches_by_the_label_file(images: Path, tmp_path: Path, isolated_feature_cache: Path) -> None:
    from transferctl.inference.evaluate import evaluate_run
    from transferctl.inference.predict import load_predictor
    from transferctl.training.train import train

    labels = write_csv(tmp_path / "labels.csv", rows(images))
    path = write_experiment(tmp_path / "experiment.yaml", head_only(Path("images"), tmp_path / "runs", epochs=1, labels="labels.csv", cache="disk"))
    run = Path(train(load_config(path))["run_dir"])
    assert json.loads((run / "classes.json").read_text()) == ["cool", "warm"]
    assert evaluate_run(run).report["images"] == 2  # the run's own label file gives evaluate its validation rows
    (row,) = load_predictor(run, "best", "cpu", "fp32", top_k=2).predict([str(images / "red" / "0000.png")], batch_size=1)
    assert sorted(name for name, _ in row["top"]) == ["cool", "warm"]  # predict names the file's classes
    assert len(list(isolated_feature_cache.glob("features-*.npy"))) == 2  # train and val
    labels.write_text(labels.read_text() + "\n")  # the same rows, another file: features are not reused
    train(load_config(path))
    assert len(list(isolated_feature_cache.glob("features-*.npy"))) == 4


def test_resume_says_when_the_label_file_changed(images: Path, tmp_path: Path, heeded_sigint: None) -> None:
    from transferctl.errors import TrainingInterrupted
    from transferctl.training.resume import resume
    from transferctl.training.train import train

    labels = write_csv(tmp_path / "labels.csv", rows(images))
    path = write_experiment(tmp_path / "experiment.yaml", head_only(Path("images"), tmp_path / "runs", epochs=2, labels="labels.csv", cache="off"))
    with pytest.raises(TrainingInterrupted):
        train(load_config(path), tmp_path / "run", StopAfter(1))
    labels.write_text(labels.read_text().replace("red/0005.png,warm", "red/0005.png,cool"))
    heard = Notices()
    resume(tmp_path / "run", observer=heard)
    assert [line for line in heard.lines if line.startswith("data.labels: the label file differs")]


@pytest.mark.parametrize(("split", "message"), [({"green": "test"}, "no training rows for cool"), ({"red": "train", "green": "train"}, "no validation rows")])
def test_a_split_column_that_leaves_a_class_untrained_or_no_validation_is_one_line(images: Path, tmp_path: Path, split: dict[str, str], message: str) -> None:
    table = [{**row, "split": split.get(row["path"].split("/")[0], "")} for row in rows(images)]
    with pytest.raises(DataError) as raised:
        read(images, write_csv(tmp_path / "labels.csv", table, ("path", "label", "split")))
    assert len(str(raised.value).splitlines()) == 1 and f"labels.csv: {message}" in str(raised.value)


def test_check_names_the_bad_rows_and_refuses_a_path_outside_in_one_error_line(images: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from transferctl.cli import app

    labels = write_csv(tmp_path / "labels.csv", [*rows(images), {"path": "red/0099.png", "label": "warm"}])
    path = write_experiment(tmp_path / "experiment.yaml", head_only(Path("images"), tmp_path / "runs", epochs=1, labels="labels.csv"))
    checked = CliRunner().invoke(app, ["check", str(path)])
    assert checked.exit_code == 0, checked.output
    assert "note: data.labels: skipped 1 bad row: " in checked.stderr and "(line 14: no such image)" in checked.stderr
    labels.write_text(labels.read_text() + "../outside.png,warm\n")
    refused = CliRunner().invoke(app, ["check", str(path)])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert refused.stderr.strip().splitlines() == [f"error: data.labels: {labels} line 15: ../outside.png leaves data.root (name each image by its path below data.root)"]



# Multi-label: several labels in a cell (cat|dog) or a JSON list.


def test_a_cell_with_several_labels_makes_a_multi_label_dataset(images: Path, tmp_path: Path) -> None:
    table = [{**row, "label": "warm|bright" if row["path"].startswith("red") and row["path"] < "red/0003" else row["label"]} for row in rows(images)]
    splits = read(images, write_csv(tmp_path / "labels.csv", table))
    assert splits.multi_label and splits.classes == ["bright", "cool", "warm"]
    labels = {path.relative_to(images).as_posix(): label for path, label in splits.train + splits.val}
    assert labels["red/0000.png"] == (0, 2) and labels["red/0005.png"] == (2,) and labels["green/0000.png"] == (1,)
    assert {index for label in (label for _, label in splits.val) for index in label} >= {0, 1, 2}  # split by the rarest class: each in val


def test_a_jsonl_list_is_the_same_as_a_csv_cell_and_order_and_repeats_do_not_matter(images: Path, tmp_path: Path) -> None:
    table = [{**row, "label": "warm|bright"} if row["path"].startswith("red") else row for row in rows(images)]
    from_csv = read(images, write_csv(tmp_path / "labels.csv", table))
    listed = [{**row, "label": ["bright", "warm", "bright"]} if row["path"].startswith("red") else row for row in rows(images)]
    from_jsonl = read(images, write_jsonl(tmp_path / "labels.jsonl", listed))
    assert (from_jsonl.train, from_jsonl.val, from_jsonl.classes) == (from_csv.train, from_csv.val, from_csv.classes)


def test_task_single_label_refuses_a_cell_with_several_labels_naming_its_line(images: Path, tmp_path: Path) -> None:
    table = [*rows(images)]
    table[3] = {**table[3], "label": "warm|bright"}
    with pytest.raises(DataError) as raised:
        discover_data(images, 0.2, 0, labels=write_csv(tmp_path / "labels.csv", table), task="single_label")
    text = str(raised.value)
    assert len(text.splitlines()) == 1 and "labels.csv line 5 gives 2 labels (bright|warm) and task is single_label" in text and "task: multi_label" in text


def test_task_multi_label_trains_class_folders_or_one_label_rows_with_a_sigmoid_each(images: Path, tmp_path: Path) -> None:
    folders = discover_data(images, 0.2, 0, task="multi_label")
    assert folders.multi_label and all(isinstance(label, tuple) and len(label) == 1 for _, label in folders.train + folders.val)
    single = read(images, write_csv(tmp_path / "labels.csv", rows(images)))
    assert not single.multi_label
    assert discover_data(images, 0.2, 0, labels=tmp_path / "labels.csv", task="multi_label").multi_label


def test_an_empty_json_list_is_an_image_of_none_of_the_classes_in_a_multi_label_run_only(images: Path, tmp_path: Path) -> None:
    table: list[dict] = [{**row, "label": ["warm", "bright"]} if row["path"] == "red/0000.png" else dict(row) for row in rows(images)]
    table[7]["label"] = []  # green/0001.png: none of the classes
    splits = read(images, write_jsonl(tmp_path / "labels.jsonl", table))
    labels = {path.relative_to(images).as_posix(): label for path, label in splits.train + splits.val}
    assert splits.multi_label and labels["green/0001.png"] == () and not splits.skipped
    single = read(images, write_jsonl(tmp_path / "single.jsonl", [row for row in table if row["path"] != "red/0000.png"]))
    assert not single.multi_label and "green/0001.png" not in {path.name for path, _ in single.train + single.val}
    assert [item.reason for item in single.skipped] == ["line 7: no label (an empty list: only multi-label runs take such images)"]  # one row fewer
