"""compare: one experiment under several strategies and seeds; report what transfer bought over scratch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from transferctl.cli import CHOOSE, app, err, print_json, user_errors
from transferctl.cli.report import table_console
from transferctl.cli.train import ConfigArg, SetOption, tracked


@app.command(rich_help_panel=CHOOSE)
def compare(
    config: Path = ConfigArg,
    strategies: str = typer.Option("scratch,feature_extract,fine_tune", "--strategies", help="Comma-separated strategies; scratch is required (the baseline)."),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Runs per strategy, with seeds seed, seed+1, ... (the same seeds for every strategy)."),
    overrides: Optional[List[str]] = SetOption,
    out: Optional[Path] = typer.Option(None, "--out", file_okay=False, help="The comparison folder (default: <output.dir>/<name>-compare). Rerun with the same folder to continue."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON document on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Train the experiment under each strategy and seed; measure jumpstart, AUC, asymptote and speed-up against scratch."""
    from transferctl.analysis.compare import parse_strategies, plan_comparison, run_comparison
    from transferctl.config import load_config
    from transferctl.training.progress import make_observer

    with user_errors():
        experiment = load_config(config, overrides or [])
        plan = plan_comparison(experiment, parse_strategies(strategies), seeds, out, source=str(config))
        with make_observer(err, quiet=quiet) as progress:
            # One TensorBoard and one MLflow observer serve every run: each run_started opens that run's log.
            with tracked(progress, experiment.logging, str(config)) as observer:
                report = run_comparison(plan, observer)
    if as_json:
        print_json(report)
    else:
        table_console().print(render_comparison(report))
    files = report["files"]
    err.print(f"wrote {files['report.md']}, {files['report.json']} and {files['curves.png']}", markup=False)


def render_comparison(report: dict[str, Any]) -> Table:
    from transferctl.analysis.compare import table_rows

    header, rows = table_rows(report)
    seeds = len(report["seeds"])
    table = Table(
        title=f"{escape(report['title'])}: {report['epochs']} epochs per run, mean ± sd over {seeds} seed{'s' if seeds > 1 else ''}, against {report['baseline']} with the same seed, "
              f"on {report.get('metric', 'val_acc')}",
        caption=f"definitions: {report['files']['report.md']}",
        caption_justify="left",
    )
    for column in header:
        table.add_column(column, justify="left" if column == "strategy" else "right", overflow="fold")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row[:-1]), "[bold red]YES[/]" if row[-1] == "YES" else row[-1])
    return table
