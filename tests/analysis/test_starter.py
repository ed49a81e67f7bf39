"""init: inspect generated folders of each layout and write experiment files that check accepts."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from transferctl.cli import app
from transferctl.config import SCHEMA_FILE, json_schema, load_config
from transferctl.errors import ConfigError, DataError
from transferctl.analysis.starter import choose_strategy, init_experiment, inspect_folder
from transferctl.testing.synthetic import tiny_dataset

runner = CliRunner()


def invoke(*args: str):  # noqa: ANN201 - typer's Result
    return runner.invoke(app, list(args))


def test_split_layout_is_inspected(tiny_split_data: Path) -> None:
    found = inspect_folder(tiny_split_data)
    assert found.layout == "split" and found.classes == ["blue", "green", "red"]
    assert found.counts == {split: {c: n for c in found.classes} for split, n in (("train", 4), ("val", 1), ("test", 1))}
    assert found.median_per_class == 5  # train + val: the test split is not counted
    assert found.images.median_size == (16, 16) and found.images.modes == {"RGB": 18}
    assert found.unreadable == ()


def test_flat_layout_is_inspected(tiny_flat_data: Path) -> None:
    found = inspect_folder(tiny_flat_data)
    assert found.layout == "flat" and found.splits == ["all"]
    assert found.counts["all"] == {"blue": 6, "green": 6, "red": 6} and found.total == 18


def test_corrupt_file_modes_and_sizes_are_reported(tmp_path: Path) -> None:
    from PIL import Image

    root = tiny_dataset(tmp_path / "data", n_classes=2, layout="flat")
    (root / "red" / "9999.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("L", (40, 30)).save(root / "green" / "grey.png")
    found = inspect_folder(root)
    assert [bad.path.name for bad in found.unreadable] == ["9999.png"]
    assert found.counts["all"] == {"green": 7, "red": 6}
    assert found.images.modes == {"RGB": 12, "L": 1} and found.images.max_size == (40, 30)

    config = tmp_path / "experiment.yaml"
    result = invoke("init", str(root), "-o", str(config))
    assert result.exit_code == 0, result.output
    assert "unreadable" in result.stderr and "9999.png" in result.stderr
    text = config.read_text()
    assert "1 unreadable file(s) will be left out" in text and "L 1; all become RGB" in text


def test_single_class_is_a_clear_error(tmp_path: Path) -> None:
    root = tiny_dataset(tmp_path / "one", n_classes=1, layout="flat")
    with pytest.raises(DataError, match="at least two class folders, found only 'red'"):
        inspect_folder(root)
    result = invoke("init", str(root), "-o", str(tmp_path / "e.yaml"))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: DATA_DIR: {root} needs at least two class folders, found only 'red' (make one sub-folder of images per class)"
    ]
    assert not (tmp_path / "e.yaml").exists()


def test_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    result = invoke("init", str(tmp_path / "nowhere"), "-o", str(tmp_path / "e.yaml"))
    assert result.exit_code == 1 and "nowhere" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("layout", ["split", "flat"])
def test_written_file_is_accepted_by_check_and_the_schema(tmp_path: Path, layout: str) -> None:
    root = tiny_dataset(tmp_path / "data" / layout, layout=layout)
    config = tmp_path / "configs" / "experiment.yaml"
    result = invoke("init", str(root), "-o", str(config))
    assert result.exit_code == 0, result.output
    text = config.read_text()
    assert text.startswith(f"# yaml-language-server: $schema={SCHEMA_FILE}\n")
    schema = json.loads((config.parent / SCHEMA_FILE).read_text())
    assert schema == json_schema()
    jsonschema.validate(yaml.safe_load(text), schema)
    loaded = load_config(config)
    assert loaded.data.root == root.resolve() and loaded.strategy == "feature_extract"
    # check itself (random weights: the tests have no pretrained weights cache)
    checked = invoke("check", str(config), "--set", "backbone.weights=none", "--set", "data.image_size=32", "--json")
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["data"]["layout"] == layout


def test_relative_data_path_is_relative_to_the_file(tiny_flat_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    init_experiment(Path("tiny_flat"), Path("deep/er/e.yaml"))
    assert yaml.safe_load(Path("deep/er/e.yaml").read_text())["data"]["root"] == "../../tiny_flat"
    init_experiment(tiny_flat_data, Path("abs.yaml"))
    assert yaml.safe_load(Path("abs.yaml").read_text())["data"]["root"] == str(tiny_flat_data)


def test_existing_file_is_kept_unless_force(tiny_flat_data: Path, tmp_path: Path) -> None:
    config = tmp_path / "e.yaml"
    config.write_text("mine\n")
    result = invoke("init", str(tiny_flat_data), "-o", str(config))
    assert result.exit_code == 1 and config.read_text() == "mine\n"
    assert result.stderr.strip().splitlines() == [f"error: {config}: already exists (choose another file with -o, or pass --force to replace it)"]
    assert invoke("init", str(tiny_flat_data), "-o", str(config), "--force").exit_code == 0
    assert config.read_text().startswith("# yaml-language-server")


def test_a_schema_that_cannot_be_written_leaves_no_experiment_file(tiny_flat_data: Path, tmp_path: Path) -> None:
    (tmp_path / SCHEMA_FILE).mkdir()  # a folder where the schema goes
    result = invoke("init", str(tiny_flat_data), "-o", str(tmp_path / "exp.yaml"))
    assert result.exit_code == 1 and f"{tmp_path / SCHEMA_FILE}: cannot write" in result.stderr
    assert not (tmp_path / "exp.yaml").exists()


@pytest.mark.parametrize("below", ["x.yaml", "sub/x.yaml"])
def test_an_output_path_under_a_file_names_the_file(tiny_flat_data: Path, tmp_path: Path, below: str) -> None:
    (tmp_path / "notes").write_text("mine\n")
    result = invoke("init", str(tiny_flat_data), "-o", str(tmp_path / "notes" / below))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'notes' / below}: cannot write: {tmp_path / 'notes'} is a file, not a folder (give -o a path in a folder)"]
    assert (tmp_path / "notes").read_text() == "mine\n"  # said 'File exists'


def test_auto_strategy_follows_recommends_rule(tmp_path: Path) -> None:
    small = inspect_folder(tiny_dataset(tmp_path / "small", layout="flat"))
    assert choose_strategy("auto", small)[0] == "feature_extract"
    large = small.__class__(**{**small.__dict__, "counts": {"all": {c: 1000 for c in small.classes}}})
    strategy, advice = choose_strategy("auto", large)
    assert strategy == "fine_tune" and advice is not None and advice.similar
    assert choose_strategy("scratch", small) == ("scratch", None)
    with pytest.raises(ConfigError, match="did you mean 'fine_tune'"):
        choose_strategy("finetune", small)


def test_explicit_strategy_and_backbone(tiny_flat_data: Path, tmp_path: Path) -> None:
    config = tmp_path / "e.yaml"
    result = invoke("init", str(tiny_flat_data), "-o", str(config), "--strategy", "scratch", "--backbone", "mobilenet_v3_small", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["strategy"] == "scratch" and report["advice"] is None and report["data"]["layout"] == "flat"
    raw = yaml.safe_load(config.read_text())
    assert raw["backbone"] == {"name": "mobilenet_v3_small", "weights": "none"} and raw["schedule"][0]["train"] == "all"
    wrong = invoke("init", str(tiny_flat_data), "-o", str(tmp_path / "f.yaml"), "--backbone", "resnet180")
    assert wrong.exit_code == 1 and "did you mean 'resnet18'" in wrong.stderr


def test_init_warns_about_imbalanced_classes_and_names_what_helps(tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path / "data", per_class=15, layout="flat")
    for path in sorted((data / "blue").iterdir())[1:]:
        path.unlink()
    expected = ("data.root: imbalanced classes, the smallest (blue, 1 image) has less than a tenth of the largest (red, 15); "
                "consider loss.class_weights: balanced, data.sampler: balanced, early_stopping.metric: balanced_acc")  # fmt: skip
    assert inspect_folder(data).imbalance == expected
    result = invoke("init", str(data), "-o", str(tmp_path / "exp.yaml"), "--strategy", "feature_extract")
    assert result.exit_code == 0 and "warning:" in result.stderr and "loss.class_weights: balanced" in result.stderr
    header = " ".join(line.lstrip("# ").strip() for line in (tmp_path / "exp.yaml").read_text().splitlines() if line.startswith("#"))
    assert f"Warning: {expected}." in header
    assert inspect_folder(tiny_dataset(tmp_path / "even", layout="flat")).imbalance is None


def labelled_images(tmp_path: Path) -> tuple[Path, Path]:
    """tiny_dataset's red, green and blue folders (15 images each) and a hand-written CSV naming all of red as
    warm, one green image as cool (imbalanced), two red ones as test rows, and a missing image; blue is not listed."""
    images = tiny_dataset(tmp_path / "images", per_class=15, size=24, layout="flat")
    rows = [f"red/{n:04d}.png,warm," for n in range(13)] + ["red/0013.png,warm,test", "red/0014.png,warm,test", "green/0000.png,cool,", "green/gone.png,cool,"]
    labels = tmp_path / "meta" / "labels.csv"
    labels.parent.mkdir()
    labels.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return images, labels


def test_a_label_file_is_inspected_by_its_rows(tmp_path: Path) -> None:
    images, labels = labelled_images(tmp_path)
    found = inspect_folder(images, labels)
    assert found.layout == "labels" and found.classes == ["cool", "warm"]  # the file's labels, not the folders
    assert found.counts == {"all": {"cool": 1, "warm": 13}, "test": {"cool": 0, "warm": 2}} and found.total == 16
    assert found.images.sampled == 16 and found.images.median_size == (24, 24)
    assert [bad.reason for bad in found.unreadable] == ["line 18: no such image"]
    assert found.imbalance is not None and found.imbalance.startswith("data.labels: imbalanced classes, the smallest (cool, 1 image)")


def test_init_with_a_label_file_writes_data_labels_that_check_accepts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labelled_images(tmp_path)
    monkeypatch.chdir(tmp_path)
    images, labels, config = Path("images"), Path("meta/labels.csv"), Path("configs/experiment.yaml")
    result = invoke("init", str(images), "--labels", str(labels), "-o", str(config))
    assert result.exit_code == 0, result.output
    for text in (f"label file {labels}", "2 classes", "warning:", "data.labels: imbalanced", "bad rows:", "1 row(s) of the label file", f"--labels {labels}"):
        assert text in result.stderr.replace("\n", " "), text
    written = yaml.safe_load(config.read_text())["data"]
    assert written["labels"] == "../meta/labels.csv" and written["root"] == "../images"  # relative to the file, as data.root
    header = " ".join(line.lstrip("# ").strip() for line in config.read_text().splitlines() if line.startswith("#"))
    assert f"the label file {labels}" in header and "1 row(s) of the label file will be left out" in header
    assert load_config(config).data.labels == labels.resolve()
    checked = invoke("check", str(config), "--set", "backbone.weights=none", "--set", "data.image_size=32", "--json")
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["data"]["layout"] == "labels"


def test_init_names_a_bad_label_file_in_one_line(tmp_path: Path) -> None:
    images, labels = labelled_images(tmp_path)
    labels.write_text("path,label\n../outside.png,warm\n")
    result = invoke("init", str(images), "--labels", str(labels), "-o", str(tmp_path / "exp.yaml"))
    assert result.exit_code == 1 and not (tmp_path / "exp.yaml").exists()
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --labels: ") and "line 2" in line and "leaves data.root" in line


def test_init_on_a_multi_label_file_counts_images_per_label_and_writes_a_multi_label_experiment(tmp_path: Path) -> None:
    from transferctl.data.label_files import discover_data
    from transferctl.testing.synthetic import write_multi_label_dataset

    labels = write_multi_label_dataset(tmp_path / "data", images=24, size=16)
    rows = [line.split(",")[1].split("|") for line in labels.read_text().splitlines()[1:]]
    found = inspect_folder(labels.parent, labels)
    assert found.multi_label and found.task == "multi_label" and found.total == 24  # images, each once
    assert found.counts == {"all": {name: sum(name in row for row in rows) for name in ("blue", "green", "red")}}  # once for each label
    assert sum(found.counts["all"].values()) > 24

    config = tmp_path / "experiment.yaml"
    result = invoke("init", str(labels.parent), "--labels", str(labels), "-o", str(config))
    assert result.exit_code == 0, result.output
    assert "multi-label: an image counts once for each of its labels" in result.stderr.replace("\n", " ")
    assert f"median {found.median_per_class:g} images per label" in result.stderr
    text = config.read_text()
    header = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
    assert "Task: multi-label" in header and f"median {found.median_per_class:g} per label" in header
    written = yaml.safe_load(text)
    assert written["task"] == "multi_label" and written["early_stopping"]["metric"] == "val_map"
    checked = invoke("check", str(config), "--set", "backbone.weights=none", "--set", "data.image_size=32", "--json")
    assert checked.exit_code == 0, checked.output
    assert discover_data(labels.parent, 0.2, 0, labels=labels).multi_label


def test_a_rare_label_of_multi_label_data_is_warned_of_with_the_option_that_applies(tmp_path: Path) -> None:
    from transferctl.testing.synthetic import write_multi_label_dataset

    labels = write_multi_label_dataset(tmp_path / "data", images=16, size=16)
    labels.write_text("path,label\n" + "".join(f"images/{n:04d}.png,{'common|rare' if n == 0 else 'common'}\n" for n in range(16)))
    found = inspect_folder(labels.parent, labels)
    assert found.multi_label and found.imbalance is not None
    assert found.imbalance.startswith("data.labels: imbalanced labels, the smallest (rare, 1 image)")
    assert found.imbalance.endswith("consider loss.class_weights: balanced")  # the sampler and balanced_acc need one label an image
