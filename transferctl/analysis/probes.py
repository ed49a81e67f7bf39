"""Measures on extracted features: linear probes, learning gain, agreement with a source head, LogME spread.

Labels are one class an image (N ints), or multi-label targets (an N x classes 0/1 matrix). On multi-label
targets a probe is one-vs-rest: one binary logistic regression a label, scored by mean average precision
(multi_label_metrics, what training reports as val_map) wherever single-label probes give accuracy; folds
and halves are stratified by each image's rarest label (data.targets.stratum).

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

from transferctl.analysis.logme import logme
from transferctl.data.sampling import stratified_sample
from transferctl.data.targets import strata
from transferctl.training.multi_label_metrics import mean_average_precision

# Inverse L2 strengths tried, strongest first (each fit warm-starts from the last), on features centred and
# scaled to unit mean variance per dimension: the penalty then means the same on every layer and backbone.
PROBE_CS = (1.0e-3, 1.0e-2, 1.0e-1, 1.0, 10.0, 100.0)
PROBE_C = 0.5  # when some class has a single image, so that no fold can hold it out: no choice by CV
PROBE_MAX_ITER = 1000  # L-BFGS iterations: enough to converge (a few dozen steps leave a probe under-trained)


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float  # balanced accuracy (mean recall over classes), mean over the cross-validation folds
    half_accuracy: float | None = None  # the same folds, trained on a stratified half of each training part
    c: float = PROBE_C  # the inverse L2 strength cross-validation chose

    @property
    def gain_from_half(self) -> float | None:
        """Accuracy points (0-1) still gained between half and all of the training data."""
        return None if self.half_accuracy is None else self.accuracy - self.half_accuracy


@dataclass(frozen=True)
class HeldOutProbe:
    """A probe fitted on every training image (C chosen by CV among them) and scored on held-out images."""

    accuracy: float  # plain accuracy on the held-out images: what training reports as val_acc
    balanced_accuracy: float
    c: float
    folds: int  # of the cross-validation that chose c; 0: a class had one image, c is PROBE_C
    half_balanced_accuracy: float | None = None  # fitted on a stratified half of the training images

    @property
    def gain_from_half(self) -> float | None:
        return None if self.half_balanced_accuracy is None else self.balanced_accuracy - self.half_balanced_accuracy


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def folds_for(labels: np.ndarray, wanted: int) -> int:
    """As many folds as asked, but no more than the smallest class (stratum) has members (each fold needs one)."""
    _, counts = np.unique(strata(labels), return_counts=True)
    return int(min(wanted, counts.min()))


def is_multi_label(labels: np.ndarray) -> bool:
    return np.ndim(labels) == 2


def probe(features: np.ndarray, labels: np.ndarray, folds: int = 3, seed: int = 0, with_half: bool = False) -> ProbeResult:
    """Cross-validated balanced accuracy of a linear probe (multinomial logistic regression, fitted to convergence).

    The L2 strength is chosen by the same stratified folds (the best mean score over PROBE_CS), and the
    accuracy is that best mean: a slight optimism, shared by every probe compared with it. With `with_half`,
    each fold also trains at the chosen strength on a stratified half of its training part and is scored on
    the same held-out part, which measures what doubling the data still buys.
    """
    labels = np.asarray(labels)
    n_folds = folds_for(labels, folds)
    if n_folds < 2:
        raise ValueError("a cross-validated probe needs at least two images in every class")
    with one_blas_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at large C on separable data: the ranking holds
        x = _scaled(features, features)
        splits = _splits(labels, n_folds, seed)
        scores = np.array([_path_scores(x, labels, train, test) for train, test in splits])  # (folds, Cs, 2)
        best = _best_c(scores)
        half = None
        if with_half:
            half = float(np.mean([_fit_score(x, labels, train[stratified_sample(strata(labels[train]), max(len(train) // 2, 1), seed + fold)], test, PROBE_CS[best])[1]
                                  for fold, (train, test) in enumerate(splits)]))  # fmt: skip
    return ProbeResult(float(scores[:, best, 0].mean()), half, PROBE_CS[best])


def held_out_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray,
                   folds: int = 3, seed: int = 0, with_half: bool = False) -> HeldOutProbe:  # fmt: skip
    """A probe as training will see it: C chosen by cross-validation within the training images only, fitted to
    convergence on all of them, scored on held-out images it never saw (the validation split).

    With `with_half`, the same C is also fitted on a stratified half of the training images and scored on the
    same held-out images: what the second half of the training data still buys.
    """
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    n_folds = folds_for(train_labels, folds)
    everything = np.arange(len(train_labels))
    with one_blas_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = _scaled(train_features, train_features)
        c = PROBE_C
        if n_folds >= 2:
            c = PROBE_CS[_best_c(np.array([_path_scores(x, train_labels, train, test) for train, test in _splits(train_labels, n_folds, seed)]))]
        both = np.concatenate([x, _scaled(test_features, train_features)])
        labels = np.concatenate([train_labels, test_labels])
        test = np.arange(len(train_labels), len(labels))
        accuracy, balanced = _fit_score(both, labels, everything, test, c)
        half = None
        if with_half:
            kept = stratified_sample(strata(train_labels), max(len(train_labels) // 2, 1), seed)
            half = _fit_score(both, labels, kept, test, c)[1]
    return HeldOutProbe(accuracy, balanced, c, n_folds if n_folds >= 2 else 0, half)


def _scaled(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Centre, and scale by one number for all dimensions, both from `reference` (the images a probe fits on).

    One number: the penalty then means the same on every layer and backbone while strong dimensions stay
    strong (per-dimension standardisation would lift rarely active, noisy ReLU units to the level of the
    informative ones)."""
    reference = np.asarray(reference, dtype=np.float64)
    mean = reference.mean(axis=0)
    scale = float(np.sqrt(np.mean((reference - mean) ** 2))) or 1.0
    return (np.asarray(features, dtype=np.float64) - mean) / scale


def _splits(labels: np.ndarray, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), strata(labels)))


def _path_scores(x: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """(balanced accuracy, -log loss) on `test` for every C in PROBE_CS, fitted on `train` strongest first, each
    fit warm-started from the last (the regularisation path costs little more than its last fit)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, log_loss

    if is_multi_label(labels):
        return np.array([[_map_score(labels[test], scores), -_mean_log_loss(labels[test], scores)]
                         for scores in _one_vs_rest_scores(x, labels, train, test, PROBE_CS)])  # fmt: skip
    classes = np.unique(labels[train])
    if len(classes) < 2:
        score = float(balanced_accuracy_score(labels[test], np.full(len(test), classes[0])))
        return np.array([[score, 0.0]] * len(PROBE_CS))
    model = LogisticRegression(C=PROBE_CS[0], max_iter=PROBE_MAX_ITER, warm_start=True)
    rows = []
    for c in PROBE_CS:
        model.set_params(C=c)
        model.fit(x[train], labels[train])
        probabilities = model.predict_proba(x[test])
        predicted = model.classes_[probabilities.argmax(axis=1)]
        rows.append([balanced_accuracy_score(labels[test], predicted), -log_loss(labels[test], probabilities, labels=model.classes_)])
    return np.array(rows)


def _best_c(scores: np.ndarray) -> int:
    """Index into PROBE_CS of the best mean balanced accuracy over folds; ties (common on small or easy data)
    go to the better held-out log loss, then to the stronger penalty."""
    mean = scores.mean(axis=0)
    return int(max(range(len(PROBE_CS)), key=lambda i: (round(mean[i, 0], 9), mean[i, 1], -i)))


def _fit_score(x: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, c: float) -> tuple[float, float]:
    """(accuracy, balanced accuracy) on `test` of a probe fitted on `train` at inverse strength c.

    Balanced (the mean of the classes' recalls): on 150 circles and 6 squares, plain accuracy is 96% for a
    probe that answers "circle" to everything, pretrained or random, and every comparison would read "no gain".
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    if is_multi_label(labels):  # mAP stands for both: there is no class an image to be right about
        score = _map_score(labels[test], _one_vs_rest_scores(x, labels, train, test, (c,))[0])
        return score, score
    classes = np.unique(labels[train])
    if len(classes) < 2:
        predicted = np.full(len(test), classes[0])
    else:
        predicted = LogisticRegression(C=c, max_iter=PROBE_MAX_ITER).fit(x[train], labels[train]).predict(x[test])
    return float(accuracy_score(labels[test], predicted)), float(balanced_accuracy_score(labels[test], predicted))


def _one_vs_rest_scores(x: np.ndarray, targets: np.ndarray, train: np.ndarray, test: np.ndarray, cs: tuple[float, ...]) -> np.ndarray:
    """(len(cs), len(test), labels) sigmoid scores of one binary logistic regression a label, fitted on `train` at
    each C in turn, warm-started from the last. A label with one value in `train` gets that value as its score."""
    from sklearn.linear_model import LogisticRegression

    scores = np.empty((len(cs), len(test), targets.shape[1]))
    for column in range(targets.shape[1]):
        y = targets[train, column]
        if y.min() == y.max():
            scores[:, :, column] = y[0]
            continue
        model = LogisticRegression(C=cs[0], max_iter=PROBE_MAX_ITER, warm_start=True)
        for index, c in enumerate(cs):
            model.set_params(C=c)
            scores[index, :, column] = model.fit(x[train], y).predict_proba(x[test])[:, 1]
    return scores


def _map_score(targets: np.ndarray, scores: np.ndarray) -> float:
    """mAP over the labels with a positive image here; 0 where none has one (the same for every C, so no choice moves)."""
    value = mean_average_precision(targets, scores)
    return 0.0 if np.isnan(value) else value


def _mean_log_loss(targets: np.ndarray, scores: np.ndarray) -> float:
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    return float(-np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p)))


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
    return [stratified_sample(strata(labels), len(labels) // 2, seed + 1 + i) for i in range(count)]
