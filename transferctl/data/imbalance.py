"""Classes of very different sizes: the balanced sampler's weights (data.sampler: balanced) and the warning
that `init` and `check` give when the smallest class has less than a tenth of the largest.

The options that help and what they do: docs/experiment-file.md (Imbalanced classes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from transferctl.config import ExperimentConfig
from transferctl.data.folders import DatasetSplits
from transferctl.data.targets import class_counts

IMBALANCE_RATIO = 10  # largest class / smallest class from which init and check warn
# The settings that help with imbalanced classes, as a user writes them, in the order worth trying.
IMBALANCE_OPTIONS = {"loss.class_weights": "balanced", "data.sampler": "balanced", "early_stopping.metric": "balanced_acc"}
# Multi-label: the sampler and balanced accuracy need one class an image, and val_map already weighs labels alike.
MULTI_LABEL_IMBALANCE_OPTIONS = {"loss.class_weights": "balanced"}


def balanced_sample_weights(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Each image's weight for WeightedRandomSampler-style draws that pick every class equally often:
    scikit-learn's compute_sample_weight('balanced'), n / (classes x images of its class)."""
    from sklearn.utils.class_weight import compute_sample_weight

    return compute_sample_weight("balanced", np.asarray(labels))


def imbalance_warning(counts: Mapping[str, int], chosen: Mapping[str, str] | None = None, where: str = "data.root", multi_label: bool = False) -> str | None:
    """A line when the smallest class has less than 1/IMBALANCE_RATIO of the largest's images, naming the
    options of IMBALANCE_OPTIONS (multi-label: those that apply to it) not already `chosen` (field -> value);
    None when balanced enough or all are set."""
    if not counts:
        return None
    largest = max(counts, key=lambda name: (counts[name], name))
    smallest = min(counts, key=lambda name: (counts[name], name))
    if counts[smallest] * IMBALANCE_RATIO >= counts[largest]:
        return None
    chosen = chosen or {}
    options = MULTI_LABEL_IMBALANCE_OPTIONS if multi_label else IMBALANCE_OPTIONS
    helping = [f"{field}: {value}" for field, value in options.items() if chosen.get(field) != value]
    if not helping:
        return None
    plural = "" if counts[smallest] == 1 else "s"
    return (f"{where}: imbalanced {'labels' if multi_label else 'classes'}, the smallest ({smallest}, {counts[smallest]} image{plural}) has less than a tenth of the largest "
            f"({largest}, {counts[largest]}); consider {', '.join(helping)}")  # fmt: skip


def imbalance_notices(config: ExperimentConfig, splits: DatasetSplits) -> list[str]:
    """`check`'s warning about the training images' classes, naming the options the experiment does not set yet
    (a list of class weights counts as set)."""
    counts = class_counts([label for _, label in splits.train])
    chosen = {
        "loss.class_weights": "balanced" if config.loss.class_weights != "none" else "none",
        "data.sampler": config.data.sampler,
        "early_stopping.metric": "balanced_acc" if config.early_stopping.metric in ("balanced_acc", "macro_f1") else config.early_stopping.metric,
    }
    warning = imbalance_warning({name: counts[label] for label, name in enumerate(splits.classes)}, chosen, "data.root (training images)", splits.multi_label)
    return [warning] if warning else []
