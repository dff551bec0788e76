"""The batched GPU-path augmentation against the per-image code it replaced: tensor operations per call (on a GPU,
kernel launches the host issues), CPU wall time, largest difference, and the resize's largest buffers.

    python benchmarks/augment_ops.py            # about a minute on 2 cores
    python benchmarks/augment_ops.py --repeats 9

Each call is TrainAugment(224)(images, generator) or EvalTransform(224)(images) on 128 uint8 images; old is
``tests/augment_reference.py`` (one resize per image, one jitter group per step and operation). Times are medians of
``--repeats`` calls on this CPU; the machine may be shared, so compare ratios. Nothing here runs on a GPU.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_op_counts import count_operations

import augment_reference
import batch_resize
import gpu_augment as ga
from common import IMAGENET_MEAN, IMAGENET_STD

SIZE = 224


def mixed_images(count: int, seed: int, sides: tuple[int, int]) -> list[torch.Tensor]:
    """Random uint8 images with sides in ``sides``, portrait and landscape."""
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.integers(0, 256, (3, *rng.integers(*sides, 2)), dtype=np.uint8))
            for _ in range(count)]


def photos(count: int, long: int, short: int) -> list[torch.Tensor]:
    """Random uint8 images of one photo size, alternately landscape and portrait."""
    rng = np.random.default_rng(0)
    shapes = [(short, long) if index % 2 == 0 else (long, short) for index in range(count)]
    return [torch.from_numpy(rng.integers(0, 256, (3, *shape), dtype=np.uint8)) for shape in shapes]


def median_seconds(call: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``call()`` over ``repeats`` runs, after one warm-up run."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def resize_buffer_bytes(augment: ga.TrainAugment, images: list[torch.Tensor]) -> int:
    """The largest chunk's resize buffers, in bytes: gathered uint8 windows, their float32 copy, the weights and
    the first product."""
    params = augment.sample_params(ga.host_sizes(images), torch.Generator().manual_seed(0))
    count = len(images)
    chunks = batch_resize.plan_resize(ga.host_sizes(images), params.boxes[:, :2], params.boxes[:, 2:],
                                      np.full((count, 2), SIZE), np.zeros((count, 2), np.int64), params.flips, SIZE,
                                      1 / 255, augment.max_resize_elements)

    def chunk_bytes(chunk: batch_resize.ResizeChunk) -> int:
        windows = len(chunk.images) * 3 * chunk.side * chunk.side
        return windows * (1 + 4) + 2 * len(chunk.images) * chunk.side * SIZE * 4 + windows // chunk.side * SIZE * 4

    return max(chunk_bytes(chunk) for chunk in chunks)


def compare(name: str, images: list[torch.Tensor], repeats: int) -> list[str]:
    """Rows of the table for one set of images."""
    augment = ga.TrainAugment(SIZE, IMAGENET_MEAN, IMAGENET_STD)
    transform = ga.EvalTransform(SIZE, IMAGENET_MEAN, IMAGENET_STD)
    calls = {
        "train": (lambda: augment(images, torch.Generator().manual_seed(0)),
                  lambda: augment_reference.train_augment(augment, images, torch.Generator().manual_seed(0))),
        "eval": (lambda: transform(images), lambda: augment_reference.eval_transform(transform, images)),
    }
    rows = []
    for kind, (new, old) in calls.items():
        error = ((new() - old()) * augment.std).abs().max().item()
        new_ops, old_ops = count_operations(new), count_operations(old)
        new_s, old_s = median_seconds(new, repeats), median_seconds(old, repeats)
        rows.append(f"| {name} | {kind} | {old_ops} | {new_ops} | {old_s * 1000:.0f} | {new_s * 1000:.0f} "
                    f"| {old_s / new_s:.2f}x | {error:.1e} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; 128 images, output {SIZE}; times are medians of {args.repeats} calls\n")
    print("| images | call | ops old | ops new | ms old | ms new | speed-up | max abs diff (pixels in [0, 1]) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, images in [("40-120 px, mixed", mixed_images(128, 0, (40, 121))),
                         ("500x375 photos", photos(128, 500, 375))]:
        print("\n".join(compare(name, images, args.repeats)), flush=True)
    augment = ga.TrainAugment(SIZE, IMAGENET_MEAN, IMAGENET_STD)
    print("\nLargest resize buffers of one training call (uint8 windows + float32 copy + weights + first product):")
    for name, images in [("500x375 photos", photos(128, 500, 375)), ("792x1056 photos", photos(128, 1056, 792))]:
        print(f"  128 {name}: {resize_buffer_bytes(augment, images) / 2**20:.0f} MiB "
              f"(chunks of at most {augment.max_resize_elements / 2**20:.0f} Mi float32 window pixels)")


if __name__ == "__main__":
    main()
