"""predict: label image files with a trained run; JSON Lines on stdout, one line per input."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.markup import escape

from transferctl.cli import EXIT_INTERRUPTED, USE, app, err, user_errors, write_stdout
from transferctl.cli.evaluate import CheckpointOption, DeviceOption, PrecisionOption, RunDirArg, TrustCodeOption, TtaOption
from transferctl.errors import Problem
from transferctl.paths import shown


@app.command(rich_help_panel=USE)
def predict(
    run_dir: Path = RunDirArg,
    paths: Optional[List[str]] = typer.Argument(None, help="Image files or folders; '-' alone reads paths from stdin, one per line."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="How many of the most likely classes each line lists (single-label runs)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per forward pass."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first file that cannot be read."),
    checkpoint: str = CheckpointOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    trust_code: bool = TrustCodeOption,
    tta: str = TtaOption,
) -> None:
    """Print {"path", "label", "score", "top"} per image as JSON Lines (multi-label runs: {"path", "labels", "scores"}); unreadable files get {"path", "error"}."""
    from transferctl.inference.predict import expand_paths, load_predictor, read_path_lines

    if not paths:
        raise typer.BadParameter("give image files or folders, or '-' to read paths from stdin", param_hint="PATHS")
    if "-" in paths and len(paths) > 1:
        raise typer.BadParameter("'-' (read paths from stdin) must be the only path", param_hint="PATHS")
    failed = done = 0
    with user_errors(), _leaving_at_once_on_ctrl_c(paths == ["-"]):
        predictor = load_predictor(run_dir, checkpoint, device, precision, top_k, trust_code, tta)
        if predictor.task.notice:
            err.print(f"note: {predictor.task.notice}", style="yellow", markup=False)
        inputs = read_path_lines(sys.stdin) if paths == ["-"] else iter(paths)
        for record in predictor.predict(expand_paths(inputs), batch_size):
            _write_line(record)
            done += 1
            if "error" in record:
                failed += 1
                err.print(f"[bold red]error:[/] {escape(str(Problem(shown(record['path']), record['error'])))}")
                if strict:
                    err.print("stopped at the first unreadable file (--strict)")
                    break
    if failed:
        err.print(f"{failed} of {done} inputs could not be read")
        raise typer.Exit(1)


@contextlib.contextmanager
def _leaving_at_once_on_ctrl_c(reading_stdin: bool) -> Iterator[None]:
    """Ctrl-C while paths come from stdin: say so and exit 130 without Python's teardown.

    The thread that reads stdin is blocked in read() and cannot be stopped. Left alive, it wakes into the
    interpreter's teardown when the input closes, and once that ended the process in SIGABRT ("terminate
    called without an active exception") instead of 130. Everything printed is flushed first.
    """
    try:
        yield
    except KeyboardInterrupt:
        if not reading_stdin:
            raise
        err.print("[yellow]interrupted[/]")
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


def _write_line(record: dict[str, object]) -> None:
    write_stdout(json_line(record) + "\n")  # one line at a time: the next command in the pipeline starts at once


def json_line(record: dict[str, object]) -> str:
    """Non-ASCII names as they are, except where a file name is not UTF-8 (Python holds its bytes as lone
    surrogates): then \\u escapes, still valid JSON in valid UTF-8, and os.fsencode of the value gives the
    file's name back."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record)
    return line
