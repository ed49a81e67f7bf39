"""A built backbone (network, layer groups, head, preprocessing) and what every builder does alike to it:
give it a new head, and load a source's weights under that head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from transferctl.data.preprocessing import Preprocessing
from transferctl.errors import Problem, WeightsError
from transferctl.models.layer_groups import LayerGroups

_AUX_HEAD_PREFIXES = ("AuxLogits.", "aux1.", "aux2.")  # googlenet / inception_v3 side classifiers


@dataclass
class Backbone:
    model: nn.Module
    name: str
    groups: LayerGroups
    head_path: str
    preprocessing: Preprocessing
    weights: str  # a human description of where the weights came from
    cut: str | None = None  # the layer group the body ends with (backbone.cut), None for the whole body

    @property
    def group_names(self) -> list[str]:
        return [name for name, _ in self.groups]


def replace_head(model: nn.Module, head_path: str, num_classes: int) -> None:
    """Swap the final layer for a freshly initialised one with num_classes outputs."""
    parent_path, _, attribute = head_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attribute)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes)
    elif isinstance(old, nn.Conv2d):  # squeezenet classifies with a 1x1 convolution
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size)
    else:
        raise TypeError(f"head {head_path} is a {type(old).__name__}, expected Linear or Conv2d")
    setattr(parent, attribute, new)


def fitting_body(model: nn.Module, state: dict[str, torch.Tensor], head_path: str, source: str) -> dict[str, torch.Tensor]:
    """Every weight of `state` but the head's (the file's own classifier belongs to another task), checked to
    fit `model` exactly: a WeightsError names the keys that are missing, unexpected or of the wrong shape."""
    own_head = head_path + "."
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(own_head)}
    given = {k: v for k, v in state.items() if not k.startswith(own_head) and not k.startswith(_AUX_HEAD_PREFIXES)}
    # BatchNorm's step counter only steers momentum=None averaging; files from older torch lack it, and torch's
    # own load_state_dict accepts them (the counter starts at 0, as torch leaves it).
    missing = sorted(key for key in set(expected) - set(given) if not key.endswith(".num_batches_tracked"))
    unexpected = sorted(set(given) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(given) if expected[k].shape != given[k].shape)
    if missing or unexpected or reshaped:
        raise WeightsError(Problem("backbone.weights", f"{source} does not fit this architecture: {_mismatch_summary(missing, unexpected, reshaped)}",
                                   "use weights saved from the same backbone.name"))
    return given


def load_body(model: nn.Module, body: dict[str, torch.Tensor]) -> None:
    """Load weights that fitting_body checked against `model`. A cut since has dropped some of its layers
    (transferctl.models.cut keeps the rest as they are): their weights go with them."""
    kept = model.state_dict()
    model.load_state_dict({key: value for key, value in body.items() if key in kept}, strict=False)


def _mismatch_summary(missing: list[str], unexpected: list[str], reshaped: list[str]) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            parts.append(f"{len(keys)} {label} ({shown})")
    return "; ".join(parts)
