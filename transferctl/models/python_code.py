"""Your own model: `backbone.name: python:package.module:function`, a function returning an nn.Module.

This is the one place an experiment file runs code, and only because the user named a Python import path
in it. The function may load its own pretrained weights: `weights: none` keeps whatever it built, a weights
file or `run:` loads on top. The config names the head (`backbone.head: fc`), optionally the layer groups
(`backbone.groups`, from the input side; default: everything before the head is one group, "body") and the
normalisation (`backbone.mean`, `backbone.std`, ImageNet's by default). The image size is
`data.image_size` (224 by default). Checkpoints keep the backbone section, so `evaluate`, `predict` and
`export` rebuild the same network by calling the same function (it must still be importable there, and
since a run directory may come from anyone, they do so only with --trust-code: transferctl/models/trust.py).
Modules come from installed packages or PYTHONPATH, never implicitly from the current folder: a shared run
directory one `cd`s into must not be able to plant its own module. Whatever the user's code prints goes to
stderr, so that `--json` keeps stdout to its one document.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Any, Callable, Iterator

from torch import nn

from transferctl.config import PYTHON_PREFIX, BackboneConfig, WeightsSource
from transferctl.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from transferctl.errors import ConfigError, Problem, did_you_mean
from transferctl.models.backbone import replace_head
from transferctl.models.layer_groups import HEAD, LayerGroups, check_layer_groups, groups_from_parameters

DEFAULT_IMAGE_SIZE = 224
_IMPORT_HINT = "the module must be importable: install its package, or put its folder on PYTHONPATH (PYTHONPATH=. for the current folder)"


# ---------------------------------------------------------------------------------------------
# The builder's steps (transferctl.models.build calls them in its one order)


def architecture(config: BackboneConfig, source: WeightsSource, num_classes: int, image_size: int | None) -> nn.Module:
    """Whatever the user's function returns, with whatever weights it loads itself."""
    with _user_code():
        return _call(_import_function(config.name), config.name)


def head_path(config: BackboneConfig, model: nn.Module) -> str:
    head = config.head or ""
    _check_head(model, head, config.name)
    return head


def new_head(model: nn.Module, head: str, num_classes: int) -> None:
    replace_head(model, head, num_classes)


def groups(config: BackboneConfig, model: nn.Module, head: str) -> LayerGroups:
    return _groups(model, head, config.groups)


def preprocessing(config: BackboneConfig, model: nn.Module, source: WeightsSource) -> Preprocessing:
    """ImageNet's recipe (resize 256, crop 224) with the configured normalisation; data.image_size rescales it."""
    return Preprocessing(round(DEFAULT_IMAGE_SIZE * 256 / 224), DEFAULT_IMAGE_SIZE, config.mean or IMAGENET_MEAN, config.std or IMAGENET_STD)


def description(config: BackboneConfig, model: nn.Module, source: WeightsSource) -> str:
    return "its own (python: function)" if source.kind == "none" else str(source)


def _import_function(name: str) -> Callable[[], Any]:
    spec = name[len(PYTHON_PREFIX) :]
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(Problem("backbone.name", f"'{name}' is not python:package.module:function", "e.g. python:mymodels.nets:build"))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever the import raised, the user must fix their module
        raise ConfigError(Problem("backbone.name", f"cannot import {module_name}: {type(exc).__name__}: {_one_line(exc)}", _IMPORT_HINT)) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise ConfigError(Problem("backbone.name", f"{module_name} has no function '{attribute}'", did_you_mean(attribute, names)))
    return function


def _call(function: Callable[[], Any], name: str) -> nn.Module:
    try:
        model = function()
    except Exception as exc:  # noqa: BLE001 - the user's code failed; say so in one line
        raise ConfigError(Problem("backbone.name", f"{name}() raised {type(exc).__name__}: {_one_line(exc)}", "fix the function or its arguments' defaults")) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(Problem("backbone.name", f"{name}() returned a {type(model).__name__}, not a torch.nn.Module", "return the network"))
    return model


@contextlib.contextmanager
def _user_code() -> Iterator[None]:
    """The user's code may print (efficientnet_pytorch says 'Loaded pretrained weights for ...'): to stderr,
    where progress goes, so that stdout holds only the command's machine output (`train --json`)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _check_head(model: nn.Module, head: str, name: str) -> None:
    modules = [path for path, _ in model.named_modules() if path]
    try:
        layer = model.get_submodule(head)
    except AttributeError:
        raise ConfigError(Problem("backbone.head", f"{name} has no module '{head}'", did_you_mean(head, modules))) from None
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        linear = [path for path, module in model.named_modules() if isinstance(module, nn.Linear)]
        hint = f"name its last Linear layer, e.g. {linear[-1]}" if linear else "the head must be a Linear (or 1x1 Conv2d) layer"
        raise ConfigError(Problem("backbone.head", f"'{head}' is a {type(layer).__name__}, not a Linear or Conv2d layer", hint))


def _groups(model: nn.Module, head: str, named: dict[str, list[str]] | None) -> LayerGroups:
    if not named:
        # Everything before the head is one group: feature_extract and fine_tune work without more config.
        owner = {n: (HEAD if n == head or n.startswith(head + ".") else "body") for n, _ in model.named_parameters()}
        groups = groups_from_parameters(model, owner)
        return [group for group in groups if group[0] != HEAD] + [(HEAD, [head])]
    if HEAD in named:
        raise ConfigError(Problem("backbone.groups", "'head' is the group of backbone.head; name the other groups only"))
    try:
        return check_layer_groups(model, [*((name, list(paths)) for name, paths in named.items()), (HEAD, [head])])
    except ValueError as exc:
        raise ConfigError(Problem("backbone.groups", str(exc), "list module prefixes so that every parameter but the head's is in one group")) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."
