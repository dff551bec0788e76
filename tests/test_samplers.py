"""samplers.py: the seeded epoch order, class-balanced draws, the lone last batch, and each process's share of an
epoch. How the ranks' batches line up step by step with the single-process run is in test_distributed.py; how often
the balanced sampler draws each class, in test_recipes.py."""

from __future__ import annotations

import pytest

from common import World
from samplers import (
    EpochSampler,
    balanced_sample_weights,
    drops_lone_batch,
    epoch_batches,
    epoch_seed,
    sharded_epoch_batches,
)


def positions(keys: list[tuple[int, int]]) -> list[int]:
    """The dataset positions of ``(position, sample seed)`` keys."""
    return [position for position, _ in keys]


def epoch_keys(sampler: EpochSampler, epoch: int) -> list[tuple[int, int]]:
    """The ``(position, sample seed)`` keys ``sampler`` yields in ``epoch``."""
    sampler.set_epoch(epoch)
    return list(sampler)


# --------------------------------------------------------------------------- the epoch order


def test_epoch_seed_is_fixed_by_seed_and_epoch_and_distinct_for_every_pair() -> None:
    assert epoch_seed(42, 3) == epoch_seed(42, 3)
    seeds = {epoch_seed(seed, epoch) for seed in range(100) for epoch in range(300)}
    assert len(seeds) == 100 * 300  # run seed 1's epoch 0 is not run seed 0's epoch 1, say
    assert all(0 <= seed < 2**62 for seed in seeds)


def test_an_epoch_is_a_shuffled_permutation_with_one_augmentation_seed_per_image() -> None:
    keys = epoch_keys(EpochSampler(50, seed=0), epoch=1)

    assert len(keys) == len(EpochSampler(50, seed=0)) == 50
    assert sorted(positions(keys)) == list(range(50)) and positions(keys) != list(range(50))
    assert len({sample_seed for _, sample_seed in keys}) == 50


def test_an_epoch_depends_only_on_seed_and_epoch_so_a_resumed_run_continues_the_same() -> None:
    uninterrupted = EpochSampler(30, seed=5)
    for epoch in range(4):
        epoch_keys(uninterrupted, epoch)
    resumed = EpochSampler(30, seed=5)

    assert epoch_keys(resumed, 3) == epoch_keys(uninterrupted, 3) == list(uninterrupted)  # iterating again too
    assert epoch_keys(resumed, 4) != epoch_keys(resumed, 3)
    assert epoch_keys(EpochSampler(30, seed=6), 3) != epoch_keys(resumed, 3)


def test_without_shuffle_the_order_is_the_dataset_order_with_new_seeds_each_epoch() -> None:
    sampler = EpochSampler(8, seed=0, shuffle=False)
    first, second = epoch_keys(sampler, 0), epoch_keys(sampler, 1)

    assert positions(first) == positions(second) == list(range(8))
    assert first != second  # the augmentations still change from epoch to epoch


# --------------------------------------------------------------------------- class-balanced draws


def test_balanced_weights_are_the_inverse_of_each_class_size() -> None:
    weights = balanced_sample_weights([0, 0, 0, 1, 2, 2])

    assert weights == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0, 0.5, 0.5])  # each class weighs 1 in all


def test_a_weighted_epoch_draws_size_images_with_replacement_in_proportion_to_the_weights() -> None:
    sampler = EpochSampler(6, seed=0, weights=[0.0, 0.0, 1.0, 1.0, 1.0, 1.0])

    drawn = [position for epoch in range(20) for position in positions(epoch_keys(sampler, epoch))]
    assert len(drawn) == 20 * 6
    assert set(drawn) == {2, 3, 4, 5}  # never an image of weight 0; some twice in an epoch
    assert epoch_keys(sampler, 7) == epoch_keys(EpochSampler(6, seed=0, weights=[0, 0, 1, 1, 1, 1]), 7)


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("size, batch_size, drops", [(9, 4, True), (8, 4, False), (10, 4, False), (1, 4, False),
                                                     (5, 1, False)])
def test_only_a_last_batch_of_one_image_is_dropped(size: int, batch_size: int, drops: bool) -> None:
    assert drops_lone_batch(size, batch_size) is drops  # a one-image data set keeps its one batch


def test_epoch_batches_cover_the_epoch_order_less_a_lone_last_image() -> None:
    batches = epoch_batches(9, 4, seed=3)
    batches.sampler.set_epoch(2)
    order = epoch_keys(EpochSampler(9, seed=3), 2)

    assert [len(batch) for batch in batches] == [4, 4]
    assert [key for batch in batches for key in batch] == order[:8]
    assert [len(batch) for batch in epoch_batches(10, 4, seed=3)] == [4, 4, 2]


# --------------------------------------------------------------------------- each process's share


def rank_epochs(size: int, batch_size: int, world_size: int, epoch: int) -> list[list[list[tuple[int, int]]]]:
    """Every rank's batches of ``epoch``, by rank, each built as its own process builds them."""
    per_rank = []
    for rank in range(world_size):
        batches = sharded_epoch_batches(size, batch_size, 11, World(rank, rank, world_size))
        batches.set_epoch(epoch)
        per_rank.append(list(batches))
        assert len(batches) == len(per_rank[-1])  # what the loop's progress and schedule count on
    return per_rank


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [8, 13, 24, 37])
def test_the_ranks_take_disjoint_shares_of_the_epoch_in_the_same_number_of_steps(size: int, world_size: int) -> None:
    per_rank = rank_epochs(size, 3, world_size, epoch=1)
    shares = [positions([key for batch in batches for key in batch]) for batches in per_rank]

    assert len({len(batches) for batches in per_rank}) == 1  # no rank waits for a step the others do not take
    taken = [position for share in shares for position in share]
    assert len(taken) == len(set(taken))  # no image twice in an epoch
    global_size = 3 * world_size
    dropped = size % global_size if 0 < size % global_size < 2 * world_size else 0  # a last step too small to share
    assert len(taken) == size - dropped
    assert sorted(taken + positions(epoch_keys(EpochSampler(size, seed=11), 1)[size - dropped:])) == list(range(size))


def test_set_epoch_on_a_rank_changes_its_batches_reproducibly() -> None:
    batches = sharded_epoch_batches(20, 2, 0, World(1, 1, 2))
    batches.set_epoch(3)
    third = list(batches)
    batches.set_epoch(4)

    assert list(batches) != third
    batches.sampler.set_epoch(3)  # the loop may reach the sampler as DataLoader's batch_sampler.sampler
    assert list(batches) == third
