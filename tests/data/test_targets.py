"""Labels and training targets: class indices, or multi-hot rows for multi-label images."""

from __future__ import annotations

import numpy as np

from transferctl.data.targets import class_counts, strata, stratum, target_array


def test_single_labels_stay_indices_and_label_sets_become_multi_hot_rows() -> None:
    assert target_array([2, 0, 1], 3, False).tolist() == [2, 0, 1]
    hot = target_array([(0, 2), (1,), (0, 1, 2)], 3, True)
    assert hot.dtype == np.float32 and hot.tolist() == [[1, 0, 1], [0, 1, 0], [1, 1, 1]]


def test_a_multi_label_image_counts_for_each_class_and_is_split_by_its_rarest() -> None:
    labels = [(0, 1), (0,), (0, 2), (1, 2), (0,)]
    counts = class_counts(labels)
    assert counts == {0: 4, 1: 2, 2: 2}
    assert [stratum(label, counts) for label in labels] == [1, 0, 2, 1, 0]


def test_strata_of_multi_hot_rows_are_the_stratum_of_each_label_set() -> None:
    labels = [(0, 1), (0,), (0, 2), (1, 2), (0,), ()]
    counts = class_counts(labels)
    assert strata(target_array(labels, 3, True)).tolist() == [stratum(label, counts) for label in labels] == [1, 0, 2, 1, 0, -1]
    assert strata(np.array([2, 0, 1])).tolist() == [2, 0, 1]  # class indices are their own strata
