"""init: inspect a folder of images and write a commented experiment file for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Group
from rich.markup import escape
from rich.table import Table

from transferctl.cli import START, app, err, print_json, user_errors

STRATEGY_CHOICES = ("auto", "feature_extract", "fine_tune", "scratch", "pretrained_init")
SHOWN_CLASSES = 12


@app.command(rich_help_panel=START)
def init(
    data_dir: Path = typer.Argument(..., file_okay=False, help="A folder of images: DIR/train/<class>/*, DIR/val/<class>/* (optional DIR/test), or DIR/<class>/*."),
    backbone: str = typer.Option("resnet18", "--backbone", help="A torchvision classification model."),
    strategy: str = typer.Option(
        "auto", "--strategy", autocompletion=lambda: list(STRATEGY_CHOICES),
        help="auto (recommend's rule on the measured size, similarity assumed) | feature_extract | fine_tune | scratch | pretrained_init.",
    ),  # fmt: skip
    output: Path = typer.Option(Path("config.yaml"), "-o", "--output", dir_okay=False, help="The experiment file to write."),
    labels: Optional[Path] = typer.Option(None, "--labels", dir_okay=False, help="A label file (.csv path,label[,split] or .jsonl) naming the images below DATA_DIR and their classes, instead of class folders; written as data.labels."),
    force: bool = typer.Option(False, "--force", help="Replace the experiment file if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print what was found and written as one JSON document on stdout."),
) -> None:
    """Look at a folder of images and write an experiment file that `transferctl check` accepts."""
    from transferctl.analysis.starter import init_experiment

    with user_errors():
        result = init_experiment(data_dir, output, backbone, strategy, force, labels)
    if as_json:
        print_json(result.to_dict())
        return
    err.print(render_inspection(result.to_dict()["data"]))
    advice = result.advice
    measure = f"transferctl recommend --data {data_dir}" + (f" --labels {labels}" if labels else "")
    how = f"recommend's rule for {advice.case}; the similarity is assumed, measure it with: {measure}" if advice else "as asked"
    err.print(f"[bold]strategy:[/] [green]{result.strategy}[/], {escape(how)}")
    err.print(f"[bold]wrote:[/] {escape(str(output))} and {escape(str(result.schema_path))}  (next: transferctl check {escape(str(output))})")


def render_inspection(data: dict[str, Any]) -> Group:
    """Images per class and split, then one line each for sizes, modes and problems."""
    splits = list(data["counts"])
    source = f"label file {data['labels']}" if data.get("labels") else f"{data['layout']} layout"
    if data.get("task") == "multi_label":
        source += ", multi-label: an image counts once for each of its labels"
    table = Table(title=f"{escape(str(data['root']))}: {escape(source)}, {len(data['classes'])} classes, {data['images']} images")
    table.add_column("class")
    for split in splits:
        table.add_column("images" if split == "all" else split, justify="right")
    for name in data["classes"][:SHOWN_CLASSES]:
        table.add_row(escape(name), *(str(data["counts"][split][name]) for split in splits))
    if len(data["classes"]) > SHOWN_CLASSES:
        table.add_row(f"... {len(data['classes']) - SHOWN_CLASSES} more", *("" for _ in splits))
    smallest = data["smallest_class"]
    per = "label" if data.get("task") == "multi_label" else "class"
    table.caption = f"median {data['median_per_class']:g} images per {per} (train+val); smallest: {escape(smallest['name'])} ({smallest['images']})"
    sizes = data["image_sizes"]
    lines = [table]
    if sizes["sampled"]:
        low, mid, high = ("x".join(map(str, sizes[key])) for key in ("min", "median", "max"))
        spread = f"all {low}" if low == high else f"median {mid}, from {low} to {high}"
        modes = ", ".join(f"{mode} {count}" for mode, count in data["modes"].items())
        lines.append(f"sizes: {spread}; modes: {modes} ({sizes['sampled']} headers read)")
    if data["imbalance"]:
        lines.append(f"[yellow]warning:[/] {escape(data['imbalance'])}")
    if data["unreadable"]:
        first = data["unreadable"][0]
        what = "bad rows:[/] {} row(s) of the label file" if data.get("labels") else "unreadable:[/] {} file(s)"
        lines.append(f"[yellow]{what.format(len(data['unreadable']))} left out, e.g. {escape(first['path'])} ({escape(first['reason'])})")
    if data["ignored"]:
        lines.append(f"[dim]ignored: {len(data['ignored'])} file(s) without an image suffix, e.g. {escape(data['ignored'][0])}[/]")
    return Group(*lines)
