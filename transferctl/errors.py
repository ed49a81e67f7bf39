"""Errors a user can cause. The CLI prints them as one line each and exits 1; anything else is a bug."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input: where it is, what is wrong, and how to fix it."""

    where: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text} ({self.hint})" if self.hint else text


class TransferctlError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""

    def __init__(self, *problems: Problem | str) -> None:
        self.problems = tuple(p if isinstance(p, Problem) else Problem("", p) for p in problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ConfigError(TransferctlError):
    """The experiment file or a --set override is invalid."""


class DataError(TransferctlError):
    """The image folder is missing, empty or inconsistent."""


class WeightsError(TransferctlError):
    """Pretrained weights cannot be found, read or matched to the model."""


class CheckpointError(TransferctlError):
    """A run directory or checkpoint is missing, unsafe or incompatible."""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A hint naming the closest valid choice, or listing a few of them."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    shown = ", ".join(sorted(choices)[:8])
    more = ", ..." if len(choices) > 8 else ""
    return f"choose one of: {shown}{more}"


class TrainingError(TransferctlError):
    """Training cannot go on for a reason the user can act on (diverging loss, interruption)."""


class TrainingInterrupted(TrainingError):
    """Stopped by SIGINT or SIGTERM with the run directory resumable; the CLI exits 130, not 1."""
