"""The run directory: the contract between commands, and the only place transferctl writes to disk.

Layout:
  config.yaml        the resolved experiment (every default spelled out)
  classes.json       class names, in label order
  env.json           versions, device, precision
  metrics.jsonl/csv  one row per epoch
  checkpoints/last.pt, checkpoints/best.pt   loadable with torch.load(weights_only=True); fields: checkpoint.py
  summary.json       best metric, its epoch, timings, paths
Every file is written to a temporary name, flushed, fsynced and renamed: never half-written.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from transferctl.errors import CheckpointError, Problem, TransferctlError
from transferctl.paths import checked

CHECKPOINTS = "checkpoints"
LOCK = ".lock"
METRIC_COLUMNS = (
    "phase", "phase_index", "epoch", "global_epoch", "lr_head", "lr_backbone", "train_loss", "train_acc",
    "val_loss", "val_acc", "seconds", "images_per_second", "data_seconds", "train_seconds", "head_weight_decay",
    "val_balanced_acc", "val_macro_f1", "ema_val_loss", "ema_val_acc", "ema_val_balanced_acc", "ema_val_macro_f1",
    "val_map", "val_micro_f1", "ema_val_map", "ema_val_micro_f1",
)  # fmt: skip


NUMERIC_METRICS = ("global_epoch", "train_loss", "train_acc", "val_loss", "val_acc")  # what report plots and sums up
TIMINGS = ("seconds", "train_seconds", "data_seconds", "images_per_second")


def total_data_seconds(rows: list[dict[str, Any]]) -> float | None:
    """The metric rows' time spent waiting for batches; None when no row has it (written before rows recorded it)."""
    waits = [row["data_seconds"] for row in rows if isinstance(row.get("data_seconds"), (int, float))]
    return round(sum(waits), 2) if waits else None


def overall_images_per_second(rows: list[dict[str, Any]]) -> float | None:
    """Images trained over the seconds spent training them, across epochs: a head epoch on cached features
    runs thousands of images a second, and a plain mean of the epochs' speeds would report that as the run's.
    Rows written before they recorded train_seconds are left out; None when no row has it."""
    timed = [(row["images_per_second"], row["train_seconds"]) for row in rows
             if isinstance(row.get("images_per_second"), (int, float)) and isinstance(row.get("train_seconds"), (int, float))]  # fmt: skip
    seconds = sum(spent for _, spent in timed)
    return round(sum(speed * spent for speed, spent in timed) / seconds, 1) if seconds > 0 else None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: it makes 0600 files and the rename keeps that mode; 0o666 honours the umask.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: bytes | str, error: type[TransferctlError] = CheckpointError) -> None:
    """atomic_write_bytes for a file the user asked for or needs: a full disk or a read-only folder is theirs to fix,
    said in one line that names the file (as `error`, the caller's kind of problem)."""
    try:
        atomic_write_bytes(path, data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise error(Problem(str(path), f"cannot write: {reason}; the previous version of the file, if any, is intact", "free disk space or fix permissions, or write elsewhere, then retry")) from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json_text(data))


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"


def create_run_dir(output_dir: Path, name: str, now: datetime | None = None) -> Path:
    """<output>/<name>-<YYYYmmdd-HHMMSS>, made exclusively: an existing run is never reused."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    checked(output_dir, CheckpointError, "output.dir")
    with _folder_problems("output.dir", output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 100):
            candidate = output_dir / (f"{name}-{stamp}" if attempt == 1 else f"{name}-{stamp}-{attempt}")
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
    raise CheckpointError(Problem("output.dir", f"too many runs named {name}-{stamp} in {output_dir}", "wait a second or rename"))


def claim_run_dir(path: Path) -> Path:
    """A run directory the user named: it must not exist yet."""
    if checked(path, CheckpointError, "--run-dir").exists():
        raise CheckpointError(Problem("--run-dir", f"{path} already exists", "choose a new path; runs are never overwritten"))
    with _folder_problems("--run-dir", path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    return path


@contextlib.contextmanager
def _folder_problems(field: str, path: Path) -> Iterator[None]:
    """A run folder that cannot be made (a file in its way, a read-only or full disk) is the user's to fix."""
    try:
        yield
    except (FileExistsError, NotADirectoryError):
        blocking = file_in_the_way(path) or path
        raise CheckpointError(Problem(field, f"cannot make {path}: {blocking} is a file", f"point {field} at a folder")) from None
    except OSError as exc:
        raise CheckpointError(Problem(field, f"cannot make {path}: {exc.strerror or exc}", f"point {field} at a writable folder")) from None


def file_in_the_way(folder: Path) -> Path | None:
    """The first of folder and the folders above it that exists as something else than a folder."""
    return next((part for part in (folder, *folder.parents) if part.exists() and not part.is_dir()), None)


class RunDir:
    """Writer and reader of one run directory.

    writer=False: a distributed training rank other than 0, which computes what rank 0 writes and writes
    nothing itself (no files, no checkpoints, no lock): one run directory, one writer.
    """

    def __init__(self, path: Path, writer: bool = True) -> None:
        self.path = path
        self.writer = writer

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json_text(data))

    def write_text(self, name: str, text: str) -> None:
        self._write(self.path / name, text.encode("utf-8"))

    def _write(self, path: Path, data: bytes) -> None:
        if self.writer:
            write_atomically(path, data)

    def read_json(self, name: str) -> Any:
        try:
            return read_json(self.path / name)
        except FileNotFoundError:
            raise CheckpointError(Problem(str(self.path), f"no {name}: not a transferctl run directory", "pass a folder that `transferctl train` wrote")) from None

    def metrics(self, numbers: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl, with `numbers` numbers; a damaged row is an error that names its line."""
        return read_metrics(self.path / "metrics.jsonl", numbers).rows

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite both metric files whole (tiny files): a crash never leaves a torn or duplicated row."""
        self.write_text("metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        self.write_text("metrics.csv", buffer.getvalue())

    def save_checkpoint(self, kind: str, payload: dict[str, Any]) -> Path:
        import torch

        path = self.checkpoints / f"{kind}.pt"
        if not self.writer:
            return path
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        self._write(path, buffer.getvalue())
        return path

    def remove_stale_temp_files(self) -> list[Path]:
        """Temporary files a killed process left behind (never the files they were to replace)."""
        if not self.writer:
            return []
        stale = [p for folder in (self.path, self.checkpoints) if folder.is_dir() for p in folder.glob(".*.tmp") if p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Only one process trains in a run directory at a time (a second `--resume` is refused)."""
        if not self.writer:
            yield
            return
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; runs are still never overwritten
            yield
            return
        with (self.path / LOCK).open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise CheckpointError(Problem(str(self.path), "another transferctl process is training in this run directory", "wait for it to finish or stop it first")) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def read_json(path: Path, strict: bool = True) -> Any:
    """A JSON file's value. strict: a damaged file is an error that names it (a missing or unreadable one
    raises OSError, for the caller to say what it means); lenient: None for all of them, so that one
    damaged run does not stop a listing of the others."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if not strict:
            return None
        if isinstance(exc, OSError):
            raise
        damage = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise CheckpointError(Problem(str(path), f"damaged JSON: {damage}", "restore it or re-run")) from None


def read_json_mapping(path: Path) -> dict[str, Any] | None:
    """A JSON file's mapping, or None when it is missing, damaged or not a mapping."""
    data = read_json(path, strict=False)
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class MetricRows:
    """The rows of a metrics.jsonl that can be used, and a note for each line left out."""

    rows: list[dict[str, Any]]
    skipped: list[str]


def read_metrics(path: Path, numbers: tuple[str, ...] = (), strict: bool = True) -> MetricRows:
    """The rows of a metrics.jsonl, one JSON object an epoch, whose `numbers` are numbers; none when the file is missing.

    strict: a damaged line, or a row without its numbers, is an error that names its line. Lenient: it is
    left out with a note ("file:line: why"), as is an unreadable file, and a row may lack a number (earlier
    versions wrote fewer columns): a run's other rows and other runs are still shown.
    """
    if strict and not path.is_file():
        return MetricRows([], [])
    try:
        lines = list(metric_lines(path))
    except FileNotFoundError:
        return MetricRows([], [])
    except OSError as exc:
        if strict:
            raise
        return MetricRows([], [f"{path}: cannot read: {exc.strerror or exc}; its rows are left out"])
    rows, skipped = [], []
    for where, row, problem in lines:
        if row is not None:
            problem = _wrong_numbers(row, numbers, strict)
        if not problem:
            rows.append(row)
        elif strict:
            raise CheckpointError(Problem(where, problem, "restore it or re-run"))
        else:
            skipped.append(f"{where}: {problem}; the row is left out")
    return MetricRows(rows, skipped)


def _wrong_numbers(row: dict[str, Any], numbers: tuple[str, ...], strict: bool) -> str:
    """What is wrong with a metrics row's numbers; "" when nothing is."""
    wrong = [key for key in numbers if not isinstance(row.get(key) if strict else row.get(key, 0), (int, float))]
    if not wrong:
        return ""
    return f"not a metrics row: {', '.join(numbers)} must be numbers" if strict else f"not a metrics row: {', '.join(wrong)} not a number"


def metric_lines(path: Path) -> Iterator[tuple[str, dict[str, Any] | None, str]]:
    """Each non-blank line of a metrics.jsonl as ("file:line", row, "") or ("file:line", None, what is wrong).

    Decoded line by line: one byte that is not UTF-8 costs its own row, not the whole file.
    """
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield where, None, "damaged row: not UTF-8 text"
            continue
        except json.JSONDecodeError as exc:
            yield where, None, f"damaged JSON: {exc.msg}"
            continue
        yield (where, row, "") if isinstance(row, dict) else (where, None, "not a metrics row: each line is a JSON object")

