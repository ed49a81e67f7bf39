from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import experiment, write_experiment
from transferctl.cli import app
from transferctl.testing.synthetic import tiny_dataset

runner = CliRunner()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    data = tiny_dataset(tmp_path / "data", n_classes=3, layout="split")
    return write_experiment(tmp_path / "experiment.yaml", experiment(data, tmp_path / "runs"))


def invoke(*args: object):  # noqa: ANN201 - typer's Result
    return runner.invoke(app, [str(a) for a in args])


def test_lr_find_writes_the_plot_and_the_json_and_prints_the_set(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "finder.png"
    out.parent.mkdir()
    result = invoke("lr-find", config, "--phase", "1", "--steps", "20", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads(out.with_suffix(".json").read_text())
    assert report["phase"] == 1 and report["phase_name"] == "body" and len(report["lrs"]) == len(report["losses"]) <= 20
    assert min(report["lrs"]) <= report["suggestion"] <= max(report["lrs"])
    assert report["set"] == f"schedule.1.lr={report['suggestion']:.3g}"
    assert f"--set {report['set']}" in result.stderr and "suggested lr for schedule[1] (body)" in result.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300
    assert not (tmp_path / "runs").exists()  # no run directory

    again = invoke("lr-find", config, "--phase", "1", "--steps", "20", "--out", out)
    assert again.exit_code == 1 and again.stderr.strip().count("\n") == 0
    assert f"{out}: exists" in again.stderr and "--force" in again.stderr
    assert invoke("lr-find", config, "--phase", "1", "--steps", "10", "--out", out.parent, "--force").exit_code == 0
    assert (out.parent / "lr_find.png").is_file() and (out.parent / "lr_find.json").is_file()  # a folder: the default names in it


def test_a_phase_the_schedule_does_not_have_is_one_line(config: Path, tmp_path: Path) -> None:
    result = invoke("lr-find", config, "--phase", "2", "--out", tmp_path / "lr.png")
    assert result.exit_code == 1 and result.stderr.strip().count("\n") == 0
    assert "--phase: there is no phase 2: the schedule has 2 (0 to 1)" in result.stderr
    assert not (tmp_path / "lr.png").exists()


def test_check_shows_an_auto_lr_as_the_groups_ratios(config: Path) -> None:
    result = invoke("check", config, "--set", "schedule.1.lr=auto", "--json")
    assert result.exit_code == 0, result.output
    head, body = json.loads(result.stdout)["phases"]
    assert not head["lr_auto"] and body["lr_auto"] and body["lr"]["head"] == 1.0 and body["lr"]["layer4"] == pytest.approx(0.1)
    shown = invoke("check", config, "--set", "schedule.1.lr=auto")
    (body_row,) = [line for line in shown.stderr.splitlines() if line.startswith("│ body ")]
    assert "auto (lr-find" in body_row
