"""lr-find: the learning-rate range test of one phase; a plot, a suggestion, and the --set that applies it."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from transferctl.cli import TRAIN, app, err, print_json, user_errors
from transferctl.cli.train import ConfigArg, SetOption


@app.command("lr-find", rich_help_panel=TRAIN)
def lr_find(
    config: Path = ConfigArg,
    phase: int = typer.Option(0, "--phase", help="Which phase of the schedule to test (0 is the first)."),
    overrides: Optional[List[str]] = SetOption,
    out: Path = typer.Option(Path("lr_find.png"), "--out", help="The plot (a folder: lr_find.png in it); the JSON goes beside it, with .json."),
    force: bool = typer.Option(False, "--force", help="Replace the plot and JSON if they exist."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON document on stdout."),
    steps: int = typer.Option(100, "--steps", min=10, help="Learning rates tried (one optimizer step each), unless the loss diverges first."),
    start_lr: float = typer.Option(1.0e-7, "--start-lr", min=1e-12, help="The first learning rate of the head."),
    end_lr: float = typer.Option(10.0, "--end-lr", min=1e-12, help="The last learning rate of the head."),
) -> None:
    """Find a learning rate for a phase: the LR range test (Smith 2015) on its trainable layers. Writes no run."""
    from transferctl.config import load_config

    if end_lr <= start_lr:
        raise typer.BadParameter(f"must be above --start-lr ({start_lr:g})", param_hint="--end-lr")
    with user_errors():
        png, json_path = _outputs(out, force)
        experiment = load_config(config, overrides or [])
        from transferctl.training.lr_finder import lr_find_png
        from transferctl.training.train import find_lr
        from transferctl.runs.rundir import atomic_write_bytes, atomic_write_json

        finding, plan, solved = find_lr(experiment, phase, start_lr, end_lr, steps)
        result: dict[str, Any] = {
            "config": str(config), "phase_name": plan.name, **finding.to_dict(),
            "set": f"schedule.{phase}.lr={finding.suggestion:.3g}", "png": str(png), "json": str(json_path),
        }  # fmt: skip
        atomic_write_bytes(png, lr_find_png(finding, f"{config.name}: schedule[{phase}] ({plan.name}), {len(finding.lrs)} steps"))
        atomic_write_json(json_path, result)
    if solved:
        err.print(f"note: phase {escape(plan.name)} solves its head on cached features (L-BFGS), which uses no lr; set solver: minibatch in schedule[{phase}] to train it at this lr", style="yellow")
    if as_json:
        print_json(result)
    _print_result(result, config)


def _outputs(out: Path, force: bool) -> tuple[Path, Path]:
    """The plot's and the JSON's paths; either existing without --force is refused before the test runs."""
    from transferctl.errors import ConfigError, Problem

    png = out / "lr_find.png" if out.is_dir() else out
    json_path = png.with_suffix(".json")
    for path in (png, json_path):
        if path.exists() and not force:
            raise ConfigError(Problem(str(path), "exists", "give --force to replace it, or another --out"))
    return png, json_path


def _print_result(result: dict[str, Any], config: Path) -> None:
    err.print(
        f"suggested lr for schedule[{result['phase']}] ({escape(result['phase_name'])}): [bold]{result['suggestion']:.3g}[/] "
        f"(the smaller of the steepest descent, {result['steepest_lr']:.3g}, and a tenth of the lowest loss's lr, {result['min_loss_lr']:.3g}); "
        f"{len(result['lrs'])} steps, {'stopped when the loss diverged' if result['stopped'] == 'diverged' else 'the loss had not diverged by --end-lr'}"
    )
    err.print(f"apply it: transferctl train {escape(shlex.quote(str(config)))} --set {result['set']}")
    err.print(f"wrote {escape(result['png'])} and {escape(result['json'])}")
