"""The command line: one thin function per command. Only this module prints or chooses exit codes.

Human text goes to stderr, machine output (--json, JSON Lines) to stdout. torch is imported inside the
commands that need it, so `--help` and the instant commands start fast.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer
from rich.console import Console

from transferctl import __version__
from transferctl.errors import TransferctlError

app = typer.Typer(
    name="transferctl",
    help="Transfer learning for image classification: one YAML file, one command.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


def _version(value: bool) -> None:
    if value:
        typer.echo(f"transferctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Transfer learning for image classification: one YAML file, one command."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """User mistakes become one line per problem and exit 1; bugs keep their traceback."""
    try:
        yield
    except TransferctlError as exc:
        for problem in exc.problems:
            err.print(f"[bold red]error:[/] {problem}", soft_wrap=True, markup=True, highlight=False)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


ConfigArg = typer.Argument(..., exists=False, dir_okay=False, help="The experiment YAML file.")
SetOption = typer.Option(None, "--set", help="Override a field: --set data.batch_size=16 (repeatable).")


@app.command()
def train(
    config: Path = ConfigArg,
    overrides: Optional[List[str]] = SetOption,
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Write the run here (must not exist) instead of <output.dir>/<name>-<time>."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Train a model as the experiment file says; write checkpoints and metrics to a run directory."""
    from transferctl.config import load_config
    from transferctl.progress import make_observer
    from transferctl.train import train as run_training

    with user_errors():
        experiment = load_config(config, overrides or [])
        with make_observer(err, quiet=quiet) as observer:
            summary = run_training(experiment, run_dir, observer)
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary)


def _print_summary(summary: dict[str, Any]) -> None:
    err.print(f"[bold]run:[/] {summary['run_dir']}")
    err.print(
        f"best val_acc {summary['best_val_acc']:.4f} at epoch {summary['best_epoch']} ({summary['best_phase']}); "
        f"{summary['epochs']} epochs in {summary['seconds']:.1f}s, {summary['images_per_second']:.1f} images/s "
        f"on {summary['device']} ({summary['precision']})"
    )


@app.command()
def check(
    config: Path = ConfigArg,
    overrides: Optional[List[str]] = SetOption,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON on stdout."),
) -> None:
    """Validate an experiment file and show the resolved plan, without training."""
    from transferctl.config import load_config
    from transferctl.train import describe, prepare

    with user_errors():
        plan = describe(prepare(load_config(config, overrides or [])))
    if as_json:
        print_json(plan)
        return
    from transferctl.progress import render_plan

    err.print(render_plan(plan))


def main() -> None:
    app()
