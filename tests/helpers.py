"""Small builders shared by the tests: experiment files for tiny, fast runs, observers, one thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
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


class StopAfter(SilentObserver):
    """Sends this process a real SIGINT once global epoch `epoch` is saved, like a Ctrl-C at that moment
    (use with conftest's heeded_sigint)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_done(self, row: dict[str, Any]) -> None:
        if row["global_epoch"] == self.epoch:
            os.kill(os.getpid(), signal.SIGINT)


def assert_resume_matches(config: Any, tmp_path: Path, stop_after: int) -> list[dict[str, Any]]:
    """Train `config` uninterrupted (tmp_path/reference) and stopped after global epoch `stop_after`, then
    resumed (tmp_path/stopped); every metric but the timings must be equal. Returns the rows."""
    from transferctl.errors import TrainingInterrupted
    from transferctl.runs.rundir import RunDir
    from transferctl.training.resume import resume
    from transferctl.training.train import train

    train(config, tmp_path / "reference")
    with pytest.raises(TrainingInterrupted):
        train(config, tmp_path / "stopped", StopAfter(stop_after))
    resume(tmp_path / "stopped")
    timings = ("seconds", "images_per_second", "data_seconds", "train_seconds")
    want, got = ([{k: v for k, v in row.items() if k not in timings} for row in RunDir(tmp_path / run).metrics()] for run in ("reference", "stopped"))
    assert got == want
    return got


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module's tests (import it, and mark the module with usefixtures or autouse):
    this process and children started with OMP_NUM_THREADS=1 then add up sums in the same order, and on a
    shared, busy CPU one thread is several times faster than two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def head_only(data: Path, out: Path, epochs: int = 2, **data_fields: object) -> dict:
    # Minibatch steps: these tests compare cached features with full forward passes, which cannot be solved.
    raw = experiment(data, out, strategy="feature_extract", schedule=[{"name": "head", "epochs": epochs, "train": "head", "lr": 1e-2, "solver": "minibatch"}])
    raw["data"].update(data_fields)
    return raw


# A command run in a fresh interpreter, then which heavy libraries it imported (the instant commands import none).
NO_TORCH = """
import sys
from transferctl.cli import main
sys.argv = ["transferctl", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    code = exit.code or 0
heavy = sorted(name for name in ("torch", "torchvision", "sklearn", "matplotlib") if name in sys.modules)
sys.stderr.write("HEAVY=" + ",".join(heavy) + "\\n")
sys.exit(code)
"""


def heavy_imports(*args: str) -> str:
    """The heavy libraries `transferctl ARGS` imported, as the last stderr line 'HEAVY=...'."""
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr.strip().splitlines()[-1]


def imbalanced_dataset(root: Path) -> Path:
    """tiny_dataset's split layout with 15 images of red and green, of which 12 train, and 1 training image of
    blue (val keeps 3 of each): the smallest training class has less than a tenth of the largest."""
    from transferctl.testing.synthetic import tiny_dataset

    data = tiny_dataset(root, n_classes=3, per_class=15, layout="split")
    for path in sorted((data / "train" / "blue").iterdir())[1:]:
        path.unlink()
    return data


def multi_label_run(root: Path, **sections: Any) -> Path:
    """A trained multi-label run (testing/synthetic.write_multi_label_dataset: a coloured patch a label) in
    root/run: three epochs of the head alone on cached features, fast, with thresholds tuned away from 0.5."""
    from transferctl.config import config_from_dict
    from transferctl.testing.synthetic import write_multi_label_dataset
    from transferctl.training.train import train

    labels = write_multi_label_dataset(root / "data", images=48, size=16)
    head = {"name": "head", "epochs": 3, "train": "head", "lr": 0.1, "solver": "minibatch"}
    raw = experiment(labels.parent, root / "runs", data={"labels": str(labels)}, schedule=[head], **sections)
    train(config_from_dict(raw), root / "run")
    return root / "run"
