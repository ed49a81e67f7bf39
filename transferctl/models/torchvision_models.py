"""torchvision classification models, the default kind of backbone: their names, their weights (from the
torch hub cache, downloaded only where there is a network) and the preprocessing those weights' metadata
gives. As torchvision does it, hub weights come with the architecture (`get_model(name, weights=...)`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferctl.config import BackboneConfig, WeightsSource
from transferctl.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from transferctl.errors import ConfigError, Problem, WeightsError, did_you_mean
from transferctl.models.backbone import replace_head
from transferctl.models.layer_groups import LayerGroups, layer_groups
from transferctl.models.layer_groups import head_path as head_path_of

# Families whose auxiliary classifiers only matter for their original ImageNet recipe.
AUX_LOGIT_FAMILIES = ("googlenet", "inception_v3")


def classification_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


# ---------------------------------------------------------------------------------------------
# The builder's steps (transferctl.models.build calls them in its one order)


def architecture(config: BackboneConfig, source: WeightsSource, num_classes: int, image_size: int | None) -> nn.Module:
    """The network, with its hub weights when the source names them (their own head still on)."""
    _check_model_name(config.name)
    weights = None
    if source.kind == "hub":
        weights = torchvision_weights(config.name, source.value)
        ensure_cached(weights)
    return _build(config.name, weights, image_size)


def head_path(config: BackboneConfig, model: nn.Module) -> str:
    return head_path_of(config.name, model)


def new_head(model: nn.Module, head: str, num_classes: int) -> None:
    replace_head(model, head, num_classes)


def groups(config: BackboneConfig, model: nn.Module, head: str) -> LayerGroups:
    return layer_groups(config.name, model)


def preprocessing(config: BackboneConfig, model: nn.Module, source: WeightsSource) -> Preprocessing:
    """The hub weights' own; without them, the architecture's default weights still say what suits it."""
    if source.kind == "hub":
        return preprocessing_of(torchvision_weights(config.name, source.value))
    import torchvision

    try:
        return preprocessing_of(torchvision.models.get_model_weights(config.name).DEFAULT)
    except (ValueError, KeyError, AttributeError):
        return Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD)


def description(config: BackboneConfig, model: nn.Module, source: WeightsSource) -> str:
    if source.kind == "hub":
        return f"torchvision {torchvision_weights(config.name, source.value)}"
    return "none (random init)" if source.kind == "none" else str(source)


def _check_model_name(name: str) -> None:
    names = classification_models()
    if name not in names:
        raise ConfigError(
            Problem("backbone.name", f"unknown model '{name}'", did_you_mean(name, names) + "; `transferctl backbones` lists them")
        )


def _build(name: str, weights: Any, image_size: int | None) -> nn.Module:
    import torchvision

    kwargs: dict[str, Any] = {}
    if name in AUX_LOGIT_FAMILIES and weights is None:
        kwargs.update(aux_logits=False, init_weights=False)
    if name.startswith("vit_") and image_size is not None:
        if weights is not None and image_size != weights.meta["min_size"][0]:
            raise ConfigError(
                Problem("data.image_size", f"{name} with {weights} needs {weights.meta['min_size'][0]} pixel images",
                        "remove data.image_size or use weights: none")
            )
        kwargs["image_size"] = image_size
    return torchvision.models.get_model(name, weights=weights, **kwargs)


# ---------------------------------------------------------------------------------------------
# torchvision weights and the hub cache


def torchvision_weights(model_name: str, weights_name: str) -> Any:
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(model_name)
    except (ValueError, KeyError):
        raise WeightsError(Problem("backbone.weights", f"{model_name} has no torchvision weights", "use weights: none or a file")) from None
    names = [member.name for member in enum]
    if weights_name == "DEFAULT":
        return enum.DEFAULT
    if weights_name not in names:
        raise WeightsError(Problem("backbone.weights", f"unknown weights '{weights_name}' for {model_name}", did_you_mean(weights_name, names + ["DEFAULT", "none"])))
    return enum[weights_name]


def cached_weights_path(weights: Any) -> Path:
    """Where torch.hub keeps (and looks for) a torchvision weights file: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def ensure_cached(weights: Any) -> Path:
    path = cached_weights_path(weights)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    try:
        torch.hub.download_url_to_file(weights.url, str(partial), progress=False)
        partial.replace(path)
    except Exception as exc:  # noqa: BLE001 - any network failure means the same thing to the user
        partial.unlink(missing_ok=True)
        raise WeightsError(
            Problem(
                "backbone.weights",
                f"{weights} is not in the local cache and could not be downloaded ({type(exc).__name__})",
                f"copy {Path(weights.url).name} from {weights.url} to {path}",
            )
        ) from None
    return path


def preprocessing_of(weights: Any) -> Preprocessing:
    transform = weights.transforms()
    return Preprocessing(
        resize=int(transform.resize_size[0]),
        crop=int(transform.crop_size[0]),
        mean=tuple(float(v) for v in transform.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in transform.std),  # type: ignore[arg-type]
        interpolation=str(transform.interpolation.value),
    )
