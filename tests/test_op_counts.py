"""How many tensor operations one TrainAugment / EvalTransform call issues (on a GPU each is a kernel launch the host
must issue, so the count is a proxy for the host's work): bounded, and the same for 16 images as for 128.

Counted with a TorchDispatchMode that sees every ``__torch_dispatch__`` call (views included) for the whole call,
parameter drawing included, on a CPU generator and CPU tensors. The per-image implementation it replaced
(``tests/augment_reference.py``) issued 1,130 (train) and 1,157 (eval) for 128 such images at 224 px.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import augment_reference
import gpu_augment as ga
from common import IMAGENET_MEAN, IMAGENET_STD

TRAIN_LIMIT, EVAL_LIMIT = 64, 32
# The counts do not depend on the sizes (63, 68 and 21 at 224 px from 40-120 px images too): small ones keep the
# tests quick. Every image is smaller than the output, so all are upscaled.
OUTPUT_SIZE = 64
ERASE_EXTRA_LIMIT = 6  # RandomErasing: the generator's rewind, two masks, their product and one multiplication


class OperationCounter(TorchDispatchMode):
    """Counts every tensor operation dispatched while active (views, in-place and host-tensor operations too)."""

    def __init__(self) -> None:
        super().__init__()
        self.operations: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.operations.append(str(func))
        return func(*args, **(kwargs or {}))


def count_operations(call: Callable[[], Any]) -> int:
    """The number of tensor operations ``call()`` dispatches."""
    with OperationCounter() as counter:
        call()
    return len(counter.operations)


def mixed_images(count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` uint8 images with 20-60 px sides: portrait, landscape, all smaller than OUTPUT_SIZE (upscaled)."""
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.integers(0, 256, (3, *rng.integers(20, 61, 2)), dtype=np.uint8))
            for _ in range(count)]


@pytest.fixture(scope="module")
def batches() -> dict[int, list[torch.Tensor]]:
    return {16: mixed_images(16, seed=1), 128: mixed_images(128, seed=2)}


def train_count(augment: ga.TrainAugment, images: list[torch.Tensor]) -> int:
    return count_operations(lambda: augment(images, torch.Generator().manual_seed(0)))


def test_train_augment_issues_at_most_64_operations_whatever_the_batch_size(batches):
    augment = ga.TrainAugment(OUTPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    counts = {size: train_count(augment, images) for size, images in batches.items()}
    assert counts[16] == counts[128] <= TRAIN_LIMIT  # measured 63


def test_random_erasing_adds_a_few_operations_whatever_the_batch_size(batches):
    plain = ga.TrainAugment(OUTPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    erasing = ga.TrainAugment(OUTPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD, random_erase=0.5)
    counts = {size: train_count(erasing, images) for size, images in batches.items()}
    assert counts[16] == counts[128] <= train_count(plain, batches[128]) + ERASE_EXTRA_LIMIT  # measured 68


def test_eval_transform_issues_at_most_32_operations_whatever_the_batch_size(batches):
    transform = ga.EvalTransform(OUTPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    counts = {size: count_operations(lambda images=images: transform(images)) for size, images in batches.items()}
    assert counts[16] == counts[128] <= EVAL_LIMIT  # measured 21


def test_the_counter_sees_the_per_image_implementations_operations(batches):
    # The same counter on the code this replaced: it grows with the batch (one resize per image).
    augment = ga.TrainAugment(OUTPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    transform = ga.EvalTransform(OUTPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    old_train = count_operations(lambda: augment_reference.train_augment(augment, batches[128],
                                                                            torch.Generator().manual_seed(0)))
    old_eval = count_operations(lambda: augment_reference.eval_transform(transform, batches[128]))
    assert old_train > 1000 and old_eval > 1000
