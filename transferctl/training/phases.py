"""Strategy -> phases; freezing and unfreezing; one optimizer and schedule per phase over named layer groups.

Each phase gets a fresh optimizer over exactly the parameters it trains: nothing frozen holds optimizer
state, no parameter group appears mid-run, and resuming needs only (phase, epoch).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from transferctl.config import ExperimentConfig, OptimizerConfig, SchedulerConfig, schedule_of
from transferctl.errors import ConfigError, Problem, did_you_mean, quote
from transferctl.models.layer_groups import HEAD, LayerGroups, parameters_by_group


@dataclass(frozen=True)
class PhasePlan:
    index: int
    name: str
    epochs: int
    lr: float
    backbone_lr_mult: float
    bn: str
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    unfreeze_every: int | None = None  # gradual unfreezing: one more group every K epochs, from the head down
    layer_decay: float = 1.0  # a group's lr x layer_decay^(its distance from the head)
    patience: int | None = None  # until_plateau.patience: overrides early_stopping.patience for this phase
    solver: str = "auto"  # auto: a head-only stage on cached features is solved (head_solver.py); minibatch: optimizer steps
    lr_auto: bool = False  # lr: auto, not yet found (lr_finder.py): lr is 1, so each group's lr is its ratio to the head's

    @property
    def backbone_frozen(self) -> bool:
        return self.trainable == (HEAD,)


@dataclass(frozen=True)
class Stage:
    """A stretch of a phase's epochs that trains the same groups: the whole phase, or one unfreezing step."""

    plan: PhasePlan  # the phase with `trainable` / `frozen` narrowed to this stage's groups
    first_epoch: int
    last_epoch: int

    @property
    def epochs(self) -> int:
        return self.last_epoch - self.first_epoch + 1


def stages_of(plan: PhasePlan, group_names: list[str]) -> list[Stage]:
    """The phase's stages. With unfreeze_every K, stage s (0-based) spans K epochs and trains the head and
    the s groups above it among those `train` names; the last stage, with every named group, runs to the
    end of the phase. Each stage gets a fresh optimizer and schedule, so a resume needs only (phase, epoch).
    """
    if plan.unfreeze_every is None:
        return [Stage(plan, 1, plan.epochs)]
    body = [name for name in plan.trainable if name != HEAD]  # in model order, input side first
    stages = []
    for step in range(len(body) + 1):
        first = step * plan.unfreeze_every + 1
        if first > plan.epochs:
            break
        last = plan.epochs if step == len(body) else min(plan.epochs, first + plan.unfreeze_every - 1)
        trainable = tuple(body[len(body) - step :]) + (HEAD,)
        frozen = tuple(name for name in group_names if name not in trainable)
        stages.append(Stage(replace(plan, trainable=trainable, frozen=frozen), first, last))
    stages[-1] = replace(stages[-1], last_epoch=plan.epochs)
    return stages


def stage_at(stages: list[Stage], epoch: int) -> Stage:
    return next(stage for stage in stages if stage.first_epoch <= epoch <= stage.last_epoch)


def plan_phases(config: ExperimentConfig, group_names: list[str], steps_per_epoch: int | None = None) -> list[PhasePlan]:
    """The schedule's phases on this network; with steps_per_epoch (the training set's batches), a phase's
    min_steps becomes epochs: max(epochs, ceil(min_steps / steps_per_epoch))."""
    plans = []
    for index, phase in enumerate(schedule_of(config)):
        trainable = trainable_groups(phase.train, group_names, f"schedule[{index}].train")
        frozen = tuple(name for name in group_names if name not in trainable)
        patience = phase.until_plateau.patience if phase.until_plateau else None
        epochs = phase.epochs
        if phase.min_steps is not None and steps_per_epoch:
            epochs = max(epochs, math.ceil(phase.min_steps / steps_per_epoch))
        auto = phase.lr == "auto"
        plans.append(
            PhasePlan(index, phase.name, epochs, 1.0 if auto else float(phase.lr), phase.backbone_lr_mult, phase.bn, trainable, frozen,
                      phase.unfreeze_every, phase.layer_decay, patience, phase.solver, lr_auto=auto)
        )  # fmt: skip
    return plans


def trainable_groups(spec: str | list[str], group_names: list[str], where: str) -> tuple[str, ...]:
    """head | all | last:N (the last N backbone groups, plus the head) | [group, ...] (plus the head).

    The new head starts from random weights, so every phase trains it.
    """
    body = [name for name in group_names if name != HEAD]
    if spec == "all":
        return tuple(group_names)
    if spec == HEAD:
        return (HEAD,)
    if isinstance(spec, str):
        count = int(spec.split(":", 1)[1])
        if not 1 <= count <= len(body):
            raise ConfigError(Problem(where, f"last:{count} asks for {count} of {len(body)} backbone layer groups", f"use last:1 .. last:{len(body)}"))
        return tuple(body[-count:]) + (HEAD,)
    unknown = [name for name in spec if name not in group_names]
    if unknown:
        raise ConfigError(Problem(where, f"unknown layer group '{unknown[0]}'", did_you_mean(unknown[0], group_names)))
    return tuple(name for name in group_names if name in spec or name == HEAD)


def named_parameters_by_group(model: nn.Module, groups: LayerGroups) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """(name, parameter) pairs of each group; raises unless every parameter is in exactly one group."""
    params = dict(model.named_parameters())
    return {group: [(name, params[name]) for name in names] for group, names in parameters_by_group(model, groups).items()}


def apply_freezing(model: nn.Module, groups: LayerGroups, plan: PhasePlan) -> None:
    for group, params in named_parameters_by_group(model, groups).items():
        for _, param in params:
            param.requires_grad_(group in plan.trainable)


def set_train_mode(model: nn.Module, groups: LayerGroups, plan: PhasePlan) -> None:
    """Train mode, except frozen groups (BatchNorm statistics and dropout stay as pretrained)."""
    model.train()
    for group, prefixes in groups:
        if group in plan.frozen:
            for module in _modules_at(model, prefixes):
                module.eval()
    if plan.bn == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def training_batchnorms(model: nn.Module, groups: LayerGroups, plan: PhasePlan) -> list[str]:
    """Names of the BatchNorm layers the phase trains (in train mode), found by set_train_mode itself so
    that the two never disagree; the model's modes are put back as they were."""
    modes = {module: module.training for module in model.modules()}
    try:
        set_train_mode(model, groups, plan)
        return [name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training]
    finally:
        for module, training in modes.items():
            module.training = training


def refuse_single_image_batches(model: nn.Module, groups: LayerGroups, plans: list[PhasePlan], per_process: int, processes: int) -> None:
    """A BatchNorm layer in train mode normalises each channel over the batch: one image a step has nothing
    to normalise over (torch raises 'Expected more than 1 value per channel' once a layer's output is 1x1,
    mid-training) and gives statistics of single images everywhere else."""
    if per_process > 1:
        return
    for plan in plans:
        layers = training_batchnorms(model, groups, plan)
        if layers:
            steps = "1 image per step" if processes == 1 else f"{per_process * processes} images per step over {processes} processes is 1 per process"
            raise ConfigError(
                Problem(
                    "data.batch_size",
                    f"{steps}, but phase {quote(plan.name)} (schedule[{plan.index}]) trains {len(layers)} BatchNorm layers ({layers[0]}, ...), which need 2 or more",
                    f"raise data.batch_size, or set bn: frozen in schedule[{plan.index}] to keep their statistics fixed",
                )
            )


def _modules_at(model: nn.Module, prefixes: list[str]) -> list[nn.Module]:
    found = []
    for prefix in prefixes:
        try:
            found.append(model.get_submodule(prefix))
        except AttributeError:  # a bare parameter such as ViT's class_token
            continue
    return found


def optimizer_param_groups(model: nn.Module, groups: LayerGroups, plan: PhasePlan, weight_decay: float) -> list[dict[str, Any]]:
    """One optimizer group per trained layer group (and decay kind): the head at lr, the body at lr x mult,
    each body group further x layer_decay^(its distance from the head: 1 for the group just below it).

    Biases and normalisation weights get no weight decay: shrinking them towards zero only hurts.
    """
    result = []
    lrs = group_lrs(plan, [name for name, _ in groups])
    for group, params in named_parameters_by_group(model, groups).items():
        if group not in plan.trainable:
            continue
        lr = lrs[group]
        decay = [p for _, p in params if p.ndim > 1]
        no_decay = [p for _, p in params if p.ndim <= 1]
        for suffix, members, wd in (("", decay, weight_decay), ("/no_decay", no_decay, 0.0)):
            if members:
                result.append({"name": group + suffix, "params": members, "lr": lr, "weight_decay": wd})
    return result


def group_lrs(plan: PhasePlan, group_names: list[str]) -> dict[str, float]:
    """The base lr of every layer group under this phase's lr, backbone_lr_mult and layer_decay."""
    order = [name for name in group_names if name != HEAD]
    lrs = {HEAD: plan.lr}
    for distance, name in enumerate(reversed(order), start=1):
        lrs[name] = plan.lr * plan.backbone_lr_mult * plan.layer_decay**distance
    return lrs


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
# Devices on which torch's fused Adam, AdamW and SGD steps all exist (CPU from torch 2.4).
FUSED_DEVICE_TYPES = frozenset({"cpu", "cuda"})


def build_optimizer(config: OptimizerConfig, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The configured optimizer, with its fused step where torch has one for these parameters.

    A fused step updates a whole parameter group in one kernel; without it, a CPU step runs a few small
    ops per tensor. The update is the same up to rounding. What it gains (scripts/bench_optimizer.py):
    docs/performance.md (Speed, Optimizer step).
    """
    optimizer_class = OPTIMIZERS[config.name]
    options: dict[str, Any] = {"lr": param_groups[0]["lr"]}
    if config.name == "sgd":
        options.update(momentum=config.momentum, nesterov=config.momentum > 0)
    if fused_step_fits(optimizer_class, param_groups):
        options["fused"] = True
    return optimizer_class(param_groups, **options)


def fused_step_fits(optimizer_class: type[torch.optim.Optimizer], param_groups: list[dict[str, Any]]) -> bool:
    """Whether this torch has a fused step of the optimizer for parameters on these devices and dtypes."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if "fused" not in inspect.signature(optimizer_class).parameters:
        return False
    devices = FUSED_DEVICE_TYPES.intersection(_get_fused_kernels_supported_devices())
    return all(p.device.type in devices and p.is_floating_point() for group in param_groups for p in group["params"])


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A checkpoint's optimizer state, keeping the step kind (fused or not) build_optimizer chose here.

    load_state_dict takes every group setting from the checkpoint, and one written on another device or by
    another torch may name a fused step this one lacks, or lack one it has. The choice goes into the state
    before loading, because loading places the step counters where that kind of step expects them.
    """
    groups = [{**saved, "fused": current.get("fused")} for saved, current in zip(state["param_groups"], optimizer.param_groups, strict=True)]
    optimizer.load_state_dict({**state, "param_groups": groups})
    match_parameter_layouts(optimizer)


def match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor (Adam's moments, SGD's momentum) its parameter's memory layout.

    torch's fused CPU step walks a parameter and its state as one flat run of memory: with a channels-last
    parameter and contiguous moments it pairs the wrong elements, silently. A state saved in another
    layout than this process gives its parameters would otherwise resume into wrong updates.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of each group's base lr at an optimizer step: linear warm-up, then constant or cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: SchedulerConfig, epochs: int, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = epochs * steps_per_epoch
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, config.name))


def describe_phase(model: nn.Module, groups: LayerGroups, plan: PhasePlan, weight_decay: float, default_patience: int | None = None) -> dict[str, Any]:
    """What `check` shows for a phase: groups, trainable parameter count, learning rates, BN mode,
    the unfreezing steps and when the phase may end early (its until_plateau, else early_stopping's)."""
    by_group = named_parameters_by_group(model, groups)
    names = [name for name, _ in groups]
    total = sum(p.numel() for params in by_group.values() for _, p in params)
    lrs = group_lrs(plan, names)
    steps = [
        {"epochs": [stage.first_epoch, stage.last_epoch], "train": list(stage.plan.trainable),
         "trainable_params": sum(p.numel() for g in stage.plan.trainable for _, p in by_group[g])}
        for stage in stages_of(plan, names)
    ]  # fmt: skip
    bn_trainable = "frozen (eval)" if plan.bn == "frozen" else "train"
    return {
        "phase": plan.name,
        "epochs": plan.epochs,
        "train": list(plan.trainable),
        "frozen": list(plan.frozen),
        "trainable_params": steps[-1]["trainable_params"],
        "total_params": total,
        "lr": {name: lrs[name] for name in names if name in plan.trainable},
        "lr_auto": plan.lr_auto,  # lr: auto: "lr" holds each group's ratio to the lr the range test will find
        "layer_decay": plan.layer_decay,
        "unfreeze_every": plan.unfreeze_every,
        "unfreeze_steps": steps if plan.unfreeze_every is not None else [],
        "plateau_patience": plan.patience if plan.patience is not None else default_patience,
        "batchnorm": {"trained groups": bn_trainable, "frozen groups": "frozen (eval)"},
    }
