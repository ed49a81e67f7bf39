"""Early stopping: a phase ends once its metric has not improved for `patience` epochs.

Bookkeeping over metric rows and nothing else, kept apart from the loop (train.py): last.pt carries its
state (phase_best, stale), so a resumed phase stops where the uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def is_better(row: dict[str, Any], than: dict[str, Any], metric: str) -> bool:
    """Whether the row beats `than` on the metric: a lower val_loss, a higher accuracy."""
    if metric == "val_loss":
        return row[metric] < than[metric]
    return row[metric] > than[metric]


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
