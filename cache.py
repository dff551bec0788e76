"""``--cache``: decode and stage the training images once into a uint8 memory-mapped file.

``build_staged_cache`` decodes every training image with ``gpu_augment.decode_staged`` (the same
``uint8 [3, S, S]`` square and original ``(width, height)`` the GPU path's workers make every epoch) into
``<cache_dir>/staged-S<S>-<key>.u8``, a raw ``numpy.memmap`` of shape ``(N, 3, S, S)``, and writes beside it
``staged-S<S>-<key>.json`` with the sizes, labels, paths and the images that failed to decode. ``key`` hashes
the paths, labels, file sizes and modification times and ``S``, so a changed dataset gets a new cache. The data
is written under a temporary name and renamed once complete, and the ``.json`` is written last: a build that was
killed is never reused, it is built again. Other ``staged-*`` caches in the folder (of an older dataset or
staging size) are removed when a new one is built.

Later epochs read the memmap instead of decoding JPEGs: ``CachedStagedImages`` for the GPU augmentation path
(a drop-in for ``gpu_augment.StagedImages``) and ``CachedPilImages`` for the CPU path (the staged square
resized back to the original aspect ratio, then the PIL train transform).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

import dataset
import gpu_augment
from utils import UserError, atomic_write_text

CACHE_FORMAT = 2  # bump when what is stored (or how it is decoded) changes, so old caches are rebuilt


@dataclass
class StagedCache:
    """A complete cache: the memmap file, its staging size, and per image the original size, label and path."""

    data_path: Path
    staging: int
    sizes: np.ndarray  # int64 [N, 2]: original (width, height), EXIF-oriented; 0 for failures
    labels: list[int]
    paths: list[str]
    failures: dict[str, str]  # path -> why it could not be decoded at build time

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), 3, self.staging, self.staging)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))


def cache_key(samples: Sequence[tuple[str, int]], staging: int) -> str:
    """A hash of everything the cache depends on: paths, labels, file sizes and mtimes, and ``staging``."""
    digest = hashlib.sha256(f"format {CACHE_FORMAT} staging {staging}\n".encode())
    for path, label in samples:
        try:
            info = os.stat(path)
            stamp = f"{info.st_size} {info.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{path}\0{label}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:20]


def build_staged_cache(
    samples: Sequence[tuple[str, int]], staging: int, cache_dir: str | Path, workers: int = 0,
    max_pixels: int = dataset.DEFAULT_MAX_IMAGE_PIXELS,
) -> StagedCache:
    """The cache of ``samples`` at staging size ``staging`` in ``cache_dir``: reused if complete, else built.

    Decodes in ``workers`` DataLoader processes (0: in this process). Prints one line. Raises ``UserError``
    when ``cache_dir``'s disk has not enough free space for it.
    """
    samples = list(samples)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = f"staged-S{staging}-{cache_key(samples, staging)}"
    data_path, meta_path = cache_dir / f"{stem}.u8", cache_dir / f"{stem}.json"
    cache = _load_complete(data_path, meta_path, samples, staging)
    if cache is not None:
        print(f"cache: reusing {len(cache)} staged images ({cache.nbytes / 1e6:.0f} MB) in {data_path}")
        return cache

    for old in cache_dir.glob("staged-*"):  # stale caches (older data, other sizes) and killed builds
        old.unlink(missing_ok=True)
    for old in cache_dir.glob(".staged-*"):
        old.unlink(missing_ok=True)
    shape = (len(samples), 3, staging, staging)
    needed = int(np.prod(shape))
    free = shutil.disk_usage(cache_dir).free
    if needed > free:
        raise UserError(f"--cache: {cache_dir} needs {needed / 1e6:.0f} MB for {len(samples)} staged images but its "
                        f"disk has {free / 1e6:.0f} MB free; free some space, use another --output-dir, or drop --cache")

    start = time.perf_counter()
    tmp_path = cache_dir / f".{stem}.u8.partial"
    sizes = np.zeros((len(samples), 2), dtype=np.int64)
    failures: dict[str, str] = {}
    if samples:
        array = np.memmap(tmp_path, dtype=np.uint8, mode="w+", shape=shape)
        decoded = dataset.iterate_items(gpu_augment.StagedImages(samples, staging, max_pixels), workers)
        for index, item in enumerate(decoded):
            if isinstance(item, dataset.DecodeFailure):  # StagedImages has printed the warning
                failures[item.path] = item.reason
                continue
            pixels, size, _ = item
            array[index] = pixels.numpy()
            sizes[index] = size.numpy()
        array.flush()
        del array
    else:
        tmp_path.write_bytes(b"")
    os.replace(tmp_path, data_path)
    meta = {"format": CACHE_FORMAT, "staging": staging, "count": len(samples), "bytes": needed,
            "paths": [path for path, _ in samples], "labels": [int(label) for _, label in samples],
            "sizes": sizes.tolist(), "failures": failures}
    atomic_write_text(meta_path, json.dumps(meta))  # written last: its presence marks the cache complete
    print(f"cache: staged {len(samples)} images ({needed / 1e6:.0f} MB) into {data_path} in "
          f"{time.perf_counter() - start:.1f} s" + (f"; {len(failures)} could not be decoded" if failures else ""))
    return StagedCache(data_path, staging, sizes, [label for _, label in samples], meta["paths"], failures)


def _load_complete(data_path: Path, meta_path: Path, samples: list[tuple[str, int]], staging: int) -> StagedCache | None:
    """The cache described by ``meta_path`` if it is complete and matches ``samples``, else None."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        complete = (meta["format"] == CACHE_FORMAT and meta["staging"] == staging
                    and meta["paths"] == [path for path, _ in samples]
                    and meta["labels"] == [int(label) for _, label in samples]
                    and data_path.stat().st_size == meta["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not complete:
        return None
    sizes = np.asarray(meta["sizes"], dtype=np.int64).reshape(len(samples), 2)
    return StagedCache(data_path, staging, sizes, meta["labels"], meta["paths"], dict(meta["failures"]))


class _CachedImages(Dataset):
    """Reads staged images from a cache's memmap, opened lazily in each process (never pickled)."""

    def __init__(self, cache: StagedCache) -> None:
        self.cache = cache
        self._array: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.cache)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    def _read(self, index: int) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.cache.data_path, dtype=np.uint8, mode="r", shape=self.cache.shape)
        return np.array(self._array[index])  # a writable copy, detached from the file


class CachedStagedImages(_CachedImages):
    """``gpu_augment.StagedImages`` from the cache: ``(uint8 [3,S,S], int64 [w, h], label)`` or a DecodeFailure."""

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor, int] | dataset.DecodeFailure:
        index = key[0] if isinstance(key, tuple) else key
        path = self.cache.paths[index]
        if path in self.cache.failures:
            return dataset.DecodeFailure(path, self.cache.failures[path])
        size = torch.from_numpy(self.cache.sizes[index].copy())
        return torch.from_numpy(self._read(index)), size, self.cache.labels[index]


class CachedPilImages(_CachedImages):
    """The CPU path from the cache: the staged square resized back to the original aspect ratio (shorter side
    ``S``), then ``transform``, seeded per ``(index, seed)`` key like ``dataset.LabeledImages``."""

    def __init__(self, cache: StagedCache, transform: Callable[[Image.Image], Tensor]) -> None:
        super().__init__(cache)
        self.transform = transform

    def image(self, index: int) -> Image.Image:
        """The cached image ``index`` as an RGB PIL image with the original aspect ratio."""
        # merging the three contiguous planes is ~15x faster than fromarray on the transposed [S, S, 3] view
        staged = Image.merge("RGB", [Image.fromarray(plane) for plane in self._read(index)])
        width, height = (int(value) for value in self.cache.sizes[index])
        side = self.cache.staging
        if width <= height:
            target = (side, max(1, round(height * side / width)))
        else:
            target = (max(1, round(width * side / height)), side)
        return staged if target == staged.size else staged.resize(target, Image.Resampling.BILINEAR)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int] | dataset.DecodeFailure:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path = self.cache.paths[index]
        if path in self.cache.failures:
            return dataset.DecodeFailure(path, self.cache.failures[path])
        return dataset.transform_seeded(self.transform, self.image(index), seed), self.cache.labels[index]
