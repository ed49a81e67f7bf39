"""Stratified samples of image indices: every class in proportion, for probes, weight-decay folds and recommend."""

from __future__ import annotations

import numpy as np


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
