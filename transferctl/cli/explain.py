"""explain: Grad-CAM heatmaps over images, one PNG per image, from a trained run."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer
from rich.markup import escape

from transferctl.cli import USE, app, err, user_errors, write_stdout
from transferctl.cli.evaluate import CheckpointOption, DeviceOption, RunDirArg, TrustCodeOption
from transferctl.cli.predict import json_line
from transferctl.paths import shown


@app.command(rich_help_panel=USE)
def explain(
    run_dir: Path = RunDirArg,
    images: List[str] = typer.Argument(..., help="Image files to explain."),
    class_name: str = typer.Option(None, "--class", help="The class whose evidence to show (default: the predicted class)."),
    out: Path = typer.Option(Path("."), "--out", file_okay=False, help="Folder for the PNGs, <image name>.gradcam.png each."),
    checkpoint: str = CheckpointOption,
    device: str = DeviceOption,
    trust_code: bool = TrustCodeOption,
    json_output: bool = typer.Option(False, "--json", help="Print one JSON line per image: path, png, class, score, predicted."),
) -> None:
    """Grad-CAM: where in each image the network found the evidence for a class, as a heatmap PNG."""
    with user_errors():
        from transferctl.inference.explain import explain_images

        explained = explain_images(run_dir, images, out, class_name, checkpoint, device, trust_code)
    for item in explained:
        record = {"path": item.path, "png": str(item.png), "class": item.explained, "score": item.score, "predicted": item.predicted}
        if json_output:
            write_stdout(json_line(record) + "\n")  # JSON Lines, as predict writes
        else:
            err.print(f"{escape(shown(item.path))}: {escape(item.explained)} ({item.score:.3f}) -> {escape(shown(str(item.png)))}")
