"""A head-only phase on cached features, solved: multinomial logistic regression fitted to convergence.

With the body frozen and its features cached, training a new linear head is a convex problem (softmax
cross-entropy plus an L2 penalty). A few dozen minibatch steps leave it under-trained, and the frozen
features then look worse than they are. Linear-probe protocols (Kornblith et al. 2019, CLIP) fit it with
full-batch L-BFGS instead, the L2 strength chosen on held-out training images; so does this module. The
strength is chosen by stratified k-fold cross-validation on the training images (never on val), then the
head is fitted on every cached view of every training image, in the phase's first epoch. What an epoch
row means for a solved head, and the solve's time: docs/experiment-file.md (Phases); its accuracy beside a
plain loop and LogisticRegressionCV: docs/quality.md.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from transferctl.training.engine import EpochStats, NonFiniteLossError, TrainingStopped, right_answers
from transferctl.training.multi_label_metrics import mean_average_precision

# L2 strengths tried, on features scaled to a root mean square of 1 (Design: so one grid means the same for
# every backbone and layer), strongest first: each fold walks this regularisation path warm-started from the
# last strength. Half a decade apart: a decade apart lost 3 to 5 points to scikit-learn's
# LogisticRegressionCV (17 values) on noisy blobs.
WEIGHT_DECAYS = tuple(float(10.0**exponent) for exponent in np.arange(1.0, -5.01, -0.5))
# The least penalty on the head's own weights: a body whose features hardly vary (a random network's can be
# 1e-10 in size) must not get a head that magnifies them by 1e10, which fine-tuning that body would blow up.
MIN_HEAD_DECAY = 1.0e-8
FALLBACK_WEIGHT_DECAY = 1.0e-3  # when some class has a single training image: no fold can hold it out
MAX_FOLDS = 3
SELECTION_IMAGES = 1000  # above this, the strength is chosen on a stratified sample: the solves stay seconds
PATH_ITERATIONS = 30  # per strength and fold: warm starts along the path make that enough to rank them
FINAL_ITERATIONS = 1000
HISTORY = 20
ROWS_PER_CHUNK = 65536  # rows on the device at once: a cache larger than RESIDENT_BYTES is read in chunks
RESIDENT_BYTES = 2**30
MAX_PENALTY = 1.0e10  # on unit-scale features: weights of at most about 1e-10
SINGLE_THREAD_ELEMENTS = 2**21  # cached feature values up to which the solve runs on one CPU thread


@dataclass(frozen=True)
class Selection:
    """The chosen L2 strength and how it was chosen, for the run's notices."""

    weight_decay: float
    folds: int
    images: int
    accuracy: float | None  # held-out accuracy (multi-label: mAP) at the chosen strength (None: not cross-validated)
    criterion: str = "accuracy"  # what was held out and compared: accuracy, or a multi-label head's mAP

    def describe(self) -> str:
        if self.accuracy is None:
            return f"weight decay {self.weight_decay:g} (too few training images of a class: no cross-validation)"
        return (f"weight decay {self.weight_decay:g}, chosen by {self.folds}-fold cross-validation on {self.images} "
                f"training images (held-out {self.criterion} {self.accuracy:.3f})")  # fmt: skip


@dataclass(frozen=True)
class Objective:
    """The run's training loss (loss.py) over every cached row, so that a solved head fits what minibatch steps
    would: nn.CrossEntropyLoss's class weights and label smoothing, and, with data.sampler: balanced, each
    image weighted by its chance of being drawn (what the sampler's batches average to). The mean is
    normalised as nn.CrossEntropyLoss's weighted mean is: by the rows' summed weight of their target class."""

    class_weights: torch.Tensor | None = None  # (classes,)
    label_smoothing: float = 0.0
    image_weights: np.ndarray | None = None  # (images,): data.sampler balanced's draw weights
    # Multi-label (nn.BCEWithLogitsLoss): one sigmoid a class, each class's positives weighted by pos_weight.
    multi_label: bool = False
    pos_weight: torch.Tensor | None = None  # (classes,)

    @classmethod
    def of(cls, loss: nn.Module | None, image_weights: np.ndarray | None = None) -> Objective:
        if loss is None:
            return cls(image_weights=image_weights)
        if isinstance(loss, nn.BCEWithLogitsLoss):
            return cls(image_weights=image_weights, multi_label=True, pos_weight=_on_cpu(loss.pos_weight))
        return cls(_on_cpu(loss.weight), float(loss.label_smoothing), image_weights)

    def row_weights(self, images: np.ndarray, views: int) -> np.ndarray | None:
        """Each row's weight from the sampler (None: all alike)."""
        return None if self.image_weights is None else np.repeat(self.image_weights[images], views).astype(np.float32)

    def normaliser(self, labels: np.ndarray, images: np.ndarray, views: int) -> float:
        """The sum the rows' summed losses are divided by: their count when nothing is weighted."""
        weight = np.ones(len(images)) if self.image_weights is None else self.image_weights[images].astype(np.float64)
        if self.multi_label:  # BCEWithLogitsLoss's mean is over every (image, class) element
            return float(weight.sum()) * views * labels.shape[1]
        if self.class_weights is not None:
            weight = weight * self.class_weights.double().numpy()[labels[images]]
        return float(weight.sum()) * views

    def summed(self, logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """The rows' losses, summed (divide by `normaliser` for the mean)."""
        if self.multi_label:
            pos_weight = self.pos_weight.to(logits.device) if self.pos_weight is not None else None
            losses = nn.functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none").sum(dim=1)
            return (losses * rows).sum() if rows is not None else losses.sum()
        weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
        losses = nn.functional.cross_entropy(logits, targets, weight=weight, label_smoothing=self.label_smoothing, reduction="none")
        return (losses * rows).sum() if rows is not None else losses.sum()


def _on_cpu(weight: torch.Tensor | None) -> torch.Tensor | None:
    return weight.detach().float().cpu() if weight is not None else None


def plain_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The rows' plain validation loss, summed: cross-entropy, or (multi-hot targets) binary cross-entropy
    averaged over the classes, as engine.evaluate reports them."""
    if targets.dim() == 2:
        return nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / targets.shape[1]
    return nn.functional.cross_entropy(logits, targets, reduction="sum")


def solvable(head: nn.Module) -> bool:
    """Only a plain linear layer on the cached features is a logistic regression."""
    return isinstance(head, nn.Linear) and head.bias is not None


class SolvedHeadState(torch.optim.Optimizer):
    """What a checkpoint keeps of a solved head besides its weights: the chosen weight decay and whether the
    solve is done. An optimizer, so that the trainer saves and restores it like any other; never stepped."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.0, "weight_decay": None, "solved": False})  # lr: for the scheduler the trainer keeps

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        raise RuntimeError("a solved head is fitted by HeadSolver, not stepped")


class HeadSolver:
    """Fits a linear head to the cached features of a phase's training images, once, in its first epoch.

    The problem is convex, so the first epoch reaches the optimum; later epochs (and a resume after the
    first) find it solved and only measure. The trainer checkpoints `optimizer` like any optimizer.
    """

    def __init__(
        self, head: nn.Linear, features: np.ndarray, labels: np.ndarray, device: torch.device, seed: int, objective: Objective | None = None,
        fine_tuned_after: bool = False,
    ) -> None:  # fmt: skip
        """fine_tuned_after: a later stage of the run trains the body through this head (choose_weight_decay)."""
        self.head, self.features, self.labels, self.device, self.seed = head, features, labels, device, seed
        self.objective = objective or Objective()
        self.fine_tuned_after = fine_tuned_after
        self.optimizer = SolvedHeadState(head.parameters())
        self.scheduler = torch.optim.lr_scheduler.ConstantLR(self.optimizer, factor=1.0, total_iters=0)
        self.selection: Selection | None = None

    @property
    def weight_decay(self) -> float | None:
        return self.optimizer.param_groups[0]["weight_decay"]

    def train_epoch(self, should_stop: Callable[[], bool] = lambda: False) -> EpochStats:
        start = time.perf_counter()
        group = self.optimizer.param_groups[0]
        if not group["solved"]:
            self.selection, weight, bias = solve(self.features, self.labels, self.head.out_features, self.device, self.seed, should_stop, self.objective,
                                                 self.fine_tuned_after)  # fmt: skip
            with torch.no_grad():
                self.head.weight.copy_(weight.to(self.head.weight.dtype))
                self.head.bias.copy_(bias.to(self.head.bias.dtype))
            group.update(weight_decay=self.selection.weight_decay, solved=True)
        loss, correct, count = _score_raw(self.features, self.labels, self.head, self.device, self.objective)
        return EpochStats(loss, correct / count, count, time.perf_counter() - start)


def solve(
    features: np.ndarray, labels: np.ndarray, classes: int, device: torch.device, seed: int, should_stop: Callable[[], bool] = lambda: False,
    objective: Objective | None = None, fine_tuned_after: bool = False,
) -> tuple[Selection, torch.Tensor, torch.Tensor]:
    """Choose the L2 strength, fit on every training row, return it with the head's (weight, bias) for
    `classes` outputs (a class without training rows among them is only ever pushed down)."""
    objective = objective or Objective()
    design = Design.of(features, device)
    rows = _Rows(features, labels, np.arange(len(labels)), design, objective=objective)
    selection = choose_weight_decay(features, labels, design, seed, should_stop, objective, fine_tuned_after)
    weight = torch.zeros(classes, design.width, device=device, requires_grad=True)
    bias = torch.zeros(classes, device=device, requires_grad=True)
    _fit(rows, weight, bias, design.penalty(selection.weight_decay), FINAL_ITERATIONS, should_stop)
    head_weight, head_bias = design.to_head(weight.detach(), bias.detach())
    return selection, head_weight, head_bias


@contextlib.contextmanager
def _cpu_threads_for(elements: int, device: torch.device) -> Iterator[None]:
    """One CPU thread for a small fit: its operations are too small to share, and two threads waiting on each
    other beside another busy process made a 12-image solve take 3 to 11 s instead of 0.2 s."""
    small = device.type == "cpu" and elements <= SINGLE_THREAD_ELEMENTS
    threads = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(threads)


def choose_weight_decay(
    features: np.ndarray, labels: np.ndarray, design: Design, seed: int, should_stop: Callable[[], bool] = lambda: False, objective: Objective | None = None,
    fine_tuned_after: bool = False,
) -> Selection:  # fmt: skip
    """The L2 strength with the best held-out accuracy over stratified folds of the training images, smoothed
    along the path (ties: the stronger). Fitting uses every cached view of a fold's images, scoring the clean view 0;
    the folds fit the run's objective, and score plain accuracy. A multi-label head (multi-hot labels) is
    scored over shuffled folds instead (an image's set of labels has no one class to stratify by, and subset
    accuracy moves in steps too coarse to rank strengths with), by what its use needs (docs/quality.md,
    Multi-label, measured both ways on the digit composites):
    - the run's classifier (no later stage trains the body): the mean average precision of its out-of-fold
      scores (every image's from the fold that held it out). Held-out loss chose heads so damped that they
      ranked images worse: the feature extractor lost 11 points of val mAP to a plain loop.
    - a head the body is then fine-tuned through (fine_tuned_after): held-out binary cross-entropy, whose
      strong penalties keep its logits small. Fine-tuning from the mAP-chosen heads, whose logits are large,
      lost 10 to 15 points of val mAP."""
    multi_label = labels.ndim == 2
    by_loss = multi_label and fine_tuned_after
    folds = _folds(labels, seed)
    if folds is None:
        return Selection(FALLBACK_WEIGHT_DECAY, 0, len(labels), None)
    images, splits = folds
    gains = np.zeros(len(WEIGHT_DECAYS))  # held-out correct images, minus the summed held-out loss, or mAP x images
    classes = labels.shape[1] if multi_label else int(labels.max()) + 1
    out_of_fold = np.zeros((len(WEIGHT_DECAYS), len(images), classes), dtype=np.float32) if multi_label and not by_loss else None
    for fitted, held_out in splits:
        rows = _Rows(features, labels, images[fitted], design, objective=objective)
        scored = _Rows(features, labels, images[held_out], design, views=1)
        weight = torch.zeros(classes, design.width, device=design.device, requires_grad=True)
        bias = torch.zeros(classes, device=design.device, requires_grad=True)
        for index, decay in enumerate(WEIGHT_DECAYS):
            _fit(rows, weight, bias, design.penalty(decay), PATH_ITERATIONS, should_stop)
            with torch.no_grad():
                if out_of_fold is not None:
                    out_of_fold[index, held_out] = scored.logits(weight, bias)
                else:
                    loss, correct = scored.score(weight, bias)
                    gains[index] += -loss * scored.count if by_loss else correct
    if out_of_fold is not None:
        gains = np.array([mean_average_precision(labels[images], scores) for scores in out_of_fold]) * len(images)
    best = int(np.argmax(_smoothed(gains)))  # the first of the best: the strongest, whose small weights fine-tuning starts well from
    criterion = "loss" if by_loss else "mAP" if multi_label else "accuracy"
    held_out = -gains[best] if by_loss else gains[best]
    return Selection(WEIGHT_DECAYS[best], len(splits), len(images), float(held_out / len(images)), criterion)


def _folds(labels: np.ndarray, seed: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]] | None:
    """The images the strength is chosen on (at most SELECTION_IMAGES) and their folds; None when some class
    has a single training image (single-label) or there are too few images to hold any out."""
    from sklearn.model_selection import KFold, StratifiedKFold

    from transferctl.data.sampling import stratified_sample

    if labels.ndim == 2:
        if len(labels) < 2 * MAX_FOLDS:
            return None
        rng = np.random.default_rng(seed % 2**32)
        images = np.sort(rng.choice(len(labels), SELECTION_IMAGES, replace=False)) if len(labels) > SELECTION_IMAGES else np.arange(len(labels))
        return images, list(KFold(n_splits=MAX_FOLDS, shuffle=True, random_state=seed % 2**32).split(images))
    counts = np.bincount(labels)
    folds = min(MAX_FOLDS, int(counts[counts > 0].min()))
    if folds < 2:
        return None
    images = stratified_sample(labels, SELECTION_IMAGES, seed) if len(labels) > SELECTION_IMAGES else np.arange(len(labels))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    return images, list(splitter.split(images, labels[images]))


def _smoothed(correct: np.ndarray) -> np.ndarray:
    """Held-out counts averaged with their neighbours on the path (weights 1, 2, 1; the ends repeated). With
    ~100 held-out images a count is ragged from one strength to the next, and the raw maximum is often a
    lucky spike: on the real digits (docs/quality.md; 10 seeds) choosing on the smoothed
    curve gained 1 point on the penultimate features and lost nothing elsewhere."""
    padded = np.concatenate([correct[:1], correct, correct[-1:]])
    return padded[:-2] + 2 * padded[1:-1] + padded[2:]


@dataclass(frozen=True)
class Design:
    """The coordinates the problem is solved in: features centred and divided by their root mean square (the
    weight decay is taken in these units, and L-BFGS is better conditioned) and, with fewer training rows
    than feature dimensions, rotated onto the rows' span. The L2 penalty is invariant under that
    rotation and the best weights lie in that span, so the solution is exact, at (rows x rows) instead of
    (rows x width) cost."""

    mean: torch.Tensor  # (D,)
    scale: float
    basis: torch.Tensor | None  # (D, r) orthonormal columns, or None: solved in the centred features themselves
    device: torch.device

    @classmethod
    def of(cls, features: np.ndarray, device: torch.device) -> Design:
        rows, width = features.shape[0] * features.shape[1], features.shape[2]
        total, squares = torch.zeros(width, dtype=torch.float64), 0.0
        for block in _blocks(features, np.arange(features.shape[0])):
            values = torch.from_numpy(block).double()
            total += values.sum(dim=0)
            squares += float((values**2).sum())
        mean = (total / rows).float().to(device)
        scale = math.sqrt(squares / (rows * width)) or 1.0
        basis = None
        if rows < width:
            centred = (torch.from_numpy(_rows_of(features, np.arange(features.shape[0]))).to(device) - mean) / scale
            _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
            kept = singular > singular.max() * 1e-6  # the span's own directions; the rest is rounding
            basis = vh[kept].T.contiguous()
        return cls(mean, scale, basis, device)

    @property
    def width(self) -> int:
        return int(self.basis.shape[1]) if self.basis is not None else int(self.mean.shape[0])

    def penalty(self, weight_decay: float) -> float:
        """The strength on the solver's weights A (on unit-size features): weight_decay, but at least
        MIN_HEAD_DECAY on the head's own weights W = A / scale; capped where the answer is A = 0 anyway."""
        return min(max(weight_decay, MIN_HEAD_DECAY / self.scale**2), MAX_PENALTY)

    def transform(self, block: torch.Tensor) -> torch.Tensor:
        centred = (block.to(self.device) - self.mean) / self.scale
        return centred @ self.basis if self.basis is not None else centred

    def to_head(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the head on raw features: logits = W((x - mean)/scale)B^T + b."""
        raw = (weight @ self.basis.T if self.basis is not None else weight) / self.scale
        return raw, bias - raw @ self.mean


def _blocks(features: np.ndarray, images: np.ndarray, views: int | None = None) -> Iterator[np.ndarray]:
    """Rows (every view of each image, or the first `views`) of `images`, as float32 arrays of bounded size."""
    views = views or features.shape[1]
    per_chunk = max(1, ROWS_PER_CHUNK // views)
    for start in range(0, len(images), per_chunk):
        yield _rows_of(features, images[start : start + per_chunk], views)


def _rows_of(features: np.ndarray, images: np.ndarray, views: int | None = None) -> np.ndarray:
    views = views or features.shape[1]
    contiguous = len(images) > 0 and images[-1] - images[0] == len(images) - 1  # a memmap slice reads only those rows
    block = features[images[0] : images[-1] + 1, :views] if contiguous else features[images, :views]
    # Writable: torch warns about tensors over a read-only memmap (a reused cache file).
    return np.require(block, dtype=np.float32, requirements=["C", "W"]).reshape(-1, features.shape[2])


class _Rows:
    """Some images' rows in the solver's coordinates, with their labels: held on the device up to
    RESIDENT_BYTES, else (a memory-mapped cache over data.cache_memory_mb) read chunk by chunk."""

    def __init__(
        self, features: np.ndarray, labels: np.ndarray, images: np.ndarray, design: Design, views: int | None = None, objective: Objective | None = None,
    ) -> None:  # fmt: skip
        self.features, self.labels, self.images, self.design = features, labels, images, design
        self.views = views or features.shape[1]
        self.count = len(images) * self.views
        self.objective = objective or Objective()
        self.normaliser = self.objective.normaliser(labels, images, self.views)
        self.resident = self.count * features.shape[2] * 4 <= RESIDENT_BYTES
        self.loaded = list(self._load()) if self.resident else []

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        return iter(self.loaded) if self.resident else self._load()

    def _load(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        per_chunk = max(1, ROWS_PER_CHUNK // self.views)
        for start in range(0, len(self.images), per_chunk):
            images = self.images[start : start + per_chunk]
            rows = self.design.transform(torch.from_numpy(_rows_of(self.features, images, self.views)))
            weights = self.objective.row_weights(images, self.views)
            yield (rows, torch.from_numpy(np.repeat(self.labels[images], self.views, axis=0)).to(self.design.device),
                   torch.from_numpy(weights).to(self.design.device) if weights is not None else None)  # fmt: skip

    def loss_and_backward(self, weight: torch.Tensor, bias: torch.Tensor, decay: float) -> torch.Tensor:
        """The objective's mean over every row plus decay/2 x |weight|^2 (the bias is not decayed), its gradient
        accumulated into weight.grad and bias.grad."""
        total = torch.zeros((), device=weight.device)
        for block, targets, row_weights in self.chunks():
            loss = self.objective.summed(nn.functional.linear(block, weight, bias), targets, row_weights) / self.normaliser
            loss.backward()
            total += loss.detach()
        penalty = 0.5 * decay * weight.pow(2).sum()
        penalty.backward()
        return total + penalty.detach()

    def logits(self, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
        """Every row's logits, in order (one view an image: one row an image)."""
        return torch.cat([nn.functional.linear(block, weight, bias) for block, _, _ in self.chunks()]).cpu().numpy()

    def score(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[float, int]:
        """(mean cross-entropy, correct count) over every row, without the penalty."""
        loss, correct = 0.0, 0
        for block, targets, _ in self.chunks():
            logits = nn.functional.linear(block, weight, bias)
            loss += float(plain_loss_sum(logits, targets))
            correct += int(right_answers(logits, targets))
        return loss / max(self.count, 1), correct


def _fit(rows: _Rows, weight: torch.Tensor, bias: torch.Tensor, decay: float, iterations: int, should_stop: Callable[[], bool]) -> None:
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, history_size=HISTORY, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-6, tolerance_change=1e-9)  # fmt: skip

    def closure() -> torch.Tensor:
        if should_stop():
            raise TrainingStopped("stopped while solving the head")
        optimizer.zero_grad(set_to_none=True)
        loss = rows.loss_and_backward(weight, bias, decay)
        if not math.isfinite(float(loss)):
            raise NonFiniteLossError(f"training loss became {float(loss)} while solving the head")
        return loss

    with _cpu_threads_for(rows.count * weight.shape[1], weight.device):
        optimizer.step(closure)


@torch.no_grad()
def _score_raw(features: np.ndarray, labels: np.ndarray, head: nn.Linear, device: torch.device, objective: Objective | None = None) -> tuple[float, int, int]:
    """The head's mean training loss (the objective, without the penalty) and correct count on every cached
    training row, as the epoch's train stats."""
    objective = objective or Objective()
    loss, correct, count = 0.0, 0, 0
    views = features.shape[1]
    per_chunk = max(1, ROWS_PER_CHUNK // views)
    for start in range(0, features.shape[0], per_chunk):
        images = np.arange(start, min(start + per_chunk, features.shape[0]))
        rows = torch.from_numpy(_rows_of(features, images)).to(device=device, dtype=head.weight.dtype)
        targets = torch.from_numpy(np.repeat(labels[images], views, axis=0)).to(device)
        logits = head(rows).float()
        row_weights = objective.row_weights(images, views)
        loss += float(objective.summed(logits, targets, torch.from_numpy(row_weights).to(device) if row_weights is not None else None))
        correct += int(right_answers(logits, targets))
        count += len(targets)
    return loss / max(objective.normaliser(labels, np.arange(features.shape[0]), views), 1e-12), correct, count
