"""The device path's hand-over from the loader workers: main-thread CPU ms per batch, before and after packing.

    python benchmarks/collate_cost.py                  # 128 JPEGs a batch, 2 workers, 12 batches each way
    python benchmarks/collate_cost.py --batches 2 --batch-size 8   # a quick try

Before (``separate``): each worker opens every file with PIL to read its header, and hands the batch over as one
tensor per image, which costs the main process a shared-memory handle to open per image. After (``packed``): the
header scan at the start found the plain JPEGs (``images.check_images``), so the workers read their bytes only,
and hand the batch over as one buffer with offsets (``loader_items.collate_encoded``), its items views into it.
Main-thread CPU time is ``time.thread_time`` around taking each batch and making its items; worker time is the
batches' wall time (the workers' share). Prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import images
import loader_items


def write_jpeg(path: str, width: int, height: int, seed: int) -> None:
    """A photo-like JPEG (smooth noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path, quality=90)


def collate_separate(items: list[Any]) -> list[Any]:
    """The hand-over before: the items as they are, one tensor each."""
    return loader_items.split_failures(items)[0]


def loader(paths: list[str], batch_size: int, workers: int, packed: bool, scanned: bool) -> DataLoader:
    """The device path's loader: batches ``packed`` or not; the workers told the header scan's plain JPEGs
    (``scanned``) or opening each file."""
    plain = images.plain_jpeg_sizes(images.check_images(paths).sizes) if scanned else None
    files = loader_items.FileBytes(paths, [0] * len(paths), 792, images.DEFAULT_MAX_IMAGE_PIXELS, plain)
    sampler = BatchSampler(SequentialSampler(range(len(paths))), batch_size, drop_last=False)
    return DataLoader(files, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None,
                      collate_fn=loader_items.collate_encoded if packed else collate_separate)


def measure(paths: list[str], args: argparse.Namespace, packed: bool, scanned: bool) -> tuple[float, float]:
    """Main-thread CPU ms and wall ms per batch, over ``args.batches`` batches after one warm-up pass."""
    data = loader(paths, args.batch_size, args.workers, packed, scanned)
    for _batch in data:  # warm-up: workers started, files in the page cache
        pass
    cpu = wall = 0.0
    taken = 0
    while taken < args.batches:
        iterator = iter(data)
        while taken < args.batches:
            started_cpu, started_wall = time.thread_time(), time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            items = batch.items if packed else batch
            assert len(items) == args.batch_size
            cpu += time.thread_time() - started_cpu
            wall += time.perf_counter() - started_wall
            taken += 1
    return 1000 * cpu / taken, 1000 * wall / taken


WAYS = (("before: a tensor per image, workers open each file", False, False),
        ("one buffer, workers open each file", True, False),
        ("after: one buffer, workers read the plain JPEGs' bytes only", True, True))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    """Write the JPEGs, measure both ways, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="collate-cost-") as folder:
        paths = [str(Path(folder) / f"{index}.jpg") for index in range(2 * args.batch_size)]
        with ProcessPoolExecutor() as pool:
            list(pool.map(write_jpeg, paths, [args.width] * len(paths), [args.height] * len(paths),
                          range(len(paths))))
        rows = {name: measure(paths, args, packed, scanned) for name, packed, scanned in WAYS}
    cpu_name = cpu_model()
    print(f"## Loader hand-over, {args.batch_size} JPEGs of {args.width}x{args.height} a batch, {args.workers} "
          f"workers, {args.batches} batches ({os.cpu_count()} CPUs, {cpu_name}, torch {torch.__version__})")
    print("| hand-over | main-thread CPU ms/batch | wall ms/batch (the workers' share) |")
    print("|---|---:|---:|")
    for name, (cpu, wall) in rows.items():
        print(f"| {name} | {cpu:.2f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
