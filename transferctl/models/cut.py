"""backbone.cut: keep a network up to and including one layer group, pool globally, add a new head.

A layer group's output is read at its *tap*: the last module of the group, or, when parameter-free layers
(ReLU, max-pooling, dropout) follow it in the same container before the next group begins, the last of
those, so a cut after resnet's stem includes its max-pool and one after a vgg stage includes its pooling.
The same taps give `recommend` its per-stage features, so what it measures is what a cut trains on.

The cut network runs the original model's own forward (every family's quirks, such as ViT's class token
and position embedding, stay right) and stops it at the tap with a private exception. Everything after
the tap is replaced by `nn.Identity`, so its parameters leave the model, the optimizer and checkpoints.
State-dict keys are the original ones under `body.`, plus `head.weight` and `head.bias`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from transferctl.errors import ConfigError, Problem, did_you_mean
from transferctl.models.layer_groups import HEAD, LayerGroups, family_of, parameters_by_group

BODY = "body"
# Groups that already sit between the pooled features and the classifier: cutting there changes nothing.
_NOT_CUTTABLE = ("pre_logits", HEAD)
_AUX_HEADS = ("aux1", "aux2", "AuxLogits")  # googlenet / inception_v3 side classifiers
_CHANNELS_LAST_OUTPUT = ("swin",)  # families whose stages return (B, H, W, C)


class _Stop(Exception):
    """Raised by the tap's forward hook to end the forward pass there, carrying the tap's output."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


def _stop_here(module: nn.Module, args: Any, output: torch.Tensor) -> None:
    raise _Stop(output)


def pool(features: torch.Tensor, layout: str = "nchw") -> torch.Tensor:
    """Global average pooling to (B, C): over space for feature maps, over tokens for token sequences."""
    if features.ndim == 4:
        return features.mean(dim=(1, 2) if layout == "nhwc" else (2, 3))
    if features.ndim == 3:
        return features.mean(dim=1)
    return features.flatten(1)


def layout_of(model_name: str) -> str:
    return "nhwc" if family_of(model_name) in _CHANNELS_LAST_OUTPUT else "nchw"


def cut_points(model: nn.Module, groups: LayerGroups) -> list[str]:
    """The layer groups a network can be cut after, from the input side."""
    return [name for name, paths in groups if name not in _NOT_CUTTABLE and _trunk_paths(paths) and _is_module(model, _trunk_paths(paths)[-1])]


def tap_path(model: nn.Module, groups: LayerGroups, group: str) -> str:
    """The module whose output is the output of `group` (see the module docstring)."""
    last = _trunk_paths(dict(groups)[group])[-1]
    parent_path, _, _ = last.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    siblings = list(parent.named_children())
    names = [name for name, _ in siblings]
    tap = last
    for name, child in siblings[names.index(last.rpartition(".")[2]) + 1 :]:
        if _has_state(child):
            break
        tap = f"{parent_path}.{name}" if parent_path else name
    return tap


def check_cut(model_name: str, model: nn.Module, groups: LayerGroups, cut: str) -> None:
    """ConfigError unless `cut` names a layer group this network can be cut after."""
    names = [name for name, _ in groups]
    allowed = cut_points(model, groups)
    if cut in allowed:
        return
    if cut not in names:
        raise ConfigError(Problem("backbone.cut", f"{model_name} has no layer group '{cut}'", did_you_mean(cut, allowed)))
    if cut in _NOT_CUTTABLE:
        why = "it already feeds the classifier" if cut != HEAD else "the head is what a cut replaces"
        hint = "remove backbone.cut to keep the whole body" if cut != HEAD else f"choose one of: {', '.join(allowed)}"
        raise ConfigError(Problem("backbone.cut", f"cannot cut {model_name} after '{cut}': {why}", hint))
    raise ConfigError(
        Problem("backbone.cut", f"cannot cut {model_name} after '{cut}': its output is not a single module's", f"choose one of: {', '.join(allowed)}")
    )


class CutNetwork(nn.Module):
    """The body up to its tap, global pooling, and a new linear head."""

    def __init__(self, body: nn.Module, tap: str, layout: str, width: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(width, num_classes)
        self.tap = tap
        self.layout = layout
        self._stop = body.get_submodule(tap).register_forward_hook(_stop_here)

    def stop_after_other_hooks(self) -> None:
        """Move the stop behind the tap's other forward hooks: one registered later (explain's Grad-CAM,
        which reads the tap's output) would otherwise never run."""
        self._stop.remove()
        self._stop = self.body.get_submodule(self.tap).register_forward_hook(_stop_here)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled (B, width) features at the cut."""
        try:
            self.body(images)
        except _Stop as stop:
            return pool(stop.output, self.layout)
        raise RuntimeError(f"the forward pass never reached the cut at {self.tap}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def cut_network(
    model_name: str, model: nn.Module, groups: LayerGroups, cut: str, num_classes: int, image_size: int
) -> tuple[CutNetwork, LayerGroups]:
    """Cut `model` after group `cut`; return the new network and its groups (the kept ones, then the head).

    `model` is consumed: its later groups are replaced in place. `image_size` is the side of the square
    input used once to measure the width of the features at the cut.
    """
    check_cut(model_name, model, groups, cut)
    tap = tap_path(model, groups, cut)
    _drop_aux_heads(model)
    groups = [(name, _trunk_paths(paths)) for name, paths in groups]
    kept = groups[: [n for n, _ in groups].index(cut) + 1]
    for _, paths in groups[len(kept) :]:
        for path in paths:
            _replace_with_identity(model, path)
    layout = layout_of(model_name)
    width = _width_at(model, tap, layout, image_size)
    network = CutNetwork(model, tap, layout, width, num_classes)
    new_groups: LayerGroups = [(name, [f"{BODY}.{p}" for p in paths]) for name, paths in kept] + [(HEAD, [HEAD])]
    parameters_by_group(network, new_groups)  # every parameter in exactly one group, or a ValueError
    return network, new_groups


def is_cut_state(state: dict[str, Any]) -> bool:
    """A state dict saved from a CutNetwork (an earlier run with backbone.cut)."""
    return f"{HEAD}.weight" in state and any(key.startswith(BODY + ".") for key in state)


def _drop_aux_heads(model: nn.Module) -> None:
    # The side classifiers read mid-network outputs during training only; a cut network has no use for them.
    for name in _AUX_HEADS:
        if getattr(model, name, None) is not None:
            setattr(model, name, None)
    if hasattr(model, "aux_logits"):
        model.aux_logits = False


def _replace_with_identity(model: nn.Module, path: str) -> None:
    parent_path, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(getattr(parent, attribute, None), nn.Module):
        setattr(parent, attribute, nn.Identity())
    else:  # a bare parameter past the cut: no torchvision family has one, but never keep it silently
        raise ValueError(f"cannot remove {path!r} past the cut: it is not a module")


@torch.no_grad()
def _width_at(model: nn.Module, tap: str, layout: str, image_size: int) -> int:
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        captured.append(output)
        raise _Stop(output)

    was_training = model.training
    handle = model.get_submodule(tap).register_forward_hook(keep)
    try:
        model.eval()
        model(torch.zeros(1, 3, image_size, image_size))
    except _Stop:
        pass
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:
        raise RuntimeError(f"the forward pass never reached {tap}")
    return int(pool(captured[0], layout).shape[1])


def _trunk_paths(paths: list[str]) -> list[str]:
    """A group's paths without the auxiliary classifiers, which branch off the trunk."""
    return [p for p in paths if p.rpartition(".")[2] not in _AUX_HEADS]


def _is_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def stage_hooks(model: nn.Module, taps: dict[str, str], layout: str, sink: Callable[[str, torch.Tensor], None]) -> list[Any]:
    """Forward hooks that hand each tap's pooled output to `sink(group, features)`; returns their handles."""
    handles = []
    for group, path in taps.items():

        def hook(module: nn.Module, args: Any, output: torch.Tensor, group: str = group) -> None:
            sink(group, pool(output, layout))

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    return handles
