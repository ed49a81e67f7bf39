"""Early stopping: a phase ends once its metric has not improved for `patience` epochs.

Bookkeeping over metric rows and nothing else, kept apart from the loop (train.py): last.pt carries its
state (phase_best, stale), so a resumed phase stops where the uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


# early_stopping.metric -> the metrics row's column it follows (all of the validation images).
METRIC_COLUMN = {"val_acc": "val_acc", "val_loss": "val_loss", "balanced_acc": "val_balanced_acc", "macro_f1": "val_macro_f1",
                 "val_map": "val_map", "micro_f1": "val_micro_f1"}  # fmt: skip


def is_better(row: dict[str, Any], than: dict[str, Any], metric: str) -> bool:
    """Whether the row beats `than` on the metric: a lower val_loss, a higher accuracy or F1."""
    column = METRIC_COLUMN[metric]
    if metric == "val_loss":
        return row[column] < than[column]
    return row[column] > than[column]


@dataclass
class EarlyStopping:
    """One phase's best row so far and the epochs since its metric last improved."""

    metric: str
    patience: int | None  # None: the phase runs all its epochs
    best: dict[str, Any] | None = None
    stale: int = 0

    def update(self, row: dict[str, Any]) -> bool:
        """Count an epoch's row; True when the phase should end."""
        if self.best is None or is_better(row, self.best, self.metric):
            self.best, self.stale = row, 0
        else:
            self.stale += 1
        return self.patience is not None and self.stale >= self.patience
