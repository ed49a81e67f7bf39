"""explain: Grad-CAM heatmaps of a trained run's decisions, drawn over the images as the network saw them.

pytorch-grad-cam (the optional extra `transferctl[explain]`) computes the maps; this module only picks the
layer to look at and prepares the images as predict does. The layer is the last module of the last layer
group before the head, the last place where features still have a position in the image (a ViT: its last
block's first norm); for a cut network it is the cut's tap (models/cut.py). See docs/commands.md (explain).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

from transferctl.data.folders import open_rgb
from transferctl.data.preprocessing import Preprocessing
from transferctl.errors import ConfigError, DataError, Problem, did_you_mean
from transferctl.inference.predict import decode_error
from transferctl.inference.trained_model import RunTask, eval_transform, inference_runtime, load_trained_run
from transferctl.models.cut import BODY, CutNetwork, cut_points, layout_of
from transferctl.models.layer_groups import LayerGroups

MISSING_EXTRA = "explain needs pytorch-grad-cam: pip install transferctl[explain]"


class MissingExtra(ConfigError):
    """The optional extra is not installed: one line that says how to install it."""


@dataclass(frozen=True)
class Explanation:
    """One image explained: where its heatmap PNG went, the class explained and the model's own pick."""

    path: str
    png: Path
    explained: str
    score: float  # the explained class's probability (a multi-label run: its sigmoid score)
    predicted: str  # the model's pick (a multi-label run: every label at or above its threshold, joined by |)


def target_layer(model: nn.Module, groups: LayerGroups) -> str:
    """The path of the module Grad-CAM reads: the last module of the last group before the head (a ViT:
    its last block's first norm), or a cut network's tap."""
    if isinstance(model, CutNetwork):
        return f"{BODY}.{model.tap}"  # the modules after the tap are Identity and never run
    points = cut_points(model, groups)
    if not points:
        raise ConfigError(Problem("backbone", "no layer group before the head has a single module's output to explain"))
    # The group's last module, not its tap: parameter-free layers after a group may already pool the map away
    # (resnet's avgpool, timm's global_pool and head_drop).
    named = dict(model.named_modules())
    modules = [path for point in points for path in dict(groups)[point] if path in named]  # not parameters
    tap = modules[-1]
    if isinstance(model.get_submodule(tap), nn.LayerNorm) and tap in modules[1:]:
        # A ViT's final norm: its head reads the class token alone, so the image's tokens get no gradient
        # there. The last block's first norm feeds its attention, which mixes them into the class token.
        return _first_norm_of_last_block(model, modules[modules.index(tap) - 1]) or tap
    return tap


def _first_norm_of_last_block(model: nn.Module, path: str) -> str | None:
    module = model.get_submodule(path)
    while isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module):  # a group of blocks: its last
        path, module = f"{path}.{len(module) - 1}", module[-1]
    norms = [name for name, child in module.named_modules() if isinstance(child, nn.LayerNorm)]
    return (f"{path}.{norms[0]}" if norms[0] else path) if norms else None


def explain_images(
    run_dir: Path, images: list[str], out_dir: Path, class_name: str | None = None, checkpoint: str = "best",
    device: str = "cpu", trust_code: bool = False,
) -> list[Explanation]:
    """Write one heatmap PNG per image into out_dir (named after the image) and describe each."""
    decoded = [(path, _decode(path)) for path in images]  # a missing file fails before the model loads
    cam_module = _grad_cam()
    trained, backbone, task = load_trained_run(run_dir, checkpoint, trust_code)
    wanted = None if class_name is None else _class_index(class_name, trained.classes)
    layer = trained.model.get_submodule(target_layer(trained.model, backbone.groups))
    model, runtime = inference_runtime(trained.model, device, "fp32")  # gradients want full precision
    transform = eval_transform(trained.preprocessing)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _output_names([path for path, _ in decoded])
    results = []
    with cam_module.GradCAM(model=model, target_layers=[layer], reshape_transform=_to_maps(_layout(trained.model, backbone.name))) as cam:
        if isinstance(trained.model, CutNetwork):
            trained.model.stop_after_other_hooks()  # Grad-CAM's hooks on the tap run before the cut stops there
        for (path, image), name in zip(decoded, names):
            batch = transform(image).unsqueeze(0).to(runtime.device)
            with torch.no_grad():
                logits = model(batch).float()[0].cpu()
            probabilities = logits.sigmoid() if task.multi_label else logits.softmax(dim=0)
            index = int(probabilities.argmax()) if wanted is None else wanted
            heat = cam(input_tensor=batch, targets=[cam_module.ClassifierOutputTarget(index)])[0]
            png = out_dir / name
            _save_overlay(cam_module, batch[0].cpu(), trained.preprocessing, heat, png)
            results.append(Explanation(path, png, trained.classes[index], round(float(probabilities[index]), 6), _picked(probabilities, trained.classes, task)))
    return results


def _picked(probabilities: torch.Tensor, classes: list[str], task: RunTask) -> str:
    """The top class, or a multi-label run's labels at or above their thresholds (none: an empty string)."""
    if not task.multi_label:
        return classes[int(probabilities.argmax())]
    return "|".join(name for name, score, threshold in zip(classes, probabilities.tolist(), task.thresholds) if score >= threshold)


def _grad_cam() -> Any:
    """pytorch-grad-cam's pieces, or MissingExtra when the extra is not installed."""
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.image import show_cam_on_image
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise MissingExtra(Problem("", MISSING_EXTRA)) from None

    return SimpleNamespace(GradCAM=pytorch_grad_cam.GradCAM, ClassifierOutputTarget=ClassifierOutputTarget, show_cam_on_image=show_cam_on_image)


def _decode(path: str) -> Any:
    from PIL import Image

    try:
        return open_rgb(Path(path))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise DataError(Problem(path, decode_error(path, exc), "pass image files")) from None


def _class_index(name: str, classes: list[str]) -> int:
    if name in classes:
        return classes.index(name)
    hint = did_you_mean(name, classes) or f"choose one of: {', '.join(classes)}"
    raise ConfigError(Problem("--class", f"the run has no class '{name}' (its classes: {', '.join(classes)})", hint))


def _output_names(paths: list[str]) -> list[str]:
    """'<stem>.gradcam.png' per image; a stem met again gets '-2', '-3' so no PNG overwrites another."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}{'' if seen[stem] == 1 else f'-{seen[stem]}'}.gradcam.png")
    return names


def _layout(model: nn.Module, name: str) -> str:
    """nhwc for the families whose stages return channels last (swin); nchw for the rest."""
    if isinstance(model, CutNetwork):
        return model.layout
    try:
        return layout_of(name)
    except KeyError:  # timm: and python: backbones: no torchvision family, feature maps as torch lays them
        return "nchw"


def _to_maps(layout: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Activations as (B, C, H, W) for Grad-CAM: channels-last maps permuted, token sequences (ViT) laid on
    their square grid without the class and distillation tokens in front."""

    def reshape(activations: torch.Tensor) -> torch.Tensor:
        if activations.ndim == 4:
            return activations.permute(0, 3, 1, 2) if layout == "nhwc" else activations
        if activations.ndim == 3:
            side = math.isqrt(activations.shape[1])
            grid = activations[:, activations.shape[1] - side * side :, :]
            return grid.reshape(grid.shape[0], side, side, grid.shape[2]).permute(0, 3, 1, 2)
        raise ValueError(f"cannot lay activations of shape {tuple(activations.shape)} on the image")

    return reshape


def _save_overlay(cam_module: Any, tensor: torch.Tensor, preprocessing: Preprocessing, heat: Any, png: Path) -> None:
    """The heatmap over the image the network was given (resized, cropped, normalisation undone)."""
    import numpy as np
    from PIL import Image

    mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
    std = torch.tensor(preprocessing.std).view(3, 1, 1)
    shown = (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float32)
    Image.fromarray(cam_module.show_cam_on_image(shown, heat, use_rgb=True)).save(png)
