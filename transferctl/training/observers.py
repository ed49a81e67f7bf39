"""Observers of training that compose: several watchers (progress bars, TensorBoard, ...) as one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transferctl.training.phases import PhasePlan
    from transferctl.training.train import TrainObserver


class FanOutObserver:
    """Passes every event to each of its observers, in the order given."""

    def __init__(self, *observers: TrainObserver) -> None:
        self.observers = observers

    def notice(self, message: str) -> None:
        for observer in self.observers:
            observer.notice(message)

    def run_started(self, run_dir: Path) -> None:
        for observer in self.observers:
            observer.run_started(run_dir)

    def phase_started(self, plan: PhasePlan, batches_per_epoch: int) -> None:
        for observer in self.observers:
            observer.phase_started(plan, batches_per_epoch)

    def batch_done(self, index: int, count: int, running_loss: float) -> None:
        for observer in self.observers:
            observer.batch_done(index, count, running_loss)

    def epoch_done(self, row: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.epoch_done(row)
