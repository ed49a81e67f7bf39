"""Features for `recommend`: one forward pass of a network over a sample of images, read at every layer group
(the taps of transferctl.models.cut, globally pooled), at the penultimate layer (the input of the head), and, where
the weights still carry their own classifier, that classifier's predictions.
"""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferctl.config import PYTHON_PREFIX, BackboneConfig, WeightsSource
from transferctl.data.preprocessing import Preprocessing
from transferctl.models.backbone import Backbone, replace_head
from transferctl.models.build import build_backbone
from transferctl.models.source_state import load_source_state
from transferctl.models.torchvision_models import torchvision_weights
from transferctl.models.cut import cut_points, layout_of, pool, stage_hooks, tap_path
from transferctl.training.runtime import Runtime, Uint8Normalizer
from transferctl.errors import DataError, Problem


@dataclass
class ProbeNetwork:
    """A network prepared for measuring: its stage taps and, when it has one, its source classifier."""

    backbone: Backbone
    taps: dict[str, str]  # layer group -> module path whose output is that group's output
    layout: str
    source_classes: int | None  # outputs of the weights' own head, kept in place; None: a new random head
    imagenet_top1: float | None

    @property
    def model(self) -> nn.Module:
        return self.backbone.model


@dataclass
class Features:
    stages: dict[str, np.ndarray]  # layer group -> (N, C) pooled features
    penultimate: np.ndarray  # (N, D): what the classifier reads
    source_predictions: np.ndarray | None  # (N,) argmax of the source head
    seconds: float

    def rows(self, index: Any) -> Features:
        """The same measures for some of the images (numpy indexing: a slice, indices or a mask)."""
        source = None if self.source_predictions is None else self.source_predictions[index]
        return Features({group: values[index] for group, values in self.stages.items()}, self.penultimate[index], source, self.seconds)


def load_probe_network(config: BackboneConfig, image_size: int | None, pretrained: bool = True) -> ProbeNetwork:
    """Build the backbone as train would; keep the weights' own head when they have one."""
    name, source = config.name, config.weights_source
    backbone = build_backbone(config, num_classes=2, image_size=image_size, pretrained=pretrained)
    source_classes = _restore_source_head(backbone, source) if pretrained else None
    taps = {group: tap_path(backbone.model, backbone.groups, group) for group in cut_points(backbone.model, backbone.groups)}
    return ProbeNetwork(backbone, taps, _stage_layout(name), source_classes, imagenet_top1(name, source) if pretrained else None)


def _stage_layout(name: str) -> str:
    """How the layer groups' outputs are laid out. A python: network is of no known family: taken to give
    (B, C, H, W) feature maps, as convolutional networks do (tokens, (B, N, C), are pooled either way)."""
    return "nchw" if name.startswith(PYTHON_PREFIX) else layout_of(name)


def imagenet_top1(name: str, source: WeightsSource) -> float | None:
    """ImageNet-1K top-1 accuracy (percent) from torchvision's weights metadata; None for other sources."""
    if source.kind == "hub":
        metrics = torchvision_weights(name, source.value).meta.get("_metrics", {})
        top1 = metrics.get("ImageNet-1K", {}).get("acc@1")
        return float(top1) if top1 is not None else None
    return None


def _restore_source_head(backbone: Backbone, source: WeightsSource) -> int | None:
    """Put the weights' own classifier back (build_backbone replaced it) so its predictions can be compared."""
    state = load_source_state(source, backbone.name, where="--weights")
    head = backbone.head_path
    head_state = {key[len(head) + 1 :]: value for key, value in (state.weights if state else {}).items() if key.startswith(head + ".")}
    if "weight" not in head_state:
        return None
    outputs = int(head_state["weight"].shape[0])
    replace_head(backbone.model, head, outputs)
    backbone.model.get_submodule(head).load_state_dict(head_state)
    return outputs


def with_preprocessing(network: ProbeNetwork, preprocessing: Preprocessing) -> ProbeNetwork:
    """The network reading images prepared for another (a random-init copy sees what the pretrained one saw)."""
    network.backbone = dataclasses.replace(network.backbone, preprocessing=preprocessing)
    return network


def load_images(paths: list[Path], preprocessing: Preprocessing) -> torch.Tensor:
    """Decode, resize and centre-crop as the weights expect: (N, 3, crop, crop) uint8, normalised later per batch."""
    from torchvision import transforms as T

    from transferctl.data.folders import open_rgb

    transform = T.Compose(
        [
            T.Resize(preprocessing.resize, interpolation=T.InterpolationMode(preprocessing.interpolation), antialias=True),
            T.CenterCrop(preprocessing.crop),
            T.PILToTensor(),
        ]
    )
    images = torch.empty((len(paths), 3, preprocessing.crop, preprocessing.crop), dtype=torch.uint8)

    def decode(index: int) -> None:
        try:
            images[index] = transform(open_rgb(paths[index]))
        except (OSError, ValueError) as exc:
            raise DataError(Problem(str(paths[index]), f"cannot be read as an image ({exc})", "remove or replace the file")) from None

    # Pillow releases the GIL while it decodes and resizes, so threads use every core.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(decode, range(len(paths))):
            pass
    return images


def image_key(preprocessing: Preprocessing) -> int:
    """Networks with the same crop size share decoded images.

    Weights of the same crop often differ a little in resize (232 or 256 for 224) and interpolation; for a
    measurement, the first network's choice serves them all, and decoding once per crop size rather than once
    per network saves seconds per backbone. (Training always uses each weights' exact preprocessing.)
    """
    return preprocessing.crop


@torch.inference_mode()
def extract(network: ProbeNetwork, images: torch.Tensor, runtime: Runtime, batch_size: int = 64) -> Features:
    """One forward pass over `images` (uint8, from load_images): pooled features at every tap and the head's input."""
    started = time.perf_counter()
    model = network.model
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    model.eval()
    collected: dict[str, list[torch.Tensor]] = {group: [] for group in network.taps}
    collected["\0penultimate"] = []

    def sink(group: str, features: torch.Tensor) -> None:
        collected[group].append(features.float().cpu())

    def head_input(module: nn.Module, args: Any) -> None:
        sink("\0penultimate", pool(args[0], network.layout))

    handles = stage_hooks(model, network.taps, network.layout, sink)
    handles.append(model.get_submodule(network.backbone.head_path).register_forward_pre_hook(head_input))
    predictions: list[torch.Tensor] = []
    pre = network.backbone.preprocessing
    normalized = Uint8Normalizer(pre.mean, pre.std, runtime)
    try:
        for start in range(0, len(images), batch_size):
            batch = normalized(images[start : start + batch_size])
            with runtime.autocast():
                output = model(batch)
            if network.source_classes is not None:
                predictions.append(output.float().argmax(dim=1).cpu())
    finally:
        for handle in handles:
            handle.remove()
    stages = {group: torch.cat(parts).numpy() for group, parts in collected.items()}
    penultimate = stages.pop("\0penultimate")
    source = torch.cat(predictions).numpy() if predictions else None
    return Features(stages, penultimate, source, time.perf_counter() - started)
