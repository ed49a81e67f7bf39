"""The torchvision backbones transferctl knows, for `transferctl backbones`: quick, nothing downloaded.

Each model is built on the meta device (structure only: no memory, no initialisation, milliseconds), which
is enough for its layer groups and, where the weights' metadata lacks it, its parameter count. Input size
and ImageNet top-1 come from the weights' metadata; "cached" says whether each weights file is already in
the torch hub cache, where training would look for it.

Building all eighty models still takes seconds, so what comes from the built model (parameter count and
layer groups) is kept in the cache folder, keyed by torchvision's version and this code's own source; the
weights' metadata and whether they are cached are read afresh every time.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from transferctl.models.torchvision_models import AUX_LOGIT_FAMILIES, cached_weights_path, classification_models, preprocessing_of
from transferctl.models.layer_groups import layer_groups


def list_backbones(filter_text: str | None = None) -> list[dict[str, Any]]:
    names = [n for n in classification_models() if not filter_text or filter_text.lower() in n.lower()]
    built = _BuiltFacts.load()
    rows = [describe_backbone(name, built.of(name)) for name in names]
    built.save_if_changed()
    return rows


def describe_backbone(name: str, built: dict[str, Any] | None = None) -> dict[str, Any]:
    """One model's row; `built` holds what _built_facts gives for it, when already known."""
    import torchvision

    try:
        weights = list(torchvision.models.get_model_weights(name))
    except (ValueError, KeyError):
        weights = []
    built = built or _built_facts(name)
    params = weights[0].meta.get("num_params") if weights else None
    default = preprocessing_of(weights[0]) if weights else None
    return {
        "name": name,
        "params": int(params) if params else built["params"],
        "input_size": default.crop if default else 224,
        "layer_groups": built["layer_groups"],
        "weights": [_weights_entry(w) for w in weights],
    }


def _built_facts(name: str) -> dict[str, Any]:
    model = _meta_model(name)
    return {"params": sum(p.numel() for p in model.parameters()), "layer_groups": [group for group, _ in layer_groups(name, model)]}


class _BuiltFacts:
    """_built_facts of every model listed before, from the cache folder; models not there are built."""

    def __init__(self, path: Path, key: str, facts: dict[str, Any]) -> None:
        self.path, self.key, self.facts, self.changed = path, key, facts, False

    @classmethod
    def load(cls) -> _BuiltFacts:
        import torchvision

        from transferctl.runs.cache_folder import FACTS_FILE, cache_folder

        modules = (sys.modules[__name__], sys.modules[layer_groups.__module__], sys.modules[classification_models.__module__])
        sources = b"".join(Path(str(module.__file__)).read_bytes() for module in modules)  # the code that builds and groups
        key = f"torchvision {torchvision.__version__}; {hashlib.blake2b(sources, digest_size=8).hexdigest()}"
        path = cache_folder() / FACTS_FILE
        try:
            stored = json.loads(path.read_text())
            facts = stored["facts"] if stored.get("key") == key else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            facts = {}  # none yet, unreadable, or from another version: built again
        return cls(path, key, facts)

    def of(self, name: str) -> dict[str, Any]:
        if name not in self.facts:
            self.facts[name] = _built_facts(name)
            self.changed = True
        return self.facts[name]

    def save_if_changed(self) -> None:
        from transferctl.runs.cache_folder import save_json

        if self.changed:
            save_json(self.path, {"key": self.key, "facts": self.facts})


def _weights_entry(weights: Any) -> dict[str, Any]:
    metrics = weights.meta.get("_metrics", {}).get("ImageNet-1K", {})
    return {
        "name": weights.name,
        "top1": metrics.get("acc@1"),
        "input_size": preprocessing_of(weights).crop,
        "cached": cached_weights_path(weights).is_file(),
        "file": str(cached_weights_path(weights)),
    }


def _meta_model(name: str) -> torch.nn.Module:
    import torchvision
    from torchvision.models import regnet

    extra = {"aux_logits": False, "init_weights": False} if name in AUX_LOGIT_FAMILIES else {}
    original = regnet.BlockParams.from_init_params.__func__  # type: ignore[attr-defined]

    def on_cpu(cls: type, *args: Any, **kwargs: Any) -> Any:
        with torch.device("cpu"):  # RegNet computes its widths with tensor ops, which the meta device cannot
            return original(cls, *args, **kwargs)

    regnet.BlockParams.from_init_params = classmethod(on_cpu)  # type: ignore[method-assign,assignment]
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(name, weights=None, **extra)
    finally:
        regnet.BlockParams.from_init_params = classmethod(original)  # type: ignore[method-assign,assignment]


def compact_groups(groups: list[str]) -> str:
    """'embed, block0..block11, norm, head': runs of numbered groups shortened."""
    import re

    parts: list[str] = []
    run: list[str] = []
    for name in [*groups, ""]:
        match = re.fullmatch(r"([a-z_]+)(\d+)", name)
        if run and match and match.group(1) == re.fullmatch(r"([a-z_]+)(\d+)", run[-1]).group(1):  # type: ignore[union-attr]
            run.append(name)
            continue
        if run:
            parts.append(run[0] if len(run) == 1 else f"{run[0]}..{run[-1]}")
        run = [name] if match else []
        if name and not match:
            parts.append(name)
    return ", ".join(parts)
