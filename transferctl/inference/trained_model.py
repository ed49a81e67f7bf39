"""Load a trained model back from a run directory: the one place evaluate, predict and export rebuild it.

A checkpoint holds the state dict ("model"), the class names, the backbone (name, weights, head, cut) and
the preprocessing. The architecture is rebuilt with `weights: none` (nothing to download: every weight
comes from the checkpoint), given a head of len(classes) outputs, and the state dict is loaded strictly,
so a checkpoint that does not fit its own architecture is an error, never a half-loaded model. A `python:`
backbone is rebuilt only with the user's opt-in (trust_code, transferctl/models/trust.py): the checkpoint names
the code to run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from pydantic import ValidationError
from torch import nn

from transferctl.data.preprocessing import Preprocessing
from transferctl.models.backbone import Backbone
from transferctl.models.build import build_backbone
from transferctl.config import DEVICE_PATTERN, BackboneConfig
from transferctl.data.folders import build_transform
from transferctl.training.runtime import Runtime, make_runtime, prepare_model
from transferctl.errors import CheckpointError, ConfigError, Problem
from transferctl.paths import checked
from transferctl.runs.checkpoint import Checkpoint, checkpoint_file, load_run_checkpoint
from transferctl.runs.rundir import CHECKPOINTS
from transferctl.models.trust import require_trusted

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


class TrainedModel(NamedTuple):
    """Unpacks as (model, classes, preprocessing); the model is on the CPU, in eval mode."""

    model: nn.Module
    classes: list[str]
    preprocessing: Preprocessing


def load_trained_model(run_dir: Path, checkpoint: str = "best", trust_code: bool = False) -> TrainedModel:
    """Rebuild the network a run trained, from its best or last checkpoint or a checkpoint file.
    trust_code: the user allows a python: backbone the checkpoint names to be imported and called."""
    return load_trained_backbone(run_dir, checkpoint, trust_code)[0]


def load_trained_backbone(run_dir: Path, checkpoint: str = "best", trust_code: bool = False) -> tuple[TrainedModel, Backbone]:
    """load_trained_model, with the rebuilt Backbone (its name, layer groups and cut) that explain reads."""
    where = str(checkpoint_file(run_dir, checkpoint))
    if checkpoint in ("best", "last") and checked(run_dir, CheckpointError).is_dir() and not (run_dir / CHECKPOINTS).is_dir():
        raise CheckpointError(Problem(str(run_dir), f"no {CHECKPOINTS}/ folder: not a transferctl run directory, or no epoch has finished yet",
                                      "pass a folder that `transferctl train` wrote"))
    saved = load_run_checkpoint(run_dir, checkpoint)
    classes = [str(name) for name in saved.classes]
    try:
        preprocessing = Preprocessing.from_dict(saved.preprocessing)
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(Problem(where, "has no usable 'preprocessing' entry", "use a checkpoint written by `transferctl train`")) from None
    backbone = _build_architecture(saved, len(classes), preprocessing, where, trust_code)
    model = backbone.model
    _load_strictly(model, saved.model, where)
    model.eval()
    return TrainedModel(model, classes, preprocessing), backbone


def _backbone_config(checkpoint: Checkpoint, where: str) -> BackboneConfig:
    """The run's own backbone section (it may carry fields beyond name), with the weights left out."""
    section = dict((checkpoint.config or {}).get("backbone") or checkpoint.backbone or {})
    if "name" not in section:
        raise CheckpointError(Problem(where, "does not say which backbone it holds", "use a checkpoint written by `transferctl train`"))
    section["weights"] = "none"  # every weight comes from the checkpoint: nothing to read or download
    section = {key: value for key, value in section.items() if key in BackboneConfig.model_fields}
    try:
        return BackboneConfig.model_validate(section)
    except ValidationError as exc:
        raise CheckpointError(Problem(where, f"has an invalid backbone entry: {exc.errors()[0]['msg']}", "use a checkpoint written by `transferctl train`")) from None


def _build_architecture(checkpoint: Checkpoint, num_classes: int, preprocessing: Preprocessing, where: str, trust_code: bool) -> Backbone:
    config = _backbone_config(checkpoint, where)
    require_trusted(config.name, where, trust_code)
    try:
        # The crop size is the image size the run trained at (it matters to ViTs' position embeddings).
        return build_backbone(config, num_classes, preprocessing.crop, pretrained=False)
    except ConfigError as exc:
        raise CheckpointError(*(Problem(where, f"cannot rebuild its {config.name}: {p.message}", p.hint) for p in exc.problems)) from None


def _load_strictly(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise CheckpointError(Problem(where, f"weights do not fit the architecture: {detail}", "the checkpoint is damaged or from another version")) from None


def eval_transform(preprocessing: Preprocessing) -> Callable[[Any], torch.Tensor]:
    """Resize, centre-crop and normalise exactly as validation did during training."""
    return build_transform(preprocessing, augment="none", train=False)


def inference_runtime(model: nn.Module, device: str, precision: str) -> tuple[nn.Module, Runtime]:
    """Choose the device and precision (as given on the command line) and move the model there."""
    check_runtime_options(device, precision)
    runtime = make_runtime(device, precision, model)
    return prepare_model(model, runtime, training=False), runtime


def check_runtime_options(device: str, precision: str) -> None:
    """Refuse a misspelt --device or --precision before spending seconds loading a model."""
    if not DEVICE_PATTERN.match(device):
        raise ConfigError(Problem("--device", f"'{device}' is not a device", "use auto, cpu, cuda, cuda:N or mps"))
    if precision not in PRECISIONS:
        raise ConfigError(Problem("--precision", f"'{precision}' is not a precision", f"use one of {', '.join(PRECISIONS)}"))
