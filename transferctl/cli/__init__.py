"""The command line: one thin function per command. Only this package prints or chooses exit codes.

Human text goes to stderr, machine output (--json, JSON Lines) to stdout. torch is imported inside the
commands that need it, so `--help` and the instant commands start fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.markup import escape

from transferctl import __version__
from transferctl.errors import TrainingInterrupted, TransferctlError

app = typer.Typer(
    name="transferctl",
    help="Transfer learning for image classification: one YAML file, one command.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)

# `--help` groups the commands in the order a user meets them.
START = "Start: look at your images, pick a backbone"
TRAIN = "Train"
USE = "Use the trained model"
CHOOSE = "Choose and compare strategies"
INSPECT = "Inspect runs and the cache"
# Each panel lists its commands in this order: the order they are used in.
COMMAND_ORDER = ("init", "backbones", "schema", "check", "lr-find", "train", "evaluate", "predict", "explain", "export", "recommend", "compare", "runs", "show", "report", "cache")

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


_machine_output: list[Any] = []  # the real stdout, while a command's print() calls go to stderr


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """User mistakes become one line per problem and exit 1; bugs keep their traceback.

    While the command runs, print() goes to stderr: a python: backbone's code prints where it likes (its
    import, construction or forward; real packages do), and on stdout it corrupted `--json` and predict's
    lines. write_stdout still writes the machine output to the real stdout.
    """
    _machine_output.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except TrainingInterrupted as exc:  # stopped by a signal, with the way to resume in the message
        for problem in exc.problems if not _rank_prefix() else ():  # all ranks stop together; rank 0 says so
            err.print(f"[yellow]interrupted:[/] {escape(str(problem))}")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except TransferctlError as exc:
        if not getattr(exc, "echoed", False):  # a distributed rank's copy of rank 0's error: rank 0 prints it
            for problem in exc.problems:
                err.print(f"[bold red]error:[/] {_rank_prefix()}{escape(str(problem))}")
        raise typer.Exit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or a StopSignal (interrupts.py) that names its signal
        name = getattr(exc, "name", None)
        if not _rank_prefix():  # every rank got the signal; rank 0 says so
            err.print("[yellow]interrupted[/]" + (f": stopped by {name}" if name else ""))
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        _machine_output.pop()


def _stdout() -> Any:
    return _machine_output[-1] if _machine_output else sys.stdout


def _rank_prefix() -> str:
    """'rank 1: ' in a process that torchrun started as rank 1; nothing for rank 0 or a single process."""
    import os

    rank = os.environ.get("RANK", "0")
    return f"rank {rank}: " if os.environ.get("WORLD_SIZE", "1") != "1" and rank != "0" else ""


def print_json(data: Any) -> None:
    write_stdout(json.dumps(data, indent=2, default=str) + "\n")


def write_stdout(text: str) -> None:
    """Machine output, flushed at once so the next command in a pipeline starts on it.

    A reader that has left (`| head -1`, a closed jq) ends the command quietly with exit 0, as rg and sort
    do; a stdout that cannot be written (`> /dev/full`, a full disk) is one line and exit 1. Either way
    stdout then points at /dev/null, so the interpreter's last flush of what is left fails no more.
    """
    try:
        _stdout().write(text)
        _stdout().flush()
    except BrokenPipeError:
        _stdout_to_devnull()
        raise typer.Exit(0) from None
    except OSError as exc:
        _stdout_to_devnull()
        err.print(f"[bold red]error:[/] stdout: cannot write: {escape(exc.strerror or str(exc))} (send the output where there is room)")
        raise typer.Exit(EXIT_USER_ERROR) from None


def _stdout_to_devnull() -> None:
    _to_devnull(_stdout().fileno())


def _to_devnull(fd: int) -> None:
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)


class _ReaderMayLeave(io.FileIO):
    """stderr's file: once its reader has left (`2>&1 | head -2`), what is written goes to /dev/null.

    Human output is only for a reader; without this, the next progress line raised BrokenPipeError and a
    training run ended after its first epoch with exit 1 and no word (the word itself had nowhere to go).
    """

    def write(self, data: Any) -> int | None:
        try:
            return super().write(data)
        except BrokenPipeError:
            _to_devnull(self.fileno())  # also for C code and the interpreter's last flush
            return memoryview(data).nbytes


def _stderr_without_reader_is_dropped() -> None:
    """Make sys.stderr (Rich's consoles, warnings, tracebacks) drop its output when its reader leaves."""
    try:
        fd, encoding, errors = sys.stderr.fileno(), sys.stderr.encoding, sys.stderr.errors
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):  # no real stderr (a GUI host, a test's capture): leave it
        return
    # Buffered in between: it writes again what a pipe took only part of. Line by line, as Python's stderr.
    binary = io.BufferedWriter(_ReaderMayLeave(fd, "w", closefd=False))
    sys.stderr = io.TextIOWrapper(binary, encoding=encoding, errors=errors, line_buffering=True, write_through=True)


def _register_commands() -> None:
    """Each module of this package adds its commands to `app`; importing them is cheap (no torch)."""
    import importlib
    import pkgutil

    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{module}")
    app.registered_commands.sort(key=lambda command: COMMAND_ORDER.index(command.name or command.callback.__name__))


_register_commands()


def main() -> None:
    _stderr_without_reader_is_dropped()
    app()
