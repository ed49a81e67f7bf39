"""What is in a folder of runs: one row per run directory, read from the files `train` wrote.

No torch here: `transferctl runs` must answer instantly. A run without summary.json is still training or
was interrupted; it is listed as unfinished with what its metrics say so far, and a damaged file marks
its run as damaged instead of stopping the listing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from transferctl.errors import CheckpointError, DataError, Problem
from transferctl.paths import checked
from transferctl.runs.rundir import NUMERIC_METRICS, TIMINGS, MetricRows, read_json_mapping, read_metrics

if TYPE_CHECKING:
    from transferctl.config import ExperimentConfig

RUN_MARKERS = ("config.yaml", "summary.json")


@dataclass(frozen=True)
class RunInfo:
    path: str
    name: str
    status: str  # finished | unfinished | damaged
    backbone: str | None = None
    weights: str | None = None
    strategy: str | None = None
    best_val_acc: float | None = None
    best_val_map: float | None = None  # multi-label runs: the best epoch's mean average precision
    epochs: int | None = None
    date: str | None = None
    evaluations: dict[str, float] = field(default_factory=dict)  # split -> accuracy, from eval/<split>.json
    note: str = ""
    skipped_rows: list[str] = field(default_factory=list)  # damaged metrics.jsonl lines, each "file:line: why"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_run_config(run_dir: Path) -> ExperimentConfig:
    """The resolved experiment a run was trained with (its config.yaml), validated."""
    from transferctl.config import config_from_dict  # pydantic: not needed just to list runs

    path = checked(run_dir, CheckpointError) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(Problem(str(run_dir), "no config.yaml: not a transferctl run directory", "pass a folder that `transferctl train` wrote"))
    raw = _read_yaml_mapping(path)
    if raw is None:
        raise CheckpointError(Problem(str(path), "damaged: not a YAML mapping", "restore it from the checkpoint's 'config' entry"))
    return config_from_dict(raw, source=str(path))


def list_runs(folder: Path) -> list[RunInfo]:
    """Every run directory directly inside folder, oldest first."""
    if not checked(folder, DataError).is_dir():
        raise DataError(Problem(str(folder), "no such folder of runs", "pass the output.dir of your experiments; the default is runs"))
    runs = [describe_run(path) for path in sorted(folder.iterdir()) if is_run_dir(path)]
    return sorted(runs, key=lambda run: (run.date or "", run.name))


def _highest(rows: list[dict[str, Any]], column: str) -> float | None:
    values = [row[column] for row in rows if isinstance(row.get(column), (int, float))]
    return max(values) if values else None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in RUN_MARKERS)


def describe_run(run_dir: Path) -> RunInfo:
    config = _read_yaml_mapping(run_dir / "config.yaml") or {}
    backbone = config.get("backbone") if isinstance(config.get("backbone"), dict) else {}
    common: dict[str, Any] = {
        "path": str(run_dir),
        "name": run_dir.name,
        "backbone": backbone.get("name"),
        "weights": backbone.get("weights"),
        "strategy": config.get("strategy"),
        "date": _start_date(run_dir),
        "evaluations": _evaluations(run_dir),
    }
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = read_json_mapping(summary_path)
        if summary is None:
            return RunInfo(status="damaged", note=f"{summary_path} is damaged (not a JSON object)", **common)
        common["backbone"] = summary.get("backbone", common["backbone"])
        common["strategy"] = summary.get("strategy", common["strategy"])
        return RunInfo(status="finished", best_val_acc=summary.get("best_val_acc"), best_val_map=summary.get("best_val_map"), epochs=summary.get("epochs"), **common)
    metrics = metric_rows(run_dir)
    return RunInfo(
        status="unfinished",
        best_val_acc=_highest(metrics.rows, "val_acc"),
        best_val_map=_highest(metrics.rows, "val_map"),
        epochs=len(metrics.rows),
        note="no summary.json: still training or interrupted",
        skipped_rows=metrics.skipped,
        **common,
    )


def _start_date(run_dir: Path) -> str | None:
    """config.yaml is written when training starts."""
    for name in ("config.yaml", "summary.json"):
        path = run_dir / name
        if path.is_file():
            return datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")
    return None


def _evaluations(run_dir: Path) -> dict[str, float]:
    found: dict[str, float] = {}
    for path in sorted((run_dir / "eval").glob("*.json")):
        report = read_json_mapping(path)
        if report is not None and isinstance(report.get("accuracy"), (int, float)):
            found[path.stem] = report["accuracy"]
    return found


def _read_yaml_mapping(path: Path) -> dict[str, Any] | None:
    """The file's mapping, or None when it is missing, unreadable or not a mapping: one damaged run
    must not stop the listing of the others."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # a UnicodeDecodeError is a ValueError, and so is a bad date
        return None
    return data if isinstance(data, dict) else None


def metric_rows(run_dir: Path) -> MetricRows:
    """A run's metric rows as listings show them (read_metrics, lenient): a damaged line is left out with a note."""
    return read_metrics(run_dir / "metrics.jsonl", (*NUMERIC_METRICS, *TIMINGS), strict=False)
