"""explain on the command line: PNGs and JSON lines, and one-line errors (extra missing, class, file)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from runs_helpers import ONE_EPOCH, train_tiny_run
from transferctl.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def run(module_tmp_path: Path) -> Path:
    return train_tiny_run(module_tmp_path, schedule=ONE_EPOCH)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "photo.jpg")
    return tmp_path / "photo.jpg"


def _one_error_line(result) -> str:  # noqa: ANN001 - typer's Result
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    return lines[0]


def test_writes_a_png_per_image_and_a_json_line_each(run: Path, image: Path, tmp_path: Path) -> None:
    pytest.importorskip("pytorch_grad_cam")
    result = runner.invoke(app, ["explain", str(run), str(image), "--class", "green", "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["path"] == str(image) and record["class"] == "green"
    assert Path(record["png"]) == tmp_path / "out" / "photo.gradcam.png"
    assert Image.open(record["png"]).size == (32, 32)  # the run's crop, as the network saw the photo


def test_missing_extra_says_how_to_install_it(run: Path, image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # `import pytorch_grad_cam` now raises ImportError
    line = _one_error_line(runner.invoke(app, ["explain", str(run), str(image)]))
    assert line == "error: explain needs pytorch-grad-cam: pip install transferctl[explain]"


def test_unknown_class_lists_the_classes(run: Path, image: Path, tmp_path: Path) -> None:
    pytest.importorskip("pytorch_grad_cam")
    line = _one_error_line(runner.invoke(app, ["explain", str(run), str(image), "--class", "purple", "--out", str(tmp_path)]))
    assert "--class" in line and "purple" in line and all(name in line for name in ("red", "green", "blue"))
    assert not list(tmp_path.glob("*.png"))


def test_missing_image_is_one_line(run: Path, tmp_path: Path) -> None:
    line = _one_error_line(runner.invoke(app, ["explain", str(run), str(tmp_path / "nope.jpg")]))
    assert "nope.jpg" in line and "no such file" in line
