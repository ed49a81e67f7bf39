"""data/imbalance.py and data.sampler: balanced: class-balanced draws that depend only on (seed, epoch), and the
warning init and check give about imbalanced classes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from transferctl.data.folders import EpochSampler, make_loader, set_loader_epoch
from transferctl.data.imbalance import balanced_sample_weights, imbalance_warning
from transferctl.data.sharding import Shard

# 90 images of class 0, 10 of class 1 and 5 of class 2.
LABELS = np.repeat([0, 1, 2], [90, 10, 5])


def drawn_classes(sampler: EpochSampler) -> Counter[int]:
    return Counter(int(LABELS[index]) for index, _ in sampler)


def test_balanced_weights_are_scikit_learns_and_draw_every_class_about_equally() -> None:
    weights = balanced_sample_weights(LABELS)
    np.testing.assert_allclose(weights[[0, 90, 100]], [105 / (3 * 90), 105 / (3 * 10), 105 / (3 * 5)])
    sampler = EpochSampler(len(LABELS), seed=0, weights=weights)
    drawn: Counter[int] = Counter()
    for epoch in range(1, 21):
        sampler.set_epoch(epoch)
        drawn += drawn_classes(sampler)
    assert sum(drawn.values()) == 20 * len(LABELS)  # as many draws an epoch as there are images
    assert all(abs(count / (20 * len(LABELS)) - 1 / 3) < 0.05 for count in drawn.values()), drawn
    plain = EpochSampler(len(LABELS), seed=0)
    assert drawn_classes(plain) == Counter({0: 90, 1: 10, 2: 5})  # shuffle: each image once


def test_balanced_draws_and_their_seeds_depend_only_on_seed_and_epoch() -> None:
    weights = balanced_sample_weights(LABELS)
    first, again, other = (EpochSampler(len(LABELS), seed=seed, weights=weights) for seed in (3, 3, 4))
    torch.rand(100)  # the global RNG does not matter
    for sampler in (first, again, other):
        sampler.set_epoch(2)
    epoch2 = list(first)
    assert epoch2 == list(again) and epoch2 != list(other)
    first.set_epoch(3)
    assert list(first) != epoch2
    first.set_epoch(2)
    assert list(first) == epoch2  # a resumed run draws epoch 2 again as it was
    drawn_twice = [index for index, count in Counter(index for index, _ in epoch2).items() if count > 1]
    seeds = {seed for index, seed in epoch2 if index == drawn_twice[0]}
    assert len(seeds) > 1  # an image drawn twice gets two augmentations


def test_ranks_take_their_shards_of_the_one_balanced_epoch() -> None:
    weights = balanced_sample_weights(LABELS)
    whole = list(EpochSampler(len(LABELS), seed=1, weights=weights))
    shards = [list(EpochSampler(len(LABELS), seed=1, shard=Shard(rank, 2), weights=weights)) for rank in range(2)]
    padded = whole + whole[:1]
    assert shards[0] == padded[0::2] and shards[1] == padded[1::2]


class Labels:
    """A dataset of LABELS' labels, taking an EpochSampler's (index, seed) items as ImageDataset does."""

    def __len__(self) -> int:
        return len(LABELS)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index = item[0] if isinstance(item, tuple) else item
        return torch.zeros(1), int(LABELS[index])


def test_make_loader_draws_by_weights_only_when_shuffling() -> None:
    dataset = Labels()
    weights = balanced_sample_weights(LABELS)
    loader = make_loader(dataset, 8, shuffle=True, workers=0, seed=0, weights=weights)
    set_loader_epoch(loader, 1)
    labels = torch.cat([batch_labels for _, batch_labels in loader])
    assert (labels == 2).sum() > 20  # 5 images of class 2, drawn about 35 times
    in_order = make_loader(dataset, 8, shuffle=False, workers=0, seed=0, weights=weights)
    assert torch.cat([batch_labels for _, batch_labels in in_order]).tolist() == LABELS.tolist()


def test_the_warning_names_the_classes_and_the_options_not_yet_chosen() -> None:
    counts = {"cat": 200, "dog": 19, "emu": 40}
    assert imbalance_warning(counts) == (
        "data.root: imbalanced classes, the smallest (dog, 19 images) has less than a tenth of the largest (cat, 200); "
        "consider loss.class_weights: balanced, data.sampler: balanced, early_stopping.metric: balanced_acc"
    )
    partly = imbalance_warning(counts, {"loss.class_weights": "balanced", "data.sampler": "shuffle"})
    assert partly is not None and partly.endswith("consider data.sampler: balanced, early_stopping.metric: balanced_acc")
    every = {"loss.class_weights": "balanced", "data.sampler": "balanced", "early_stopping.metric": "balanced_acc"}
    assert imbalance_warning(counts, every) is None
    assert imbalance_warning({"cat": 200, "dog": 20}) is None  # exactly a tenth: no warning
    assert imbalance_warning({"cat": 11, "dog": 1}) is not None and "(dog, 1 image)" in str(imbalance_warning({"cat": 11, "dog": 1}))
