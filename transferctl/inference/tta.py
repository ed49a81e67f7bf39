"""Test-time augmentation: the model's softmax probabilities (a multi-label run's sigmoid scores) averaged
over views of each image.

`flip` averages the image and its horizontal flip, which suits photographs (a flipped dog is a dog) and
hurts where left and right differ (digits, text). The views of a batch go through the model as one batch,
so the data is decoded once. docs/commands.md (evaluate, predict) says when it pays.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from transferctl.errors import ConfigError, Problem, did_you_mean
from transferctl.training.runtime import Runtime, predict_logits

# Each mode's views, the image itself first: its logits are the plain prediction.
TTA_VIEWS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = {
    "none": (lambda images: images,),
    "flip": (lambda images: images, lambda images: images.flip(-1)),  # (N, C, H, W): -1 is the width
}
TTA_CHOICES = tuple(TTA_VIEWS)


def check_tta(tta: str) -> None:
    """Refuse an unknown --tta before any model is loaded."""
    if tta not in TTA_VIEWS:
        raise ConfigError(Problem("--tta", f"'{tta}' is not a test-time augmentation", did_you_mean(tta, TTA_CHOICES)))


def view_logits(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, Any]], runtime: Runtime, tta: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every view of every image, shape (views, images, classes), and the labels."""
    views = TTA_VIEWS[tta]
    sizes: list[int] = []

    def all_views() -> Iterable[tuple[torch.Tensor, Any]]:
        for images, labels in batches:
            sizes.append(len(images))
            yield torch.cat([view(images) for view in views]), labels

    logits, labels = predict_logits(model, all_views(), runtime)
    if not sizes:
        return logits.reshape(len(views), 0, 0), labels
    chunks = logits.split([size * len(views) for size in sizes])
    return torch.cat([chunk.reshape(len(views), size, -1) for chunk, size in zip(chunks, sizes)], dim=1), labels


def averaged_probabilities(logits: torch.Tensor, multi_label: bool = False) -> torch.Tensor:
    """The mean over views (dim 0) of each view's softmax probabilities, or, multi_label, of its sigmoid
    scores (one a class, each read on its own)."""
    return (torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)).mean(dim=0)


def as_logits(probabilities: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax is exactly `probabilities` (their log): metrics written for logits take them.
    A probability that underflowed to 0 becomes the smallest float's log, not -inf."""
    return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()
