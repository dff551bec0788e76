"""--cache: the staged training images decoded once into a memory-mapped file, reused while the data is unchanged."""

from __future__ import annotations

import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN_FLAGS, ColourData, call_main
from PIL import Image
from torch.utils.data import DataLoader

import cache
import gpu_augment
import train
from dataset import DecodeFailure, build_train_transform
from utils import UserError

STAGING = 24
IMG_SIZE = 16


@pytest.fixture
def samples(tmp_path: Path) -> list[tuple[str, int]]:
    """Noise JPEGs of several aspect ratios, a PNG, and one file that cannot be decoded."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    found = []
    for index, (width, height) in enumerate([(40, 30), (30, 50), (33, 33), (90, 20)]):
        path = folder / f"{index}.jpg"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)
        found.append((str(path), index % 2))
    png = folder / "4.png"
    Image.fromarray(rng.integers(0, 256, (20, 28), dtype=np.uint8), mode="L").save(png)
    found.append((str(png), 1))
    broken = folder / "broken.jpg"
    broken.write_text("not a JPEG\n")
    found.append((str(broken), 0))
    return found


def build(samples, tmp_path: Path, workers: int = 0) -> cache.StagedCache:
    return cache.build_staged_cache(samples, STAGING, tmp_path / "out" / "cache", workers)


def cache_files(tmp_path: Path) -> list[str]:
    return sorted(path.name for path in (tmp_path / "out" / "cache").iterdir())


def test_cached_items_equal_staged_images(samples, tmp_path, capsys):
    staged = gpu_augment.StagedImages(samples, STAGING)
    cached = cache.CachedStagedImages(build(samples, tmp_path))
    out = capsys.readouterr().out
    assert "6 images" in out and "MB" in out and " s" in out
    assert len(cached) == len(staged)
    for index in range(len(samples)):
        expected, got = staged[index], cached[index]
        if isinstance(expected, DecodeFailure):
            assert got == expected
            continue
        assert got[0].dtype == torch.uint8 and got[1].dtype == torch.int64
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and got[2] == expected[2]
        # (index, seed) keys from dataset.EpochSampler select the same item
        assert torch.equal(cached[(index, 12345)][0], expected[0])
    assert cached[5] == DecodeFailure(samples[5][0], "cannot identify image file")


def test_cached_staged_images_in_worker_processes(samples, tmp_path):
    cached = cache.CachedStagedImages(build(samples, tmp_path, workers=2))
    cached[0]  # opens the memmap in this process; workers must open their own
    loader = DataLoader(cached, batch_size=3, num_workers=1, collate_fn=gpu_augment.collate_staged)
    batches = list(loader)
    assert [[failure.path for failure in batch.failed] for batch in batches] == [[], [samples[5][0]]]
    assert torch.equal(batches[0].images[1], cached[1][0])
    assert batches[1].images.shape == (2, 3, STAGING, STAGING)


def test_second_build_reuses_the_cache(samples, tmp_path, monkeypatch, capsys):
    first = build(samples, tmp_path)
    files = cache_files(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("decoded although the cache is complete")

    monkeypatch.setattr(gpu_augment, "decode_staged", refuse)
    capsys.readouterr()
    second = build(samples, tmp_path)
    assert "reusing" in capsys.readouterr().out
    assert cache_files(tmp_path) == files
    assert second.failures == first.failures == {samples[5][0]: "cannot identify image file"}
    assert torch.equal(cache.CachedStagedImages(second)[3][0], cache.CachedStagedImages(first)[3][0])


def test_changed_file_rebuilds(samples, tmp_path):
    build(samples, tmp_path)
    before = cache_files(tmp_path)
    stat = os.stat(samples[0][0])
    os.utime(samples[0][0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = build(samples, tmp_path)
    after = cache_files(tmp_path)
    assert after != before and len(after) == 2  # the stale cache was replaced, not kept beside
    assert rebuilt.data_path.name in after


def test_killed_build_is_not_reused(samples, tmp_path, monkeypatch):
    calls = []
    real = gpu_augment.decode_staged

    def killed_midway(path, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(path)
        return real(path, *args)

    monkeypatch.setattr(gpu_augment, "decode_staged", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        build(samples, tmp_path)
    assert all(name.endswith(".partial") for name in cache_files(tmp_path))  # no final file, only the temp one
    monkeypatch.setattr(gpu_augment, "decode_staged", real)
    cached = cache.CachedStagedImages(build(samples, tmp_path))
    assert torch.equal(cached[3][0], gpu_augment.StagedImages(samples, STAGING)[3][0])
    assert not any(name.endswith(".partial") for name in cache_files(tmp_path))


def test_not_enough_disk_space_is_a_user_error(samples, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(UserError) as raised:
        build(samples, tmp_path)
    assert str(tmp_path / "out" / "cache") in str(raised.value) and "MB" in str(raised.value)


def test_cached_pil_images_follow_the_train_transform(samples, tmp_path):
    dataset = cache.CachedPilImages(build(samples, tmp_path), build_train_transform(IMG_SIZE))
    for index in range(5):
        width, height = dataset.cache.sizes[index]
        image = dataset.image(index)
        assert min(image.size) == STAGING
        assert abs(image.size[0] / image.size[1] - width / height) < 0.1
        tensor, label = dataset[(index, 7)]
        assert tensor.shape == (3, IMG_SIZE, IMG_SIZE) and label == samples[index][1]
        assert torch.equal(dataset[(index, 7)][0], tensor)  # same (index, seed): same augmentation
    assert not torch.equal(dataset[(0, 7)][0], dataset[(0, 8)][0])
    assert dataset[(5, 7)] == DecodeFailure(samples[5][0], "cannot identify image file")


def test_training_with_cache(small_data: ColourData, tmp_path):
    output_dir = tmp_path / "run"
    result = call_main(train.main, "--data-dir", small_data.root, "--output-dir", output_dir, "--epochs", "1",
                       "--cache", *TINY_TRAIN_FLAGS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (output_dir / "best.pt").is_file()
    names = sorted(path.name for path in (output_dir / "cache").iterdir())
    assert len(names) == 2 and names[0].endswith(".json") and names[1].endswith(".u8"), names
    assert "cache: staged 12 images" in result.stdout
