"""Whether a `python:` backbone named by a run directory may be rebuilt, which imports and runs its code.

A run directory (its checkpoints, its config.yaml) is data that people download and share; loading it
with `weights_only` does not help when the data names a module to import. So, like Hugging Face's
`trust_remote_code`, rebuilding such a backbone needs the user's say-so for this command (`--trust-code`)
or the module on their own allow-list (TRANSFERCTL_TRUSTED_CODE). An experiment file the user passes to
`train` is their own configuration and needs neither.
"""

from __future__ import annotations

import os

from transferctl.config import PYTHON_PREFIX
from transferctl.errors import CheckpointError, Problem

TRUSTED_CODE_ENV = "TRANSFERCTL_TRUSTED_CODE"  # comma-separated modules (or their packages) the user trusts


def require_trusted(name: str, where: str, trust_code: bool) -> None:
    """Refuse, before anything is imported, a python: backbone that neither --trust-code nor the allow-list covers."""
    if not name.startswith(PYTHON_PREFIX) or trust_code:
        return
    module = module_of(name)
    if module and _allowed(module, os.environ.get(TRUSTED_CODE_ENV, "")):
        return
    shown = _printable(module or name)
    raise CheckpointError(
        Problem(where, f"names the backbone {_printable(name)}: rebuilding it would import and run the code of {shown}",
                f"if you trust this run, add --trust-code, or add '{shown}' to {TRUSTED_CODE_ENV}")
    )  # fmt: skip


def module_of(name: str) -> str:
    """'python:pkg.mod:build' -> 'pkg.mod'."""
    return name[len(PYTHON_PREFIX) :].partition(":")[0].strip()


def _allowed(module: str, allow_list: str) -> bool:
    """The module, or a package it is in, is listed ('pkg' covers 'pkg.mod', not 'pkgextra')."""
    trusted = {entry.strip() for entry in allow_list.split(",") if entry.strip()}
    parts = module.split(".")
    return any(".".join(parts[:length]) in trusted for length in range(1, len(parts) + 1))


def _printable(text: str) -> str:
    """A name from a doctored file may hold newlines or be huge: the message stays one short line."""
    text = text if len(text) <= 120 else text[:117] + "..."
    return text if text.isprintable() else ascii(text)[1:-1]
