"""train and check: run an experiment file, or validate it and show the plan."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, List, Optional

import typer

from transferctl.cli import TRAIN, app, err, print_json, user_errors

if TYPE_CHECKING:
    from transferctl.config import LoggingConfig
    from transferctl.training.observers import TrainObserver

ConfigArg = typer.Argument(..., exists=False, dir_okay=False, help="The experiment YAML file.")
SetOption = typer.Option(None, "--set", help="Override a field: --set data.batch_size=16 (repeatable).")


@app.command(rich_help_panel=TRAIN)
def train(
    config: Optional[Path] = typer.Argument(None, dir_okay=False, help="The experiment YAML file (not with --resume)."),
    overrides: Optional[List[str]] = SetOption,
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Write the run here (must not exist) instead of <output.dir>/<name>-<time>."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", file_okay=False, help="Continue this run directory where it stopped, with its own config.yaml (--set may change the device, workers or phases not yet started)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    trust_code: bool = typer.Option(
        False, "--trust-code", help="With --resume: let a python: backbone that the run names be imported and run (only for runs you trust; or list the module in TRANSFERCTL_TRUSTED_CODE)."
    ),
    restart: bool = typer.Option(
        False, "--restart", help="With --resume: start over from epoch 1 (for a run whose last.pt is missing or damaged); the earlier checkpoints, metrics and summary are moved into RUN_DIR/before-restart-<time>/."
    ),
    nproc: Optional[int] = typer.Option(
        None, "--nproc", min=1, help="Train with N processes on this machine (DistributedDataParallel, one per GPU): the same as torchrun --standalone --nproc_per_node N."
    ),
) -> None:
    """Train a model as the experiment file says; write checkpoints and metrics to a run directory."""
    from transferctl.training.distributed import env_rank, launched
    from transferctl.training.interrupts import signals_interrupt
    from transferctl.training.tensorboard import run_logging

    if (config is None) == (resume is None):
        raise typer.BadParameter("give an experiment file, or --resume RUN_DIR (not both)", param_hint="CONFIG")
    if resume is not None and run_dir is not None:
        raise typer.BadParameter("a resumed run stays in its own directory", param_hint="--run-dir")
    if restart and resume is None:
        raise typer.BadParameter("only applies with --resume RUN_DIR", param_hint="--restart")
    if nproc is not None and nproc > 1 and not launched():
        _launch(nproc, config, overrides or [], run_dir, resume, as_json, quiet, trust_code, restart=restart)
    main = env_rank() == 0  # under torchrun only rank 0 shows progress and prints the summary
    quiet, as_json = quiet or not main, as_json and main
    # Before torch is imported (seconds): from here SIGTERM stops the command with exit 130 as Ctrl-C does.
    with user_errors(), signals_interrupt():
        from transferctl.config import load_config
        from transferctl.training.progress import make_observer

        with make_observer(err, quiet=quiet) as progress:
            if resume is not None:
                from transferctl.training.resume import resume as resume_training

                with tracked(progress, run_logging(resume, overrides or []), str(resume / "config.yaml")) as observer:
                    summary = resume_training(resume, overrides or [], observer, trust_code, restart=restart)
            else:
                from transferctl.training.train import train as run_training

                assert config is not None
                experiment = load_config(config, overrides or [])
                with tracked(progress, experiment.logging, str(config)) as observer:
                    summary = run_training(experiment, run_dir, observer)
    if as_json:
        print_json(summary)
    elif main:
        _print_summary(summary)


@contextlib.contextmanager
def tracked(progress: TrainObserver, logging: LoggingConfig, source: str) -> Iterator[TrainObserver]:
    """`progress`, plus the TensorBoard log and the MLflow run that the experiment's logging section asks for."""
    from transferctl.training.mlflow_logging import with_mlflow
    from transferctl.training.tensorboard import with_tensorboard

    with with_tensorboard(progress, logging.tensorboard, f"{source}: logging.tensorboard") as observer:
        with with_mlflow(observer, logging.mlflow, f"{source}: logging.mlflow") as tracking:
            yield tracking


def _launch(
    nproc: int, config: Optional[Path], overrides: List[str], run_dir: Optional[Path], resume: Optional[Path], as_json: bool, quiet: bool, trust_code: bool,
    restart: bool,
) -> None:
    """Start this command in nproc processes through PyTorch's launcher; exit with its exit code."""
    import os
    import signal
    import subprocess

    from transferctl.config import load_config
    from transferctl.training.distributed import launch_command, launch_environment
    from transferctl.training.interrupts import signals_interrupt

    argv = ["train", *([str(config)] if config else ["--resume", str(resume)])]
    argv += [arg for override in overrides for arg in ("--set", override)]
    argv += ["--run-dir", str(run_dir)] if run_dir else []
    argv += ["--json"] * as_json + ["--quiet"] * quiet + ["--trust-code"] * trust_code + ["--restart"] * restart
    if config is not None:
        with user_errors(), signals_interrupt():
            load_config(config, overrides)  # one error message here, rather than one per process
    process = subprocess.Popen(launch_command(nproc, argv), env=launch_environment(dict(os.environ)))
    # Ctrl-C reaches every process of the terminal's group, and a SIGTERM to this one is passed on to the
    # launcher: the workers stop themselves at the same step, so wait for them rather than leave them running.
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum)),
    }
    try:
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    raise typer.Exit(code)


def _best_numbers(summary: dict[str, Any]) -> str:
    if "best_val_map" in summary:  # multi-label: val_acc is every label right, the stricter number
        return f"val_map {summary['best_val_map']:.4f}, val_acc {summary['best_val_acc']:.4f}"
    return f"val_acc {summary['best_val_acc']:.4f}"


def _print_summary(summary: dict[str, Any]) -> None:
    err.print(f"[bold]run:[/] {summary['run_dir']}")
    err.print(
        f"best {_best_numbers(summary)} at epoch {summary['best_epoch']} ({summary['best_phase']}); "
        f"{summary['epochs']} epochs in {summary['seconds']:.1f}s, {summary['images_per_second']:.1f} images/s "
        f"on {summary['device']} ({summary['precision']})"
    )


@app.command(rich_help_panel=TRAIN)
def check(
    config: Path = ConfigArg,
    overrides: Optional[List[str]] = SetOption,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON on stdout."),
) -> None:
    """Validate an experiment file and show the resolved plan, without training."""
    from transferctl.config import load_config
    from transferctl.training.train import describe, prepare

    with user_errors():
        experiment = load_config(config, overrides or [])
        if experiment.logging.mlflow:  # said now, not after the first epochs of a train
            from transferctl.training.mlflow_logging import require_mlflow

            require_mlflow(f"{config}: logging.mlflow")
        plan = describe(prepare(experiment))
    if as_json:
        print_json(plan)
        return
    from transferctl.training.progress import render_plan

    err.print(render_plan(plan))
