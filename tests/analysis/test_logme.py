from __future__ import annotations

import math

import numpy as np
import pytest

from transferctl.analysis.logme import fit_class, log_evidence, logme, spectrum


def gaussian_log_density(features: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y; 0, I/beta + F F'/alpha), computed directly: the evidence LogME must equal."""
    n = len(y)
    covariance = np.eye(n) / beta + features @ features.T / alpha
    sign, log_det = np.linalg.slogdet(covariance)
    assert sign > 0
    return float(-0.5 * (n * math.log(2 * math.pi) + log_det + y @ np.linalg.solve(covariance, y)))


def problem(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, d))
    y = (features[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.float64)
    return features, y


@pytest.mark.parametrize(("n", "d"), [(12, 30), (40, 7), (20, 20)], ids=["N<D", "N>D", "N=D"])
def test_evidence_at_the_optimum_is_the_exact_gaussian_marginal_likelihood(n: int, d: int) -> None:
    features, y = problem(n, d, seed=n + d)
    spec = spectrum(features)
    fit = fit_class(spec, y, tol=1e-10, max_iterations=2000)
    assert fit.log_evidence == pytest.approx(gaussian_log_density(features, y, fit.alpha, fit.beta), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize(("n", "d"), [(10, 25), (30, 5)])
def test_evidence_matches_the_direct_computation_at_any_alpha_and_beta(n: int, d: int) -> None:
    features, y = problem(n, d, seed=7)
    spec = spectrum(features)
    for alpha, beta in [(0.3, 2.0), (5.0, 0.7), (1.0, 1.0)]:
        assert log_evidence(spec, y, alpha, beta) == pytest.approx(gaussian_log_density(features, y, alpha, beta), rel=1e-9)


@pytest.mark.parametrize(("n", "d"), [(12, 30), (40, 7)], ids=["N<D", "N>D"])
def test_the_fixed_point_is_a_maximum(n: int, d: int) -> None:
    features, y = problem(n, d, seed=3)
    spec = spectrum(features)
    fit = fit_class(spec, y, tol=1e-12, max_iterations=5000)
    for scale_alpha, scale_beta in [(1.05, 1.0), (0.95, 1.0), (1.0, 1.05), (1.0, 0.95)]:
        nearby = log_evidence(spec, y, fit.alpha * scale_alpha, fit.beta * scale_beta)
        assert nearby <= fit.log_evidence + 1e-9


def test_without_the_d_minus_k_term_the_evidence_would_be_wrong_when_n_below_d() -> None:
    features, y = problem(10, 40, seed=1)
    spec = spectrum(features)
    fit = fit_class(spec, y)
    exact = gaussian_log_density(features, y, fit.alpha, fit.beta)
    k = min(features.shape)
    dropped = fit.log_evidence + (features.shape[1] - k) * math.log(fit.alpha) / 2
    assert fit.log_evidence == pytest.approx(exact, rel=1e-9)
    assert abs(dropped - exact) > 1e-3


def test_default_tolerance_converges_in_a_few_steps_close_to_the_optimum() -> None:
    features, y = problem(200, 32, seed=5)
    spec = spectrum(features)
    quick, exact = fit_class(spec, y), fit_class(spec, y, tol=1e-12, max_iterations=5000)
    assert quick.iterations <= 11
    assert quick.log_evidence / 200 == pytest.approx(exact.log_evidence / 200, abs=1e-3)


def test_features_that_separate_the_classes_score_higher_than_noise() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    noise = rng.normal(size=(120, 64))
    separable = noise.copy()
    separable[:, :4] += 4.0 * np.eye(4)[labels]
    assert logme(separable, labels) > logme(noise, labels) + 0.1


def test_scores_stay_comparable_across_feature_widths_when_n_below_d() -> None:
    # The same informative features padded with many useless dimensions should not win.
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 10)
    informative = np.eye(3)[labels] * 3.0 + 0.3 * rng.normal(size=(30, 3))
    padded = np.hstack([informative, 0.3 * rng.normal(size=(30, 300))])
    assert logme(informative, labels) > logme(padded, labels)


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="labels must have shape"):
        logme(np.zeros((5, 3)), np.zeros(4))
    with pytest.raises(ValueError, match="N x D"):
        spectrum(np.zeros(5))


# ------------------------------------------------------------------ multi-label targets


def test_a_one_hot_target_matrix_scores_what_its_int_labels_score() -> None:
    rng = np.random.default_rng(5)
    features = rng.normal(size=(30, 8))
    labels = rng.integers(0, 3, size=30)
    one_hot = np.eye(3)[labels]
    assert logme(features, one_hot) == pytest.approx(logme(features, labels), rel=1e-12)


def test_multi_label_targets_score_higher_on_features_that_carry_the_labels() -> None:
    rng = np.random.default_rng(6)
    targets = (rng.random((60, 3)) < 0.5).astype(np.float64)  # independent labels, an image may have several
    informative = np.hstack([targets + 0.3 * rng.normal(size=targets.shape), rng.normal(size=(60, 5))])
    noise = rng.normal(size=(60, 8))
    assert logme(informative, targets) > logme(noise, targets) + 0.1


def test_a_label_column_without_a_positive_image_is_left_out() -> None:
    rng = np.random.default_rng(7)
    features = rng.normal(size=(20, 4))
    targets = (rng.random((20, 2)) < 0.5).astype(np.float64)
    with_empty = np.hstack([targets, np.zeros((20, 1))])
    assert logme(features, with_empty) == pytest.approx(logme(features, targets), rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        logme(features, np.zeros((19, 2)))
