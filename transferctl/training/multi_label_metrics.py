"""Multi-label metrics over sigmoid scores and multi-hot targets, with scikit-learn's definitions, and the
per-class thresholds tuned on validation images that predict and export use.

Mean average precision is the macro mean of average_precision_score over the classes that have a positive
image (a class without one has no defined AP: counting it as 0 or 1 would move the mean by chance).
F1 and subset accuracy are at the decision threshold: 0.5 during training, the tuned ones after it.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

DEFAULT_THRESHOLD = 0.5


def decisions(scores: np.ndarray, thresholds: np.ndarray | float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Which labels an image gets: every score at or above its class's threshold."""
    return scores >= np.asarray(thresholds, dtype=scores.dtype)


def average_precisions(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each class's average precision (scikit-learn's); NaN for a class without a positive image."""
    from sklearn.metrics import average_precision_score

    result = np.full(targets.shape[1], np.nan)
    for column in np.flatnonzero(targets.sum(axis=0) > 0):
        result[column] = average_precision_score(targets[:, column], scores[:, column])
    return result


def mean_average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    per_class = average_precisions(targets, scores)
    return float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")


def f1(targets: np.ndarray, predicted: np.ndarray, average: str) -> float:
    """scikit-learn's f1_score over the label matrix (micro or macro; 0 where undefined)."""
    from sklearn.metrics import f1_score

    return float(f1_score(targets.astype(bool), predicted, average=average, zero_division=0))


def subset_accuracy(targets: np.ndarray, predicted: np.ndarray) -> float:
    """The share of images whose every label is right (scikit-learn's accuracy_score on label matrices)."""
    return float((predicted == targets.astype(bool)).all(axis=1).mean()) if len(targets) else float("nan")


def tune_thresholds(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per class, the threshold with the best F1 on these (validation) images: the midpoint between the
    lowest score kept and the next one below, so that an image scored like the ones kept is kept too. A
    class without a positive image keeps DEFAULT_THRESHOLD: there is nothing to tune it on."""
    thresholds = np.full(targets.shape[1], DEFAULT_THRESHOLD)
    for column in np.flatnonzero(targets.sum(axis=0) > 0):
        thresholds[column] = _best_f1_threshold(targets[:, column].astype(bool), scores[:, column].astype(np.float64))
    return thresholds


def _best_f1_threshold(positive: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import precision_recall_curve

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precision, recall, cuts = precision_recall_curve(positive, score)
    f1s = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)[:-1]
    best = int(np.argmax(f1s))  # the first best: the lowest cut, so ties keep more positives
    below = score[score < cuts[best]]
    return float((cuts[best] + below.max()) / 2) if len(below) else float(cuts[best]) / 2


def report(targets: np.ndarray, scores: np.ndarray, thresholds: np.ndarray | float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """The headline numbers at these thresholds: mAP, micro and macro F1, subset accuracy."""
    predicted = decisions(scores, thresholds)
    return {
        "map": mean_average_precision(targets, scores),
        "micro_f1": f1(targets, predicted, "micro"),
        "macro_f1": f1(targets, predicted, "macro"),
        "subset_accuracy": subset_accuracy(targets, predicted),
    }
