"""Checkpoints written at every epoch against held between writes (output.checkpoint_seconds), in the same run.

    python scripts/bench_checkpoints.py [--images 400] [--epochs 20] [--rounds 5]

A feature_extract run of resnet18 (scripts/bench.py's transferctl run: random weights, precision auto) on
--images generated 224 px images, --epochs head epochs on cached features, once with
`output.checkpoint_seconds: 0` (best.pt and last.pt after every epoch, as before) and once with the default
(30 s: at the end of the phase, unless 30 s pass first), alternating for --rounds rounds. A first run fills
the feature cache and every measured run reuses it, so both settings do the same work but for the
checkpoints. Prints each setting's median runs per minute, every round's, the ratio, and how many checkpoint
files each run wrote and their megabytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import LR, scratch_folder, transferctl_run, write_data  # noqa: E402
from bench_inference import interleaved, table  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args(argv)


class CheckpointWrites:
    """While entered, counts the checkpoint files runs write and their bytes (RunDir._write writes every file)."""

    def __init__(self) -> None:
        self.files, self.bytes = 0, 0

    def __enter__(self) -> CheckpointWrites:
        from transferctl.runs.rundir import RunDir

        self._real_write = real_write = RunDir._write

        def counted(run: Any, path: Path, data: bytes) -> None:
            if path.suffix == ".pt":
                self.files, self.bytes = self.files + 1, self.bytes + len(data)
            real_write(run, path, data)

        RunDir._write = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from transferctl.runs.rundir import RunDir

        RunDir._write = self._real_write  # type: ignore[method-assign]


def feature_extract_run(data: Path, work: Path, epochs: int, checkpoint_seconds: float, writes: CheckpointWrites, per_run: dict[str, tuple[int, int]]) -> Callable[[], float]:
    """A function that runs one feature_extract run and returns runs per minute."""
    schedule = [{"name": "head", "epochs": epochs, "train": "head", "lr": LR}]

    def measure() -> float:
        files, written = writes.files, writes.bytes
        started = time.perf_counter()
        transferctl_run(data, work, "feature_extract", schedule, output={"checkpoint_seconds": checkpoint_seconds})
        seconds = time.perf_counter() - started
        per_run[f"checkpoint_seconds: {checkpoint_seconds:g}"] = (writes.files - files, writes.bytes - written)
        return 60.0 / seconds

    return measure


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    per_run: dict[str, tuple[int, int]] = {}
    with scratch_folder("transferctl-bench-checkpoints-") as work, CheckpointWrites() as writes:
        os.environ["TRANSFERCTL_CACHE"] = str(work / "cache")  # shared: every run reuses the features the warm-up computed
        data = write_data(work / "data", args.images)
        settings = {f"checkpoint_seconds: {seconds:g}": feature_extract_run(data, work, args.epochs, seconds, writes, per_run) for seconds in (0, 30)}
        speeds = interleaved(settings, args.rounds, unit="runs/min")
    print(f"# feature_extract, resnet18, {args.images} images, {args.epochs} head epochs on cached features, {args.rounds} interleaved rounds")
    print(table("setting", speeds, unit="runs/min"))
    print()
    for name, (files, written) in per_run.items():
        print(f"{name}: {files} checkpoint files, {written / 2**20:.0f} MB per run")


if __name__ == "__main__":
    main()
