"""runs: the runs in a folder, finished or not, as a table or JSON. Never imports torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from transferctl.cli import INSPECT, app, err, print_json, user_errors


@app.command(rich_help_panel=INSPECT)
def runs(
    folder: Path = typer.Argument(Path("runs"), file_okay=False, help="A folder of run directories (an experiment's output.dir)."),
    as_json: bool = typer.Option(False, "--json", help="Print the runs as one JSON list on stdout."),
) -> None:
    """List runs: name, backbone, strategy, best val accuracy, epochs, date, status."""
    from transferctl.runs.listing import list_runs

    with user_errors():
        found = list_runs(folder)
    if as_json:
        print_json([run.to_dict() for run in found])
        return
    if not found:
        err.print(f"no runs in {folder}", markup=False)
        return
    # In a pipe or log Rich assumes 80 columns and would fold every cell; let the lines be long instead.
    console = err if err.is_terminal else Console(stderr=True, highlight=False, width=240)
    console.print(render_runs(found))
    for line in (line for run in found for line in run.skipped_rows):
        console.print(f"[yellow]note:[/] {escape(line)}")


def render_runs(found: list[Any]) -> Table:
    multi_label = any(run.best_val_map is not None for run in found)  # a column of its own only where a run has it
    title = f"{len(found)} runs (val acc: the best epoch's" + ("; of a multi-label run, every label right)" if multi_label else ")")
    table = Table(title=title)
    for column in ("name", "backbone", "strategy", "val acc", *(("val mAP",) if multi_label else ()), "epochs", "started", "eval acc", "status"):
        table.add_column(column, justify="right" if column in ("val acc", "val mAP", "epochs") else "left", overflow="fold")
    for run in found:
        accuracy = _number(run.best_val_acc)
        evaluations = " ".join(f"{split}:{acc:.3f}" for split, acc in run.evaluations.items()) or "-"
        status = run.status if run.status == "finished" else f"[yellow]{run.status}[/]"
        table.add_row(escape(run.name), escape(run.backbone or "?"), run.strategy or "?", accuracy, *((_number(run.best_val_map),) if multi_label else ()),
                      str(run.epochs if run.epochs is not None else "-"),
                      (run.date or "?").replace("T", " ")[:16], evaluations, status)  # fmt: skip
    return table


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"
