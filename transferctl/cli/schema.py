"""schema: the experiment file's JSON Schema on stdout, for editors (yaml-language-server) and CI checks."""

from __future__ import annotations

from transferctl.cli import START, app, print_json


@app.command(rich_help_panel=START)
def schema() -> None:
    """Print the JSON Schema of the experiment file (e.g. `transferctl schema > transferctl.schema.json`)."""
    from transferctl.config import json_schema

    print_json(json_schema())
