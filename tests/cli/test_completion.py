"""Shell completion (Typer's): commands, option values, and the script `--install-completion` installs."""

from __future__ import annotations

from typer.testing import CliRunner

from transferctl.cli import app

runner = CliRunner()


def complete(words: str) -> list[str]:
    env = {"_TRANSFERCTL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
    result = runner.invoke(app, [], prog_name="transferctl", env=env)
    assert result.exit_code == 0, result.output
    return result.stdout.split()


def test_commands_complete() -> None:
    assert complete("transferctl sh") == ["show"]
    assert {"init", "schema", "show", "train", "evaluate"} <= set(complete("transferctl ''"))


def test_init_strategies_complete() -> None:
    assert complete("transferctl init data --strategy f") == ["feature_extract", "fine_tune"]


def test_completion_script_for_bash(monkeypatch) -> None:
    # Typer detects the user's shell from the process tree; CI runs without an interactive shell above it.
    monkeypatch.setattr("typer.completion._get_shell_name", lambda: "bash")
    result = runner.invoke(app, ["--show-completion"], prog_name="transferctl")
    assert result.exit_code == 0 and "_TRANSFERCTL_COMPLETE=complete_bash" in result.stdout
