"""Files to model-ready batches on the device, for each split: the one place the data path lives.

:func:`train_batches` and :func:`eval_batches` (validation, evaluation and prediction) return iterables of
:class:`Batch` es whose images are on the device, normalized, in the model's memory format. Two paths lead there
(``--augment-device``):

``cpu``
    DataLoader workers decode each image with PIL (``dataset.decode_rgb``: EXIF orientation, transparency on
    white, 16-bit, CMYK) and run torchvision's recipe on it (``dataset.build_*_transform``); the batch is copied
    to the device. Large JPEGs are decoded at a reduced scale that keeps what the recipe needs
    (``dataset.train_decode_side`` for training, the eval resize for evaluation).
``gpu`` (the default on CUDA)
    Workers only read each file's bytes. A batch's JPEGs are decoded together on the device
    (``torchvision.io.decode_jpeg``: nvJPEG on CUDA); files it cannot take (PNG, WebP, GIF, CMYK or EXIF-rotated
    JPEGs, 16-bit images, anything it rejects) are decoded on the CPU with the rules above, by the worker when it
    can tell from the header. For training each image is scaled down once, antialiased, to a shorter side of at
    most ``dataset.train_decode_side`` and, with ``--cache``, kept for later epochs (``cache.py``); the recipe
    then runs batched on the device from those pixels (``gpu_augment.py``). Evaluation resizes and centre-crops
    each decoded image on the device; the validation crops are kept too when the training images are.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler, default_collate

import gpu_augment
from accel import Accel
from cache import DecodedImages
from distributed import World, sharded_epoch_batches
from dataset import (
    DECODE_ERRORS,
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DecodeFailure,
    EpochSampler,
    ImageFiles,
    balanced_sample_weights,
    build_eval_transform,
    build_train_transform,
    decode_error_reason,
    decode_or_failure,
    decode_rgb,
    epoch_seed,
    eval_resize_size,
    open_image,
    split_failures,
    train_decode_side,
)


class Batch(NamedTuple):
    """A batch: model-ready images on the device (None when every image of it failed to decode), their class
    indices on the device (None for unlabeled images), the dataset positions of the images in order, and the
    images that could not be decoded."""

    images: Tensor | None
    targets: Tensor | None
    positions: list[int]
    failed: list[DecodeFailure]


def loader_options(workers: int, seed: int, accel: Accel) -> dict[str, Any]:
    """DataLoader settings shared by every split: workers that stay alive, pinned memory, prefetching."""
    # A private generator: the loader draws its worker base seed from it, not from the global stream dropout uses.
    options: dict[str, Any] = dict(num_workers=workers, pin_memory=accel.device.type == "cuda",
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


def drops_lone_batch(size: int, batch_size: int) -> bool:
    """Drop the last training batch when it would hold a single image: BatchNorm cannot train on one."""
    return size % batch_size == 1 and size > 1


def epoch_batches(size: int, batch_size: int, seed: int, weights: Sequence[float] | None = None) -> BatchSampler:
    """Each epoch's batches of ``(position, sample seed)`` keys, in :class:`EpochSampler`'s order (drawn by
    ``weights`` when given)."""
    return BatchSampler(EpochSampler(size, seed, weights=weights), batch_size,
                        drop_last=drops_lone_batch(size, batch_size))


@dataclass(frozen=True)
class TrainRecipe:
    """What the training recipe adds to the reference augmentation: an ``auto_augment`` policy (CPU path), random
    erasing with probability ``random_erase`` (both paths), and class-balanced sampling; and the normalization."""

    auto_augment: str = "none"
    random_erase: float = 0.0
    balanced: bool = False
    mean: tuple[float, ...] = IMAGENET_MEAN  # the normalization the pretrained weights expect
    std: tuple[float, ...] = IMAGENET_STD


# --------------------------------------------------------------------------- the CPU path


def collate_decoded(items: list[Any]) -> Batch:
    """Stack the CPU path's ``(image, label, position)`` items (on the host); failures set aside."""
    kept, failed = split_failures(items)
    if not kept:
        return Batch(None, None, [], failed)
    images, labels, positions = default_collate(kept)  # in a worker, stacks straight into shared memory
    return Batch(images, labels, positions.tolist(), failed)


class HostBatches:
    """The CPU path: batches decoded and transformed by the loader's workers, moved to the device."""

    def __init__(self, loader: DataLoader, accel: Accel, labeled: bool) -> None:
        self.loader, self.accel, self.labeled = loader, accel, labeled

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation to produce (training)."""
        set_epoch(self.loader, epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        device = self.accel.device
        for batch in self.loader:
            if batch.images is None:
                yield batch
                continue
            targets = batch.targets.to(device, non_blocking=True) if self.labeled else None
            yield Batch(self.accel.images_to_device(batch.images), targets, batch.positions, batch.failed)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's :class:`EpochSampler` (if it has one) which epoch comes next."""
    sampler = getattr(loader.batch_sampler, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


# --------------------------------------------------------------------------- the device path: workers


class Encoded(NamedTuple):
    """The device path's item: the file's bytes (``encoded``) or, for files the device decoder does not take, the
    image decoded on the CPU (``uint8 [3, H, W]``); with its label (-1: unlabeled), position and path."""

    data: Tensor
    encoded: bool
    label: int
    position: int
    path: str


def device_decodable(image: Image.Image) -> bool:
    """True for a JPEG the device decoder reads as the CPU path would: 8-bit RGB or grey, not EXIF-rotated."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return image.format == "JPEG" and image.mode in ("RGB", "L") and orientation == 1


def pixels_of(image: Image.Image) -> Tensor:
    """An RGB PIL image as ``uint8 [3, H, W]``."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def read_for_device(path: str, decode_min_side: int | None, max_pixels: int) -> tuple[Tensor, bool]:
    """``(bytes, True)`` for a file the device decodes, else ``(uint8 [3, H, W], False)`` decoded here with the
    CPU path's rules (large JPEGs at a reduced scale keeping ``decode_min_side``)."""
    with open_image(path, max_pixels) as image:
        if device_decodable(image):
            return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8), True
    rgb, _ = decode_rgb(path, min_side=decode_min_side, max_pixels=max_pixels)
    return pixels_of(rgb), False


class FileBytes(Dataset):
    """The device path's worker side: an :class:`Encoded` per key (a position, or ``(position, seed)``), or a
    :class:`DecodeFailure` for a file that cannot be read (with a warning when ``warn``)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | None, decode_min_side: int | None,
                 max_pixels: int, warn: bool = True) -> None:
        self.paths = [str(path) for path in paths]
        self.labels = [-1] * len(self.paths) if labels is None else [int(label) for label in labels]
        self.decode_min_side, self.max_pixels, self.warn = decode_min_side, max_pixels, warn

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> Encoded | DecodeFailure:
        position = key[0] if isinstance(key, tuple) else key
        path = self.paths[position]
        try:
            data, encoded = read_for_device(path, self.decode_min_side, self.max_pixels)
        except DECODE_ERRORS as error:
            failure = DecodeFailure(path, decode_error_reason(error, path), position)
            warn_skipping(failure, self.warn)
            return failure
        return Encoded(data, encoded, self.labels[position], position, path)


def warn_skipping(failure: DecodeFailure, warn: bool) -> None:
    """The console line for an image left out as it is met (when ``warn``)."""
    if warn:
        print(f"\nwarning: skipping {failure.path}: cannot decode ({failure.reason})", file=sys.stderr)


class EncodedBatch(NamedTuple):
    """What the device path's loader yields: the readable items and the failures."""

    items: list[Encoded]
    failed: list[DecodeFailure]


def collate_encoded(items: list[Any]) -> EncodedBatch:
    """Keep the items as a list: their bytes and images differ in size."""
    kept, failed = split_failures(items)
    return EncodedBatch(kept, failed)


# --------------------------------------------------------------------------- the device path: decoding

JpegDecoder = Callable[[list[Tensor] | Tensor, torch.device], list[Tensor] | Tensor]


def jpeg_decoder() -> tuple[str, JpegDecoder]:
    """The batched JPEG decoder, by name: TorchCodec's when it is installed (PyTorch's maintained image decoders,
    from torchcodec 0.16 for torch 2.11 on), else torchvision's, which torchvision 0.29 deprecates in its favour.
    Both take encoded bytes and decode with nvJPEG on CUDA."""
    try:
        from torchcodec.decoders import decode_jpeg as torchcodec_decode
    except Exception:  # noqa: BLE001 - absent, or built for another torch: torchvision then
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as torchvision_decode

        def decode(data: list[Tensor] | Tensor, device: torch.device) -> list[Tensor] | Tensor:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchCodec.*")
                return torchvision_decode(data, mode=ImageReadMode.RGB, device=device)

        return "torchvision", decode
    return "torchcodec", lambda data, device: torchcodec_decode(data, mode="RGB", device=device)


JPEG_DECODER_NAME, decode_jpeg = jpeg_decoder()
DEVICE_DECODE_ERRORS = (RuntimeError, ValueError)


class DeviceDecoder:
    """Decodes a batch of :class:`Encoded` items on ``device``: its JPEGs in one call (nvJPEG on CUDA), one by one
    if that call fails, and by PIL on the CPU for a file the device rejects; then scales each image down to a
    shorter side of ``bound`` when it is larger."""

    def __init__(self, device: torch.device, bound: int | None, decode_min_side: int | None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, warn: bool = True) -> None:
        self.device, self.bound = device, bound
        self.decode_min_side, self.max_pixels, self.warn = decode_min_side, max_pixels, warn

    def __call__(self, items: Sequence[Encoded]) -> tuple[list[tuple[Encoded, Tensor]], list[DecodeFailure]]:
        """``(item, uint8 [3, H, W] image on the device)`` for each item decoded, and the failures."""
        jpegs = self.decode_jpegs([item for item in items if item.encoded])
        decoded, failed = [], []
        for item in items:
            image = jpegs[item.position] if item.encoded else item.data.to(self.device, non_blocking=True)
            if isinstance(image, DecodeFailure):
                failed.append(image)
            else:
                decoded.append((item, self.bounded(image)))
        return decoded, failed

    def decode_jpegs(self, items: Sequence[Encoded]) -> dict[int, Tensor | DecodeFailure]:
        """Each item's image on the device by position (or why it failed)."""
        if not items:
            return {}
        try:
            images = decode_jpeg([item.data for item in items], self.device)
        except DEVICE_DECODE_ERRORS:  # one bad file fails the whole call: find it
            images = [self.decode_one(item) for item in items]
        return {item.position: image for item, image in zip(items, images)}

    def decode_one(self, item: Encoded) -> Tensor | DecodeFailure:
        """One JPEG on the device, else with PIL on the CPU (which may take what the device rejects)."""
        try:
            return decode_jpeg(item.data, self.device)
        except DEVICE_DECODE_ERRORS:
            image = decode_or_failure(item.path, self.decode_min_side, self.max_pixels)
        if isinstance(image, DecodeFailure):
            failure = image._replace(position=item.position)
            warn_skipping(failure, self.warn)
            return failure
        return pixels_of(image).to(self.device, non_blocking=True)

    def bounded(self, image: Tensor) -> Tensor:
        """``image`` with its shorter side scaled down to ``bound`` (antialiased) when it is longer."""
        if self.bound is None or min(image.shape[-2:]) <= self.bound:
            return image
        resized = gpu_augment.resize_shorter_side(image, self.bound)
        return resized.round_().clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- the device path: batches


class DeviceTrainBatches:
    """The device path's training batches: decoded on the device (or read from ``cache``) and augmented there.

    Batch ``n`` of an epoch draws its augmentation from seed ``epoch_seed(seed, epoch) + n``: the batches are the
    same whether they come from the files or from the cache.
    """

    def __init__(self, loader: DataLoader, decoder: DeviceDecoder, augment: gpu_augment.TrainAugment,
                 labels: Sequence[int], cache: DecodedImages | None, seed: int, accel: Accel) -> None:
        self.loader, self.decoder, self.augment, self.cache = loader, decoder, augment, cache
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.seed, self.accel, self.epoch = seed, accel, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation to produce."""
        self.epoch = epoch
        set_epoch(self.loader, epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        decoded = self.from_cache() if self.cache is not None and self.cache.complete else self.from_files()
        for number, (images, positions, failed) in enumerate(decoded):
            if not images:
                yield Batch(None, None, [], failed)
                continue
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch) + number)
            targets = self.labels[positions].to(self.accel.device, non_blocking=True)
            yield Batch(self.accel.images_to_device(self.augment(images, generator)), targets, positions, failed)

    def from_files(self) -> Iterator[tuple[list[Tensor], list[int], list[DecodeFailure]]]:
        """Each batch read by the workers and decoded here; kept in the cache when there is one."""
        for batch in self.loader:
            decoded, failed = self.decoder(batch.items)
            failed = batch.failed + failed
            if self.cache is not None:
                for item, image in decoded:
                    self.cache.put(item.position, image)
                for failure in failed:
                    self.cache.fail(failure.position, failure.reason)
            yield [image for _, image in decoded], [item.position for item, _ in decoded], failed

    def from_cache(self) -> Iterator[tuple[list[Tensor], list[int], list[DecodeFailure]]]:
        """Each batch from the cache: the same positions the loader would read, nothing decoded."""
        paths = self.loader.dataset.paths
        for keys in self.loader.batch_sampler:
            positions = [position for position, _ in keys]
            kept = [position for position in positions if position not in self.cache.failures]
            failed = [DecodeFailure(paths[position], self.cache.failures[position], position)
                      for position in positions if position in self.cache.failures]
            yield self.cache.fetch(kept, self.accel.device), kept, failed


class DeviceEvalBatches:
    """The device path's evaluation batches, in order: decoded on the device, resized and centre-cropped there;
    the crops kept in ``cache`` (validation, across epochs) when given."""

    def __init__(self, loader: DataLoader, decoder: DeviceDecoder, transform: gpu_augment.EvalTransform,
                 labels: Sequence[int] | None, cache: DecodedImages | None, accel: Accel) -> None:
        self.loader, self.decoder, self.transform, self.cache, self.accel = loader, decoder, transform, cache, accel
        self.labels = None if labels is None else torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        decoded = self.from_cache() if self.cache is not None and self.cache.complete else self.from_files()
        for crops, positions, failed in decoded:
            if not crops:
                yield Batch(None, None, [], failed)
                continue
            targets = None if self.labels is None else self.labels[positions].to(self.accel.device, non_blocking=True)
            with torch.autocast(device_type=self.accel.device.type, enabled=False):
                images = self.transform.normalize_crops(crops)
            yield Batch(self.accel.images_to_device(images), targets, positions, failed)

    def from_files(self) -> Iterator[tuple[list[Tensor], list[int], list[DecodeFailure]]]:
        """Each batch read by the workers, decoded and cropped here; the crops kept when there is a cache."""
        for batch in self.loader:
            decoded, failed = self.decoder(batch.items)
            failed = batch.failed + failed
            crops = [self.transform.crop(image) for _, image in decoded]
            positions = [item.position for item, _ in decoded]
            if self.cache is not None:
                for position, crop in zip(positions, crops):
                    self.cache.put(position, crop)
                for failure in failed:
                    self.cache.fail(failure.position, failure.reason)
            yield crops, positions, failed

    def from_cache(self) -> Iterator[tuple[list[Tensor], list[int], list[DecodeFailure]]]:
        """Each batch's crops from the cache, in the loader's order."""
        paths = self.loader.dataset.paths
        for positions in self.loader.batch_sampler:
            kept = [position for position in positions if position not in self.cache.failures]
            failed = [DecodeFailure(paths[position], self.cache.failures[position], position)
                      for position in positions if position in self.cache.failures]
            yield self.cache.fetch(kept, self.accel.device), kept, failed


# --------------------------------------------------------------------------- the two splits


def train_batches(paths: Sequence[str], labels: Sequence[int], img_size: int, batch_size: int, workers: int,
                  seed: int, accel: Accel, on_device: bool, cache: DecodedImages | None = None,
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                  recipe: TrainRecipe = TrainRecipe(), world: World = World()) -> HostBatches | DeviceTrainBatches:
    """The training batches of an epoch (call ``set_epoch`` first): shuffled (or drawn class-balanced) and augmented
    by the recipe, on the device (``on_device``; not with an auto-augment policy) or in the loader's workers. Under
    torchrun (``world``) this process's part of each step's global batch (see ``distributed.ShardedBatches``)."""
    decode_side = train_decode_side(img_size)
    weights = balanced_sample_weights(labels) if recipe.balanced else None
    batch_sampler = (sharded_epoch_batches(len(paths), batch_size, seed, world, weights) if world.distributed
                     else epoch_batches(len(paths), batch_size, seed, weights))
    options = loader_options(workers, seed, accel)
    if not on_device:
        transform = build_train_transform(img_size, recipe.mean, recipe.std, recipe.auto_augment,
                                          recipe.random_erase)
        images = ImageFiles(paths, labels, transform, decode_side, max_pixels)
        loader = DataLoader(images, batch_sampler=batch_sampler, collate_fn=collate_decoded, **options)
        return HostBatches(loader, accel, labeled=True)
    loader = DataLoader(FileBytes(paths, labels, decode_side, max_pixels), batch_sampler=batch_sampler,
                        collate_fn=collate_encoded, **options)
    decoder = DeviceDecoder(accel.device, decode_side, decode_side, max_pixels)
    augment = gpu_augment.TrainAugment(img_size, recipe.mean, recipe.std,
                                       random_erase=recipe.random_erase).to(accel.device)
    augment_seed = seed + 7919 * world.rank  # each process its own crops (the CPU path's come with the keys)
    return DeviceTrainBatches(loader, decoder, augment, labels, cache, augment_seed, accel)


def eval_batches(paths: Sequence[str], labels: Sequence[int] | None, img_size: int, mean: Sequence[float],
                 std: Sequence[float], batch_size: int, workers: int, accel: Accel, on_device: bool,
                 cache: DecodedImages | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 warn: bool = False) -> HostBatches | DeviceEvalBatches:
    """Batches of ``paths`` in order through the eval recipe (resize, centre crop, normalize), on the device
    (``on_device``) or in the loader's workers; ``labels`` None for unlabeled images. ``warn``: say on the console
    which images cannot be decoded, as they are met."""
    decode_side = eval_resize_size(img_size)
    batch_sampler = BatchSampler(SequentialSampler(range(len(paths))), batch_size, drop_last=False)
    options = loader_options(workers, 0, accel)
    if not on_device:
        images = ImageFiles(paths, labels, build_eval_transform(img_size, mean, std), decode_side, max_pixels, warn)
        loader = DataLoader(images, batch_sampler=batch_sampler, collate_fn=collate_decoded, **options)
        return HostBatches(loader, accel, labeled=labels is not None)
    loader = DataLoader(FileBytes(paths, labels, decode_side, max_pixels, warn), batch_sampler=batch_sampler,
                        collate_fn=collate_encoded, **options)
    decoder = DeviceDecoder(accel.device, None, decode_side, max_pixels, warn)
    transform = gpu_augment.EvalTransform(img_size, mean, std).to(accel.device)
    return DeviceEvalBatches(loader, decoder, transform, labels, cache, accel)
