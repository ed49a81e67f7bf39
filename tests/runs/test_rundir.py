"""rundir.py: run directory naming, atomic writes, metrics and saving checkpoints (reading them: test_checkpoint.py)."""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from transferctl.errors import CheckpointError
from transferctl.runs.rundir import (
    METRIC_COLUMNS,
    RunDir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    claim_run_dir,
    create_run_dir,
    overall_images_per_second,
    total_data_seconds,
)

NOW = datetime(2024, 3, 9, 7, 5, 3)


def metric_row(epoch: int, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {column: 0.0 for column in METRIC_COLUMNS}
    row.update(phase="head", phase_index=0, epoch=epoch, global_epoch=epoch, val_acc=0.5 + epoch / 10)
    row.update(extra)
    return row


def valid_checkpoint() -> dict[str, Any]:
    return {"model": {"fc.weight": torch.randn(2, 3), "fc.bias": torch.zeros(2)}, "classes": ["cat", "dog"], "epoch": 3}


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# --------------------------------------------------------------------------- naming


def test_create_run_dir_names_folder_after_name_and_time(tmp_path: Path) -> None:
    path = create_run_dir(tmp_path / "runs", "flowers", now=NOW)

    assert path == tmp_path / "runs" / "flowers-20240309-070503"
    assert path.is_dir()
    assert files_in(path) == []


def test_create_run_dir_never_reuses_a_folder(tmp_path: Path) -> None:
    first = create_run_dir(tmp_path, "exp", now=NOW)
    (first / "marker").write_text("first run")

    second = create_run_dir(tmp_path, "exp", now=NOW)
    third = create_run_dir(tmp_path, "exp", now=NOW)

    assert second == tmp_path / "exp-20240309-070503-2"
    assert third == tmp_path / "exp-20240309-070503-3"
    assert files_in(second) == [] and files_in(third) == []
    assert (first / "marker").read_text() == "first run"


def test_create_run_dir_uses_current_time_by_default(tmp_path: Path) -> None:
    before = datetime.now().replace(microsecond=0)
    path = create_run_dir(tmp_path, "now")
    after = datetime.now()

    stamp = datetime.strptime(path.name.removeprefix("now-"), "%Y%m%d-%H%M%S")
    assert before <= stamp <= after


def test_claim_run_dir_creates_a_new_folder(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "my-run"

    assert claim_run_dir(target) == target
    assert target.is_dir()


@pytest.mark.parametrize("make", ["folder", "file"])
def test_claim_run_dir_refuses_an_existing_path(tmp_path: Path, make: str) -> None:
    target = tmp_path / "taken"
    if make == "folder":
        target.mkdir()
        (target / "config.yaml").write_text("keep me")
    else:
        target.write_text("keep me")

    with pytest.raises(CheckpointError, match="already exists") as info:
        claim_run_dir(target)

    assert str(target) in str(info.value)
    assert (target / "config.yaml" if make == "folder" else target).read_text() == "keep me"


@pytest.mark.parametrize("where", ["output", "inside"])
def test_a_file_in_the_way_of_the_runs_folder_is_named(tmp_path: Path, where: str) -> None:
    (tmp_path / "runs").write_text("notes")
    output = tmp_path / "runs" if where == "output" else tmp_path / "runs" / "sub"

    with pytest.raises(CheckpointError) as info:
        create_run_dir(output, "exp", now=NOW)

    assert str(info.value) == f"output.dir: cannot make {output}: {tmp_path / 'runs'} is a file (point output.dir at a folder)"
    with pytest.raises(CheckpointError, match=f"--run-dir: cannot make {tmp_path / 'runs' / 'mine'}: .* is a file"):
        claim_run_dir(tmp_path / "runs" / "mine")


def test_a_read_only_runs_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(self: Path, *args: Any, **kwargs: Any) -> None:
        raise OSError(30, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(CheckpointError, match="output.dir: cannot make .*: Read-only file system \\(point output.dir at a writable folder\\)"):
        create_run_dir(tmp_path / "runs", "exp", now=NOW)


# --------------------------------------------------------------------------- atomic writes


def test_atomic_writes_leave_only_the_target_file(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "sub" / "blob.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "sub" / "note.txt", "héllo\n")
    atomic_write_json(tmp_path / "sub" / "data.json", {"when": NOW, "n": 1})

    assert files_in(tmp_path / "sub") == ["blob.bin", "data.json", "note.txt"]
    assert (tmp_path / "sub" / "blob.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "note.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((tmp_path / "sub" / "data.json").read_text()) == {"when": str(NOW), "n": 1}


def test_atomic_write_replaces_previous_content(tmp_path: Path) -> None:
    target = tmp_path / "value.txt"
    atomic_write_text(target, "a much longer first version\n")
    atomic_write_text(target, "short\n")

    assert target.read_text() == "short\n"
    assert files_in(tmp_path) == ["value.txt"]


def test_failed_replace_keeps_previous_file_and_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"version": 1})

    def broken_replace(source: str | Path, destination: str | Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(target, {"version": 2})

    assert json.loads(target.read_text()) == {"version": 1}
    assert files_in(tmp_path) == ["summary.json"]


def test_failed_write_keeps_previous_file_and_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "metrics.csv"
    atomic_write_text(target, "old\n")

    def broken_fsync(fd: int) -> None:
        raise KeyboardInterrupt  # interrupted mid-write: not even an Exception

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new\n")

    assert target.read_text() == "old\n"
    assert files_in(tmp_path) == ["metrics.csv"]


def test_atomic_writes_honour_the_umask(tmp_path: Path) -> None:
    """Run files get the permissions a plain open() would give them, not the 0600 of a temp file."""
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "config.yaml", "name: x\n")
    finally:
        os.umask(previous)

    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- RunDir json and metrics


def test_write_json_and_read_json_round_trip(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_json("classes.json", ["chat", "собака"])

    assert run.read_json("classes.json") == ["chat", "собака"]


def test_read_json_of_a_missing_file_says_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no summary.json: not a transferctl run directory") as info:
        RunDir(tmp_path).read_json("summary.json")
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("content", [b'{"best": 0.9,', b"", b"\xff\xfe\x00garbage"])
def test_read_json_of_a_damaged_file_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "summary.json").write_bytes(content)

    with pytest.raises(CheckpointError, match="damaged JSON") as info:
        RunDir(tmp_path).read_json("summary.json")
    assert str(tmp_path / "summary.json") in str(info.value)


def test_write_metrics_writes_jsonl_and_csv(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    rows = [metric_row(1), metric_row(2, note="not a column")]

    run.write_metrics(rows)

    assert run.metrics() == rows
    with (tmp_path / "metrics.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == METRIC_COLUMNS
        table = list(reader)
    assert [row["epoch"] for row in table] == ["1", "2"]
    assert float(table[1]["val_acc"]) == pytest.approx(0.7)


def test_write_metrics_rewrites_without_duplicate_rows(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    rows = [metric_row(1)]
    run.write_metrics(rows)
    rows.append(metric_row(2))
    run.write_metrics(rows)
    run.write_metrics(rows)

    assert [row["epoch"] for row in run.metrics()] == [1, 2]
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(METRIC_COLUMNS)
    assert len(lines) == 3
    assert files_in(tmp_path) == ["metrics.csv", "metrics.jsonl"]


def test_write_metrics_leaves_missing_columns_empty(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_metrics([{"phase": "head", "epoch": 1}])

    with (tmp_path / "metrics.csv").open(newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["phase"] == "head" and row["val_loss"] == ""


def test_metrics_name_a_row_that_is_not_utf8(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_metrics([metric_row(1), metric_row(2)])
    (tmp_path / "metrics.jsonl").write_bytes((tmp_path / "metrics.jsonl").read_bytes().replace(b'"epoch": 2', b'"epoch": 2\xff'))
    with pytest.raises(CheckpointError, match=r"metrics.jsonl:2: damaged row: not UTF-8 text"):
        run.metrics()


def test_metrics_of_a_run_without_metrics_is_empty(tmp_path: Path) -> None:
    assert RunDir(tmp_path).metrics() == []


# --------------------------------------------------------------------------- checkpoints


def test_save_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    payload = valid_checkpoint()

    path = run.save_checkpoint("best", payload)

    assert path == tmp_path / "checkpoints" / "best.pt"
    assert files_in(tmp_path / "checkpoints") == ["best.pt"]
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["classes"] == ["cat", "dog"] and loaded["epoch"] == 3
    assert torch.equal(loaded["model"]["fc.weight"], payload["model"]["fc.weight"])


def test_waiting_time_adds_up_the_rows_that_recorded_it() -> None:
    # A run resumed from an older transferctl's checkpoint has rows without data_seconds.
    assert total_data_seconds([{"seconds": 3.0}, {"data_seconds": 0.25}, {"data_seconds": 0.5}]) == 0.75
    assert total_data_seconds([{"seconds": 3.0}]) is None


def test_a_runs_speed_is_its_images_over_its_training_seconds() -> None:
    cached = {"images_per_second": 4000.0, "train_seconds": 0.01}  # a head epoch on cached features: 40 images
    full = {"images_per_second": 10.0, "train_seconds": 4.0}  # 40 images
    assert overall_images_per_second([cached, full, full]) == round(120 / 8.01, 1)  # not the epochs' mean, 1340
    assert overall_images_per_second([{"images_per_second": 9.0}, full]) == 10.0  # rows from before train_seconds
    assert overall_images_per_second([{"images_per_second": 9.0}]) is None
