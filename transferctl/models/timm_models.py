"""timm models (optional extra `transferctl[timm]`): `backbone.name: timm:<model>`.

Preprocessing comes from the model's pretrained config (timm.data.resolve_data_config: input size,
crop_pct, mean, std, interpolation), layer groups from the model's own group matcher (the coarse one timm
uses for layer decay: stem, one group per stage or block, then the head), and the head from
get_classifier()/reset_classifier(). Weights: `DEFAULT` (timm's pretrained weights, from its local cache,
downloaded only where there is a network), a pretrained tag (`weights: a1_in1k` means `<model>.a1_in1k`),
a local file, `run:<dir>`, or `none`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from transferctl.config import TIMM_PREFIX, BackboneConfig, WeightsSource
from transferctl.data.preprocessing import Preprocessing
from transferctl.errors import ConfigError, Problem, WeightsError, did_you_mean
from transferctl.models.layer_groups import HEAD, LayerGroups, check_layer_groups, groups_from_parameters

INSTALL_HINT = "pip install 'transferctl[timm]'"


def import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError(Problem("backbone.name", "timm: backbones need the timm package, which is not installed", INSTALL_HINT)) from None
    return timm


# ---------------------------------------------------------------------------------------------
# The builder's steps (transferctl.models.build calls them in its one order)


def architecture(config: BackboneConfig, source: WeightsSource, num_classes: int, image_size: int | None) -> nn.Module:
    """The model, with its head of num_classes outputs already new: timm's loader leaves the pretrained
    classifier out when the sizes differ, so hub weights come with the architecture, as timm builds them."""
    timm = import_timm()
    full_name = _full_name(config, source)
    _check_name(timm, full_name.split(".")[0])
    hub = source.kind == "hub"
    if hub:
        check_hub_weights_reachable(timm, full_name)
    return _create(timm, full_name, hub, num_classes, image_size)


def head_path(config: BackboneConfig, model: nn.Module) -> str:
    classifier = model.get_classifier()
    for path, module in model.named_modules():
        if module is classifier and path:
            return path
    raise ConfigError(Problem("backbone.name", f"{type(model).__name__} has no classifier layer to replace", "choose a timm classification model"))


def new_head(model: nn.Module, head: str, num_classes: int) -> None:
    """Nothing to do: create_model(num_classes=...) made the head new (see architecture)."""


def groups(config: BackboneConfig, model: nn.Module, head: str) -> LayerGroups:
    return timm_layer_groups(model, head)


def preprocessing(config: BackboneConfig, model: nn.Module, source: WeightsSource) -> Preprocessing:
    """What the model's pretrained config says (timm.data.resolve_data_config), with or without its weights."""
    data = import_timm().data.resolve_data_config({}, model=model)
    crop = int(data["input_size"][-1])
    resize = max(crop, round(crop / float(data.get("crop_pct", 0.875))))
    interpolation = str(data.get("interpolation", "bilinear"))
    return Preprocessing(resize, crop, tuple(data["mean"]), tuple(data["std"]), interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear")  # type: ignore[arg-type]


def description(config: BackboneConfig, model: nn.Module, source: WeightsSource) -> str:
    if source.kind == "hub":
        return f"timm {model.pretrained_cfg.get('hf_hub_id') or _full_name(config, source)}"
    return "none (random init)" if source.kind == "none" else str(source)


def _full_name(config: BackboneConfig, source: WeightsSource) -> str:
    """timm's name of the model with its pretrained tag: `weights: a1_in1k` means `<model>.a1_in1k`."""
    name = config.name[len(TIMM_PREFIX) :]
    return f"{name}.{source.value}" if source.kind == "hub" and source.value != "DEFAULT" else name


def _check_name(timm: Any, name: str) -> None:
    names = timm.list_models()
    if name not in names:
        raise ConfigError(Problem("backbone.name", f"timm has no model '{name}'", did_you_mean(name, names) + "; timm.list_models() lists them"))


def _create(timm: Any, name: str, pretrained: bool, num_classes: int, image_size: int | None) -> nn.Module:
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    try:
        try:
            # Transformers fix their position embeddings to the input size; convnets ignore img_size.
            return timm.create_model(name, pretrained=pretrained, **kwargs, **({"img_size": image_size} if image_size else {}))
        except TypeError:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc) or "Invalid pretrained tag" in str(exc):
            raise WeightsError(Problem("backbone.weights", f"timm has no pretrained weights '{name}'", "use DEFAULT, a tag timm lists for the model, a file or none")) from None
        raise
    except (OSError, ValueError) as exc:  # offline: huggingface_hub or torch.hub could not fetch the file
        if not pretrained:
            raise
        raise not_downloadable(name, type(exc).__name__) from None


def not_downloadable(name: str, reason: str) -> WeightsError:
    return WeightsError(
        Problem("backbone.weights", f"timm weights for {name} are not in the local cache and could not be downloaded ({reason})",
                f"on a machine with a network run: python -c \"import timm; timm.create_model('{name}', pretrained=True)\", then copy the Hugging Face cache (~/.cache/huggingface) here; or use a weights file")
    )  # fmt: skip


HUB_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm asks the Hugging Face Hub for, in turn


def check_hub_weights_reachable(timm: Any, name: str) -> None:
    """Weights that come from the Hugging Face Hub are either in its local cache or must be downloaded; when
    neither can be, say so in a few seconds: huggingface_hub itself retries for about 45 s before it gives up."""
    repo, files = _hub_weights(timm, name)
    if repo is None or _in_hub_cache(repo, files):
        return
    reachable, reason = hub_reachable()
    if not reachable:
        raise not_downloadable(name, reason)


def _hub_weights(timm: Any, name: str) -> tuple[str | None, tuple[str, ...]]:
    """The Hub repository of a model's pretrained weights and the files timm would fetch; None when they
    come from elsewhere (a URL, a local file) or the name is unknown (create_model says so better)."""
    try:
        config = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        return None, ()
    if config is None or not config.hf_hub_id:
        return None, ()
    return config.hf_hub_id, (config.hf_hub_filename,) if config.hf_hub_filename else HUB_WEIGHTS_FILES


def _in_hub_cache(repo: str, files: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, filename), str) for filename in files)


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether a connection to the Hub's host opens, and why not. Behind a proxy it cannot be told this way,
    so the answer is yes and huggingface_hub finds out itself."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True, ""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return False, f"{host} cannot be reached: {exc.strerror or type(exc).__name__}"
    return True, ""


def timm_layer_groups(model: nn.Module, head: str) -> LayerGroups:
    """The model's coarse group matcher (stem, stages or blocks, head) as named layer groups."""
    from timm.models._manipulate import group_parameters

    by_index = group_parameters(model, model.group_matcher(coarse=True))
    owner: dict[str, str] = {}
    names = _group_names(list(by_index.values()))
    for index_names, group in zip(by_index.values(), names):
        for param in index_names:
            owner[param] = HEAD if param == head or param.startswith(head + ".") else group
    groups = [g for g in groups_from_parameters(model, owner) if g[0] != HEAD]
    return check_layer_groups(model, [*groups, (HEAD, [head])])


def _group_names(groups: list[list[str]]) -> list[str]:
    """stem, then each group named by the module most of its parameters are in and no other group's
    (layer1, blocks3, stages0); the last group, the final norm beside the head, is pre_logits."""
    names: list[str] = []
    for index, params in enumerate(groups):
        others = [p for i, group in enumerate(groups) if i != index for p in group]
        if index == 0:
            name = "stem"
        elif index == len(groups) - 1:
            name = "pre_logits"
        else:
            name = _own_prefix(params, others).replace(".", "") or f"group{index}"
        while name in names:
            name += "_"
        names.append(name)
    return names


def _own_prefix(params: list[str], others: list[str]) -> str:
    """The shallowest module prefix that holds most of `params` and none of `others`."""
    parts = params[0].split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth]) + "."
        mine = sum(p.startswith(prefix) for p in params)
        if mine * 2 > len(params) and not any(p.startswith(prefix) for p in others):
            return prefix[:-1]
    return ""
