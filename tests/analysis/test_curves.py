"""The learning-curve measures on hand-made curves whose answers are worked out in the comments."""

from __future__ import annotations

import math

import pytest

from transferctl.analysis.curves import (
    Stat,
    asymptote,
    asymptotic_gain,
    auc,
    best_few_count,
    jumpstart,
    mean_band,
    measure,
    negative_transfer,
    speedup,
    summarize,
    summarize_measures,
    time_to_threshold,
    transfer_ratio,
)

SCRATCH = [0.2, 0.4, 0.6, 0.8]  # best 0.8, threshold 0.76: reached at epoch 4
TRANSFER = [0.6, 0.8, 0.8, 0.9]  # reaches 0.76 at epoch 2


def test_auc_is_the_trapezoid_mean_over_epochs() -> None:
    # intervals: (0.2+0.4)/2, (0.4+0.6)/2, (0.6+0.8)/2 = 0.3, 0.5, 0.7 -> mean 0.5
    assert auc(SCRATCH) == pytest.approx(0.5)
    # (0.7 + 0.8 + 0.85) / 3
    assert auc(TRANSFER) == pytest.approx(2.35 / 3)
    assert auc([0.7]) == 0.7
    assert auc([0.5, 0.5, 0.5]) == pytest.approx(0.5)


def test_jumpstart_compares_the_first_epochs() -> None:
    assert jumpstart(TRANSFER, SCRATCH) == pytest.approx(0.4)
    assert jumpstart(SCRATCH, TRANSFER) == pytest.approx(-0.4)


def test_transfer_ratio() -> None:
    assert transfer_ratio(TRANSFER, SCRATCH) == pytest.approx((2.35 / 3 - 0.5) / 0.5)
    assert transfer_ratio(SCRATCH, SCRATCH) == 0.0
    assert transfer_ratio(TRANSFER, [0.0, 0.0]) is None  # undefined, not infinite


def test_asymptote_is_the_mean_of_the_best_quarter() -> None:
    assert [best_few_count(n) for n in (1, 2, 4, 5, 8, 10, 12)] == [1, 1, 1, 2, 2, 3, 3]
    assert asymptote(SCRATCH) == pytest.approx(0.8)  # best 1 of 4
    # 8 epochs: the best 2 are 0.9 and 0.7, wherever they are
    assert asymptote([0.1, 0.9, 0.2, 0.3, 0.7, 0.4, 0.5, 0.6]) == pytest.approx(0.8)
    assert asymptotic_gain(TRANSFER, SCRATCH) == pytest.approx(0.1)


def test_time_to_threshold_and_speedup() -> None:
    assert time_to_threshold(SCRATCH, 0.76) == 4
    assert time_to_threshold(TRANSFER, 0.76) == 2
    assert time_to_threshold(SCRATCH, 0.95) is None
    assert speedup(TRANSFER, SCRATCH) == pytest.approx(2.0)  # 4 / 2
    assert speedup([0.1, 0.2, 0.3, 0.4], SCRATCH) is None  # never reaches 0.76
    assert speedup(SCRATCH, SCRATCH) == 1.0


def test_measure_bundles_one_seed() -> None:
    m = measure(TRANSFER, SCRATCH)
    assert m.jumpstart == pytest.approx(0.4)
    assert m.asymptote == pytest.approx(0.9)
    assert m.time_to_threshold == 2
    assert m.speedup == pytest.approx(2.0)


def test_summarize_mean_sd_and_missing_values() -> None:
    stat = summarize([1.0, 2.0, 3.0])
    assert (stat.mean, stat.sd, stat.n, stat.of) == (2.0, 1.0, 3, 3)
    assert stat.text(1) == "2.0 ± 1.0"
    one = summarize([0.5])
    assert one.sd is None and one.text(2) == "0.50"
    partial = summarize([2.0, None, 4.0])
    assert partial.mean == 3.0 and partial.sd == pytest.approx(math.sqrt(2)) and partial.n == 2 and partial.of == 3
    assert partial.text(1).endswith("(2 of 3)")
    assert summarize([None, None]).text() == "—"


def test_summarize_measures_over_seeds() -> None:
    stats = summarize_measures([measure(TRANSFER, SCRATCH), measure(SCRATCH, SCRATCH)])
    assert stats["jumpstart"].mean == pytest.approx(0.2)
    assert stats["jumpstart"].sd == pytest.approx(math.sqrt(0.08))
    assert stats["speedup"].mean == pytest.approx(1.5)


def test_negative_transfer_needs_a_gain_below_zero_by_more_than_the_spread() -> None:
    assert negative_transfer(Stat(-0.05, 0.01, 3, 3))
    assert not negative_transfer(Stat(-0.05, 0.10, 3, 3))  # within the noise
    assert not negative_transfer(Stat(0.05, 0.01, 3, 3))
    assert negative_transfer(Stat(-0.01, None, 1, 1))  # one seed: no spread to hide in
    assert not negative_transfer(Stat(None, None, 0, 2))


def test_mean_band() -> None:
    mean, sd = mean_band([[0.0, 1.0], [1.0, 1.0]])
    assert mean == [0.5, 1.0]
    assert sd == pytest.approx([math.sqrt(0.5), 0.0])
    assert mean_band([[0.3, 0.4]]) == ([0.3, 0.4], None)
    with pytest.raises(ValueError):
        mean_band([[0.1], [0.1, 0.2]])


def test_empty_curves_are_a_bug() -> None:
    with pytest.raises(ValueError):
        auc([])
