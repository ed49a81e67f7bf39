"""report: learning curves of existing runs in one PNG, and their summary table. Never imports torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from transferctl.cli import INSPECT, app, err, print_json, user_errors


@app.command(rich_help_panel=INSPECT)
def report(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories, or folders of them (a compare folder, an output.dir)."),
    out: Optional[Path] = typer.Option(None, "--out", dir_okay=False, help="The PNG to write (default: learning-curves.png in the one folder given, else in the current directory)."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summaries as one JSON document on stdout."),
) -> None:
    """Plot loss and accuracy (train and val) per epoch of one or more runs, and summarise them."""
    from transferctl.analysis.report import report_runs

    with user_errors():
        result = report_runs(run_dirs, out)
    if as_json:
        print_json({"png": str(result.png), "runs": result.runs})
    else:
        table_console().print(render_run_summaries(result.runs))
    err.print(f"wrote {result.png}", markup=False)


def table_console() -> Console:
    """stderr; in a pipe or log Rich assumes 80 columns and would fold every cell, so allow long lines."""
    return err if err.is_terminal else Console(stderr=True, highlight=False, width=200)


def render_run_summaries(runs: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{len(runs)} runs (AUC: mean val accuracy over epochs, trapezoid)")
    with_map = any("best_val_map" in run for run in runs)  # multi-label runs: their mAP, since their val acc is every label right
    columns = ("run", "strategy", "epochs", "phases", "best val acc (epoch)", "final val acc", "final train acc", "min val loss", "AUC", "seconds", "status")
    if with_map:
        columns = (*columns[:4], "best val mAP (epoch)", *columns[4:])
    for column in columns:
        table.add_column(column, justify="left" if column in ("run", "strategy", "phases", "status") else "right", overflow="fold")
    for run in runs:
        if not run["epochs"]:
            table.add_row(escape(run["name"]), run["strategy"] or "?", "0", *("-" for _ in columns[3:-1]), f"[yellow]{run['status']}[/]")
            continue
        status = run["status"] if run["status"] == "finished" else f"[yellow]{run['status']}[/]"
        mean_ap = [f"{run['best_val_map']:.4f} ({run['best_map_epoch']})" if "best_val_map" in run else "-"] if with_map else []
        table.add_row(
            escape(run["name"]), run["strategy"] or "?", str(run["epochs"]), escape(" → ".join(run["phases"])), *mean_ap,
            f"{run['best_val_acc']:.4f} ({run['best_epoch']})", f"{run['final_val_acc']:.4f}", f"{run['final_train_acc']:.4f}",
            f"{run['min_val_loss']:.4f}", f"{run['val_acc_auc']:.4f}", f"{run['seconds']:.1f}", status,
        )  # fmt: skip
    return table
