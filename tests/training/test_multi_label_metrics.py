"""Multi-label metrics and thresholds, against scikit-learn's own definitions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score

from transferctl.training.multi_label_metrics import decisions, mean_average_precision, report, subset_accuracy, tune_thresholds


def scored(seed: int = 0, images: int = 60, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = (rng.random((images, classes)) < 0.4).astype(np.float32)
    scores = np.clip(0.35 * targets + rng.random((images, classes)) * 0.65, 0, 1).astype(np.float32)
    return targets, scores


def test_map_is_scikit_learns_macro_average_precision() -> None:
    targets, scores = scored()
    assert mean_average_precision(targets, scores) == pytest.approx(average_precision_score(targets, scores, average="macro"))


def test_a_class_without_a_positive_image_is_left_out_of_the_mean() -> None:
    targets, scores = scored()
    targets[:, 3] = 0
    expected = np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in range(3)])
    assert mean_average_precision(targets, scores) == pytest.approx(expected)


def test_report_gives_scikit_learns_f1_and_subset_accuracy_at_the_threshold() -> None:
    targets, scores = scored(1)
    numbers = report(targets, scores, 0.5)
    predicted = scores >= 0.5
    assert numbers["micro_f1"] == pytest.approx(f1_score(targets, predicted, average="micro", zero_division=0))
    assert numbers["macro_f1"] == pytest.approx(f1_score(targets, predicted, average="macro", zero_division=0))
    assert numbers["subset_accuracy"] == pytest.approx(np.mean((predicted == targets.astype(bool)).all(axis=1)))
    assert subset_accuracy(targets, targets.astype(bool)) == 1.0


def test_each_tuned_threshold_gives_its_class_the_best_f1_on_those_images() -> None:
    targets, scores = scored(2)
    thresholds = tune_thresholds(targets, scores)
    tuned = decisions(scores, thresholds)
    for column in range(targets.shape[1]):
        best = max(f1_score(targets[:, column], scores[:, column] >= cut, zero_division=0) for cut in np.unique(scores[:, column]))
        assert f1_score(targets[:, column], tuned[:, column], zero_division=0) == pytest.approx(best)
    assert report(targets, scores, thresholds)["macro_f1"] >= report(targets, scores)["macro_f1"]


def test_a_threshold_lies_between_the_scores_it_separates_and_a_class_never_true_keeps_a_half() -> None:
    targets = np.array([[1, 0], [1, 0], [0, 0], [0, 0]], dtype=np.float32)
    scores = np.array([[0.9, 0.1], [0.7, 0.2], [0.3, 0.3], [0.1, 0.4]], dtype=np.float32)
    thresholds = tune_thresholds(targets, scores)
    assert thresholds[0] == pytest.approx(0.5) and thresholds[1] == 0.5
