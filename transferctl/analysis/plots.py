"""Learning-curve figures: built as matplotlib Figure objects (so tests can count their lines), then PNG.

No pyplot: a bare Figure has no global state and needs no display, whatever the backend setting.
Phase boundaries are vertical lines between the last epoch of a phase and the first of the next
(x = epoch + 0.5), in the colour of their run or strategy; their labels start with '_' so the legend
skips them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transferctl.analysis.curves import curve_metric

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from transferctl.analysis.curves import RunCurves

STRATEGY_COLOURS = {"scratch": "tab:gray", "feature_extract": "tab:blue", "fine_tune": "tab:orange", "pretrained_init": "tab:green"}
PHASE_LABEL = "_phase boundary"


@dataclass(frozen=True)
class StrategyBand:
    """One strategy in the comparison plot: mean val accuracy per epoch over seeds, and its spread."""

    strategy: str
    mean: list[float]
    sd: list[float] | None  # None with one seed
    phase_ends: list[int]  # global epochs after which a new phase starts
    seeds: int


def new_figure(width: float, height: float, columns: int = 1) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(1, columns, index + 1) for index in range(columns)]
    return figure, axes


def mark_phase_ends(axes: Axes, phase_ends: Sequence[int], colour: Any) -> None:
    for end in phase_ends:
        axes.axvline(end + 0.5, color=colour, linestyle=":", linewidth=1.2, alpha=0.8, label=PHASE_LABEL)


def comparison_figure(bands: Sequence[StrategyBand], title: str, ylabel: str = "validation accuracy") -> Figure:
    """Val accuracy (or another [0, 1] metric: ylabel) per epoch: a mean line per strategy, a band of ± one sd over seeds, phase boundaries."""
    figure, (axes,) = new_figure(8.0, 5.0)
    for index, band in enumerate(bands):
        colour = STRATEGY_COLOURS.get(band.strategy, f"C{index}")
        epochs = list(range(1, len(band.mean) + 1))
        spread = f"mean ± sd over {band.seeds} seeds" if band.sd is not None else "1 seed"
        axes.plot(epochs, band.mean, color=colour, marker="o", markersize=3, linewidth=2, label=f"{band.strategy} ({spread})")
        if band.sd is not None:
            # clipped: accuracy lives in [0, 1], whatever a wide spread over few seeds says
            low = [max(0.0, m - s) for m, s in zip(band.mean, band.sd)]
            high = [min(1.0, m + s) for m, s in zip(band.mean, band.sd)]
            axes.fill_between(epochs, low, high, color=colour, alpha=0.2, linewidth=0)
        mark_phase_ends(axes, band.phase_ends, colour)
    _decorate(axes, ylabel, title)
    axes.text(0.99, 0.01, "dotted: phase boundary", transform=axes.transAxes, ha="right", va="bottom", fontsize=8, color="dimgray")
    figure.tight_layout()
    return figure


def learning_curves_figure(runs: Sequence[RunCurves]) -> Figure:
    """Loss (left) and accuracy (right) per epoch: train solid, val dashed, one colour per run."""
    figure, (loss_axes, acc_axes) = new_figure(13.0, 5.0, columns=2)
    for index, run in enumerate(r for r in runs if r.rows):
        colour = f"C{index % 10}"
        epochs = run.series("global_epoch")
        for axes, metric in ((loss_axes, "loss"), (acc_axes, "acc")):
            axes.plot(epochs, run.series(f"train_{metric}"), color=colour, linestyle="-", label=f"{run.name} (train)")
            axes.plot(epochs, run.series(f"val_{metric}"), color=colour, linestyle="--", marker="o", markersize=3, label=f"{run.name} (val)")
            mark_phase_ends(axes, run.phase_ends, colour)
        if curve_metric(run.rows) == "val_map":  # multi-label: val_acc is every label right; mAP is the run's measure
            acc_axes.plot(epochs, run.series("val_map"), color=colour, linestyle="-.", marker="s", markersize=3, label=f"{run.name} (val mAP)")
    losses = [value for run in runs for key in ("train_loss", "val_loss") for value in run.series(key)]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 100:
        loss_axes.set_yscale("log")  # one diverging run would otherwise flatten every other curve
    _decorate(loss_axes, "loss", "loss (solid: train, dashed: val)", legend=False)  # one legend serves both
    multi_label = any(curve_metric(run.rows) == "val_map" for run in runs if run.rows)
    _decorate(acc_axes, "accuracy, mAP" if multi_label else "accuracy",
              "accuracy (solid: train, dashed: val; dotted: phase boundary)" + ("; dash-dot: val mAP" if multi_label else ""))
    figure.tight_layout()
    return figure


def _decorate(axes: Axes, ylabel: str, title: str, legend: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)
    if legend:
        axes.legend(fontsize=8, loc="best")


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
