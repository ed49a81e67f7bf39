"""show: a run at a glance, from a real tiny run and from hand-written run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from helpers import heavy_imports
from runs_helpers import train_tiny_run
from transferctl.cli import app
from transferctl.analysis.show import changes_from_defaults, show_run

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(module_tmp_path: Path) -> Path:
    return train_tiny_run(module_tmp_path)


def test_json_of_a_finished_run(tiny_run: Path) -> None:
    result = runner.invoke(app, ["show", str(tiny_run), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["status"] == "finished" and shown["backbone"] == "resnet18" and shown["classes"] == ["blue", "green", "red"]
    changed = {c["field"]: (c["value"], c["default"]) for c in shown["changed"]}
    assert changed["backbone.weights"] == ("none", "DEFAULT") and changed["data.batch_size"] == (8, 32)
    assert "data.root" not in changed and "strategy" not in changed  # fine_tune is the default
    head, body = shown["phases"]
    assert (head["name"], head["trains"], head["lr_head"], head["lr_backbone"], head["epochs_run"]) == ("head", "head only", 0.01, None, 1)
    assert body["trains"] == "all layers" and body["lr_backbone"] == pytest.approx(0.001)
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert shown["best"]["val_acc"] == summary["best_val_acc"] and shown["best"]["epoch"] == summary["best_epoch"]
    assert shown["timing"]["epochs"] == 2 and shown["timing"]["device"] == "cpu" and shown["timing"]["seconds"] == summary["seconds"]
    assert shown["timing"]["data_seconds"] == summary["data_seconds"]


def test_rich_output_names_the_parts(tiny_run: Path) -> None:
    result = runner.invoke(app, ["show", str(tiny_run)])
    assert result.exit_code == 0, result.output
    for text in ("changed from the defaults", "backbone.weights", "phases", "head only", "best: val_acc", "time: 2 epochs", "of it waiting for data"):
        assert text in result.stderr
    assert result.stdout == ""


def write_run(path: Path, config: dict, rows: list[dict] | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    if rows is not None:
        (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def row(phase_index: int, epoch: int, val_acc: float, global_epoch: int) -> dict:
    return {"phase": ["head", "body"][phase_index], "phase_index": phase_index, "epoch": epoch, "global_epoch": global_epoch,
            "val_acc": val_acc, "val_loss": 1.0 - val_acc, "seconds": 2.0, "images_per_second": 10.0}  # fmt: skip


def test_unfinished_run_is_shown_from_its_metrics(tmp_path: Path) -> None:
    config = {"name": "x", "data": {"root": str(tmp_path)}, "strategy": "fine_tune"}
    run = write_run(tmp_path / "run", config, [row(0, 1, 0.5, 1), row(0, 2, 0.7, 2), row(0, 3, 0.6, 3), row(1, 1, 0.65, 4)])
    shown = show_run(run)
    assert shown["status"] == "unfinished"
    assert [(p["epochs_run"], p["epochs"]) for p in shown["phases"]] == [(3, 3), (1, 5)]  # fine_tune's default schedule
    assert shown["best"] == {"metric": "val_acc", "val_acc": 0.7, "val_loss": pytest.approx(0.3), "epoch": 2, "phase": "head", "final_val_acc": 0.65}
    assert shown["timing"]["seconds"] is None and shown["timing"]["train_seconds"] == 8.0
    assert shown["timing"]["data_seconds"] is None  # rows written before they recorded it
    assert [c["field"] for c in shown["changed"]] == ["name"]


def test_an_unfinished_run_adds_up_its_rows_time_waiting_for_data(tmp_path: Path) -> None:
    config = {"name": "x", "data": {"root": str(tmp_path)}, "strategy": "fine_tune"}
    rows = [{**row(0, 1, 0.5, 1), "data_seconds": 0.25}, {**row(0, 2, 0.7, 2), "data_seconds": 0.5}]
    assert show_run(write_run(tmp_path / "run", config, rows))["timing"]["data_seconds"] == 0.75


def test_strategy_default_schedule_is_not_a_change() -> None:
    from transferctl.config import config_from_dict, config_to_dict

    config = config_from_dict({"data": {"root": "d"}, "strategy": "feature_extract"})
    resolved = config_from_dict(config_to_dict(config))  # as config.yaml spells the schedule out
    assert [c["field"] for c in changes_from_defaults(resolved)] == ["strategy"]
    custom = config_from_dict({**config_to_dict(config), "schedule": [{"name": "head", "epochs": 2, "train": "head", "lr": 0.01}]})
    assert [c["field"] for c in changes_from_defaults(custom)] == ["strategy", "schedule"]


def test_a_summary_number_that_is_not_one_is_named_and_bad_rows_are_left_out(tmp_path: Path) -> None:
    config = {"name": "x", "data": {"root": str(tmp_path)}, "strategy": "fine_tune"}
    run = write_run(tmp_path / "run", config, [row(0, 1, 0.5, 1), {**row(0, 2, 0.9, 2), "seconds": "slow"}])
    assert show_run(run)["best"]["val_acc"] == 0.5  # the row whose numbers are not numbers is left out, as a damaged line is
    (run / "summary.json").write_text(json.dumps({"best_val_acc": "high", "epochs": 2}))
    result = runner.invoke(app, ["show", str(run)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {run / 'summary.json'}: best_val_acc is 'high', not a number (restore the file or re-run)"


def test_a_row_that_is_not_utf8_is_left_out_with_a_note_naming_its_line(tmp_path: Path) -> None:
    config = {"name": "x", "data": {"root": str(tmp_path)}, "strategy": "fine_tune"}
    run = write_run(tmp_path / "run", config, [row(0, 1, 0.5, 1), row(0, 2, 0.7, 2), row(0, 3, 0.6, 3)])
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"head"', b'"he\xffad"')  # one byte that is not UTF-8, in the second row
    (run / "metrics.jsonl").write_bytes(b"".join(lines))
    shown = show_run(run)
    assert shown["phases"][0]["epochs_run"] == 2 and shown["best"]["val_acc"] == 0.6
    assert shown["skipped_rows"] == [f"{run / 'metrics.jsonl'}:2: damaged row: not UTF-8 text; the row is left out"]
    result = runner.invoke(app, ["show", str(run)])
    assert result.exit_code == 0 and f"note: {run / 'metrics.jsonl'}:2: damaged row: not UTF-8 text" in result.stderr


def test_not_a_run_directory_is_one_line(tmp_path: Path) -> None:
    for target in (tmp_path / "nowhere", tmp_path):
        result = runner.invoke(app, ["show", str(target)])
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output


def test_show_does_not_import_torch(tmp_path: Path) -> None:

    run = write_run(tmp_path / "run", {"name": "x", "data": {"root": str(tmp_path)}}, [row(0, 1, 0.5, 1)])
    assert heavy_imports("show", str(run)) == "HEAVY="
    assert heavy_imports("show", str(run), "--json") == "HEAVY="
