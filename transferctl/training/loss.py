"""The training loss, built once a run from the experiment file's `loss` section: nn.CrossEntropyLoss with
label smoothing and class weights (none, scikit-learn's balanced ones, or the user's list); for a
multi-label run nn.BCEWithLogitsLoss, one sigmoid a class, whose class weights weigh each class's positives.

The minibatch loop (engine.train_one_epoch) and the solved head (head_solver.py) both take this one
module, so a phase trains the same objective either way; validation loss stays plain cross-entropy.
What each option does: docs/experiment-file.md (Loss).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from transferctl.config import LossConfig
from transferctl.data.targets import Label, target_array
from transferctl.errors import ConfigError, Problem


def build_loss(config: LossConfig, train_labels: Sequence[Label], classes: Sequence[str], multi_label: bool = False) -> nn.Module:
    """The loss for these training labels; ConfigError naming loss.class_weights when a list does not fit the classes."""
    if multi_label:
        return nn.BCEWithLogitsLoss(pos_weight=positive_weights(config.class_weights, target_array(train_labels, len(classes), True), classes))
    weights = class_weights(config.class_weights, np.asarray(train_labels, dtype=np.int64), classes)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)


def positive_weights(setting: str | list[float], targets: np.ndarray, classes: Sequence[str]) -> torch.Tensor | None:
    """BCEWithLogitsLoss's pos_weight: balanced weighs each class's positives by its negatives over its positives
    (so both count alike), a list gives each class's factor."""
    if setting == "none":
        return None
    if setting == "balanced":
        positives = targets.sum(axis=0)
        return torch.tensor((len(targets) - positives) / np.maximum(positives, 1), dtype=torch.float32)
    _check_length(setting, classes)
    return torch.tensor(setting, dtype=torch.float32)


def class_weights(setting: str | list[float], labels: np.ndarray, classes: Sequence[str]) -> torch.Tensor | None:
    if setting == "none":
        return None
    if setting == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        present = np.unique(labels)  # every class has a training image (data.discover keeps one of each)
        weights = np.ones(len(classes))
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
        return torch.tensor(weights, dtype=torch.float32)
    _check_length(setting, classes)
    return torch.tensor(setting, dtype=torch.float32)


def _check_length(setting: list[float], classes: Sequence[str]) -> None:
    if len(setting) != len(classes):
        raise ConfigError(Problem(
            "loss.class_weights", f"has {len(setting)} weights for {len(classes)} classes",
            f"give one weight per class, in this order: {', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''}",
        ))  # fmt: skip
