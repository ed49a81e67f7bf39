from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import experiment, write_experiment
from transferctl import __version__
from transferctl.cli import app

runner = CliRunner()


def invoke(*args: str):  # noqa: ANN201 - typer's Result
    return runner.invoke(app, list(args))


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"transferctl {__version__}"


def test_python_dash_m_works() -> None:
    done = subprocess.run([sys.executable, "-m", "transferctl", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"transferctl {__version__}"


def test_train_json_prints_one_document_on_stdout(tiny_split_data: Path, tmp_path: Path) -> None:
    config = write_experiment(tmp_path / "e.yaml", experiment(tiny_split_data, tmp_path / "runs"))
    result = invoke("train", str(config), "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert Path(summary["run_dir"]).is_dir() and summary["epochs"] == 2


def test_train_logs_plain_lines_when_not_a_terminal(tiny_split_data: Path, tmp_path: Path) -> None:
    config = write_experiment(tmp_path / "e.yaml", experiment(tiny_split_data, tmp_path / "runs"))
    result = invoke("train", str(config))
    assert result.exit_code == 0
    assert "[head] epoch 1/1" in result.stderr and "best val_acc" in result.stderr
    assert "\x1b[" not in result.stderr and result.stdout == ""


def test_set_overrides_reach_the_run(tiny_split_data: Path, tmp_path: Path) -> None:
    config = write_experiment(tmp_path / "e.yaml", experiment(tiny_split_data, tmp_path / "runs"))
    result = invoke("train", str(config), "--json", "-q", "--set", "schedule.1.epochs=2", "--set", "name=other")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 3 and Path(summary["run_dir"]).name.startswith("other-")


def test_user_errors_are_one_line_each_with_exit_1(tmp_path: Path) -> None:
    config = write_experiment(tmp_path / "e.yaml", {"data": {"root": "x", "batch_size": 0}, "backbone": {"nme": "resnet18"}})
    result = invoke("check", str(config))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error:") for line in lines)
    assert "did you mean 'name'" in result.stderr and "Traceback" not in result.output


def test_missing_data_folder_names_the_field(tmp_path: Path) -> None:
    config = write_experiment(tmp_path / "e.yaml", experiment(tmp_path / "nowhere", tmp_path / "runs"))
    result = invoke("train", str(config))
    assert result.exit_code == 1 and "data.root" in result.stderr and "nowhere" in result.stderr


def test_unknown_backbone_is_a_user_error(tiny_split_data: Path, tmp_path: Path) -> None:
    raw = experiment(tiny_split_data, tmp_path / "runs", backbone={"name": "resnet180", "weights": "none"})
    result = invoke("check", str(write_experiment(tmp_path / "e.yaml", raw)))
    assert result.exit_code == 1 and "backbone.name" in result.stderr and "resnet18" in result.stderr


def test_unknown_group_in_schedule_is_a_user_error(tiny_split_data: Path, tmp_path: Path) -> None:
    raw = experiment(tiny_split_data, tmp_path / "runs", schedule=[{"name": "a", "epochs": 1, "lr": 0.1, "train": ["layer9"]}])
    result = invoke("check", str(write_experiment(tmp_path / "e.yaml", raw)))
    assert result.exit_code == 1 and "schedule[0].train" in result.stderr


def test_check_prints_the_plan(tiny_split_data: Path, tmp_path: Path) -> None:
    config = write_experiment(tmp_path / "e.yaml", experiment(tiny_split_data, tmp_path / "runs"))
    result = invoke("check", str(config))
    assert result.exit_code == 0, result.output
    for text in ("head only", "layer4", "trainable", "BatchNorm", "backbone 0.001"):
        assert text in result.stderr
    as_json = json.loads(invoke("check", str(config), "--json").stdout)
    assert [p["phase"] for p in as_json["phases"]] == ["head", "body"]
    assert (as_json["device"], as_json["precision"]) == ("cpu", "fp32") and "runs on" in result.stderr  # what train would use here
    assert not (tmp_path / "runs").exists()


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert invoke("train").exit_code == 2
    assert invoke("frobnicate").exit_code == 2


def runs_json(folder: Path, stdout: object) -> subprocess.Popen[str]:
    """`transferctl runs --json`: machine output without torch, quick to start."""
    return subprocess.Popen([sys.executable, "-m", "transferctl", "runs", str(folder), "--json"], stdout=stdout, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_stdout_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    with open("/dev/full", "w") as full:
        child = runs_json(tmp_path, full)
        _, stderr = child.communicate(timeout=60)
    assert child.returncode == 1
    assert stderr.strip() == "error: stdout: cannot write: No space left on device (send the output where there is room)"


def test_a_reader_that_left_ends_the_command_quietly(tmp_path: Path) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written: `| head -0`
    with open(write, "w") as gone:
        child = runs_json(tmp_path, gone)
        _, stderr = child.communicate(timeout=60)
    assert (child.returncode, stderr) == (0, "")


def test_training_goes_on_to_the_end_when_the_reader_of_its_output_leaves(tiny_split_data: Path, tmp_path: Path) -> None:
    """`train ... --json 2>&1 | head -2`: the progress lines and the JSON summary are dropped, the run is not."""
    config = write_experiment(tmp_path / "e.yaml", experiment(tiny_split_data, tmp_path / "runs"))
    run = tmp_path / "run"
    command = [sys.executable, "-m", "transferctl", "train", str(config), "--run-dir", str(run), "--json"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert child.stdout is not None
    first = [child.stdout.readline() for _ in range(2)]  # what `head -2` reads before it leaves
    child.stdout.close()
    assert child.wait(timeout=300) == 0, first
    assert [json.loads(line)["global_epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run / "summary.json").is_file()


def test_names_with_square_brackets_are_printed_as_written() -> None:
    """Folder, run and class names are the user's; Rich must not read `[red]a` as markup and print `a`."""
    from rich.console import Console

    from transferctl.cli.evaluate import render_report
    from transferctl.cli.runs import render_runs
    from transferctl.runs.listing import RunInfo

    per_class = [{"class": name, "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1} for name in ("[red]a", "b")]
    report = {"run_dir": "runs/[x]", "split": "val", "images": 2, "top5_accuracy": None, "accuracy": 1.0, "loss": 0.1, "macro_f1": 1.0,
              "weighted_f1": 1.0, "ece": 0.0, "per_class": per_class}  # fmt: skip
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render_report(report))
    console.print(render_runs([RunInfo(path="runs/[bold]r", name="[bold]r", status="finished", backbone="resnet18")]))
    text = console.export_text()
    assert "[red]a" in text and "runs/[x]" in text and "[bold]r" in text


def test_help_lists_the_commands_in_the_order_a_user_meets_them() -> None:
    from transferctl.cli import CHOOSE, COMMAND_ORDER, INSPECT, START, TRAIN, USE

    text = invoke("--help").stdout
    panels = [text.index(title) for title in (START, TRAIN, USE, CHOOSE, INSPECT)]
    assert panels == sorted(panels)
    listed = [match.group(1) for match in re.finditer(r"^│ ([a-z][a-z-]*) {2,}\S", text, re.M)]
    assert listed == list(COMMAND_ORDER) and listed[:6] == ["init", "backbones", "schema", "check", "lr-find", "train"]
