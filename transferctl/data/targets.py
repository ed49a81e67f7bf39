"""What an image's label is, and the target a model trains on.

Single-label data gives each image one class (an int). Multi-label data gives each image a set of classes
(a sorted tuple of ints), which trains as a multi-hot row: one sigmoid output per class. See
docs/experiment-file.md (Multi-label).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Union

import numpy as np

Label = Union[int, tuple[int, ...]]  # one class, or the classes of a multi-label image
MULTI_LABEL_SEPARATOR = "|"  # between the labels of one CSV cell: cat|dog


def classes_of(label: Label) -> tuple[int, ...]:
    return label if isinstance(label, tuple) else (label,)


def target_array(labels: Sequence[Label], classes: int, multi_label: bool) -> np.ndarray:
    """Class indices (int64, one per image), or multi-hot rows (float32, images x classes) for multi-label."""
    if not multi_label:
        return np.asarray(labels, dtype=np.int64)
    hot = np.zeros((len(labels), classes), dtype=np.float32)
    for row, label in enumerate(labels):
        hot[row, list(classes_of(label))] = 1.0
    return hot


def class_counts(labels: Sequence[Label]) -> Counter[int]:
    """Images per class: a multi-label image counts once for each of its classes."""
    return Counter(index for label in labels for index in classes_of(label))


def stratum(label: Label, counts: Counter[int]) -> int:
    """The class an image is split and sampled by: its own, or a multi-label image's rarest one (so that
    splitting per stratum still gives every rare class training and validation images); -1 for an image
    of none of the classes."""
    return min(classes_of(label), key=lambda index: (counts[index], index), default=-1)


def strata(targets: np.ndarray) -> np.ndarray:
    """stratum for an array of targets: class indices stay as they are; multi-hot rows give their rarest
    label (ties: the lower index), -1 for a row of none."""
    targets = np.asarray(targets)
    if targets.ndim != 2:
        return targets
    counts = targets.sum(axis=0)
    rarity = np.where(targets > 0, counts[None, :], np.inf)
    return np.where(targets.any(axis=1), rarity.argmin(axis=1), -1)
