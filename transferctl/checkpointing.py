"""When an epoch's checkpoints reach the disk: at the end of every phase, and within a phase once
output.checkpoint_seconds have passed since the last write, rather than after every epoch.

A head epoch on cached features takes milliseconds, while writing resnet18's best.pt and last.pt takes
about 150 ms and 90 MB (a ViT-B's, seconds and 700 MB): a 20-epoch feature_extract run on cached features
wrote 984 MB of checkpoints after every epoch, and ran 3.5x as fast writing 85 MB at the phase's end
(scripts/bench_checkpoints.py). An epoch not written at once is kept in memory, copied so that later
steps cannot change it, and written when a write is next due or when the run stops for any reason
(finished, Ctrl-C, SIGTERM, a diverging loss, an error). Only a killed process (kill -9, power loss)
loses it: a resume then trains again the epochs since the last write.

The metric files are written with last.pt, so that they always agree with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from transferctl.errors import CheckpointError, Problem
from transferctl.rundir import RunDir


@dataclass
class _Unsaved:
    last: dict[str, Any]
    best: dict[str, Any] | None  # the best epoch's payload, when it has not been written yet


class CheckpointSaver:
    """Writes best.pt, last.pt and the metric files when due; holds an epoch that is not due in memory.

    `hint` says what to do when a write fails (the disk is full, say).
    """

    def __init__(self, run_dir: RunDir, interval_seconds: float, hint: str) -> None:
        self.run_dir, self.interval, self.hint = run_dir, interval_seconds, hint
        self.saved_at = time.perf_counter()
        self._unsaved: _Unsaved | None = None

    def is_due(self, phase_done: bool) -> bool:
        return phase_done or time.perf_counter() - self.saved_at >= self.interval

    def save(self, last: dict[str, Any], best: dict[str, Any] | None, phase_done: bool) -> None:
        """One epoch's checkpoints; `best` only when the epoch is the best so far. Written now when due,
        else kept as copies (the tensors `last` and `best` share are copied once)."""
        earlier_best = self._unsaved.best if self._unsaved is not None else None
        if self.is_due(phase_done):
            self._unsaved = None
            self._write(last, best if best is not None else earlier_best)
            return
        copies: dict[int, torch.Tensor] = {}
        best = detached_copy(best, copies) if best is not None else earlier_best
        self._unsaved = _Unsaved(detached_copy(last, copies), best)

    def flush(self) -> None:
        """Write the epoch held in memory, if any."""
        if self._unsaved is not None:
            unsaved, self._unsaved = self._unsaved, None
            self._write(unsaved.last, unsaved.best)

    def _write(self, last: dict[str, Any], best: dict[str, Any] | None) -> None:
        """best.pt, then last.pt, then the metric files: whatever a crash cuts short, last.pt is the truth
        (a resume rewrites the metrics from it, and recomputes the epochs after it)."""
        try:
            if best is not None:
                self.run_dir.save_checkpoint("best", best)
            self.run_dir.save_checkpoint("last", last)
            self.run_dir.write_metrics(last["rows"])
        except CheckpointError as exc:
            raise CheckpointError(*(Problem(p.where, p.message, self.hint) for p in exc.problems)) from None
        self.saved_at = time.perf_counter()


def detached_copy(value: Any, copies: dict[int, torch.Tensor] | None = None) -> Any:
    """A copy of a nested state (dicts, lists, tuples) that training cannot change: every tensor copied to
    the CPU, once, however often it appears (`copies`, by identity), in its own memory layout (a fused
    optimizer step reads its state in the layout of the parameter: see phases.load_optimizer_state)."""
    copies = {} if copies is None else copies
    if isinstance(value, torch.Tensor):
        if id(value) not in copies:
            copies[id(value)] = value.detach().to("cpu", copy=True)
        return copies[id(value)]
    if isinstance(value, dict):
        return {key: detached_copy(item, copies) for key, item in value.items()}
    if isinstance(value, list):
        return [detached_copy(item, copies) for item in value]
    if isinstance(value, tuple):
        return tuple(detached_copy(item, copies) for item in value)
    return value
