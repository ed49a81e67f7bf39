"""A run's checkpoint files, typed: what training writes into checkpoints/best.pt and last.pt, and the one
reader of them that resume, inference, export and `run:` weights share.

best.pt holds the weights and what it takes to rebuild and use them; last.pt adds all an uninterrupted run
would carry into the next epoch (resume.py). Files of earlier versions may lack any field but `model` and
`classes`: such a field reads as None, and each reader decides what it can do without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypedDict

from transferctl.errors import CheckpointError, Problem
from transferctl.paths import checked
from transferctl.runs.rundir import CHECKPOINTS

CHECKPOINT_FORMAT = 2  # 2: last.pt carries everything resume needs (rows, early-stopping state, ...)


class BackboneEntry(TypedDict, total=False):
    """What the checkpoint says about its network (export copies it into model.json as it is)."""

    name: str
    weights: str
    head: str
    cut: str | None


@dataclass(kw_only=True)  # keyword-only: the fields keep the order the files have always had
class Checkpoint:
    """best.pt: the weights, the classes in output order, and how to rebuild the network that holds them."""

    format: int | None = None
    model: dict[str, Any]  # the state dict
    classes: list[str]
    data: Any = None  # the splits' fingerprint, which resume compares with the data it finds
    backbone: BackboneEntry = field(default_factory=lambda: BackboneEntry())
    preprocessing: dict[str, Any] | None = None
    phase_index: int | None = None
    epoch: int | None = None  # within the phase
    global_epoch: int | None = None
    best: dict[str, Any] | None = None  # the best metrics row so far
    config: dict[str, Any] | None = None  # the resolved experiment
    weights: str | None = None  # raw | ema: the trained weights, or their average (ema:) where that did better

    def to_payload(self) -> dict[str, Any]:
        """The dict torch.save writes: every field, in order; tensors as they are (never copied here)."""
        return {item.name: getattr(self, item.name) for item in fields(self)}


@dataclass(kw_only=True)
class LastCheckpoint(Checkpoint):
    """last.pt: a checkpoint with the state a resume continues from."""

    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None  # None where no grad scaler runs
    rng: dict[str, Any] | None = None
    phase_done: bool | None = None  # the phase ran all its epochs or stopped early
    phase_best: dict[str, Any] | None = None  # the phase's best row, for its early stopping
    stale: int | None = None  # epochs since the phase's metric last improved
    rows: list[dict[str, Any]] | None = None  # every epoch's metrics row so far
    elapsed: float | None = None  # seconds spent training, all sessions together
    ema: dict[str, Any] | None = None  # the weight average's state (ema.py), where the run keeps one


RESUME_FIELDS = frozenset(item.name for item in fields(LastCheckpoint)) - {item.name for item in fields(Checkpoint)}


def checkpoint_from_payload(payload: dict[str, Any]) -> Checkpoint:
    """The fields a loaded checkpoint dict has (a LastCheckpoint where it holds any resume state); a field it
    lacks reads as its default, a key no field names is left out."""
    kind = LastCheckpoint if RESUME_FIELDS & payload.keys() else Checkpoint
    known = {item.name for item in fields(kind)}
    return kind(**{key: value for key, value in payload.items() if key in known})


def checkpoint_file(run_dir: Path, which: str) -> Path:
    """best | last | a path to a checkpoint file."""
    if which in ("best", "last"):
        return run_dir / CHECKPOINTS / f"{which}.pt"
    return Path(which)


def load_run_checkpoint(run_dir: Path, which: str = "best", where: str = "") -> Checkpoint:
    """A run's best or last checkpoint, or a checkpoint file, loaded without running any code it carries."""
    from transferctl.runs.safeload import load_torch_file

    checked(run_dir, CheckpointError, where)
    where = where or str(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(Problem(where, f"no such run directory: {run_dir}", "give a folder written by `transferctl train`"))
    path = checkpoint_file(run_dir, which)
    if not checked(path, CheckpointError).is_file():
        raise CheckpointError(Problem(where, f"no checkpoint at {path}", "train the run first, or pick --checkpoint last"))
    payload = load_torch_file(path, CheckpointError, where)
    if not isinstance(payload, dict) or "model" not in payload or "classes" not in payload:
        raise CheckpointError(Problem(where, f"{path} is not a transferctl checkpoint", "use a checkpoint from a run directory"))
    return checkpoint_from_payload(payload)
