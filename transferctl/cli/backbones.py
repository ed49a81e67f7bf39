"""backbones: the torchvision models a config can name, with size, input, layer groups, weights and cache."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from transferctl.cli import START, app, err, print_json, user_errors


@app.command(rich_help_panel=START)
def backbones(
    filter_text: Optional[str] = typer.Option(None, "--filter", help="Only models whose name contains TEXT (e.g. resnet, vit_)."),
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
) -> None:
    """List the torchvision backbones: parameters, input size, layer groups, weights, ImageNet top-1, cached."""
    from transferctl.models.catalog import compact_groups, list_backbones

    with user_errors():
        rows = list_backbones(filter_text)
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} torchvision backbones (timm:<model> and python:module:function also work: see docs/experiment-file.md)")
    for column in ("name", "params", "input", "layer groups", "weights (top-1, * = cached)"):
        table.add_column(column, overflow="fold")
    for row in rows:
        weights = ", ".join(
            f"{w['name']} ({w['top1']:.1f}){'*' if w['cached'] else ''}" if w["top1"] is not None else w["name"] for w in row["weights"]
        )
        table.add_row(row["name"], f"{row['params'] / 1e6:.1f}M", str(row["input_size"]), compact_groups(row["layer_groups"]), weights or "-")
    err.print(table)
