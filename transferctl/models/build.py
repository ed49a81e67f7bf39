"""Pretrained backbones: build a torchvision model, load its weights from any source, swap in a new head.

Weights sources: `DEFAULT` or a torchvision weights name (from the torch hub cache, downloaded only where
there is a network), a local `.pt/.pth/.safetensors` state dict, `run:<dir>` (an earlier transferctl run's
best checkpoint, its head dropped), or `none`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferctl.config import PYTHON_PREFIX, TIMM_PREFIX, BackboneConfig, looks_like_weights_file
from transferctl.models.cut import HEAD as CUT_HEAD
from transferctl.models.cut import cut_network, is_cut_state
from transferctl.errors import ConfigError, Problem, WeightsError, did_you_mean
from transferctl.models.layer_groups import LayerGroups, layer_groups
from transferctl.models.layer_groups import head_path as head_path_of

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Families whose auxiliary classifiers only matter for their original ImageNet recipe.
_AUX_LOGIT_FAMILIES = ("googlenet", "inception_v3")


@dataclass(frozen=True)
class Preprocessing:
    """What the network expects of an image: resize the short side, centre-crop, normalise (RGB)."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            resize=int(data["resize"]),
            crop=int(data["crop"]),
            mean=tuple(data["mean"]),  # type: ignore[arg-type]
            std=tuple(data["std"]),  # type: ignore[arg-type]
            interpolation=str(data.get("interpolation", "bilinear")),
        )

    def with_image_size(self, size: int | None) -> Preprocessing:
        """Keep the weights' resize/crop ratio at a new crop size."""
        if size is None or size == self.crop:
            return self
        resize = max(size, round(size * self.resize / self.crop))
        return Preprocessing(resize, size, self.mean, self.std, self.interpolation)


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


def classification_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_backbone(
    config: BackboneConfig, num_classes: int, image_size: int | None, pretrained: bool = True
) -> Backbone:
    """Build the network with its pretrained weights, then give it a new head of num_classes outputs.

    With `config.cut`, the body ends after that layer group and is followed by global pooling and the new
    head (`transferctl.models.cut`); rebuilding a checkpoint of such a run needs the same cut and image size.
    """
    if config.name.startswith((PYTHON_PREFIX, TIMM_PREFIX)):
        return _build_other(config, num_classes, image_size, pretrained)
    _check_model_name(config.name)
    source = config.weights if pretrained else "none"
    if source.lower() == "none":
        model = _build(config.name, None, image_size)
        loaded, preprocessing, description = None, _architecture_preprocessing(config.name), "none (random init)"
    elif source.startswith("run:"):
        model = _build(config.name, None, image_size)
        loaded, preprocessing = _state_from_run(Path(source[4:]), config.name)
        description = source
    elif looks_like_weights_file(source):
        model = _build(config.name, None, image_size)
        loaded, preprocessing = _state_from_file(Path(source)), _architecture_preprocessing(config.name)
        description = source
    else:
        weights = torchvision_weights(config.name, source)
        ensure_cached(weights)
        model = _build(config.name, weights, image_size)
        loaded, preprocessing, description = None, preprocessing_of(weights), f"torchvision {weights}"
    head = head_path_of(config.name, model)
    replace_head(model, head, num_classes)
    # Weights saved from a cut network (an earlier run with backbone.cut) fit only after cutting.
    load_after_cut = loaded is not None and is_cut_state(loaded)
    if loaded is not None and not load_after_cut:
        load_body_weights(model, loaded, head, source)
    groups = layer_groups(config.name, model)
    preprocessing = preprocessing.with_image_size(image_size)
    if config.cut is not None:
        model, groups = cut_network(config.name, model, groups, config.cut, num_classes, preprocessing.crop)
        head = CUT_HEAD
    if load_after_cut:
        _load_cut_state(model, loaded, config, source)
    return Backbone(model, config.name, groups, head, preprocessing, description, config.cut)


def _build_other(config: BackboneConfig, num_classes: int, image_size: int | None, pretrained: bool) -> Backbone:
    """timm:<model> (timm_backbones.py) and python:module:function (custom.py); neither can be cut."""
    if config.cut is not None:
        raise ConfigError(Problem("backbone.cut", f"cutting is supported for torchvision backbones, not {config.name}", "remove backbone.cut"))
    if config.name.startswith(TIMM_PREFIX):
        from transferctl.models.timm_models import build_timm_backbone

        return build_timm_backbone(config, num_classes, image_size, pretrained)
    from transferctl.models.python_code import build_python_backbone

    return build_python_backbone(config, num_classes, image_size, pretrained)


def load_weights_on_top(model: nn.Module, head: str, source: str, model_name: str) -> Preprocessing | None:
    """A weights file or `run:` loaded into a timm or python backbone (its head left out); returns the
    run's preprocessing for `run:`, else None. Any other source is the builder's own business."""
    if source.startswith("run:"):
        state, preprocessing = _state_from_run(Path(source[4:]), model_name)
        load_body_weights(model, state, head, source)
        return preprocessing
    if looks_like_weights_file(source):
        load_body_weights(model, _state_from_file(Path(source)), head, source)
    return None


def _check_model_name(name: str) -> None:
    names = classification_models()
    if name not in names:
        raise ConfigError(
            Problem("backbone.name", f"unknown model '{name}'", did_you_mean(name, names) + "; `transferctl backbones` lists them")
        )


def _build(name: str, weights: Any, image_size: int | None) -> nn.Module:
    import torchvision

    kwargs: dict[str, Any] = {}
    if name in _AUX_LOGIT_FAMILIES and weights is None:
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


def _architecture_preprocessing(model_name: str) -> Preprocessing:
    """Without torchvision weights, the architecture's own default weights still say what suits it."""
    import torchvision

    try:
        return preprocessing_of(torchvision.models.get_model_weights(model_name).DEFAULT)
    except (ValueError, KeyError, AttributeError):
        return Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------------------------------
# Local files and earlier runs


def _state_from_file(path: Path) -> dict[str, torch.Tensor]:
    from transferctl.runs.safeload import load_state_dict

    return load_state_dict(path, WeightsError, where="backbone.weights")


def _state_from_run(run_dir: Path, model_name: str) -> tuple[dict[str, torch.Tensor], Preprocessing]:
    from transferctl.runs.checkpoint import load_run_checkpoint

    checkpoint = load_run_checkpoint(run_dir, "best", where="backbone.weights")
    trained_on = checkpoint.backbone.get("name")
    if trained_on and trained_on != model_name:
        raise WeightsError(
            Problem("backbone.weights", f"run {run_dir} trained a {trained_on}, not a {model_name}", f"set backbone.name: {trained_on}")
        )
    return checkpoint.model, Preprocessing.from_dict(checkpoint.preprocessing)


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


def load_body_weights(model: nn.Module, state: dict[str, torch.Tensor], head_path: str, source: str) -> None:
    """Load every weight but the head's; the file's own classifier belongs to another task."""
    own_head = head_path + "."
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(own_head)}
    given = {k: v for k, v in state.items() if not k.startswith(own_head) and not _is_aux_key(k)}
    # BatchNorm's step counter only steers momentum=None averaging; files from older torch lack it, and torch's
    # own load_state_dict accepts them (the counter starts at 0, as torch leaves it).
    missing = sorted(key for key in set(expected) - set(given) if not key.endswith(".num_batches_tracked"))
    unexpected = sorted(set(given) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(given) if expected[k].shape != given[k].shape)
    if missing or unexpected or reshaped:
        raise WeightsError(Problem("backbone.weights", f"{source} does not fit this architecture: {_mismatch_summary(missing, unexpected, reshaped)}",
                                   "use weights saved from the same backbone.name"))
    model.load_state_dict(given, strict=False)


def _load_cut_state(model: nn.Module, state: dict[str, torch.Tensor], config: BackboneConfig, source: str) -> None:
    hint = "set backbone.cut to the layer group those weights were cut after (the run's config.yaml says which)"
    if config.cut is None:
        raise WeightsError(Problem("backbone.weights", f"{source} holds a {config.name} cut short by backbone.cut, not a whole one", hint))
    try:
        load_body_weights(model, state, CUT_HEAD, source)
    except WeightsError:
        raise WeightsError(Problem("backbone.weights", f"{source} holds a {config.name} cut after another layer group than '{config.cut}'", hint)) from None


def _is_aux_key(key: str) -> bool:
    return key.startswith(("AuxLogits.", "aux1.", "aux2."))


def _mismatch_summary(missing: list[str], unexpected: list[str], reshaped: list[str]) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            parts.append(f"{len(keys)} {label} ({shown})")
    return "; ".join(parts)
