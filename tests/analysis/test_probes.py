from __future__ import annotations

import numpy as np
import pytest

from transferctl.analysis.probes import PROBE_C, PROBE_CS, _scaled, held_out_probe, logme_with_spread, probe, source_agreement

from transferctl.data.sampling import stratified_order, stratified_sample

LABELS = np.repeat(np.arange(4), 30)


def separable(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(len(LABELS), 32))
    features[:, :4] += 5.0 * np.eye(4)[LABELS]
    return features


def noise(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(len(LABELS), 32))


def test_a_probe_reads_separable_features_and_not_noise() -> None:
    assert probe(separable(), LABELS).accuracy > 0.95
    assert probe(noise(), LABELS).accuracy < 0.45  # chance is 0.25


def test_easy_features_gain_nothing_from_more_data() -> None:
    result = probe(separable(), LABELS, with_half=True)
    assert result.half_accuracy is not None and result.gain_from_half is not None
    assert result.gain_from_half < 0.02


def test_weak_wide_features_still_gain_from_more_data() -> None:
    # Many noisy dimensions, each carrying a little signal: a probe on half of the data has clearly less to go on.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 80)
    features = 0.2 * rng.normal(size=(3, 400))[labels] + rng.normal(size=(240, 400))
    result = probe(features, labels, with_half=True)
    assert result.gain_from_half is not None and result.gain_from_half > 0.02


def test_a_probe_without_data_reports_none_for_half() -> None:
    assert probe(separable(), LABELS).gain_from_half is None


def test_folds_never_exceed_the_smallest_class() -> None:
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    features = np.eye(2)[labels] + 0.01 * np.random.default_rng(0).normal(size=(8, 2))
    assert probe(features, labels, folds=5).accuracy == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least two images in every class"):
        probe(features[1:], labels[1:])


def test_source_head_agreement_is_chance_corrected() -> None:
    rng = np.random.default_rng(0)
    relabelled = (LABELS * 7 + 3) % 1000  # every class maps to its own source class
    assert source_agreement(LABELS, relabelled) == pytest.approx(1.0)
    assert abs(source_agreement(LABELS, rng.integers(0, 1000, len(LABELS)))) < 0.05
    assert abs(source_agreement(LABELS, np.full(len(LABELS), 17))) < 1e-9  # one source class for everything


def test_stratified_samples_keep_class_proportions_and_every_class() -> None:
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    sample = stratified_sample(labels, 20, seed=0)
    assert len(sample) == 20 and len(set(sample)) == 20
    counts = np.bincount(labels[sample], minlength=3)
    assert all(abs(got - want) <= 1 for got, want in zip(counts, [12, 6, 2])), counts
    order = stratified_order(labels, seed=1)
    assert set(labels[order[:3]]) == {0, 1, 2}
    assert np.bincount(labels[order[:6]]).tolist() == [2, 2, 2]  # two each: enough to cross-validate
    assert sorted(order.tolist()) == list(range(100))
    assert stratified_sample(labels, 1000, seed=0).tolist() == list(range(100))


def test_logme_spread_is_small_for_clear_features_and_scores_rank_them() -> None:
    clear, clear_spread = logme_with_spread(separable(), LABELS)
    unclear, _ = logme_with_spread(noise(), LABELS)
    assert clear > unclear and 0.0 <= clear_spread < 0.2


def test_on_imbalanced_classes_a_probe_that_learned_nothing_scores_chance_not_the_majority_share() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 150 + [1] * 6)  # 96% one class
    noise = rng.normal(size=(len(labels), 8))  # features that say nothing about the labels
    assert probe(noise, labels, folds=3).accuracy < 0.7  # chance is 0.5; plain accuracy would be about 0.96
    separable = noise + labels[:, None] * 6.0
    assert probe(separable, labels, folds=3).accuracy > 0.95


def test_the_l2_strength_is_chosen_by_cross_validation_not_fixed() -> None:
    # Four informative dimensions among 200 noisy ones, 40 images: a weak penalty fits the noise, so CV picks a
    # strong one; with clean, wide margins a weak penalty loses nothing and CV may take it.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    noisy = rng.normal(size=(40, 200))
    noisy[:, :4] += 1.5 * np.eye(4)[labels]
    chosen = probe(noisy, labels).c
    assert chosen in PROBE_CS and chosen < max(PROBE_CS)
    assert probe(separable(), LABELS).c in PROBE_CS


def test_a_held_out_probe_fits_on_training_images_and_scores_the_others() -> None:
    features = separable()
    train = np.arange(len(LABELS)) % 3 != 0
    result = held_out_probe(features[train], LABELS[train], features[~train], LABELS[~train], with_half=True)
    assert result.accuracy > 0.95 and result.balanced_accuracy > 0.95 and result.folds == 3
    assert result.gain_from_half is not None and abs(result.gain_from_half) < 0.05
    # Labels the probe never saw paired with these features: held out, it cannot read them.
    shuffled = np.random.default_rng(3).permutation(LABELS[~train])
    assert held_out_probe(features[train], LABELS[train], features[~train], shuffled).accuracy < 0.5


def test_cross_validation_finds_the_strength_a_fixed_one_misses() -> None:
    # Four weak but clean informative dimensions beside ten strong noisy ones: after scaling, the signal is small
    # and the old fixed strength (C 0.5) smothers it; the chosen, weaker penalty reads it.
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 120)
    features = np.concatenate([0.2 * np.eye(4)[labels] + 0.1 * rng.normal(size=(480, 4)), 3.0 * rng.normal(size=(480, 10))], axis=1)
    train = np.arange(480) % 2 == 0
    chosen = held_out_probe(features[train], labels[train], features[~train], labels[~train])
    x = _scaled(features, features[train])
    fixed = LogisticRegression(C=PROBE_C, max_iter=1000).fit(x[train], labels[train]).score(x[~train], labels[~train])
    assert chosen.c > PROBE_C and chosen.accuracy > fixed + 0.2


def test_a_class_with_one_training_image_falls_back_to_the_fixed_strength() -> None:
    labels = np.array([0, 0, 0, 1])
    features = np.eye(2)[labels] + 0.01 * np.random.default_rng(0).normal(size=(4, 2))
    result = held_out_probe(features, labels, features, labels)
    assert result.c == PROBE_C and result.folds == 0 and result.accuracy == 1.0


# ------------------------------------------------------------------ multi-label targets


def multi_label_problem(informative: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = (rng.random((90, 3)) < 0.4).astype(np.float64)
    features = rng.normal(size=(90, 16))
    if informative:
        features[:, :3] += 3.0 * targets
    return features, targets


def test_a_multi_label_probe_is_one_vs_rest_scored_by_map_on_the_held_out_images() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from transferctl.training.multi_label_metrics import mean_average_precision

    features, targets = multi_label_problem(informative=True)
    result = held_out_probe(features[:60], targets[:60], features[60:], targets[60:], with_half=True)
    assert result.accuracy == result.balanced_accuracy > 0.9 and result.half_balanced_accuracy is not None
    # The same number as scikit-learn's own one-vs-rest logistic regression at the C chosen, on the same scaling.
    reference = OneVsRestClassifier(LogisticRegression(C=result.c, max_iter=1000)).fit(_scaled(features[:60], features[:60]), targets[:60])
    scores = reference.predict_proba(_scaled(features[60:], features[:60]))
    assert result.balanced_accuracy == pytest.approx(mean_average_precision(targets[60:], scores), abs=1e-3)
    noisy, _ = multi_label_problem(informative=False)
    assert held_out_probe(noisy[:60], targets[:60], noisy[60:], targets[60:]).balanced_accuracy < result.balanced_accuracy - 0.2


def test_cross_validated_probes_and_logme_spread_take_multi_label_targets() -> None:
    features, targets = multi_label_problem(informative=True)
    noisy, _ = multi_label_problem(informative=False)
    assert probe(features, targets, with_half=True).accuracy > probe(noisy, targets).accuracy + 0.2
    score, spread = logme_with_spread(features, targets)
    assert spread > 0 and score > logme_with_spread(noisy, targets)[0]
