"""cache: what transferctl keeps in its cache folder, and clearing it. Never imports torch."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from transferctl.cli import INSPECT, app, err, print_json, user_errors


@app.command(rich_help_panel=INSPECT)
def cache(
    clear: bool = typer.Option(False, "--clear", help="Remove the entries (all, or those --older-than)."),
    older_than: Optional[float] = typer.Option(None, "--older-than", min=0, metavar="DAYS", help="With --clear: only entries last used more than DAYS ago."),
    as_json: bool = typer.Option(False, "--json", help="Print the entries (or those removed) as JSON on stdout."),
) -> None:
    """List the cache folder's entries (backbone features, backbone facts) with size and last use; --clear empties it.
    Files the cache did not write are never listed, counted or removed: they are named as left alone."""
    from transferctl.runs.cache_folder import cache_folder, clear as clear_entries, entries, limit_bytes, others

    if older_than is not None and not clear:
        raise typer.BadParameter("only applies with --clear", param_hint="--older-than")
    folder = cache_folder()
    with user_errors():
        limit = limit_bytes()
        listed = clear_entries(older_than) if clear else entries()
    foreign = others()
    total = sum(entry.size for entry in listed)
    if as_json:
        key = "removed" if clear else "entries"
        print_json({"folder": str(folder), "limit_mb": None if limit is None else limit // 2**20, "megabytes": round(total / 2**20, 2),
                    key: [entry.to_dict() for entry in listed], "not_written_by_transferctl": [str(path) for path in foreign]})  # fmt: skip
        return
    if clear:
        err.print(f"removed {_count(len(listed))} ({total / 2**20:.1f} MB) from {escape(str(folder))}")
        _print_kept(entries(), older_than)
    else:
        _print_entries(folder, listed, limit)
    if foreign:
        names = ", ".join(path.name for path in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        err.print(f"left alone: {escape(names)} (not written by transferctl's cache)")


def _print_entries(folder: Path, listed: list[Any], limit: Optional[int]) -> None:
    total = sum(entry.size for entry in listed)
    limit_text = "no limit" if limit is None else f"limit {limit / 2**20:.0f} MB"
    if not listed:
        err.print(f"{escape(str(folder))} holds nothing of transferctl's ({limit_text})")
        return
    err.print(f"{escape(str(folder))}: {_count(len(listed))}, {total / 2**20:.1f} MB ({limit_text})")
    console = err if err.is_terminal else Console(stderr=True, highlight=False, width=240)
    console.print(render_entries(listed))


def _print_kept(kept: list[Any], older_than: Optional[float]) -> None:
    """Say why entries of the cache's own are still there after --clear."""
    writing = sum(entry.kind == "unfinished" for entry in kept)
    if writing:
        err.print(f"kept {_count(writing)}: still being written by a run")
    if len(kept) > writing and older_than is not None:
        err.print(f"kept {_count(len(kept) - writing)}: used in the last {older_than:g} days")


def _count(entries: int) -> str:
    return "1 entry" if entries == 1 else f"{entries} entries"


def render_entries(listed: list[Any]) -> Table:
    table = Table()
    for column in ("kind", "MB", "last used", "of"):
        table.add_column(column, justify="right" if column == "MB" else "left", overflow="fold")
    for entry in reversed(listed):  # most recently used first
        used = datetime.fromtimestamp(entry.last_used).strftime("%Y-%m-%d %H:%M")
        table.add_row(entry.kind, f"{entry.size / 2**20:.1f}", used, escape(_what(entry)))
    return table


def _what(entry: Any) -> str:
    about = entry.about
    if not about:
        return entry.path.name
    views = f" x {about['views']} views" if about.get("views", 1) != 1 else ""
    return f"{about.get('backbone', '?')}: {about.get('split', '?')} of {about.get('data', '?')}, {about.get('images', '?')} images{views}"
