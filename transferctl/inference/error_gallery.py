"""The error gallery of `evaluate`: which images the model gets wrong, worst first.

eval/<stem>-misclassified.csv lists every misclassified image with its loss (that image's cross-entropy),
and eval/<stem>-top-losses.png shows the worst N as the user sees them (the decoded file, upright and
resized), as fastai's plot_top_losses does. A multi-label run lists every image with a wrong label (one
missed or one given that is not the image's), its loss the mean binary cross-entropy over the classes.
docs/commands.md (evaluate) says how to read them.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from transferctl.errors import ConfigError, DataError, Problem

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CSV_COLUMNS = ("path", "true", "predicted", "confidence", "loss")
MULTI_LABEL_CSV_COLUMNS = ("path", "true", "predicted", "loss")  # true, predicted: labels joined by | as in a label file
NO_LABEL = "(none)"  # a panel's title where a multi-label image was given no label
THUMBNAIL = 224  # pixels on the longer side of a panel's image: enough to see, small for a grid of 16


@dataclass(frozen=True)
class Mistake:
    path: Path
    true: str
    predicted: str
    confidence: float | None  # the predicted class's probability; None for a multi-label image
    loss: float  # -log of the true class's probability (multi-label: the mean binary cross-entropy)


def check_top_losses(top_losses: int) -> None:
    """Refuse a negative --top-losses before any model is loaded."""
    if top_losses < 0:
        raise ConfigError(Problem("--top-losses", f"{top_losses} is not a number of images", "give 0 (no picture) or more, e.g. --top-losses 16"))


def misclassified(logits: torch.Tensor, labels: torch.Tensor, paths: list[Path], classes: list[str]) -> list[Mistake]:
    """The misclassified images, highest loss first; the loss is torch's cross-entropy of each image."""
    logits = logits.to(torch.float64)
    losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    confidence, predicted = torch.softmax(logits, dim=1).max(dim=1)
    wrong = (predicted != labels).nonzero().flatten().tolist()
    rows = [Mistake(paths[i], classes[int(labels[i])], classes[int(predicted[i])], float(confidence[i]), float(losses[i])) for i in wrong]
    return sorted(rows, key=lambda row: row.loss, reverse=True)


def image_losses(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each image's binary cross-entropy (torch's), averaged over its classes, from sigmoid scores."""
    return torch.nn.functional.binary_cross_entropy(scores.to(torch.float64), targets.to(torch.float64), reduction="none").mean(dim=1)


def wrong_labels(scores: torch.Tensor, targets: torch.Tensor, thresholds: Sequence[float], paths: list[Path], classes: list[str]) -> list[Mistake]:
    """The multi-label images with any label wrong at the thresholds, highest loss (image_losses) first."""
    from transferctl.data.targets import MULTI_LABEL_SEPARATOR
    from transferctl.training.multi_label_metrics import decisions

    given = torch.from_numpy(decisions(scores.to(torch.float64).numpy(), thresholds))
    truth = targets.bool()
    losses = image_losses(scores, targets)

    def names(row: torch.Tensor) -> str:
        return MULTI_LABEL_SEPARATOR.join(classes[int(i)] for i in row.nonzero().flatten())

    wrong = (given != truth).any(dim=1).nonzero().flatten().tolist()
    rows = [Mistake(paths[i], names(truth[i]), names(given[i]), None, float(losses[i])) for i in wrong]
    return sorted(rows, key=lambda row: row.loss, reverse=True)


def misclassified_csv(rows: list[Mistake], multi_label: bool = False) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if multi_label:
        writer.writerow(MULTI_LABEL_CSV_COLUMNS)
        writer.writerows((str(row.path), row.true, row.predicted, f"{row.loss:.6g}") for row in rows)
        return buffer.getvalue()
    writer.writerow(CSV_COLUMNS)
    writer.writerows((str(row.path), row.true, row.predicted, f"{row.confidence:.6g}", f"{row.loss:.6g}") for row in rows)
    return buffer.getvalue()


def top_losses_figure(rows: list[Mistake], title: str) -> Figure:
    """One panel per image, in a near-square grid, each titled predicted / true / confidence (multi-label:
    predicted / true, the labels given and the image's own)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = max(1, math.ceil(math.sqrt(len(rows))))
    grid_rows = max(1, math.ceil(len(rows) / columns))
    # No pyplot: a bare Figure has no global state and needs no display, whatever the backend setting.
    figure = Figure(figsize=(2.6 * columns, 2.8 * grid_rows + 0.6), dpi=100)
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    for index, row in enumerate(rows):
        axes = figure.add_subplot(grid_rows, columns, index + 1)
        axes.imshow(_thumbnail(row.path))
        confidence = "" if row.confidence is None else f" / {row.confidence:.2f}"
        axes.set_title(f"{row.predicted or NO_LABEL} / {row.true}{confidence}", fontsize=9)
        axes.axis("off")
    figure.tight_layout()
    return figure


def figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _thumbnail(path: Path) -> Any:
    """The file as a viewer shows it (decode: upright, RGB), shrunk: not the normalised tensor the model saw."""
    from transferctl.data.folders import decode

    image = decode(path)
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return image


def write_error_gallery(folder: Path, stem: str, rows: list[Mistake], top_losses: int, heading: str, multi_label: bool = False) -> dict[str, Any]:
    """<stem>-misclassified.csv always, <stem>-top-losses.png of the worst top_losses when any is wrong;
    the report's keys counting the mistakes and naming the files (None: no picture)."""
    from transferctl.runs.rundir import write_atomically

    csv_path = folder / f"{stem}-misclassified.csv"
    png_path = folder / f"{stem}-top-losses.png"
    write_atomically(csv_path, misclassified_csv(rows, multi_label), DataError)
    worst = rows[:top_losses]
    if worst:
        title = f"{heading}: the {len(worst)} highest losses (predicted / true{'' if multi_label else ' / confidence'})"
        write_atomically(png_path, figure_png(top_losses_figure(worst, title)), DataError)
    else:
        # An earlier evaluation of the same name may have left one: it would show mistakes this one has not.
        png_path.unlink(missing_ok=True)
    return {"misclassified": len(rows), "misclassified_csv": str(csv_path), "top_losses_png": str(png_path) if worst else None}
