"""Which images each step takes: the seeded epoch order (uniform or class-balanced), and under torchrun each
process's share of every step's global batch and of the validation images."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, Sampler

from common import World
from utils import UserError


class EpochSampler(Sampler):
    """A shuffled order, and one augmentation seed per sample, that depend only on ``(seed, epoch)``.

    Yields ``(index, sample_seed)`` keys. Because the randomness does not live in the worker processes, a run
    gives the same batches whatever ``--workers`` is, and a resumed run continues exactly as an uninterrupted
    one would, persistent workers included. With ``weights`` (one per sample) an epoch draws ``size`` samples
    with replacement in proportion to them instead (class-balanced sampling). Call :meth:`set_epoch` before each
    epoch.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, weights: Sequence[float] | None = None) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and seeds to yield."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        else:
            order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator)
        return iter(zip(order.tolist(), seeds.tolist(), strict=True))


def balanced_sample_weights(labels: Sequence[int]) -> list[float]:
    """One weight per sample, the inverse of its class's size: each class is drawn equally often."""
    counts = Counter(labels)
    return [1.0 / counts[label] for label in labels]


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch of a run: a different one for each epoch of a run and for each ``--seed`` (pairs collide
    only between epochs a million apart)."""
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % 2**62


def drops_lone_batch(size: int, batch_size: int) -> bool:
    """Drop the last training batch when it would hold a single image: BatchNorm cannot train on one."""
    return size % batch_size == 1 and size > 1


def epoch_batches(size: int, batch_size: int, seed: int, weights: Sequence[float] | None = None) -> BatchSampler:
    """Each epoch's batches of ``(position, sample seed)`` keys, in :class:`EpochSampler`'s order (drawn by
    ``weights`` when given)."""
    return BatchSampler(EpochSampler(size, seed, weights=weights), batch_size,
                        drop_last=drops_lone_batch(size, batch_size))


def shard_slice(count: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous part of ``count`` items: equal parts, the first ``count % world_size`` ranks
    taking one more. The parts in rank order are the items in order."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def shard_range(count: int, world: World) -> range:
    """The positions of ``count`` evaluation images this rank evaluates (see :func:`shard_slice`)."""
    return range(count)[shard_slice(count, world.rank, world.world_size)]


class ShardedBatches(Sampler[list]):
    """One rank's training batches: its contiguous part of each of the single-process run's batches of
    ``batch_size * world_size`` keys from ``sampler``.

    Step k of rank r is ``shard_slice`` r of the single-process run's k-th global batch, so the ranks' batches of a
    step, in rank order, are that batch, and the union over ranks and steps is the single-process epoch order. A
    last partial global batch is split as evenly as it goes, and kept only when every rank gets 2 or more images
    (BatchNorm cannot train on one); with one process that is exactly :func:`drops_lone_batch`. Every rank
    takes the same number of steps. ``set_epoch`` reaches the :class:`EpochSampler` (also through ``.sampler``).
    """

    def __init__(self, sampler: EpochSampler, batch_size: int, rank: int, world_size: int) -> None:
        size = len(sampler)
        if world_size > 1 and size < 2 * world_size:
            raise UserError(f"{size} training images cannot be shared by {world_size} processes (each needs 2); "
                            "start fewer processes")
        self.sampler, self.rank, self.world_size = sampler, rank, world_size
        self.global_size = batch_size * world_size
        remainder = size % self.global_size
        self.drop_last = 0 < remainder < 2 * world_size and size > remainder

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches to yield."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(BatchSampler(self.sampler, self.global_size, self.drop_last))

    def __iter__(self) -> Iterator[list]:
        for keys in BatchSampler(self.sampler, self.global_size, self.drop_last):
            yield keys[shard_slice(len(keys), self.rank, self.world_size)]


def sharded_epoch_batches(size: int, batch_size: int, seed: int, world: World,
                          weights: Sequence[float] | None = None) -> ShardedBatches:
    """This rank's batches of ``batch_size`` keys from :class:`EpochSampler` ``(size, seed, weights)``; with one
    process the same batches as :func:`epoch_batches`."""
    return ShardedBatches(EpochSampler(size, seed, weights=weights), batch_size, world.rank, world.world_size)
