"""TensorBoard logs of a run (optional: pip install transferctl[tensorboard]).

Training: TensorBoardObserver writes every number of each epoch row into <run>/tensorboard/ (losses,
accuracies, balanced accuracy, F1, their EMA twins, images/s, whatever a row carries) and the learning
rate of every trained layer group, with the global epoch as the step, so a resumed run continues the same curves. evaluate adds its confusion matrix as an image. Nothing here is
imported unless an experiment asks for it (logging.tensorboard: true).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from transferctl.errors import ConfigError, Problem
from transferctl.training.mlflow_logging import epoch_metrics
from transferctl.training.observers import FanOutObserver

if TYPE_CHECKING:
    from transferctl.config import LoggingConfig
    from transferctl.training.phases import PhasePlan
    from transferctl.training.observers import TrainObserver

LOG_DIR = "tensorboard"
INSTALL_HINT = "pip install transferctl[tensorboard], or set logging.tensorboard: false"
SPLITS = ("ema_val", "train", "val")  # a column <split>_<metric> becomes <metric>/<split>: one chart per metric, a curve per split
SPEED = ("images_per_second", "data_seconds", "seconds", "train_seconds")
NOT_SCALARS = ("phase_index", "epoch", "global_epoch", "lr_head", "lr_backbone")  # the step and the schedule's place; lr/<group> has the rates


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def require_tensorboard(where: str) -> None:
    """Fail before any work when the experiment asks for logs that cannot be written."""
    if not tensorboard_available():
        raise ConfigError(Problem(where, "asks for TensorBoard logs, but the tensorboard package is not installed", INSTALL_HINT))


def summary_writer(run_dir: Path, where: str = "logging.tensorboard") -> Any:
    """A SummaryWriter on <run>/tensorboard/ (an existing log there is continued, not replaced)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # tensorboard there but broken, e.g. a protobuf it cannot use
        raise ConfigError(Problem(where, f"cannot use TensorBoard: {exc}", INSTALL_HINT)) from None
    return SummaryWriter(log_dir=str(run_dir / LOG_DIR))


class TensorBoardObserver:
    """Per-epoch scalars of a training run; the writer opens when the run directory is known."""

    def __init__(self) -> None:
        self.writer: Any = None
        self.plan: PhasePlan | None = None

    def notice(self, message: str) -> None:
        pass

    def run_started(self, run_dir: Path) -> None:
        self.close()
        self.writer = summary_writer(run_dir)

    def phase_started(self, plan: PhasePlan, batches_per_epoch: int) -> None:
        self.plan = plan

    def batch_done(self, index: int, count: int, running_loss: float) -> None:
        pass

    def epoch_done(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(row["global_epoch"])
        for column, value in epoch_metrics(row).items():
            if column not in NOT_SCALARS:
                self.writer.add_scalar(scalar_tag(column), value, step)
        for group, lr in group_learning_rates(self.plan, row).items():
            self.writer.add_scalar(f"lr/{group}", lr, step)
        self.writer.flush()  # an interrupted run keeps every finished epoch's points

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def scalar_tag(column: str) -> str:
    """A metric row's column as a TensorBoard tag: val_loss -> loss/val, ema_val_balanced_acc ->
    balanced_accuracy/ema_val, images_per_second -> speed/images_per_second, anything else -> epoch/<column>."""
    if column in SPEED:
        return f"speed/{column}"
    split = next((split for split in SPLITS if column.startswith(f"{split}_")), None)
    if split is None:
        return f"epoch/{column}"
    metric = column[len(split) + 1 :]
    return f"{metric[: -len('acc')]}accuracy/{split}" if metric.endswith("acc") else f"{metric}/{split}"


def group_learning_rates(plan: PhasePlan | None, row: dict[str, Any]) -> dict[str, float]:
    """The lr of each trained layer group at the start of the epoch.

    The schedule scales every group by the same factor, so each group's lr is the head's (in the row)
    times its multiplier: 1 for the head, backbone_lr_mult for the rest. Frozen groups have none.
    """
    head_lr = row.get("lr_head")
    if plan is None or not isinstance(head_lr, (int, float)):
        return {}
    return {group: head_lr * (1.0 if group == "head" else plan.backbone_lr_mult) for group in plan.trainable}


@contextlib.contextmanager
def with_tensorboard(observer: TrainObserver, enabled: bool, where: str = "logging.tensorboard") -> Iterator[TrainObserver]:
    """`observer`, plus TensorBoard logs when enabled; the log is closed however training ends."""
    if not enabled:
        yield observer
        return
    require_tensorboard(where)
    board = TensorBoardObserver()
    try:
        yield FanOutObserver(observer, board)
    finally:
        board.close()


def log_evaluation(run_dir: Path, report: dict[str, Any], confusion_png: Path, name: str) -> None:
    """evaluate's picture (the confusion matrix, or a multi-label run's precision-recall curves) and headline
    numbers, at the run's last epoch, under
    eval/<name>/ (the report's file name: the split, and another data folder's or checkpoint's name)."""
    import numpy as np
    from PIL import Image

    from transferctl.runs.listing import metric_rows

    step = len(metric_rows(run_dir).rows)
    with Image.open(io.BytesIO(confusion_png.read_bytes())) as image:
        pixels = np.asarray(image.convert("RGB"))
    picture = "pr_curves" if report.get("task") == "multi_label" else "confusion_matrix"
    writer = summary_writer(run_dir, f"{run_dir / 'config.yaml'}: logging.tensorboard")
    try:
        writer.add_image(f"eval/{name}/{picture}", pixels, step, dataformats="HWC")
        for metric, value in epoch_metrics(report).items():  # every headline number, as MLflow gets them
            writer.add_scalar(f"eval/{name}/{metric}", value, step)
    finally:
        writer.close()


def run_wants_tensorboard(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> bool:
    """Whether a run directory's config.yaml (with --set overrides) asks for TensorBoard logs."""
    return run_logging(run_dir, overrides).tensorboard


def run_logging(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> LoggingConfig:
    """The logging section of a run directory's config.yaml (with --set overrides); no logging when it
    cannot be read: the command that opens the run says what is wrong with it."""
    from transferctl.config import LoggingConfig, load_config
    from transferctl.errors import TransferctlError

    try:
        return load_config(run_dir / "config.yaml", overrides).logging
    except TransferctlError:
        return LoggingConfig()
