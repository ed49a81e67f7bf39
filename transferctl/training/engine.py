"""One training epoch, one evaluation pass, seeds and random states; where they run is runtime.py. No file I/O here."""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from transferctl.training.multi_label_metrics import decisions, subset_accuracy
from transferctl.training.multi_label_metrics import report as multi_label_report
from transferctl.training.runtime import Runtime, logits_of, predict_logits, to_device

BatchCallback = Callable[[int, int, float], None]  # (batch index, batch count, running loss)
REPORT_SECONDS = 0.2  # how often train_one_epoch reads the running loss for on_batch


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float
    data_seconds: float = 0.0  # of `seconds`, spent waiting for the next batch (training only)
    # Validation only: counts of (true class, predicted class), summed over ranks (distributed.reduce_stats).
    confusion: np.ndarray | None = None
    # Validation of multi-label runs: every image's sigmoid scores and multi-hot targets, gathered over ranks.
    scores: np.ndarray | None = None
    targets: np.ndarray | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def multi_label(self) -> bool:
        return self.scores is not None

    def validation_columns(self, prefix: str = "val_") -> dict[str, float]:
        """The metrics row's validation columns: loss and accuracy, with balanced accuracy and macro F1, or for a
        multi-label run mAP and micro/macro F1 at threshold 0.5 (accuracy: every label of an image right)."""
        columns = {"loss": self.loss, "acc": self.accuracy}
        if self.multi_label:
            assert self.scores is not None and self.targets is not None
            numbers = multi_label_report(self.targets, self.scores) if self.images else dict.fromkeys(("map", "micro_f1", "macro_f1"), float("nan"))
            columns.update({"map": numbers["map"], "micro_f1": numbers["micro_f1"], "macro_f1": numbers["macro_f1"]})
        else:
            columns.update({"balanced_acc": self.balanced_accuracy, "macro_f1": self.macro_f1})
        return {prefix + name: value for name, value in columns.items()}

    @property
    def balanced_accuracy(self) -> float:
        """scikit-learn's balanced_accuracy_score: the mean recall of the classes that have validation images."""
        from sklearn.metrics import balanced_accuracy_score

        truth, predicted = _pairs(self.confusion)
        if not len(truth):
            return float("nan")
        with warnings.catch_warnings():  # a class predicted but never true: recall is over the true classes, as documented
            warnings.simplefilter("ignore")
            return float(balanced_accuracy_score(truth, predicted))

    @property
    def macro_f1(self) -> float:
        """scikit-learn's f1_score(average='macro') over the classes that are true or predicted (0 where undefined)."""
        from sklearn.metrics import f1_score

        truth, predicted = _pairs(self.confusion)
        return float(f1_score(truth, predicted, average="macro", zero_division=0)) if len(truth) else float("nan")


def _pairs(confusion: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) labels, one pair per image, that a confusion matrix counts; scikit-learn's metrics take these."""
    if confusion is None:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    truth, predicted = np.nonzero(confusion)
    counts = confusion[truth, predicted].astype(np.int64)
    return np.repeat(truth, counts), np.repeat(predicted, counts)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the caller knows which phase and epoch."""


class TrainingStopped(RuntimeError):
    """should_stop said yes between two steps; the epoch was abandoned."""


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    runtime: Runtime,
    scaler: torch.amp.GradScaler | None = None,
    on_batch: BatchCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    report_seconds: float = REPORT_SECONDS,
    mix: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    after_step: Callable[[], None] | None = None,
    loss_fn: nn.Module | None = None,
) -> EpochStats:
    """One pass over the batches; the model must already be in the phase's train/eval modes.

    should_stop is asked before every step: when it says yes, TrainingStopped abandons the epoch (the
    caller's last checkpoint is the state to go back to). A non-finite loss raises NonFiniteLossError.
    on_batch hears of the first and last batches and of one every report_seconds in between: reading the
    running loss waits for the GPU to finish every step queued so far, so doing it after every batch
    would leave the GPU idle while the next step is being queued.
    mix (mixing.py) makes (images, soft targets, the labels train accuracy counts) of a batch, given its index;
    after_step runs after every optimizer step (ema.py).
    loss_fn is the run's loss (loss.py: label smoothing, class weights), on the runtime's device; None: plain cross-entropy.
    """
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    start = time.perf_counter()
    total_loss = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    seen = 0
    batch_count = len(batches) if hasattr(batches, "__len__") else 0  # type: ignore[arg-type]
    reported = start
    waiting = WaitTimer(batches)
    for index, (images, labels) in enumerate(waiting):
        if should_stop is not None and should_stop():
            raise TrainingStopped(f"stopped before batch {index + 1} of {batch_count}")
        images, labels = to_device(images, labels, runtime)
        images, targets, labels = mix(index, images, labels) if mix is not None else (images, labels, labels)
        with runtime.autocast():
            logits = logits_of(model(images))
            loss = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            _scaled_step(loss, optimizer, scheduler, scaler)
        else:
            loss.backward()
            optimizer.step()
            scheduler.step()
        if after_step is not None:
            after_step()
        # Accumulate on the device: calling .item() every batch would be a CPU-GPU sync point.
        total_loss += loss.detach() * len(labels)
        correct += right_answers(logits.detach(), labels)
        seen += len(labels)
        now = time.perf_counter()
        if on_batch is not None and (index == 0 or index + 1 == batch_count or now - reported >= report_seconds):
            reported = now
            running = float(total_loss) / seen  # a sync point anyway: stop now if the loss diverged
            if not math.isfinite(running):
                raise NonFiniteLossError(f"training loss became {running} at batch {index + 1} of {batch_count}")
            on_batch(index, batch_count, running)
    mean_loss = float(total_loss) / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(f"training loss became {mean_loss}")
    return EpochStats(mean_loss, float(correct) / max(seen, 1), seen, time.perf_counter() - start, waiting.seconds)


class WaitTimer:
    """Iterates like `items`, adding up the time spent waiting for each next item in `seconds`.

    For a training loop that is the time the model waited for data: decoding and augmenting in this process
    (no workers), or workers that do not keep up. On a GPU the steps run asynchronously, so a model that is
    the bottleneck makes the loop wait at its sync points instead, while the workers fill their queue.
    """

    def __init__(self, items: Iterable[Any]) -> None:
        self.items, self.seconds = items, 0.0

    def __iter__(self) -> Iterator[Any]:
        iterator, end = iter(self.items), object()
        while True:
            asked = time.perf_counter()
            item = next(iterator, end)
            self.seconds += time.perf_counter() - asked
            if item is end:
                return
            yield item


def _scaled_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler) -> None:
    """An fp16 step: the scaler skips the update when the scaled gradients overflowed and lowers the scale.

    The schedule still advances, one step per batch as planned. PyTorch then warns that the scheduler
    stepped before the optimizer, which is true of a skipped step and harmless: the warning is held back,
    or most fp16 runs would print it, since the first steps usually overflow while the scale settles.
    """
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
        scheduler.step()


def right_answers(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many images the logits get right: the top class, or (multi-hot labels) every label at threshold 0.5."""
    if labels.dim() == 2:
        return ((logits > 0) == (labels > 0.5)).all(dim=1).sum()
    return (logits.argmax(dim=1) == labels).sum()


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], runtime: Runtime, multi_label: bool = False) -> EpochStats:
    start = time.perf_counter()
    logits, labels = predict_logits(model, batches, runtime)
    if multi_label:
        return _evaluate_multi_label(logits, labels, start)
    if labels.numel() == 0:
        return EpochStats(float("nan"), float("nan"), 0, time.perf_counter() - start)
    loss = float(nn.functional.cross_entropy(logits, labels))  # plain cross-entropy, whatever the training loss
    predicted = logits.argmax(dim=1)
    accuracy = float((predicted == labels).float().mean())
    return EpochStats(loss, accuracy, labels.numel(), time.perf_counter() - start, confusion=confusion_counts(labels, predicted, logits.shape[1]))


def _evaluate_multi_label(logits: torch.Tensor, labels: torch.Tensor, start: float) -> EpochStats:
    """Plain binary cross-entropy (mean over images and classes, whatever the training loss), the scores and
    targets the row's mAP and F1 come from, and subset accuracy at 0.5."""
    if len(labels) == 0:
        empty = np.empty((0, 0), dtype=np.float32)
        return EpochStats(float("nan"), float("nan"), 0, time.perf_counter() - start, scores=empty, targets=empty)
    targets = labels.float()
    loss = float(nn.functional.binary_cross_entropy_with_logits(logits, targets))
    scores, truth = torch.sigmoid(logits).numpy(), targets.numpy()
    accuracy = subset_accuracy(truth, decisions(scores))
    return EpochStats(loss, accuracy, len(labels), time.perf_counter() - start, scores=scores, targets=truth)


def confusion_counts(labels: torch.Tensor, predicted: torch.Tensor, classes: int) -> np.ndarray:
    """scikit-learn's confusion_matrix over every class: rows true, columns predicted."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels.numpy(), predicted.numpy(), labels=np.arange(classes))


def make_grad_scaler(runtime: Runtime) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    if runtime.precision == "fp16":
        return torch.amp.GradScaler(runtime.device.type)
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    """Every global random generator's state, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # an ndarray inside: stored as a list
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Undo rng_states: what an uninterrupted run's generators held at that point."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    # On another machine (or on the CPU) the CUDA streams differ anyway; restore what still matches.
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
