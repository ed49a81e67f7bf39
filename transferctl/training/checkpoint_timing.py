"""When an epoch's checkpoints reach the disk: at the end of every phase, and within a phase once
output.checkpoint_seconds have passed since the last write, rather than after every epoch.

A head epoch on cached features takes milliseconds, while writing a network's best.pt and last.pt takes
far longer (what scripts/bench_checkpoints.py measured: docs/commands.md, The run directory). An epoch
not written at once is kept in memory, copied so that later
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
from transferctl.runs.rundir import RunDir


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
        """One epoch's checkpoints; `best` only when the epoch is the best so far. Their tensors may be the
        live model's and optimizer's: written now when due, else kept as copies (a tensor `last` and `best`
        share is copied once)."""
        earlier_best = self._unsaved.best if self._unsaved is not None else None
        if self.is_due(phase_done):
            self._unsaved = None
            self._write(last, best if best is not None else earlier_best)
            return
        copies: dict[int, torch.Tensor] = {}
        best = on_cpu(best, copies, always_copy=True) if best is not None else earlier_best
        self._unsaved = _Unsaved(on_cpu(last, copies, always_copy=True), best)

    def flush(self) -> None:
        """Write the epoch held in memory, if any."""
        if self._unsaved is not None:
            unsaved, self._unsaved = self._unsaved, None
            self._write(unsaved.last, unsaved.best)

    def _write(self, last: dict[str, Any], best: dict[str, Any] | None) -> None:
        """best.pt, then last.pt, then the metric files: whatever a crash cuts short, last.pt is the truth
        (a resume rewrites the metrics from it, and recomputes the epochs after it)."""
        copies: dict[int, torch.Tensor] = {}
        try:
            if best is not None:
                self.run_dir.save_checkpoint("best", on_cpu(best, copies))
            self.run_dir.save_checkpoint("last", on_cpu(last, copies))
            self.run_dir.write_metrics(last["rows"])
        except CheckpointError as exc:
            raise CheckpointError(*(Problem(p.where, p.message, self.hint) for p in exc.problems)) from None
        self.saved_at = time.perf_counter()


def on_cpu(value: Any, copies: dict[int, torch.Tensor], always_copy: bool = False) -> Any:
    """A nested state (dicts, lists, tuples) with every tensor on the CPU in the default, contiguous layout:
    what a checkpoint holds, whatever the device and layout training used (a resume gives optimizer state
    its parameter's layout again: phases.load_optimizer_state). A tensor already so is itself, unless
    `always_copy`: then every tensor is a copy that training cannot change. A tensor met again (`copies`,
    by identity) is converted once."""
    if isinstance(value, torch.Tensor):
        if id(value) not in copies:
            copies[id(value)] = value.detach().to("cpu", copy=always_copy, memory_format=torch.contiguous_format)
        return copies[id(value)]
    if isinstance(value, dict):
        return {key: on_cpu(item, copies, always_copy) for key, item in value.items()}
    if isinstance(value, list):
        return [on_cpu(item, copies, always_copy) for item in value]
    if isinstance(value, tuple):
        return tuple(on_cpu(item, copies, always_copy) for item in value)
    return value
