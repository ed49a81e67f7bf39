"""report: the learning curves of existing runs in one PNG, and one summary row per run.

Reads only what `train` writes (config.yaml, metrics.jsonl, summary.json), so it works on runs from
`train` and from `compare`, finished or not, and never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferctl.analysis.curves import RunCurves, auc, curve_metric
from transferctl.errors import CheckpointError, DataError, Problem
from transferctl.runs.rundir import NUMERIC_METRICS, RunDir, write_atomically
from transferctl.runs.listing import RunInfo, describe_run, is_run_dir

PNG_NAME = "learning-curves.png"


@dataclass(frozen=True)
class RunReport:
    runs: list[dict[str, Any]]
    png: Path


def find_run_dirs(paths: Sequence[Path]) -> list[Path]:
    """Each argument is a run directory, or a folder of them (a `compare` folder, an output.dir)."""
    found: list[Path] = []
    seen: set[Path] = set()  # resolved: runs/x and /abs/runs/x are one run
    for path in paths:
        if not path.is_dir():
            raise DataError(Problem(str(path), "no such run directory", "pass folders written by `transferctl train` or `compare`"))
        inside = [path] if is_run_dir(path) else sorted(child for child in path.iterdir() if is_run_dir(child))
        if not inside:
            raise CheckpointError(Problem(str(path), "is not a run directory and holds none", "pass folders written by `transferctl train` or `compare`"))
        for run in inside:
            if run.resolve() not in seen:
                seen.add(run.resolve())
                found.append(run)
    return found


def load_run_curves(path: Path) -> RunCurves:
    return RunCurves(path, describe_run(path), RunDir(path).metrics(numbers=NUMERIC_METRICS))


def summarize_run(run: RunCurves) -> dict[str, Any]:
    """Best, final and area-under-curve numbers from the metric rows (finished or not)."""
    summary: dict[str, Any] = {
        "run_dir": str(run.path), "name": run.name, "strategy": run.info.strategy, "backbone": run.info.backbone,
        "status": run.info.status, "epochs": len(run.rows), "phases": list(dict.fromkeys(run.series("phase"))),
    }  # fmt: skip
    if not run.rows:
        return summary
    best = max(run.rows, key=lambda row: row["val_acc"])  # the first of equals: max keeps it
    last = run.rows[-1]
    return {
        **summary,
        "best_val_acc": best["val_acc"],
        "best_epoch": best["global_epoch"],
        "final_val_acc": last["val_acc"],
        "final_train_acc": last["train_acc"],
        "min_val_loss": min(run.series("val_loss")),
        "final_train_loss": last["train_loss"],
        "val_acc_auc": auc(run.series("val_acc")),
        "phase_ends": run.phase_ends,
        "seconds": round(sum(row.get("seconds", 0.0) for row in run.rows), 2),
        **(_map_numbers(run) if curve_metric(run.rows) == "val_map" else {}),
    }


def _map_numbers(run: RunCurves) -> dict[str, Any]:
    """A multi-label run's own measure beside val_acc (there subset accuracy: every label right)."""
    best = max(run.rows, key=lambda row: row["val_map"])
    return {"best_val_map": best["val_map"], "best_map_epoch": best["global_epoch"], "final_val_map": run.rows[-1]["val_map"],
            "val_map_auc": auc(run.series("val_map"))}  # fmt: skip


def default_png(paths: Sequence[Path]) -> Path:
    """Next to the one run (or folder of runs) given, else in the current directory."""
    return paths[0] / PNG_NAME if len(paths) == 1 else Path(PNG_NAME)


def report_runs(paths: Sequence[Path], png: Path | None = None) -> RunReport:
    """Plot the loss and accuracy curves of every run found under paths into one PNG."""
    from transferctl.analysis.plots import learning_curves_figure, png_bytes

    runs = [load_run_curves(path) for path in find_run_dirs(paths)]
    if not any(run.rows for run in runs):
        raise CheckpointError(Problem(", ".join(str(p) for p in paths), "no run has finished an epoch yet", "wait for the first epoch, then retry"))
    png = png or default_png(paths)
    write_atomically(png, png_bytes(learning_curves_figure(runs)))
    return RunReport([summarize_run(run) for run in runs], png)
