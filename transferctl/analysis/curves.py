"""Learning-curve measures of transfer (Taylor & Stone 2009), as pure functions of accuracy curves.

A curve is the validation accuracy after each epoch, epoch 1 first. A transfer curve is always measured
against the scratch curve of the same seed (same data split, same number of epochs), and the per-seed
results are then summarised as mean ± sample standard deviation over the seeds.

No torch and no I/O here: `compare` feeds these the curves it read from the run directories, and the
tests feed them hand-made curves with known answers. RunCurves holds one run's rows as report, compare and
plots share them (report reads them from disk).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transferctl.runs.listing import RunInfo

Curve = Sequence[float]

BEST_FEW_FRACTION = 0.25
"""The asymptote is the mean of the best quarter of the epochs (rounded up, at least one): long enough to
smooth one lucky epoch, short enough to ignore the climb. 8 epochs -> best 2, 10 -> best 3."""

THRESHOLD_FRACTION = 0.95
"""Time to threshold: the first epoch reaching 95% of scratch's best accuracy."""

DEFINITIONS: dict[str, str] = {
    "jumpstart": "accuracy after the first epoch minus scratch's, a_T(1) − a_S(1)",
    "auc": "area under the accuracy curve per epoch: trapezoid rule over epochs 1..n divided by n − 1 (a mean accuracy)",
    "transfer_ratio": "(AUC_T − AUC_S) / AUC_S",
    "asymptote": "mean accuracy of the best ⌈n/4⌉ epochs (8 epochs: the best 2)",
    "asymptotic_gain": "asymptote of the strategy minus scratch's",
    "time_to_threshold": "first epoch whose accuracy reaches 95% of scratch's best accuracy (same seed)",
    "speedup": "scratch's time to threshold divided by the strategy's; empty when the strategy never reaches it",
    "negative_transfer": "the mean asymptotic gain is below zero by more than its standard deviation over seeds",
    "mean_sd": "each measure is computed per seed against scratch with the same seed, then summarised as mean ± sample sd over seeds",
}


def _checked(curve: Curve) -> list[float]:
    if len(curve) == 0:
        raise ValueError("a learning curve needs at least one epoch")
    return [float(value) for value in curve]


def auc(curve: Curve) -> float:
    """Trapezoid area over epochs 1..n, divided by the n − 1 intervals: a mean accuracy in [0, 1].

    One epoch has no interval; its area is defined as its only value.
    """
    values = _checked(curve)
    if len(values) == 1:
        return values[0]
    area = sum((a + b) / 2.0 for a, b in zip(values, values[1:]))
    return area / (len(values) - 1)


def best_few_count(epochs: int) -> int:
    return max(1, math.ceil(BEST_FEW_FRACTION * epochs))


def asymptote(curve: Curve) -> float:
    """Mean of the best ⌈n/4⌉ epochs."""
    values = sorted(_checked(curve), reverse=True)
    best = values[: best_few_count(len(values))]
    return sum(best) / len(best)


def jumpstart(transfer: Curve, scratch: Curve) -> float:
    return _checked(transfer)[0] - _checked(scratch)[0]


def asymptotic_gain(transfer: Curve, scratch: Curve) -> float:
    return asymptote(transfer) - asymptote(scratch)


def transfer_ratio(transfer: Curve, scratch: Curve) -> float | None:
    """(AUC_T − AUC_S) / AUC_S; None when scratch's AUC is 0 (the ratio is undefined)."""
    base = auc(scratch)
    return None if base == 0 else (auc(transfer) - base) / base


def threshold(scratch: Curve) -> float:
    return THRESHOLD_FRACTION * max(_checked(scratch))


def time_to_threshold(curve: Curve, level: float) -> int | None:
    """The first epoch (1-based) whose accuracy reaches level; None when none does."""
    for epoch, value in enumerate(_checked(curve), start=1):
        if value >= level:
            return epoch
    return None


def speedup(transfer: Curve, scratch: Curve) -> float | None:
    """TTT_S / TTT_T at 95% of scratch's best; None when the transfer curve never gets there."""
    level = threshold(scratch)
    ttt_s, ttt_t = time_to_threshold(scratch, level), time_to_threshold(transfer, level)
    assert ttt_s is not None, "scratch always reaches 95% of its own best"
    return None if ttt_t is None else ttt_s / ttt_t


@dataclass(frozen=True)
class SeedMeasures:
    """One seed: a strategy's curve against scratch's curve of the same seed."""

    jumpstart: float
    auc: float
    transfer_ratio: float | None
    asymptote: float
    asymptotic_gain: float
    time_to_threshold: int | None
    speedup: float | None


def measure(transfer: Curve, scratch: Curve) -> SeedMeasures:
    return SeedMeasures(
        jumpstart=jumpstart(transfer, scratch),
        auc=auc(transfer),
        transfer_ratio=transfer_ratio(transfer, scratch),
        asymptote=asymptote(transfer),
        asymptotic_gain=asymptotic_gain(transfer, scratch),
        time_to_threshold=time_to_threshold(transfer, threshold(scratch)),
        speedup=speedup(transfer, scratch),
    )


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over the seeds where the value is defined (n of them, of all)."""

    mean: float | None
    sd: float | None  # None with fewer than two values: one seed has no spread
    n: int
    of: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self, digits: int = 3) -> str:
        """'0.812 ± 0.031', '0.812' (one value), '—' (none); '(2 of 3)' when some seeds had no value."""
        if self.mean is None:
            return "—"
        text = f"{self.mean:.{digits}f}" + (f" ± {self.sd:.{digits}f}" if self.sd is not None else "")
        return text + (f" ({self.n} of {self.of})" if self.n < self.of else "")


def summarize(values: Sequence[float | None]) -> Stat:
    present = [float(v) for v in values if v is not None]
    mean = statistics.fmean(present) if present else None
    sd = statistics.stdev(present) if len(present) >= 2 else None
    return Stat(mean, sd, len(present), len(values))


def summarize_measures(per_seed: Sequence[SeedMeasures]) -> dict[str, Stat]:
    """Each field of SeedMeasures as a Stat over the seeds."""
    fields = SeedMeasures.__dataclass_fields__
    return {name: summarize([getattr(m, name) for m in per_seed]) for name in fields}


def negative_transfer(gain: Stat) -> bool:
    """Below zero by more than the spread over seeds (with one seed: below zero at all)."""
    return gain.mean is not None and gain.mean < 0 and -gain.mean > (gain.sd or 0.0)


def mean_band(curves: Sequence[Curve]) -> tuple[list[float], list[float] | None]:
    """Per-epoch mean over seeds and the sample sd (None for one seed); curves must be equally long."""
    checked = [_checked(curve) for curve in curves]
    if not checked or len({len(c) for c in checked}) != 1:
        raise ValueError("mean_band needs curves of one and the same length")
    columns = list(zip(*checked))
    mean = [statistics.fmean(column) for column in columns]
    sd = [statistics.stdev(column) for column in columns] if len(checked) >= 2 else None
    return mean, sd


@dataclass(frozen=True)
class RunCurves:
    """A run directory's metric rows (one per epoch) with what `runs` knows about it."""

    path: Path
    info: RunInfo
    rows: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.path.name

    def series(self, key: str) -> list[float]:
        return [row[key] for row in self.rows]

    @property
    def phase_ends(self) -> list[int]:
        return phase_ends(self.rows)


def curve_metric(rows: Sequence[dict[str, Any]]) -> str:
    """What a run's curve follows: val_map where its rows have it (multi-label, whose val_acc is subset
    accuracy: every label right), else val_acc."""
    return "val_map" if rows and all("val_map" in row for row in rows) else "val_acc"


def phase_ends(rows: Sequence[dict[str, Any]]) -> list[int]:
    """The global epochs after which a new phase starts."""
    return [a["global_epoch"] for a, b in zip(rows, rows[1:]) if a.get("phase_index", a["phase"]) != b.get("phase_index", b["phase"])]
