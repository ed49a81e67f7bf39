"""Observers of training: how the CLI watches a run (TrainObserver), one that hears nothing, and several as one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from transferctl.training.phases import PhasePlan


class TrainObserver(Protocol):
    """How the CLI watches training; library code never prints."""

    def notice(self, message: str) -> None: ...

    def run_started(self, run_dir: Path) -> None: ...

    def phase_started(self, plan: PhasePlan, batches_per_epoch: int) -> None: ...

    def batch_done(self, index: int, count: int, running_loss: float) -> None: ...

    def epoch_done(self, row: dict[str, Any]) -> None: ...


class SilentObserver:
    def notice(self, message: str) -> None:
        pass

    def run_started(self, run_dir: Path) -> None:
        pass

    def phase_started(self, plan: PhasePlan, batches_per_epoch: int) -> None:
        pass

    def batch_done(self, index: int, count: int, running_loss: float) -> None:
        pass

    def epoch_done(self, row: dict[str, Any]) -> None:
        pass


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
