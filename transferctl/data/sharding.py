"""Which part of the data each process of a distributed run takes: every `world`-th item of one shared order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Which part of the data this process handles: every `world`-th item, starting at `rank`."""

    rank: int = 0
    world: int = 1


def shard_of(order: list[T], part: Shard, pad: bool) -> list[T]:
    """Every `world`-th item from `rank`. With pad, the order first wraps around to a multiple of world (as
    DistributedSampler does), so every rank takes the same number of steps; without, shards may differ by one.

    With per-rank batches of b, the k-th batches of all ranks together are items k*b*world .. (k+1)*b*world of
    the order: the global batch a single process would take.
    """
    if part.world == 1:
        return order
    if pad and order:
        total = -(-len(order) // part.world) * part.world
        order = (order * (total // len(order) + 1))[:total]
    return order[part.rank :: part.world]


def shard_length(size: int, part: Shard, pad: bool) -> int:
    """len(shard_of(items, part, pad)) for `size` items, without building the list."""
    if part.world == 1 or size == 0:
        return size
    if pad:
        return -(-size // part.world)
    return len(range(part.rank, size, part.world))
