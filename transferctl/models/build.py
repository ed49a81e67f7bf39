"""Build a backbone in one order, whatever its kind (torchvision, `timm:`, `python:`) and weights source
(`config.WeightsSource`): the architecture (hub weights come with it, as torchvision and timm build them),
the source's state, a new head, layer groups and preprocessing, the cut, then the body's weights from the
source's state. A whole network's state is checked against the whole network before the cut drops layers;
one saved from a cut network fits only once the network is cut.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from transferctl.config import NO_WEIGHTS, PYTHON_PREFIX, TIMM_PREFIX, BackboneConfig, WeightsSource
from transferctl.data.preprocessing import Preprocessing
from transferctl.errors import ConfigError, Problem, WeightsError
from transferctl.models import torchvision_models
from transferctl.models.backbone import Backbone, fitting_body, load_body
from transferctl.models.cut import cut_network, is_cut_state
from transferctl.models.layer_groups import HEAD, LayerGroups
from transferctl.models.source_state import SourceState, load_source_state


class Builder(Protocol):
    """The steps one kind of model takes; torchvision_models, timm_models and python_code each provide them."""

    def architecture(self, config: BackboneConfig, source: WeightsSource, num_classes: int, image_size: int | None) -> nn.Module: ...
    def head_path(self, config: BackboneConfig, model: nn.Module) -> str: ...
    def new_head(self, model: nn.Module, head: str, num_classes: int) -> None: ...
    def groups(self, config: BackboneConfig, model: nn.Module, head: str) -> LayerGroups: ...
    def preprocessing(self, config: BackboneConfig, model: nn.Module, source: WeightsSource) -> Preprocessing: ...
    def description(self, config: BackboneConfig, model: nn.Module, source: WeightsSource) -> str: ...


def build_backbone(config: BackboneConfig, num_classes: int, image_size: int | None, pretrained: bool = True) -> Backbone:
    """Build the network with its source's weights and a new head of num_classes outputs.

    With `config.cut`, the body ends after that layer group and is followed by global pooling and the new
    head (`transferctl.models.cut`); rebuilding a checkpoint of such a run needs the same cut and image size.
    """
    builder = _builder_for(config)
    source = config.weights_source if pretrained else NO_WEIGHTS
    model = builder.architecture(config, source, num_classes, image_size)
    head = builder.head_path(config, model)
    state = None if source.kind == "hub" else load_source_state(source, config.name)  # hub weights came with it
    builder.new_head(model, head, num_classes)
    saved_cut = state if state is not None and _cuttable(config) and is_cut_state(state.weights) else None
    whole = model  # a cut keeps it as its body, so the whole network's weights still load into it
    body = fitting_body(whole, state.weights, head, str(source)) if state is not None and saved_cut is None else None
    groups = builder.groups(config, model, head)
    preprocessing = _preprocessing(builder, config, model, source, state).with_image_size(image_size)
    description = builder.description(config, model, source)
    if config.cut is not None:
        model, groups = cut_network(config.name, model, groups, config.cut, num_classes, preprocessing.crop)
        head = HEAD
    if saved_cut is not None:
        load_body(model, _fitting_cut_body(model, saved_cut, config, source))
    elif body is not None:
        load_body(whole, body)
    return Backbone(model, config.name, groups, head, preprocessing, description, config.cut)


def _builder_for(config: BackboneConfig) -> Builder:
    """torchvision_models for plain names; timm: and python: backbones (optional, and never cut) import theirs."""
    if _cuttable(config):
        return torchvision_models
    if config.cut is not None:
        raise ConfigError(Problem("backbone.cut", f"cutting is supported for torchvision backbones, not {config.name}", "remove backbone.cut"))
    if config.name.startswith(TIMM_PREFIX):
        from transferctl.models import timm_models

        return timm_models
    from transferctl.models import python_code

    return python_code


def _cuttable(config: BackboneConfig) -> bool:
    return not config.name.startswith((PYTHON_PREFIX, TIMM_PREFIX))


def _preprocessing(builder: Builder, config: BackboneConfig, model: nn.Module, source: WeightsSource, state: SourceState | None) -> Preprocessing:
    """An earlier run's own preprocessing; else what the builder derives from the weights or architecture."""
    if state is not None and state.preprocessing is not None:
        return state.preprocessing
    return builder.preprocessing(config, model, source)


def _fitting_cut_body(model: nn.Module, state: SourceState, config: BackboneConfig, source: WeightsSource) -> dict[str, torch.Tensor]:
    hint = "set backbone.cut to the layer group those weights were cut after (the run's config.yaml says which)"
    if config.cut is None:
        raise WeightsError(Problem("backbone.weights", f"{source} holds a {config.name} cut short by backbone.cut, not a whole one", hint))
    try:
        return fitting_body(model, state.weights, HEAD, str(source))
    except WeightsError:
        raise WeightsError(Problem("backbone.weights", f"{source} holds a {config.name} cut after another layer group than '{config.cut}'", hint)) from None
