"""checkpoint_timing.py: an epoch's checkpoints are written when due, else held as copies and written later."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import record_checkpoint_writes
from transferctl.training.checkpoint_timing import CheckpointSaver, on_cpu
from transferctl.errors import CheckpointError
from transferctl.runs.rundir import RunDir

HINT = "free disk space, then resume"


def epoch_payloads(epoch: int, weight: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    """(last, best) of an epoch as train.py builds them: both share the model's tensors."""
    best = {"model": {"fc.weight": weight}, "epoch": epoch}
    rows = [{"phase": "head", "phase_index": 0, "epoch": n, "global_epoch": n} for n in range(1, epoch + 1)]
    return {**best, "optimizer": {"state": {0: {"exp_avg": weight * 0.5}}}, "rows": rows}, best


def written(run: Path, kind: str) -> dict[str, Any]:
    return torch.load(run / "checkpoints" / f"{kind}.pt", weights_only=True)


def test_an_epoch_that_is_not_due_is_written_by_flush_as_it_was(tmp_path: Path) -> None:
    saver = CheckpointSaver(RunDir(tmp_path), 3600, HINT)
    weight = torch.zeros(2, 3)
    last, best = epoch_payloads(1, weight)

    saver.save(last, best, phase_done=False)
    weight += 1  # the next epoch's steps change the model in place

    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    saver.flush()
    assert torch.equal(written(tmp_path, "last")["model"]["fc.weight"], torch.zeros(2, 3))
    assert torch.equal(written(tmp_path, "best")["model"]["fc.weight"], torch.zeros(2, 3))
    assert [row["global_epoch"] for row in RunDir(tmp_path).metrics()] == [1]


def test_the_held_best_epoch_is_written_with_a_later_epoch_that_is_due(tmp_path: Path) -> None:
    saver = CheckpointSaver(RunDir(tmp_path), 3600, HINT)
    weight = torch.zeros(2, 3)
    saver.save(*epoch_payloads(1, weight), phase_done=False)  # the best epoch, held
    weight += 1
    last, _ = epoch_payloads(2, weight)

    saver.save(last, None, phase_done=True)  # not better, but the phase ends

    assert written(tmp_path, "best")["epoch"] == 1 and torch.equal(written(tmp_path, "best")["model"]["fc.weight"], torch.zeros(2, 3))
    assert written(tmp_path, "last")["epoch"] == 2 and torch.equal(written(tmp_path, "last")["model"]["fc.weight"], torch.ones(2, 3))
    assert [row["global_epoch"] for row in RunDir(tmp_path).metrics()] == [1, 2]
    saver.flush()  # nothing held any more
    assert written(tmp_path, "last")["epoch"] == 2


def test_a_written_best_epoch_is_not_written_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saver = CheckpointSaver(RunDir(tmp_path), 3600, HINT)
    saves = record_checkpoint_writes(monkeypatch, "epoch")

    saver.save(*epoch_payloads(1, torch.zeros(1)), phase_done=True)
    saver.save(epoch_payloads(2, torch.ones(1))[0], None, phase_done=False)
    saver.flush()

    assert saves == [("best", 1), ("last", 1), ("last", 2)]


def test_held_copies_share_what_the_payloads_share() -> None:
    weight = torch.zeros(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    last, best = epoch_payloads(1, weight)
    copies: dict[int, torch.Tensor] = {}

    last_copy, best_copy = on_cpu(last, copies, always_copy=True), on_cpu(best, copies, always_copy=True)

    assert last_copy["model"]["fc.weight"] is best_copy["model"]["fc.weight"]  # copied once
    assert last_copy["model"]["fc.weight"] is not weight
    assert last_copy["model"]["fc.weight"].is_contiguous()  # checkpoints hold the default layout
    assert on_cpu({"python": (3, (1, 2), None), "numpy": ["MT19937", [1, 2], 0]}, {}) == {"python": (3, (1, 2), None), "numpy": ["MT19937", [1, 2], 0]}


def test_only_tensors_in_another_layout_are_converted_for_a_write() -> None:
    plain, channels_last = torch.zeros(3), torch.zeros(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)

    converted = on_cpu({"plain": plain, "conv": channels_last}, {})

    assert converted["plain"].data_ptr() == plain.data_ptr()  # not copied
    assert converted["conv"].is_contiguous() and torch.equal(converted["conv"], channels_last)


def test_a_written_checkpoint_holds_the_default_layout(tmp_path: Path) -> None:
    weight = torch.arange(48.0).reshape(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)

    CheckpointSaver(RunDir(tmp_path), 3600, HINT).save(*epoch_payloads(1, weight), phase_done=True)

    saved = written(tmp_path, "last")["model"]["fc.weight"]
    assert saved.is_contiguous() and torch.equal(saved, weight)


def test_writes_are_due_at_a_phase_end_or_after_the_interval(tmp_path: Path) -> None:
    assert CheckpointSaver(RunDir(tmp_path), 3600, HINT).is_due(phase_done=True)
    assert not CheckpointSaver(RunDir(tmp_path), 3600, HINT).is_due(phase_done=False)
    assert CheckpointSaver(RunDir(tmp_path), 0, HINT).is_due(phase_done=False)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file is written")
def test_a_failed_write_names_the_file_and_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    saver = CheckpointSaver(RunDir(tmp_path), 3600, HINT)
    saver.save(*epoch_payloads(1, torch.zeros(1)), phase_done=False)
    monkeypatch.setattr(os, "fsync", full_disk)

    with pytest.raises(CheckpointError) as info:
        saver.flush()

    (problem,) = info.value.problems
    assert problem.where == str(tmp_path / "checkpoints" / "best.pt") and "No space left on device" in problem.message and problem.hint == HINT
