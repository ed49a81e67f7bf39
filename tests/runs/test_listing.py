from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from helpers import heavy_imports
from runs_helpers import ONE_EPOCH, train_tiny_run
from transferctl.cli import app
from transferctl.runs.listing import list_runs

runner = CliRunner()

def test_help_does_not_import_torch() -> None:
    assert heavy_imports("--help") == "HEAVY="


def test_runs_does_not_import_torch(tmp_path: Path) -> None:
    write_run(tmp_path / "a", summary={"backbone": "resnet18", "strategy": "fine_tune", "best_val_acc": 0.5, "epochs": 2})
    assert heavy_imports("runs", str(tmp_path)) == "HEAVY="
    assert heavy_imports("runs", str(tmp_path), "--json") == "HEAVY="


def write_run(path: Path, summary: dict[str, object] | None = None, metrics: list[dict[str, object]] | None = None) -> Path:
    path.mkdir(parents=True)
    config = {"name": "x", "backbone": {"name": "resnet50", "weights": "DEFAULT"}, "strategy": "feature_extract"}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    if metrics is not None:
        (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
    return path


def test_a_real_run_is_listed_with_its_summary(tmp_path: Path) -> None:
    run = train_tiny_run(tmp_path, schedule=ONE_EPOCH)
    summary = json.loads((run / "summary.json").read_text())
    (tmp_path / "run" / "eval").mkdir()
    (tmp_path / "run" / "eval" / "test.json").write_text(json.dumps({"accuracy": 0.25}))
    [info] = list_runs(tmp_path)
    assert (info.name, info.status, info.backbone, info.strategy) == ("run", "finished", "resnet18", "fine_tune")
    assert info.best_val_acc == summary["best_val_acc"] and info.epochs == 1
    assert info.evaluations == {"test": 0.25} and info.date is not None


def test_unfinished_damaged_and_foreign_folders(tmp_path: Path) -> None:
    write_run(tmp_path / "done", summary={"backbone": "resnet18", "strategy": "fine_tune", "best_val_acc": 0.9, "epochs": 8})
    write_run(tmp_path / "running", metrics=[{"val_acc": 0.4}, {"val_acc": 0.6}, {"val_acc": 0.5}])
    broken = write_run(tmp_path / "broken")
    (broken / "summary.json").write_text("{not json")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a run")

    result = runner.invoke(app, ["runs", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    runs = {run["name"]: run for run in json.loads(result.stdout)}
    assert set(runs) == {"done", "running", "broken"}
    assert runs["done"]["status"] == "finished" and runs["done"]["best_val_acc"] == 0.9 and runs["done"]["epochs"] == 8
    running = runs["running"]
    assert running["status"] == "unfinished" and running["epochs"] == 3 and running["best_val_acc"] == 0.6
    assert (running["backbone"], running["strategy"]) == ("resnet50", "feature_extract")
    assert runs["broken"]["status"] == "damaged" and "summary.json" in runs["broken"]["note"]

    table = runner.invoke(app, ["runs", str(tmp_path)])
    assert table.exit_code == 0 and table.stdout == ""
    assert all(name in table.stderr for name in ("done", "running", "broken", "unfinished"))


def test_an_unfinished_runs_rows_that_are_not_utf8_are_left_out_with_a_note(tmp_path: Path) -> None:
    run = write_run(tmp_path / "running", metrics=[{"val_acc": 0.4}, {"val_acc": 0.6}, {"val_acc": 0.5}])
    (run / "metrics.jsonl").write_bytes((run / "metrics.jsonl").read_bytes().replace(b"0.6", b"0.6\xe9"))
    [info] = list_runs(tmp_path)
    assert (info.epochs, info.best_val_acc) == (2, 0.5)
    assert info.skipped_rows == [f"{run / 'metrics.jsonl'}:2: damaged row: not UTF-8 text; the row is left out"]
    table = runner.invoke(app, ["runs", str(tmp_path)])
    assert table.exit_code == 0 and f"note: {run / 'metrics.jsonl'}:2: damaged row" in table.stderr


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    result = runner.invoke(app, ["runs", str(tmp_path), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == []
    result = runner.invoke(app, ["runs", str(tmp_path / "nope")])
    assert result.exit_code == 1 and result.stderr.startswith("error:") and "nope" in result.stderr


@pytest.mark.parametrize("args", [["--help"], ["runs", "--help"]])
def test_help_exits_0(args: list[str]) -> None:
    assert runner.invoke(app, args).exit_code == 0
