"""A weights source's state: the tensors a `backbone.weights` entry names, head included, and for an earlier
run the preprocessing it trained with. Building a backbone loads it under a new head; `recommend` keeps its
head to compare the source classifier's predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transferctl.config import WeightsSource
from transferctl.data.preprocessing import Preprocessing
from transferctl.errors import Problem, WeightsError


@dataclass(frozen=True)
class SourceState:
    weights: dict[str, torch.Tensor]
    preprocessing: Preprocessing | None  # a run's own; None: the builder derives it from the architecture


def load_source_state(source: WeightsSource, model_name: str, where: str = "backbone.weights") -> SourceState | None:
    """The source's tensors; None for no weights. Hub weights are torchvision's (timm and torchvision build
    their hub weights into the architecture instead: transferctl.models.build)."""
    if source.kind == "none":
        return None
    if source.kind == "run":
        return _run_state(source, model_name, where)
    if source.kind == "file":
        from transferctl.runs.safeload import load_state_dict

        return SourceState(load_state_dict(source.path, WeightsError, where=where), None)
    from transferctl.models.torchvision_models import torchvision_weights

    return SourceState(torchvision_weights(model_name, source.value).get_state_dict(progress=False), None)


def _run_state(source: WeightsSource, model_name: str, where: str) -> SourceState:
    from transferctl.runs.checkpoint import load_run_checkpoint

    checkpoint = load_run_checkpoint(source.path, "best", where=where)
    trained_on = checkpoint.backbone.get("name")
    if trained_on and trained_on != model_name:
        raise WeightsError(
            Problem(where, f"run {source.path} trained a {trained_on}, not a {model_name}", f"set backbone.name: {trained_on}")
        )
    return SourceState(checkpoint.model, Preprocessing.from_dict(checkpoint.preprocessing))
