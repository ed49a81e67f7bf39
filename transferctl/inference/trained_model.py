"""Load a trained model back from a run directory: the one place evaluate, predict and export rebuild it.

A checkpoint holds the state dict ("model"), the class names, the backbone (name, weights, head, cut) and
the preprocessing. The architecture is rebuilt with `weights: none` (nothing to download: every weight
comes from the checkpoint), given a head of len(classes) outputs, and the state dict is loaded strictly,
so a checkpoint that does not fit its own architecture is an error, never a half-loaded model. A `python:`
backbone is rebuilt only with the user's opt-in (trust_code, transferctl/models/trust.py): the checkpoint names
the code to run.

A checkpoint also says what its outputs mean (run_task): one softmax over the classes, or, for a
multi-label run, a sigmoid a class and the per-class thresholds tuned on val (docs/commands.md).
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class RunTask:
    """What a run's outputs mean: a single-label run's softmax picks one class; a multi-label run gives each
    class a sigmoid score, and an image every label whose score reaches that class's threshold."""

    multi_label: bool = False
    thresholds: tuple[float, ...] = ()  # multi-label: one a class, in output order
    notice: str | None = None  # why the thresholds are the default rather than tuned ones

    @property
    def name(self) -> str:
        return "multi_label" if self.multi_label else "single_label"


def run_task(saved: Checkpoint, where: str) -> RunTask:
    """The checkpoint's task (its config's `task`) and, for multi-label, the thresholds tuned on val that its
    best row carries. Where they are not for these weights (an older run, or --checkpoint last of a run whose
    best epoch came earlier), every class gets DEFAULT_THRESHOLD, and the notice says so."""
    from transferctl.training.multi_label_metrics import DEFAULT_THRESHOLD

    if (saved.config or {}).get("task") != "multi_label":
        return RunTask()
    best = saved.best or {}
    tuned = best.get("thresholds")
    default = (DEFAULT_THRESHOLD,) * len(saved.classes)
    if not isinstance(tuned, list) or len(tuned) != len(saved.classes):
        return RunTask(True, default, f"{where} holds no thresholds tuned on val (a run from before they were kept): every class's label is given at a score of {DEFAULT_THRESHOLD}")
    if saved.global_epoch is not None and best.get("global_epoch") != saved.global_epoch:
        return RunTask(True, default, f"{where} holds epoch {saved.global_epoch}'s weights, and the thresholds were tuned for epoch {best.get('global_epoch')} "
                                      f"(--checkpoint best): every class's label is given at a score of {DEFAULT_THRESHOLD}")  # fmt: skip
    return RunTask(True, tuple(float(value) for value in tuned))


def load_trained_model(run_dir: Path, checkpoint: str = "best", trust_code: bool = False) -> TrainedModel:
    """Rebuild the network a run trained, from its best or last checkpoint or a checkpoint file.
    trust_code: the user allows a python: backbone the checkpoint names to be imported and called."""
    return load_trained_run(run_dir, checkpoint, trust_code)[0]


def load_trained_task(run_dir: Path, checkpoint: str = "best", trust_code: bool = False) -> tuple[TrainedModel, RunTask]:
    """load_trained_model, with what its outputs mean (run_task)."""
    trained, _, task = load_trained_run(run_dir, checkpoint, trust_code)
    return trained, task


def load_trained_run(run_dir: Path, checkpoint: str = "best", trust_code: bool = False) -> tuple[TrainedModel, Backbone, RunTask]:
    """The network, its rebuilt Backbone (name, layer groups and cut: what explain reads) and what its outputs mean."""
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
    return TrainedModel(model, classes, preprocessing), backbone, run_task(saved, where)


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
