"""`ema:`: an exponential moving average of the weights (torch.optim.swa_utils.AveragedModel with
get_ema_multi_avg_fn), updated after every optimizer step and evaluated each epoch beside the weights themselves.

BatchNorm's running statistics are averaged like the weights (use_buffers=True), so the average is a network
ready to evaluate without a pass over the training images to recompute them. What does not train in the
current step (frozen parameters, the buffers of layers in eval mode) is copied from the model instead: an
average of a value that does not move is that value, and a group frozen after training keeps its trained
state, not a lagging one. docs/experiment-file.md (Weight averaging) says how best.pt chooses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from transferctl.config import ExperimentConfig
from transferctl.training.early_stopping import METRIC_COLUMN, is_better
from transferctl.training.engine import EpochStats

class WeightAverage:
    """The average of `model`'s weights, starting from the weights it has now (or from a last.pt's `state`)."""

    def __init__(self, model: nn.Module, decay: float, state: dict[str, Any] | None = None) -> None:
        self.model = model
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        if state is None:
            self.averaged.update_parameters(model)  # the first update copies: the average starts at the weights
        else:
            self.averaged.load_state_dict(state)

    @property
    def module(self) -> nn.Module:
        """The averaged network, with the model's structure and state-dict keys."""
        return self.averaged.module

    def update(self) -> None:
        """After an optimizer step."""
        self.averaged.update_parameters(self.model)
        self._copy_what_does_not_train()

    @torch.no_grad()
    def follow(self) -> None:
        """Make the average the model: after a solved head (head_solver.py), a converged solution with no
        steps to average over."""
        for mine, theirs in zip(self.module.state_dict().values(), self.model.state_dict().values(), strict=True):
            mine.copy_(theirs)

    @torch.no_grad()
    def _copy_what_does_not_train(self) -> None:
        for mine, theirs in zip(self.module.parameters(), self.model.parameters(), strict=True):
            if not theirs.requires_grad:
                mine.copy_(theirs)
        for mine_module, module in zip(self.module.modules(), self.model.modules(), strict=True):
            for name, buffer in module.named_buffers(recurse=False):
                # Eval mode: the layer's statistics do not move. A step count is a count, not something to average.
                if buffer is not None and (not module.training or not torch.is_floating_point(buffer)):
                    mine_module.get_buffer(name).copy_(buffer)

    def state_dict(self) -> dict[str, Any]:
        """What last.pt keeps: the averaged weights and buffers and the number of updates."""
        return self.averaged.state_dict()


def weight_average(config: ExperimentConfig, model: nn.Module, state: dict[str, Any] | None = None) -> WeightAverage | None:
    return WeightAverage(model, config.ema.decay, state) if config.ema is not None else None


def averaged_columns(stats: EpochStats) -> dict[str, float]:
    """The averaged weights' validation: the metrics row's columns of every early_stopping.metric, as ema_<column>."""
    return stats.validation_columns("ema_val_")


def better_weights(row: dict[str, Any], metric: str) -> dict[str, Any]:
    """The row as best-checkpoint selection sees it: the averaged weights' validation where they did better on
    the metric (weights: ema), else the row's own (weights: raw)."""
    averaged = {**row, **{column: row[f"ema_{column}"] for column in METRIC_COLUMN.values() if f"ema_{column}" in row}, "weights": "ema"}
    if f"ema_{METRIC_COLUMN[metric]}" in row and is_better(averaged, row, metric):
        return averaged
    return {**row, "weights": "raw"}
