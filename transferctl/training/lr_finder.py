"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates for Training Neural Networks", 3.3).

A phase's trainable parameters take optimizer steps on training batches while the learning rate grows
exponentially from tiny to huge; the loss first does not move, then falls, then blows up. Two rules read
a learning rate off the smoothed curve: its steepest descent (Smith's) and a tenth of its minimum
(fastai's `lr_min`). The suggestion is the smaller of the two. Each fails alone in a known way: the
steepest point of a noisy curve can sit early on a bump, and on a small training set the loss may sink
to its floor and stay there without diverging, which puts the minimum at the last lr tried. Too high an
lr costs fine-tuning more than too low a one (it wrecks the pretrained features), so the lower pick is
the safe side. The model, its freezing and modes and the random-number generators are put back
afterwards, so the test changes nothing a run sees.
How to use it: docs/commands.md (lr-find).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from transferctl.config import ExperimentConfig, OptimizerConfig, schedule_of
from transferctl.errors import ConfigError, Problem
from transferctl.models.layer_groups import LayerGroups
from transferctl.training.engine import make_grad_scaler, restore_rng_states, rng_states
from transferctl.training.phases import PhasePlan, apply_freezing, build_optimizer, optimizer_param_groups, set_train_mode
from transferctl.training.runtime import Runtime, logits_of, to_device

START_LR = 1.0e-7
END_LR = 10.0
STEPS = 100
SMOOTHING = 0.9  # the moving average's weight of the past: about 10 steps (0.98, fastai's, lags 4 decades at 100 steps)
DIVERGED = 4.0  # the smoothed loss above this many times its minimum: the test stops
MIN_STEPS = 10  # before this many steps the average has seen too little to call anything diverged


@dataclass(frozen=True)
class LrFinding:
    """The head's learning rate at each step (the body's keep the phase's ratio to it), the losses, and the pick."""

    phase: int
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float  # the smaller of steepest_lr and a tenth of min_loss_lr, at least the first lr tried
    min_loss_lr: float
    steepest_lr: float
    stopped: str  # "diverged": the smoothed loss passed DIVERGED x its minimum; "end": it reached the last lr

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rule": "the smaller of the steepest descent's lr and a tenth of the minimum's"}


def lr_schedule(start: float, end: float, steps: int) -> list[float]:
    """`steps` learning rates from start to end, evenly spaced on a log scale."""
    return [float(lr) for lr in np.geomspace(start, end, steps)]


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """The bias-corrected exponential moving average (as Adam corrects its moments): early values are not
    pulled towards zero by the average's starting point."""
    average, result = 0.0, []
    for step, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        result.append(average / (1 - beta**step))
    return result


def smooth_both_ways(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """The moving average run forwards, then backwards over its result: as smooth, without its lag (a
    one-way average shifts the curve towards larger learning rates, and the picks with it)."""
    return smooth(smooth(losses, beta)[::-1], beta)[::-1]


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, float, float]:
    """(suggestion, lr at the smoothed minimum, lr of the steepest descent before the minimum)."""
    low = int(np.argmin(smoothed))
    steepest = lrs[0]
    if low >= 2:
        slopes = np.gradient(np.asarray(smoothed[: low + 1]), np.log(np.asarray(lrs[: low + 1])))
        steepest = lrs[int(np.argmin(slopes))]
    return max(min(steepest, lrs[low] / 10), lrs[0]), lrs[low], steepest


def lr_range_test(
    model: nn.Module,
    groups: LayerGroups,
    plan: PhasePlan,
    optimizer: OptimizerConfig,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    runtime: Runtime,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
    steps: int = STEPS,
    loss_fn: nn.Module | None = None,
) -> LrFinding:
    """The range test on what `plan` trains, with its optimizer and layer-group learning rates and the run's
    loss (loss_fn, on the device; default plain cross-entropy); the model and the random-number generators
    are as they were when it returns (or raises)."""
    saved = _Saved.of(model)
    try:
        return _sweep(model, groups, plan, optimizer, batches, runtime, lr_schedule(start_lr, end_lr, steps), loss_fn or nn.CrossEntropyLoss())
    finally:
        saved.restore(model)


def _sweep(
    model: nn.Module, groups: LayerGroups, plan: PhasePlan, config: OptimizerConfig, batches: Iterable[Any], runtime: Runtime, lrs: list[float], loss_fn: nn.Module
) -> LrFinding:
    unit = replace(plan, lr=1.0)  # each group's lr relative to the head's: backbone_lr_mult and layer_decay kept
    apply_freezing(model, groups, unit)
    set_train_mode(model, groups, unit)
    param_groups = optimizer_param_groups(model, groups, unit, config.weight_decay)
    scales = [group["lr"] for group in param_groups]
    optimizer = build_optimizer(config, param_groups)
    scaler = make_grad_scaler(runtime)
    losses: list[float] = []
    stopped = "end"
    for lr, (images, labels) in zip(lrs, _endless(batches)):
        for group, scale in zip(optimizer.param_groups, scales):
            group["lr"] = lr * scale
        loss = _step(model, optimizer, scaler, loss_fn, images, labels, runtime)
        losses.append(loss)
        smoothed = smooth(losses)
        if not math.isfinite(loss) or (len(losses) >= MIN_STEPS and smoothed[-1] > DIVERGED * min(smoothed)):
            stopped = "diverged"
            break
    finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
    tried, losses = [lrs[i] for i in finite], [losses[i] for i in finite]
    if len(losses) < 2:
        raise ConfigError(Problem(f"schedule[{plan.index}]", f"the loss was not finite from the first learning rate tried ({lrs[0]:g})", "give a smaller --start-lr"))
    smoothed = smooth_both_ways(losses)
    suggestion, low, steepest = suggest(tried, smoothed)
    return LrFinding(plan.index, tried, losses, smoothed, suggestion, low, steepest, stopped)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, loss_fn: nn.Module, images: torch.Tensor, labels: torch.Tensor, runtime: Runtime) -> float:
    images, labels = to_device(images, labels, runtime)
    with runtime.autocast():
        loss = loss_fn(logits_of(model(images)).float(), labels)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach())  # a sync point every step: the test must see each loss to stop in time


def _endless(batches: Iterable[Any]) -> Iterator[Any]:
    """The batches again and again: a small training set has fewer batches than the test has steps."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            return


@dataclass
class _Saved:
    """What the test changes: weights and buffers (a copy on the CPU), requires_grad, train/eval modes, RNGs."""

    state: dict[str, torch.Tensor]
    grads: dict[str, bool]
    modes: dict[str, bool]
    rng: dict[str, Any]

    @classmethod
    def of(cls, model: nn.Module) -> _Saved:
        state = {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}
        grads = {name: param.requires_grad for name, param in model.named_parameters()}
        modes = {name: module.training for name, module in model.named_modules()}
        return cls(state, grads, modes, rng_states())

    def restore(self, model: nn.Module) -> None:
        model.load_state_dict(self.state)
        for name, param in model.named_parameters():
            param.requires_grad_(self.grads[name])
            param.grad = None
        for name, module in model.named_modules():
            module.training = self.modes[name]
        restore_rng_states(self.rng)


# ---------------------------------------------------------------------------------------------
# Which phases, and `lr: auto`


def auto_phases(config: ExperimentConfig) -> list[int]:
    """The schedule's phases whose lr is `auto`."""
    return [index for index, phase in enumerate(schedule_of(config)) if phase.lr == "auto"]


def with_lrs(config: ExperimentConfig, lrs: dict[int, float]) -> ExperimentConfig:
    """The config with schedule[i].lr = lrs[i]: what the run's config.yaml records."""
    schedule = [phase.model_copy(update={"lr": lrs[index]}) if index in lrs else phase for index, phase in enumerate(schedule_of(config))]
    return config.model_copy(update={"schedule": schedule})


def phase_at(plans: list[PhasePlan], index: int, where: str) -> PhasePlan:
    if not 0 <= index < len(plans):
        raise ConfigError(Problem(where, f"there is no phase {index}: the schedule has {len(plans)} (0 to {len(plans) - 1})", f"use a number from 0 to {len(plans) - 1}"))
    return plans[index]


# ---------------------------------------------------------------------------------------------
# The plot


def lr_find_png(finding: LrFinding, title: str) -> bytes:
    """Loss against learning rate (log scale): the raw losses faint, the smoothed curve, the pick marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # No pyplot: a bare Figure has no global state and needs no display, whatever the backend setting.
    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(finding.lrs, finding.losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    axes.plot(finding.lrs, finding.smoothed, color="tab:blue", linewidth=2, label="smoothed")
    axes.axvline(finding.suggestion, color="tab:red", linestyle="--", label=f"suggestion {finding.suggestion:.2g}")
    axes.axvline(finding.min_loss_lr, color="tab:gray", linestyle=":", label=f"minimum {finding.min_loss_lr:.2g}")
    axes.set_xscale("log")
    top = max(finding.smoothed[0], min(finding.smoothed)) * 2  # the blow-up would squash the curve that matters
    axes.set_ylim(min(finding.losses) * 0.9, max(top, min(finding.losses) * 1.5))
    axes.set_xlabel("learning rate of the head (the body's keep the phase's ratio)")
    axes.set_ylabel("training loss")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()

