"""Measures on extracted features: linear probes, learning gain, agreement with a source head, LogME spread.

Pure numpy and scikit-learn, no torch: the callers hand in feature matrices. Small dense problems like
these run fastest on one BLAS thread; on a shared CPU, multi-threaded OpenBLAS spins and can be 100x
slower (measured: a 1000 x 512 SVD took 15 s on two busy cores, 0.15 s on one), so every public
function here runs under `one_blas_thread()`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from transferctl.logme import logme

PROBE_C = 0.5  # inverse L2 strength on features scaled to unit mean variance per dimension
PROBE_MAX_ITER = 200


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float  # balanced accuracy (mean recall over classes), mean over the cross-validation folds
    half_accuracy: float | None = None  # the same folds, trained on a stratified half of each training part

    @property
    def gain_from_half(self) -> float | None:
        """Accuracy points (0-1) still gained between half and all of the training data."""
        return None if self.half_accuracy is None else self.accuracy - self.half_accuracy


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of the indices whose every prefix is a stratified sample: one image of each class, then a
    second of each (a cross-validated probe needs two), then the classes in proportion.

    Each class is shuffled; its first two members go to the front rounds, its i-th member gets the position
    (i + u) / count with u uniform in [0, 1), and the rest follow by position, so a prefix of length
    n >= 2 x classes holds two of every class (that has two) and about n * share of each.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    positions = np.empty(len(labels))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        positions[members] = (np.arange(len(members)) + rng.uniform(0.0, 1.0)) / len(members)
        front = members[:2]
        positions[front] = np.arange(len(front)) - 2.0 + rng.uniform(0.0, 0.5)
    return np.argsort(positions, kind="stable")


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a class-proportional sample of n items (all of them when n >= len(labels))."""
    return np.sort(stratified_order(labels, seed)[: min(n, len(labels))])


def folds_for(labels: np.ndarray, wanted: int) -> int:
    """As many folds as asked, but no more than the smallest class has members (each fold needs one)."""
    _, counts = np.unique(labels, return_counts=True)
    return int(min(wanted, counts.min()))


def probe(features: np.ndarray, labels: np.ndarray, folds: int = 3, seed: int = 0, with_half: bool = False) -> ProbeResult:
    """Cross-validated balanced accuracy of a linear probe (multinomial logistic regression on centred, scaled features).

    Folds are stratified. With `with_half`, each fold also trains on a stratified half of its training part
    and is scored on the same held-out part, which measures what doubling the data still buys.
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    n_folds = folds_for(labels, folds)
    if n_folds < 2:
        raise ValueError("a cross-validated probe needs at least two images in every class")
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    full, half = [], []
    with one_blas_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a probe that stops at max_iter is still a probe
        for fold, (train, test) in enumerate(splitter.split(features, labels)):
            full.append(_fit_score(features, labels, train, test))
            if with_half:
                kept = train[stratified_sample(labels[train], max(len(train) // 2, 1), seed + fold)]
                half.append(_fit_score(features, labels, kept, test))
    return ProbeResult(float(np.mean(full)), float(np.mean(half)) if with_half else None)


def _fit_score(features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression

    from sklearn.metrics import balanced_accuracy_score

    if len(np.unique(labels[train])) < 2:
        return float(balanced_accuracy_score(labels[test], np.full(len(test), labels[train][0])))
    # Centre, and scale by one number for all dimensions: the penalty then means the same on every layer and
    # backbone, while strong dimensions stay strong. (Per-dimension standardisation would lift rarely active,
    # noisy ReLU units to the level of the informative ones.)
    mean = features[train].mean(axis=0)
    scale = float(np.sqrt(np.mean((features[train] - mean) ** 2))) or 1.0
    model = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER)
    model.fit((features[train] - mean) / scale, labels[train])
    # Balanced (the mean of the classes' recalls): on 150 circles and 6 squares, plain accuracy is 96% for a
    # probe that answers "circle" to everything, pretrained or random, and every comparison would read "no gain".
    return float(balanced_accuracy_score(labels[test], model.predict((features[test] - mean) / scale)))


def source_agreement(labels: np.ndarray, source_predictions: np.ndarray) -> float:
    """Adjusted mutual information between the labels and the source head's argmax (0 = chance, 1 = a relabelling)."""
    from sklearn.metrics import adjusted_mutual_info_score

    with one_blas_thread():
        return float(adjusted_mutual_info_score(labels, source_predictions))


def logme_with_spread(features: np.ndarray, labels: np.ndarray, subsamples: int = 3, seed: int = 0) -> tuple[float, float]:
    """LogME on all rows, and the standard deviation of LogME over stratified halves (its noise on this data)."""
    labels = np.asarray(labels)
    with one_blas_thread():
        score = logme(features, labels)
        halves = [logme(features[idx], labels[idx]) for idx in _halves(labels, subsamples, seed)]
    return score, float(np.std(halves)) if len(halves) > 1 else 0.0


def _halves(labels: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
    if len(labels) < 4:
        return []
    return [stratified_sample(labels, len(labels) // 2, seed + 1 + i) for i in range(count)]
