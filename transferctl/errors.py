"""Errors a user can cause. The CLI prints them as one line each and exits 1; anything else is a bug."""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

QUOTE_LIMIT = 80  # characters of a user's value that a message quotes

# Characters that end a line (str.splitlines, terminals) or drive a terminal: shown as escapes in messages.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(text: str) -> str:
    """Control characters as escapes: a file named with a newline (or a terminal escape) cannot split a
    one-line message in two, or recolour the terminal that shows it."""
    return text.translate(_CONTROLS)


def clip(text: str, limit: int = QUOTE_LIMIT) -> str:
    """One line of at most `limit` characters, cut after a word where one ends in the second half, then '...'."""
    text = one_line(text)
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,.;:") + "..."


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 4, 4, 3, 4
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = QUOTE_LIMIT


def quote(value: Any) -> str:
    """A value as a message quotes it: its repr, of which only the first few items and characters are
    ever built (a config value can be a YAML alias expanded a million-fold), clipped to one short line."""
    return clip(_REPR.repr(value))


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input: where it is, what is wrong, and how to fix it."""

    where: str
    message: str
    hint: str = ""

    @property
    def text(self) -> str:
        """The problem as written, control characters and all (what str() shows escaped)."""
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text} ({self.hint})" if self.hint else text

    def __str__(self) -> str:
        return one_line(self.text)


class TransferctlError(Exception):
    """Base class of every error caused by the user's input rather than by a bug.

    Its own text keeps the problems as written, one a line: a DataLoader worker's error comes back as the
    worker's traceback text, which data.worker_error takes apart by lines. Each problem is shown by str().
    """

    def __init__(self, *problems: Problem | str) -> None:
        self.problems = tuple(p if isinstance(p, Problem) else Problem("", p) for p in problems)
        super().__init__("\n".join(p.text for p in self.problems))


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
