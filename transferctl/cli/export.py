"""export: write a trained run's model as ONNX, TorchScript or safetensors, with its preprocessing and classes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from transferctl.cli import USE, app, err, print_json, user_errors
from transferctl.cli.evaluate import TrustCodeOption

FORMATS = ("onnx", "torchscript", "safetensors")  # transferctl.inference.export.FORMATS, without importing torch here


def _complete_format(incomplete: str) -> list[str]:
    return [name for name in FORMATS if name.startswith(incomplete)]


@app.command("export", rich_help_panel=USE)
def export_command(
    run_dir: Path = typer.Argument(..., file_okay=False, help="A run directory written by `transferctl train`."),
    fmt: str = typer.Option(..., "--format", "-f", help="onnx | torchscript | safetensors.", autocompletion=_complete_format),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best | last | path to a checkpoint file."),
    out: Optional[Path] = typer.Option(None, "--out", file_okay=False, help="Folder to write into (default: RUN_DIR/export)."),
    as_json: bool = typer.Option(False, "--json", help="Print the written paths and the check as JSON on stdout."),
    trust_code: bool = TrustCodeOption,
) -> None:
    """Write the trained model for deployment, with model.json (preprocessing, classes) beside it."""
    if fmt not in FORMATS:
        raise typer.BadParameter(f"'{fmt}' is not one of {', '.join(FORMATS)}", param_hint="--format")
    from transferctl.inference.export import export

    with user_errors():
        result = export(run_dir, fmt, checkpoint, out, trust_code)
    for notice in result.notices:
        err.print(f"note: {notice}", style="yellow", markup=False)
    if as_json:
        print_json({"format": result.format, "model": str(result.model_file), "sidecar": str(result.sidecar), "max_abs_diff": result.max_diff})
        return
    err.print(f"[bold]wrote[/] {result.model_file} and {result.sidecar}")
    if result.max_diff is None:
        err.print("not checked: onnxruntime is not installed (pip install 'transferctl[onnx]')")
    else:
        err.print(f"checked: outputs match the PyTorch model (max abs difference {result.max_diff:.1e})")
