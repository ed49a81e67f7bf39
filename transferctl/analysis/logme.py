"""LogME (You et al., ICML 2021): how well features F explain the labels, as a Bayesian linear model's evidence.

For each class c, the one-vs-rest indicator y (N) is regressed on F (N x D) with a prior w ~ N(0, 1/alpha I)
and noise N(0, 1/beta I). The log evidence, maximised over alpha and beta, is

    log p = D/2 log alpha + N/2 log beta - N/2 log 2pi - beta/2 |y - F m|^2 - alpha/2 |m|^2 - 1/2 log|A|
    A = alpha I + beta F'F,   m = beta A^-1 F'y

and the score is the mean over classes of log p / N. One thin SVD F = U S V' turns every term into a sum
over the k = min(N, D) singular values, so each class and each fixed-point step costs O(k).

Multi-label targets (a multi-hot matrix, images x classes) are scored the same way: each label column is its
own 0/1 regression target, exactly as a one-hot column is for one class, and the score is the mean over the
columns of log p / N (a one-hot matrix scores what its int labels score). A column without a positive image
is left out, as a class absent from int labels is: an all-zero target is fitted perfectly by any features.

`log|A|` sums all D eigenvalues of A, the D - k that equal alpha included: the widely copied reference code
drops (D - k) log alpha, which is wrong when N < D and makes features of different widths incomparable.
Pure numpy; no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TOLERANCE = 1e-3  # stop when alpha/beta moves by less than this (relative)
MAX_ITERATIONS = 50  # the fixed point usually settles in 2-5 steps; each step is O(k)


@dataclass(frozen=True)
class Spectrum:
    """What LogME needs of F: its singular values and the left singular vectors, computed once."""

    singular_values: np.ndarray  # (k,)
    left_vectors: np.ndarray  # U, (N, k)
    n: int
    d: int

    @property
    def eigenvalues(self) -> np.ndarray:
        """The non-zero-dimension eigenvalues of F'F: sigma_i = s_i^2."""
        return self.singular_values**2


@dataclass(frozen=True)
class ClassFit:
    alpha: float
    beta: float
    log_evidence: float  # log p(y | F, alpha, beta), not divided by N
    iterations: int


def spectrum(features: np.ndarray) -> Spectrum:
    """The thin SVD of F (float64), the only O(N D min(N, D)) step."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 1 or f.shape[1] < 1:
        raise ValueError(f"features must be a non-empty N x D matrix, got shape {f.shape}")
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    return Spectrum(s, u, f.shape[0], f.shape[1])


def log_evidence(spec: Spectrum, y: np.ndarray, alpha: float, beta: float) -> float:
    """Exact log p(y | F, alpha, beta) from the SVD; equals the log density of N(0, I/beta + F F'/alpha) at y."""
    z, outside = _project(spec, y)
    sigma = spec.eigenvalues
    denom = alpha + beta * sigma
    m_sq = float(np.sum(beta**2 * sigma * z**2 / denom**2))
    residual_sq = float(np.sum((alpha * z / denom) ** 2)) + outside
    k = len(sigma)
    log_det_a = float(np.sum(np.log(denom))) + (spec.d - k) * math.log(alpha)
    return (
        spec.d / 2 * math.log(alpha)
        + spec.n / 2 * math.log(beta)
        - spec.n / 2 * math.log(2 * math.pi)
        - beta / 2 * residual_sq
        - alpha / 2 * m_sq
        - log_det_a / 2
    )


def fit_class(spec: Spectrum, y: np.ndarray, tol: float = TOLERANCE, max_iterations: int = MAX_ITERATIONS) -> ClassFit:
    """Maximise the evidence over alpha and beta by MacKay's fixed point, starting at alpha = beta = 1."""
    z, outside = _project(spec, y)
    sigma = spec.eigenvalues
    alpha, beta = 1.0, 1.0
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        denom = alpha + beta * sigma
        gamma = float(np.sum(beta * sigma / denom))
        m_sq = float(np.sum(beta**2 * sigma * z**2 / denom**2))
        residual_sq = float(np.sum((alpha * z / denom) ** 2)) + outside
        # Floors keep a perfectly fitted (or all-zero) indicator from dividing by zero.
        new_alpha = gamma / max(m_sq, 1e-300) if gamma > 0 else alpha
        new_beta = (spec.n - gamma) / max(residual_sq, 1e-300)
        new_alpha, new_beta = max(new_alpha, 1e-300), max(new_beta, 1e-300)
        ratio, new_ratio = alpha / beta, new_alpha / new_beta
        alpha, beta = new_alpha, new_beta
        if abs(new_ratio - ratio) <= tol * ratio:
            break
    return ClassFit(alpha, beta, log_evidence(spec, y, alpha, beta), iterations)


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The LogME score: the mean over classes of the maximised log evidence per sample (higher is better).
    `labels`: one class an image (N ints), or multi-label targets (an N x classes 0/1 matrix)."""
    return logme_from_spectrum(spectrum(features), labels)


def logme_from_spectrum(spec: Spectrum, labels: np.ndarray) -> float:
    evidences = [fit_class(spec, y).log_evidence for y in indicator_columns(labels, spec.n)]
    return float(np.mean(evidences)) / spec.n


def indicator_columns(labels: np.ndarray, n: int) -> list[np.ndarray]:
    """The 0/1 targets LogME regresses: one a class present in int labels, or each column of a multi-hot
    matrix that has a positive image (an all-zero column says nothing about the features)."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[0] == n:
        return [column.astype(np.float64) for column in labels.T if column.any()]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) or ({n}, classes), got {labels.shape}")
    return [(labels == c).astype(np.float64) for c in np.unique(labels)]


def _project(spec: Spectrum, y: np.ndarray) -> tuple[np.ndarray, float]:
    """z = U'y and |y|^2 - |z|^2, the part of y outside the column space of F."""
    y = np.asarray(y, dtype=np.float64)
    z = spec.left_vectors.T @ y
    return z, max(float(y @ y - z @ z), 0.0)
