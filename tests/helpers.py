"""Small builders shared by the tests: experiment files for tiny, fast runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from transferctl.training.observers import SilentObserver


def experiment(data_root: Path, output_dir: Path, **sections: Any) -> dict[str, Any]:
    """A tiny experiment: resnet18 at 32 px, random init, fp32 on CPU, two short phases."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "backbone": {"name": "resnet18", "weights": "none"},
        "data": {"root": str(data_root), "image_size": 32, "batch_size": 8, "num_workers": 0, "augment": "none"},
        "strategy": "fine_tune",
        "schedule": [
            {"name": "head", "epochs": 1, "train": "head", "lr": 1.0e-2},
            {"name": "body", "epochs": 1, "train": "all", "lr": 1.0e-2, "backbone_lr_mult": 0.1},
        ],
        "device": "cpu",
        "precision": "fp32",
        "output": {"dir": str(output_dir)},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def cli_with_patched_decoding(patch: str) -> str:
    """A child process's script: run `patch` (with `data` = transferctl.data.folders in scope, e.g. to slow down or
    break data.open_rgb), then the real transferctl command line on sys.argv."""
    return f"""import sys
import transferctl.data.folders as data
{patch.strip()}
from transferctl.cli import main
sys.argv[0] = "transferctl"
main()
"""


def slow_decoding(seconds: float) -> str:
    """A cli_with_patched_decoding patch: every image takes `seconds` longer to decode, so that a signal sent
    after an epoch lands while the next one is still running."""
    return f"""
import time
_open_rgb = data.open_rgb
def slow_open_rgb(path):
    time.sleep({seconds})
    return _open_rgb(path)
data.open_rgb = slow_open_rgb
"""


def write_experiment(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def record_checkpoint_writes(monkeypatch: Any, key: str) -> list[tuple[str, Any]]:
    """(kind, payload[key]) of every checkpoint RunDir writes from now on, in order; the files are still written."""
    from transferctl.runs.rundir import RunDir

    writes: list[tuple[str, Any]] = []
    real = RunDir.save_checkpoint

    def recorded(run: RunDir, kind: str, payload: dict[str, Any]) -> Path:
        writes.append((kind, payload[key]))
        return real(run, kind, payload)

    monkeypatch.setattr(RunDir, "save_checkpoint", recorded)
    return writes


class Notices(SilentObserver):
    """An observer that keeps the notices a run gives."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def notice(self, message: str) -> None:
        self.lines.append(message)
