"""Files to model-ready batches on the device, for each split: the entry point of the data path.

:func:`load_data` (train.py) and :func:`inference_batches` (predict.py, evaluate.py) build, through
:func:`train_batches` and :func:`eval_batches`, iterables of :class:`Batch` es whose images are on the device,
normalized, in the model's memory format. Two paths lead there (``--augment-device``, ``accel.choose_data_path``):

``cpu``
    DataLoader workers decode each image with PIL (``images.decode_rgb``: EXIF orientation, transparency on
    white, 16-bit, CMYK) and run torchvision's recipe on it (``recipe.build_*_transform``); the batch is copied
    to the device. Large JPEGs are decoded at a reduced scale that keeps what the recipe needs
    (``recipe.train_decode_side`` for training, the eval resize for evaluation).
``gpu`` (the default on CUDA)
    Workers only read each file's bytes. A batch's JPEGs are decoded together on the device
    (``torchvision.io.decode_jpeg``: nvJPEG on CUDA); files it cannot take (PNG, WebP, GIF, CMYK or EXIF-rotated
    JPEGs, 16-bit images, anything it rejects) are decoded on the CPU with the rules above, by the worker when it
    can tell from the header. For training each image is scaled down once, antialiased, to a shorter side of at
    most ``recipe.train_decode_side`` and, with ``--cache``, kept for later epochs (``cache.py``); the recipe
    then runs batched on the device from those pixels (``gpu_augment.py``). Evaluation resizes and centre-crops
    each decoded image on the device; the validation crops are kept too when the training images are.

On CUDA the device path decodes on a stream of its own, ordered against the compute stream, in chunks of a bounded
size; running out of GPU memory is never taken for a bad file. With a cache, each batch takes what the cache holds
and decodes the rest: the workers read only the files not yet decoded, and the batches are the same either way.

Read on, in the order a batch is made: ``loader_items.py`` (what the loader's workers make of each file, and how
a batch of it is collated), ``device_decode.py`` (the device path's decoding), ``batch_iterables.py`` (the
iterables the loop takes, built here) and ``batch_producer.py`` (the device path's thread that makes them a few
batches ahead).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

import gpu_augment
from accel import Accel
from batch_iterables import DeviceEvalBatches, DeviceTrainBatches, HostBatches
from cache import CacheChoice, DecodedImages, cache_bytes, choose_cache, gpu_free_bytes
from common import IMAGENET_MEAN, IMAGENET_STD, SINGLE_PROCESS, World, processes_per_node
from dataset import TrainValData
from device_decode import DeviceDecoder
from images import DEFAULT_MAX_IMAGE_PIXELS, plain_jpeg_sizes
from loader_items import FileBytes, ImageFiles, SkipCached, collate_decoded, collate_encoded
from recipe import build_eval_transform, build_train_transform, eval_resize_size, train_decode_side
from run_config import TrainConfig
from samplers import balanced_sample_weights, epoch_batches, shard_range, sharded_epoch_batches
from utils import available_ram_bytes


@dataclass(frozen=True)
class TrainRecipe:
    """What the training recipe adds to the reference augmentation: an ``auto_augment`` policy (CPU path), random
    erasing with probability ``random_erase`` (both paths), and class-balanced sampling; and the normalization."""

    auto_augment: str = "none"
    random_erase: float = 0.0
    balanced: bool = False
    mean: tuple[float, ...] = IMAGENET_MEAN  # the normalization the pretrained weights expect
    std: tuple[float, ...] = IMAGENET_STD


@dataclass
class Loaders:
    """The training and validation batches (``common.Batch`` es on the device), and where the cache is."""

    train: HostBatches | DeviceTrainBatches
    val: HostBatches | DeviceEvalBatches | None  # None with --train-on-all
    cache: CacheChoice


def load_data(data: TrainValData, config: TrainConfig, accel: Accel, mean: Sequence[float], std: Sequence[float],
              world: World = SINGLE_PROCESS) -> Loaders:
    """Training batches (shuffled, augmented) and validation batches (the eval transform predict.py uses), each on
    the path the configuration chose for its split (``config.chosen.train_path``, ``eval_path``).

    On the CPU path the loader workers decode and augment each image with PIL; on the GPU path they read the
    files' bytes, and decoding and augmentation run on the device (see pipeline.py). Under torchrun each process
    gets its share of every step's batch and its contiguous part of the validation images.
    """
    train_on_device, eval_on_device = config.chosen.train_path == "gpu", config.chosen.eval_path == "gpu"
    train_bytes = cached_bytes(config, data.train_samples, data, training=True)
    choice = resolve_cache(config, data, accel, eval_on_device, train_bytes)
    recipe = TrainRecipe(config.auto_augment, config.random_erase, config.sampler == "balanced", mean, std)
    place = {"gpu": accel.device, "ram": torch.device("cpu")}.get(choice.place)
    train_paths, train_labels = [path for path, _ in data.train_samples], [label for _, label in data.train_samples]
    own_val = [data.val_samples[index] for index in shard_range(len(data.val_samples), world)]
    val_paths, val_labels = [path for path, _ in own_val], [label for _, label in own_val]
    train_cache = val_cache = None
    if place is not None:
        val_cache = DecodedImages(len(val_paths), place, capacity=cached_bytes(config, own_val, data, training=False))
        if train_on_device:
            train_cache = DecodedImages(len(train_paths), place, capacity=train_bytes)
    plain_jpegs = plain_jpeg_sizes(data.sizes)
    train = train_batches(train_paths, train_labels, config.img_size, config.batch_size, config.workers, config.seed,
                          accel, train_on_device, train_cache, config.max_image_pixels, recipe, world, plain_jpegs)
    val = None if not val_paths else eval_batches(
        val_paths, val_labels, config.eval_size, mean, std, config.batch_size, config.workers, accel, eval_on_device,
        val_cache, config.max_image_pixels, warn=True, plain_jpegs=plain_jpegs)
    return Loaders(train, val, choice)


def resolve_cache(config: TrainConfig, data: TrainValData, accel: Accel, on_device: bool,
                  train_bytes: int) -> CacheChoice:
    """Where ``--cache`` keeps the decoded training images (``train_bytes``) and validation crops, said in one
    line: decided here, once, as it depends on the images' sizes. Processes on one node (torchrun) share its host
    memory."""
    needed = train_bytes + cached_bytes(config, data.val_samples, data, training=False)
    choice = choose_cache(config.cache, needed, gpu_free_bytes(accel.device), available_ram_bytes(), on_device,
                          processes_on_node=processes_per_node())
    if on_device or config.cache != "auto":
        print(f"cache: {choice.place} ({choice.reason})")
    return choice


def cached_bytes(config: TrainConfig, samples: Sequence[tuple[str, int]], data: TrainValData,
                 training: bool) -> int:
    """Bytes the cache needs for ``samples``: decoded training images (sizes from the headers), or eval crops."""
    if training:
        sizes = [data.sizes.get(path, (0, 0)) for path, _ in samples]
        return cache_bytes(sizes, train_decode_side(config.img_size))
    return len(samples) * 3 * config.eval_size ** 2


def inference_batches(paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float],  # noqa: PLR0913
                      accel: Accel, on_device: bool, batch_size: int = 128, workers: int = 0,
                      max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> HostBatches | DeviceEvalBatches:
    """Unlabeled batches of ``paths`` through a trained model's eval recipe (resize to ``size``*256/224, centre
    crop ``size``, normalize by ``mean`` and ``std``), on the device path when ``on_device``: what predict.py,
    evaluate.py and train.py's final report feed a trained model."""
    return eval_batches(list(paths), None, size, mean, std, batch_size, workers, accel, on_device,
                        max_pixels=max_pixels)


def train_batches(paths: Sequence[str], labels: Sequence[int], img_size: int, batch_size: int, workers: int,  # noqa: PLR0913
                  seed: int, accel: Accel, on_device: bool, cache: DecodedImages | None = None,
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, recipe: TrainRecipe = TrainRecipe(),
                  world: World = SINGLE_PROCESS, plain_jpegs: dict[str, tuple[int, int]] | None = None,
                  ) -> HostBatches | DeviceTrainBatches:
    """The training batches of an epoch (call ``set_epoch`` first): shuffled (or drawn class-balanced) and augmented
    by the recipe, on the device (``on_device``; not with an auto-augment policy) or in the loader's workers. Under
    torchrun (``world``) this process's part of each step's global batch (see ``samplers.ShardedBatches``).
    ``plain_jpegs``: the header scan's plain JPEGs (``images.plain_jpeg_sizes``), whose bytes the device path's
    workers send without opening them. Each image left out is said once per run."""
    decode_side = train_decode_side(img_size)
    weights = balanced_sample_weights(labels) if recipe.balanced else None
    batch_sampler = (sharded_epoch_batches(len(paths), batch_size, seed, world, weights) if world.distributed
                     else epoch_batches(len(paths), batch_size, seed, weights))
    options = loader_options(workers, seed, accel, pin_memory=not on_device)
    if not on_device:
        transform = build_train_transform(img_size, recipe.mean, recipe.std, recipe.auto_augment,
                                          recipe.random_erase)
        images = ImageFiles(paths, labels, transform, decode_side, max_pixels)
        loader = DataLoader(images, batch_sampler=batch_sampler, collate_fn=collate_decoded, **options)
        return HostBatches(loader, accel, labeled=True, warn=True)
    loader = DataLoader(FileBytes(paths, labels, decode_side, max_pixels, plain_jpegs), collate_fn=collate_encoded,
                        batch_sampler=batch_sampler if cache is None else SkipCached(batch_sampler, cache), **options)
    decoder = DeviceDecoder(accel.device, decode_side, decode_side, max_pixels)
    augment = gpu_augment.TrainAugment(img_size, recipe.mean, recipe.std,
                                       random_erase=recipe.random_erase).to(accel.device)
    augment_seed = seed + 7919 * world.rank  # each process its own crops (the CPU path's come with the keys)
    return DeviceTrainBatches(loader, decoder, augment, labels, cache, augment_seed, accel)


def eval_batches(paths: Sequence[str], labels: Sequence[int] | None, img_size: int, mean: Sequence[float],  # noqa: PLR0913
                 std: Sequence[float], batch_size: int, workers: int, accel: Accel, on_device: bool,
                 cache: DecodedImages | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 warn: bool = False, plain_jpegs: dict[str, tuple[int, int]] | None = None,
                 ) -> HostBatches | DeviceEvalBatches:
    """Batches of ``paths`` in order through the eval recipe (resize, centre crop, normalize), on the device
    (``on_device``) or in the loader's workers; ``labels`` None for unlabeled images. ``warn``: say on the console
    which images cannot be decoded, the first time they are met. ``plain_jpegs``: see :func:`train_batches`."""
    decode_side = eval_resize_size(img_size)
    batch_sampler = BatchSampler(SequentialSampler(range(len(paths))), batch_size, drop_last=False)
    options = loader_options(workers, 0, accel, pin_memory=not on_device)
    if not on_device:
        images = ImageFiles(paths, labels, build_eval_transform(img_size, mean, std), decode_side, max_pixels)
        loader = DataLoader(images, batch_sampler=batch_sampler, collate_fn=collate_decoded, **options)
        return HostBatches(loader, accel, labeled=labels is not None, warn=warn)
    loader = DataLoader(FileBytes(paths, labels, decode_side, max_pixels, plain_jpegs), collate_fn=collate_encoded,
                        batch_sampler=batch_sampler if cache is None else SkipCached(batch_sampler, cache), **options)
    decoder = DeviceDecoder(accel.device, None, decode_side, max_pixels)
    transform = gpu_augment.EvalTransform(img_size, mean, std).to(accel.device)
    return DeviceEvalBatches(loader, decoder, transform, labels, cache, accel, warn)


def loader_options(workers: int, seed: int, accel: Accel, pin_memory: bool) -> dict[str, Any]:
    """DataLoader settings shared by every split: workers that stay alive, prefetching, and batches in pinned memory
    when ``pin_memory`` on CUDA (the CPU path's decoded images, copied to the GPU asynchronously; the device path's
    file bytes are read on the host by the decoder, so pinning them would be a copy for nothing)."""
    # A private generator: the loader draws its worker base seed from it, not from the global stream dropout uses.
    options: dict[str, Any] = dict(num_workers=workers, pin_memory=pin_memory and accel.device.type == "cuda",
                                   generator=torch.Generator().manual_seed(seed))
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=leave_stop_signals_to_main)
    return options


def leave_stop_signals_to_main(worker_id: int) -> None:
    """Move a loader worker to a process group of its own, so that a signal to the run's group (Ctrl-C, torchrun,
    ``kill -TERM -PGID``) reaches only the main process, which stops after its batch, keeps last.pt and ends its
    workers itself; a worker killed first would end the run with a DataLoader error. The worker still ends when
    the main process terminates it or dies."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()
