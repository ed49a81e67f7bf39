"""show: one run at a glance (config changes, phases, best metrics, timing). Never imports torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from transferctl.cli import INSPECT, app, err, print_json, user_errors


@app.command(rich_help_panel=INSPECT)
def show(
    run_dir: Path = typer.Argument(..., file_okay=False, help="A run directory written by `transferctl train`."),
    as_json: bool = typer.Option(False, "--json", help="Print the run as one JSON document on stdout."),
) -> None:
    """A run at a glance: config differences from the defaults, phases, best metrics, timing."""
    from transferctl.analysis.show import show_run

    with user_errors():
        shown = show_run(run_dir)
    if as_json:
        print_json(shown)
        return
    # In a pipe or log Rich assumes 80 columns and would fold every cell; let the lines be long instead.
    console = err if err.is_terminal else Console(stderr=True, highlight=False, width=200)
    console.print(render_show(shown))


def render_show(shown: dict[str, Any]) -> Group:
    header = Table.grid(padding=(0, 2))
    status = shown["status"] if shown["status"] == "finished" else f"[yellow]{shown['status']}[/]"
    classes = shown["classes"]
    header.add_row("run", f"{escape(shown['run_dir'])} ({status}, started {(shown['started'] or '?').replace('T', ' ')})")
    weights = "random init" if str(shown["weights"]).lower() == "none" else f"weights {shown['weights']}"
    header.add_row("model", f"{shown['backbone']}, {escape(weights)}, {shown['strategy']}")
    header.add_row("data", escape(shown["data_root"]) + (f" ({len(classes)} classes)" if classes else ""))
    parts: list[Any] = [header]
    if shown["changed"]:
        changes = Table(title="changed from the defaults", title_justify="left", show_header=False, box=None, padding=(0, 2))
        for change in shown["changed"]:
            changes.add_row(change["field"], escape(_value(change["value"])), f"[dim](default {escape(_value(change['default']))})[/]")
        parts.append(changes)
    else:
        parts.append("every field at its default")
    parts.append(_phases(shown["phases"]))
    parts.extend(_results(shown))
    parts.extend(f"[yellow]note:[/] {escape(line)}" for line in shown["skipped_rows"])
    return Group(*parts)


def _phases(phases: list[dict[str, Any]]) -> Table:
    table = Table(title="phases", title_justify="left")
    multi_label = any(phase.get("best_val_map") is not None for phase in phases)
    headline = ("best val mAP", "best_val_map") if multi_label else ("best val acc", "best_val_acc")
    for column in ("#", "phase", "epochs", "trains", "lr head", "lr backbone", "BatchNorm", headline[0], "time"):
        table.add_column(column, justify="right" if column in ("#", "epochs", "lr head", "lr backbone", headline[0], "time") else "left")
    for phase in phases:
        epochs = str(phase["epochs"]) if phase["epochs_run"] == phase["epochs"] else f"{phase['epochs_run']}/{phase['epochs']}"
        best = f"{phase[headline[1]]:.4f}" if phase.get(headline[1]) is not None else "-"
        backbone = f"{phase['lr_backbone']:.2g}" if phase["lr_backbone"] is not None else "frozen"
        table.add_row(str(phase["index"] + 1), escape(phase["name"]), epochs, escape(phase["trains"]), f"{phase['lr_head']:.2g}", backbone,
                      phase["bn"], best, f"{phase['seconds']:.1f}s")  # fmt: skip
    return table


def _results(shown: dict[str, Any]) -> list[str]:
    lines = []
    best = shown["best"]
    if best is not None:
        loss = f", val_loss {best['val_loss']:.4f}" if isinstance(best.get("val_loss"), (int, float)) else ""
        final = f"; last epoch {best['final_val_acc']:.4f}" if isinstance(best.get("final_val_acc"), (int, float)) else ""
        score = f"val_map {best['val_map']:.4f}, val_acc (every label right) " if isinstance(best.get("val_map"), (int, float)) else "val_acc "
        lines.append(f"[bold]best:[/] {score}{best['val_acc']:.4f}{loss} at epoch {best['epoch']} ({best['phase']}), by {best['metric']}{final}")
    if shown["evaluations"]:
        lines.append("[bold]evaluated:[/] " + ", ".join(f"{split} accuracy {acc:.4f}" for split, acc in shown["evaluations"].items()))
    timing = shown["timing"]
    wall = f"{timing['seconds']:.1f}s in all, " if isinstance(timing["seconds"], (int, float)) else ""
    speed = f", {timing['images_per_second']:.0f} images/s" if isinstance(timing["images_per_second"], (int, float)) else ""
    where = ", ".join(str(part) for part in (timing["device"], timing["precision"], timing["gpu"], f"torch {timing['torch']}" if timing["torch"] else None) if part)
    waited = f" ({timing['data_seconds']:.1f}s of it waiting for data)" if isinstance(timing.get("data_seconds"), (int, float)) else ""
    lines.append(f"[bold]time:[/] {timing['epochs']} epochs, {wall}{timing['train_seconds']:.1f}s training{waited}{speed}" + (f" on {escape(where)}" if where else ""))
    return lines


def _value(value: Any) -> str:
    return "null" if value is None else str(value)
