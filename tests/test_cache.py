"""cache.py: where decoded images are kept, how they lie in memory, and how a batch of them comes back."""

from __future__ import annotations

import pytest
import torch

import cache
from utils import UserError

GB = 10**9
CPU = torch.device("cpu")


def some_images(*shapes: tuple[int, int]) -> list[torch.Tensor]:
    """Random ``uint8 [3, H, W]`` images of ``shapes``."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in shapes]


def shares_memory(image: torch.Tensor, owner: torch.Tensor) -> bool:
    return image.untyped_storage().data_ptr() == owner.untyped_storage().data_ptr()


# --------------------------------------------------------------------------- where: processes sharing a node


def test_the_processes_of_a_node_share_its_host_memory_but_each_has_its_gpu():
    alone = cache.choose_cache("auto", 12 * GB, 20 * GB, 100 * GB, device_path=True)
    four = cache.choose_cache("auto", 12 * GB, 20 * GB, 100 * GB, device_path=True, processes_on_node=4)
    eight = cache.choose_cache("auto", 12 * GB, 20 * GB, 100 * GB, device_path=True, processes_on_node=8)
    assert (alone.place, four.place, eight.place) == ("ram", "ram", "none")  # 50 GB / 8 = 6.25 GB < 12 GB
    assert "they fit in 50% of the 100.0 GB of host memory available;" in alone.reason
    assert "split between the 4 processes on this node" in four.reason
    assert "nor in 50% of the 100.0 GB of host memory available, split between the 8 processes" in eight.reason
    assert cache.choose_cache("auto", 12 * GB, 80 * GB, 100 * GB, True, processes_on_node=8).place == "gpu"
    with pytest.raises(UserError, match="--cache ram: 12.00 GB .* split between the 8 processes on this node"):
        cache.choose_cache("ram", 12 * GB, None, 100 * GB, device_path=True, processes_on_node=8)


def test_the_reason_says_the_images_go_in_one_slab():
    reason = cache.choose_cache("auto", 12 * GB, 80 * GB, 100 * GB, device_path=True).reason
    assert reason.endswith("held in one slab per split allocated up front (12.00 GB in all)")


# --------------------------------------------------------------------------- how: one slab


def test_images_lie_in_one_slab_and_one_that_does_not_fit_gets_its_own_tensor():
    images = some_images((5, 7), (6, 6), (4, 4), (9, 4))
    store = cache.DecodedImages(4, CPU, capacity=sum(image.numel() for image in images[:3]))
    for position, image in enumerate(images):
        store.put(position, image)

    assert [shares_memory(image, store.slab) for image in store.images] == [True, True, True, False]
    assert all(image.data_ptr() % cache.SLAB_ALIGN == 0 for image in store.images)
    assert store.outside_slab == 1
    assert all(torch.equal(got, image) for got, image in zip(store.fetch(range(4), CPU), images, strict=True))


def test_a_position_is_stored_once():
    first, second = some_images((4, 4), (4, 4))
    store = cache.DecodedImages(1, CPU, capacity=first.numel())
    store.put(0, first)
    store.put(0, second)  # met again (a class-balanced epoch draws with replacement): the slab is not spent twice
    assert torch.equal(store.images[0], first) and store.outside_slab == 0


def test_without_a_capacity_each_image_is_its_own_tensor():
    store = cache.DecodedImages(2, CPU)
    image = some_images((3, 3))[0]
    store.put(0, image)
    assert store.slab.numel() == 0 and store.outside_slab == 1 and torch.equal(store.images[0], image)


# --------------------------------------------------------------------------- host memory: pageable, one copy back


def test_host_memory_is_pageable_and_gives_back_the_exact_pixels():
    images = some_images((5, 7), (6, 6))
    store = cache.DecodedImages(2, CPU, capacity=sum(image.numel() for image in images))
    for position, image in enumerate(images):
        store.put(position, image)
    assert not store.slab.is_pinned() and not any(image.is_pinned() for image in store.images)
    assert all(torch.equal(got, image) for got, image in zip(store.fetch([0, 1], CPU), images, strict=True))


class FakeEvent:
    """A CUDA event that writes down what is asked of it."""

    def __init__(self, log: list[str]) -> None:
        self.log, self.number = log, sum(entry.startswith("record") for entry in log)

    def record(self) -> None:
        self.log.append(f"record {self.number}")

    def query(self) -> bool:
        return False  # the copy is still under way

    def synchronize(self) -> None:
        self.log.append(f"wait for {self.number}")


def fake_staging(log: list[str]) -> cache.Staging:
    """A :class:`cache.Staging` whose 'device' is the host: its transfer returns the staging buffer itself."""

    def allocate(size: int) -> torch.Tensor:
        log.append(f"allocate {size}")
        return torch.empty(size, dtype=torch.uint8)

    return cache.Staging(CPU, allocate=allocate, new_event=lambda: FakeEvent(log))


def test_a_batch_goes_to_the_gpu_in_one_copy_through_two_staging_buffers_used_in_turn():
    log: list[str] = []
    staging = fake_staging(log)
    batches = [some_images((2, 3), (3, 3)), some_images((2, 2)), some_images((1, 3))]

    flats = [staging.transfer(images) for images in batches]

    for flat, images in zip(flats, batches, strict=True):
        assert torch.equal(flat, torch.cat([image.reshape(-1) for image in images]))
    assert shares_memory(flats[2], flats[0])  # the first buffer again, rewritten ...
    assert log == ["allocate 64", "record 0", "allocate 16", "record 1",  # 45 and 12 bytes: powers of two
                   "wait for 0", "record 2"]  # ... once the copy that read it was done; big enough: not grown


def test_fetching_from_host_memory_for_cuda_copies_once_into_the_staging_buffer():
    images = some_images((5, 7), (6, 6), (4, 4))
    store = cache.DecodedImages(3, CPU, capacity=sum(image.numel() for image in images))
    for position, image in enumerate(images):
        store.put(position, image)
    log: list[str] = []
    store.staging = fake_staging(log)

    fetched = store.fetch([2, 0], torch.device("cuda"))

    assert torch.equal(fetched[0], images[2]) and torch.equal(fetched[1], images[0])
    assert all(shares_memory(image, store.staging.buffers[0]) for image in fetched)  # no copy but that one
    assert log == ["allocate 256", "record 0"]  # 48 + 105 bytes, rounded up to a power of two
