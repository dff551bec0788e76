"""Files to model-ready batches on the device, for each split: the one place the data path lives.

:func:`train_batches` and :func:`eval_batches` (validation, evaluation and prediction) return iterables of
:class:`Batch` es whose images are on the device, normalized, in the model's memory format. Two paths lead there
(``--augment-device``):

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

On CUDA the device path decodes on a stream of its own, ordered against the compute stream (see
:class:`DecodeStream`), in chunks of at most :data:`DECODE_BUDGET` decoded bytes; running out of GPU memory is never
taken for a bad file. With a cache, each batch takes what the cache holds and decodes the rest: the workers read
only the files not yet decoded (:class:`SkipCached`), and the batches are the same either way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler, default_collate

import gpu_augment
from accel import Accel
from cache import CacheChoice, DecodedImages, cache_bytes, choose_cache, gpu_free_bytes
from checkpoint import eval_size
from common import IMAGENET_MEAN, IMAGENET_STD, Batch, DecodeFailure, World, processes_per_node
from dataset import TrainValData
from images import (
    DECODE_ERRORS,
    DEFAULT_MAX_IMAGE_PIXELS,
    decode_error_reason,
    decode_rgb,
    device_decodable,
    load_rgb,
    open_image,
    plain_jpeg_sizes,
)
from recipe import build_eval_transform, build_train_transform, eval_resize_size, train_decode_side
from samplers import balanced_sample_weights, epoch_batches, epoch_seed, shard_range, sharded_epoch_batches
from utils import available_ram_bytes


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
    """The CPU path: batches decoded and transformed by the loader's workers, moved to the device. ``warn``: say
    each image left out on the console, once per run."""

    def __init__(self, loader: DataLoader, accel: Accel, labeled: bool, warn: bool = False) -> None:
        self.loader, self.accel, self.labeled = loader, accel, labeled
        self.warnings = SkipWarnings(warn)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation to produce (training)."""
        set_epoch(self.loader, epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        return self.warnings.passing(self.moved())

    def moved(self) -> Iterator[Batch]:
        """The loader's batches, on the device."""
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
    image decoded on the CPU (``uint8 [3, H, W]``); with its label (-1: unlabeled), position, path and the
    ``(width, height)`` it decodes to (from the JPEG's header; ``(0, 0)``: unknown)."""

    data: Tensor
    encoded: bool
    label: int
    position: int
    path: str
    size: tuple[int, int] = (0, 0)

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the decoded ``uint8`` RGB image."""
        return 3 * self.size[0] * self.size[1]


class Cached(NamedTuple):
    """The key, and the item the worker returns for it, of a position whose image (or failure) the cache holds:
    nothing is read, the main process takes the image from the cache."""

    position: int


def pixels_of(image: Image.Image) -> Tensor:
    """An RGB PIL image as ``uint8 [3, H, W]``."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def read_for_device(path: str, decode_min_side: int | None, max_pixels: int,
                    plain_size: tuple[int, int] | None = None) -> tuple[Tensor, bool, tuple[int, int]]:
    """``(bytes, True, (width, height) from the header)`` for a file the device decodes, else
    ``(uint8 [3, H, W], False, (W, H))`` decoded here with the CPU path's rules (large images at a reduced scale
    keeping ``decode_min_side``). ``plain_size``: the header scan found a plain JPEG of that size (see
    ``images.ImageSize``), so only its bytes are read."""
    if plain_size is not None:
        return file_bytes(path), True, plain_size
    with open_image(path, max_pixels) as image:
        if device_decodable(image):
            return file_bytes(path), True, image.size
    rgb, _ = decode_rgb(path, min_side=decode_min_side, max_pixels=max_pixels)
    return pixels_of(rgb), False, rgb.size


def file_bytes(path: str) -> Tensor:
    """The bytes of the file at ``path`` as a ``uint8`` tensor."""
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


class FileBytes(Dataset):
    """The device path's worker side: an :class:`Encoded` per key (a position, or ``(position, seed)``), or a
    :class:`DecodeFailure` for a file that cannot be read; a :class:`Cached` key comes back as it is, unread.
    ``plain_jpegs``: the sizes of the files the header scan found to be plain JPEGs (``images.plain_jpegs``), whose
    bytes are sent without opening them again."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | None, decode_min_side: int | None,
                 max_pixels: int, plain_jpegs: dict[str, tuple[int, int]] | None = None) -> None:
        self.paths = [str(path) for path in paths]
        self.labels = [-1] * len(self.paths) if labels is None else [int(label) for label in labels]
        self.decode_min_side, self.max_pixels = decode_min_side, max_pixels
        self.plain_jpegs = plain_jpegs or {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int] | Cached) -> Encoded | Cached | DecodeFailure:
        if isinstance(key, Cached):
            return key
        position = key_position(key)
        path = self.paths[position]
        try:
            data, encoded, size = read_for_device(path, self.decode_min_side, self.max_pixels,
                                                  self.plain_jpegs.get(path))
        except DECODE_ERRORS as error:
            return DecodeFailure(path, decode_error_reason(error, path), position)
        return Encoded(data, encoded, self.labels[position], position, path, size)


def key_position(key: int | tuple[int, int]) -> int:
    """The dataset position of a sampler key: a position, or ``(position, seed)``."""
    return key[0] if isinstance(key, tuple) else key


class SkipCached(Sampler[list]):
    """``batches`` (a batch sampler) with each key whose position ``cache`` holds replaced by :class:`Cached`, so
    the workers read only the files still to decode. The loader iterates it in the main process, where the cache
    lives (a few batches ahead: a key cached meanwhile is just read and decoded again). ``sampler`` is the wrapped
    one's, for :func:`set_epoch`."""

    def __init__(self, batches: Iterable[list], cache: DecodedImages) -> None:
        self.batches, self.cache = batches, cache
        self.sampler = getattr(batches, "sampler", None)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list]:
        for keys in self.batches:
            yield [Cached(key_position(key)) if self.cache.has(key_position(key)) else key for key in keys]


class Packed(NamedTuple):
    """An :class:`Encoded` item on its way from a worker: its data lies in the batch's buffer from ``start``, with
    ``shape``."""

    start: int
    shape: tuple[int, ...]
    encoded: bool
    label: int
    position: int
    path: str
    size: tuple[int, int]

    def unpacked(self, buffer: Tensor) -> Encoded:
        """The item, its data a view of ``buffer``."""
        count = int(np.prod(self.shape))
        data = buffer[self.start:self.start + count].view(self.shape)
        return Encoded(data, self.encoded, self.label, self.position, self.path, self.size)


class EncodedBatch(NamedTuple):
    """What the device path's loader yields: one ``uint8`` buffer holding every item's bytes (or CPU-decoded
    pixels) end to end, the readable (or cached) items in the batch's order as :class:`Packed` records, and the
    failures. One tensor crosses from the worker, not one per image (each costs the main process a shared-memory
    handle to open)."""

    buffer: Tensor
    packed: list[Packed | Cached]
    failed: list[DecodeFailure]

    @property
    def items(self) -> list[Encoded | Cached]:
        """The items, each :class:`Encoded` one's data a view of the buffer."""
        return [entry if isinstance(entry, Cached) else entry.unpacked(self.buffer) for entry in self.packed]


def collate_encoded(items: list[Any]) -> EncodedBatch:
    """Pack the items' bytes and pixels into one buffer (they differ in size), failures set aside."""
    kept, failed = split_failures(items)
    encoded = [item for item in kept if isinstance(item, Encoded)]
    starts = np.cumsum([0] + [item.data.numel() for item in encoded]).tolist()
    buffer = (torch.cat([item.data.reshape(-1) for item in encoded]) if encoded
              else torch.empty(0, dtype=torch.uint8))
    placed = iter(zip(starts, encoded))
    packed: list[Packed | Cached] = [item if isinstance(item, Cached) else pack(*next(placed)) for item in kept]
    return EncodedBatch(buffer, packed, failed)


def pack(start: int, item: Encoded) -> Packed:
    """``item``'s record once its data lies in the batch's buffer from ``start``."""
    return Packed(start, tuple(item.data.shape), item.encoded, item.label, item.position, item.path, item.size)


# --------------------------------------------------------------------------- the device path: decoding

JpegDecoder = Callable[[list[Tensor] | Tensor, torch.device], list[Tensor] | Tensor]


def jpeg_decoder() -> tuple[str, JpegDecoder]:
    """The batched JPEG decoder, by name: TorchCodec's when it is installed (PyTorch's maintained image decoders,
    from torchcodec 0.16 for torch 2.11 on), else torchvision's, which torchvision 0.29 deprecates in its favour.
    Both take encoded bytes and decode with nvJPEG on CUDA."""
    try:
        from torchcodec.decoders import decode_jpeg as torchcodec_decode
    except Exception:  # noqa: BLE001 - absent, or built for another torch: torchvision then
        import torchvision

        return "torchvision", torchvision_jpeg_decoder(takes_jpeg_lists(torchvision.__version__))
    return "torchcodec", lambda data, device: torchcodec_decode(data, mode="RGB", device=device)


def takes_jpeg_lists(torchvision_version: str) -> bool:
    """True when torchvision's ``decode_jpeg`` takes a list of JPEGs (one batched nvJPEG call): 0.20 and newer."""
    major, minor = (int(part) for part in re.findall(r"\d+", torchvision_version)[:2])
    return (major, minor) >= (0, 20)


def torchvision_jpeg_decoder(takes_lists: bool) -> JpegDecoder:
    """torchvision's ``decode_jpeg`` to RGB; a list is decoded one JPEG at a time where it takes none (0.19)."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as torchvision_decode

    def decode(data: list[Tensor] | Tensor, device: torch.device) -> list[Tensor] | Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchCodec.*")
            if isinstance(data, list) and not takes_lists:
                return [torchvision_decode(one, mode=ImageReadMode.RGB, device=device) for one in data]
            return torchvision_decode(data, mode=ImageReadMode.RGB, device=device)

    return decode


JPEG_DECODER_NAME, decode_jpeg = jpeg_decoder()
DEVICE_DECODE_ERRORS = (RuntimeError, ValueError)  # a file the device rejects; never an out-of-memory error
DECODE_BUDGET = 256 * 2**20  # bytes of decoded uint8 RGB at most per device decode call


def record_on(tensor: Tensor, stream: Any) -> None:
    """Tell PyTorch's caching allocator that ``stream`` uses ``tensor``: its memory is not handed out again
    before the work queued there by the time it is freed has run."""
    tensor.record_stream(stream)


class DecodeStream:
    """Runs the decodes of a CUDA ``device`` on a stream of their own (created once): the compute stream then waits
    for the decode, and each output is recorded as used by the compute stream.

    torchvision's batched nvJPEG decode (before pytorch/vision#9606) and TorchCodec's (up to 0.16) allocate their
    output on the caller's stream while nvJPEG writes it from its own: on the compute stream they could be handed
    memory that kernels queued there still read. Off CUDA the decode simply runs.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream: Any = None

    def run(self, decode: Callable[[], list[Any]]) -> list[Any]:
        """``decode()`` on the decode stream; the tensors among its results are then safe on the compute stream."""
        if self.device.type != "cuda":
            return decode()
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        # The decode stream does not wait for the compute stream: the decode reads host bytes only, and the memory
        # it allocates on its own stream is handed back only once the compute stream is done with it (record_on).
        # Waiting would also make nvJPEG's internal synchronizations wait for the training step queued before.
        with torch.cuda.stream(self.stream):
            results = decode()
        compute.wait_stream(self.stream)
        for result in results:
            if isinstance(result, Tensor):
                record_on(result, compute)
        return results


def decode_chunks(items: Sequence[Encoded], budget: int) -> list[list[Encoded]]:
    """``items`` in order, in consecutive groups whose decoded images take at most ``budget`` bytes together (an
    image larger than that in a group of its own)."""
    chunks: list[list[Encoded]] = []
    total = 0
    for item in items:
        if not chunks or total + item.decoded_bytes > budget:
            chunks.append([])
            total = 0
        chunks[-1].append(item)
        total += item.decoded_bytes
    return chunks


class DeviceDecoder:
    """Decodes a batch of :class:`Encoded` items on ``device``: its JPEGs together in chunks of at most ``budget``
    decoded bytes (nvJPEG on CUDA, on a :class:`DecodeStream`), a chunk one by one if its call fails, and by PIL on
    the CPU a file the device rejects; then scales each image down to a shorter side of ``bound`` when it is
    larger. Running out of GPU memory is raised, not taken for a bad file. The failures are returned, not said:
    the batches say each once (:class:`SkipWarnings`)."""

    def __init__(self, device: torch.device, bound: int | None, decode_min_side: int | None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, budget: int = DECODE_BUDGET) -> None:
        self.device, self.bound, self.budget = device, bound, budget
        self.decode_min_side, self.max_pixels = decode_min_side, max_pixels
        self.stream = DecodeStream(device)

    def __call__(self, items: Sequence[Encoded]) -> tuple[list[tuple[Encoded, Tensor]], list[DecodeFailure]]:
        """``(item, uint8 [3, H, W] image on the device)`` for each item decoded, and the failures."""
        jpegs = self.decode_jpegs([item for item in items if item.encoded])
        decoded, failed = [], []
        for item in items:
            image = jpegs[item.position] if item.encoded else self.bounded(item.data.to(self.device, non_blocking=True))
            if isinstance(image, DecodeFailure):
                failed.append(image)
            else:
                decoded.append((item, image))
        return decoded, failed

    def decode_jpegs(self, items: Sequence[Encoded]) -> dict[int, Tensor | DecodeFailure]:
        """Each item's bounded image on the device by position (or why it failed), chunk by chunk."""
        images: dict[int, Tensor | DecodeFailure] = {}
        for chunk in decode_chunks(items, self.budget):
            images.update(self.decode_chunk(chunk))
        return images

    def decode_chunk(self, items: Sequence[Encoded]) -> dict[int, Tensor | DecodeFailure]:
        """One chunk's bounded images by position (or why they failed); the full-size ones freed on return."""
        images = self.stream.run(partial(self.decode_together, items))
        return {item.position: image if isinstance(image, DecodeFailure) else self.bounded(image)
                for item, image in zip(items, images)}

    def decode_together(self, items: Sequence[Encoded]) -> list[Tensor | DecodeFailure]:
        """The items' images in one device call, or one by one when it fails (one bad file fails it all)."""
        try:
            return list(decode_jpeg([item.data for item in items], self.device))
        except torch.cuda.OutOfMemoryError:
            raise  # not a bad file: decoding one by one would hide it
        except DEVICE_DECODE_ERRORS:
            return [self.decode_one(item) for item in items]

    def decode_one(self, item: Encoded) -> Tensor | DecodeFailure:
        """One JPEG on the device, else with PIL on the CPU (which may take what the device rejects)."""
        try:
            return decode_jpeg(item.data, self.device)
        except torch.cuda.OutOfMemoryError:
            raise
        except DEVICE_DECODE_ERRORS:
            image = decode_or_failure(item.path, self.decode_min_side, self.max_pixels)
        if isinstance(image, DecodeFailure):
            return image._replace(position=item.position)
        return pixels_of(image).to(self.device, non_blocking=True)

    def bounded(self, image: Tensor) -> Tensor:
        """``image`` with its shorter side scaled down to ``bound`` (antialiased) when it is longer."""
        if self.bound is None or min(image.shape[-2:]) <= self.bound:
            return image
        resized = gpu_augment.resize_shorter_side(image, self.bound)
        return resized.round_().clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- the device path: batches

ItemDecoder = Callable[[Sequence[Encoded]], tuple[list[tuple[Encoded, Tensor]], list[DecodeFailure]]]
DecodedBatch = tuple[list[Tensor], list[int], list[DecodeFailure]]


def decoded_batches(batches: Iterable[EncodedBatch], decode: ItemDecoder, cache: DecodedImages | None,
                    device: torch.device, paths: Sequence[str]) -> Iterator[DecodedBatch]:
    """Each of the loader's ``batches`` as ``(images on device, their positions, failures)``, images in the batch's
    order: the items the workers read decoded by ``decode`` (and kept in ``cache``), the :class:`Cached` ones
    taken from ``cache``. ``paths``: the dataset's, by position."""
    for batch in batches:
        items = batch.items
        decoded, failed = decode([item for item in items if isinstance(item, Encoded)])
        failed = batch.failed + failed
        if cache is not None:
            keep(cache, decoded, failed)
        images = {item.position: image for item, image in decoded}
        held = [item.position for item in items if isinstance(item, Cached)]
        if held:
            images.update(cached_images(cache, held, device))
            failed += cached_failures(cache, held, paths)
        positions = [item.position for item in items if item.position in images]
        yield [images[position] for position in positions], positions, failed


def keep(cache: DecodedImages, decoded: list[tuple[Encoded, Tensor]], failed: list[DecodeFailure]) -> None:
    """Put a batch's decoded images and failures in ``cache``."""
    for item, image in decoded:
        cache.put(item.position, image)
    for failure in failed:
        cache.fail(failure.position, failure.reason)


def cached_images(cache: DecodedImages, positions: Sequence[int], device: torch.device) -> dict[int, Tensor]:
    """The images ``cache`` holds for ``positions`` (not the failures), on ``device``, in one fetch."""
    kept = [position for position in dict.fromkeys(positions) if position not in cache.failures]
    return dict(zip(kept, cache.fetch(kept, device)))


def cached_failures(cache: DecodedImages, positions: Sequence[int], paths: Sequence[str]) -> list[DecodeFailure]:
    """The failures ``cache`` remembers among ``positions``."""
    return [DecodeFailure(paths[position], cache.failures[position], position)
            for position in positions if position in cache.failures]


class SkipWarnings:
    """The console line for each image left out, said once per run (not once per epoch) when ``enabled``: the
    epoch's failures still come with its batches, for skipped_files.txt and the counts."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.said: set[str] = set()

    def passing(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """``batches`` as they are, saying each new failure first."""
        for batch in batches:
            for failure in batch.failed:
                self.say(failure)
            yield batch

    def say(self, failure: DecodeFailure) -> None:
        """Warn about ``failure`` unless its file was warned about already."""
        if self.enabled and failure.path not in self.said:
            self.said.add(failure.path)
            print(f"\nwarning: skipping {failure.path}: cannot decode ({failure.reason})", file=sys.stderr)


def skip_count(failed: Iterable[DecodeFailure]) -> int:
    """How many files ``failed`` (a pass's failures, as ``engine.EpochResult.failed``) names: the epoch line's
    count of images left out."""
    return len({failure.path for failure in failed})


# --------------------------------------------------------------------------- the device path: the producer

PREFETCH_BATCHES = 2  # batches the producer prepares ahead of the one the model steps on
POLL_S = 0.1  # seconds between looks at a stop request while waiting on the other thread


class SideStream:
    """Where the producer thread issues a CUDA ``device``'s work: a stream of its own, and an event after each
    batch that the consumer's stream waits on before using it. Off CUDA there is none and nothing waits."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream: Any = None
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)  # the thread's current device is not the caller's
            self.stream = torch.cuda.Stream(self.device)

    def issuing(self) -> contextlib.AbstractContextManager:
        """The producer's context: its device and stream current (in its thread) while it issues a batch."""
        if self.stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def ready(self) -> Any:
        """An event recorded on the stream once a batch's work is queued (None off CUDA)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def received(self, batch: Batch, event: Any) -> Batch:
        """``batch`` made safe on the consumer's current stream: it waits for ``event``, and the caching allocator
        is told that stream uses the batch's tensors (they were allocated on the producer's)."""
        if event is None:
            return batch
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(event)
        for tensor in (batch.images, batch.targets):
            if tensor is not None:
                record_on(tensor, consumer)
        return batch


class ProducerFailed(NamedTuple):
    """What the producer hands over when making a batch raised: the exception, raised again by the consumer."""

    error: BaseException


PRODUCER_DONE = None  # handed over once every batch has been


class BatchProducer:
    """Makes ``batches`` (decoding, cache writes, augmentation) in a thread of its own while the caller's thread
    steps on the previous ones, at most ``depth`` batches ahead (plus the one in hand), its CUDA work on a
    :class:`SideStream`. Iterate it once; an exception in the thread is raised in the caller's; :meth:`stop` (when
    the caller's iteration ends, finishes early, or is interrupted) ends the thread after its current batch."""

    def __init__(self, batches: Iterator[Batch], device: torch.device, depth: int = PREFETCH_BATCHES,
                 side: SideStream | None = None) -> None:
        self.side = side or SideStream(device)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.produce, args=(batches,), name="batch-producer", daemon=True)
        self.thread.start()

    def produce(self, batches: Iterator[Batch]) -> None:
        """The thread: each batch made and handed over with its event, then the end (or the exception)."""
        try:
            with self.side.issuing(), torch.no_grad():
                for batch in batches:
                    if not self.hand_over((batch, self.side.ready())):
                        return
        except BaseException as error:  # noqa: BLE001 - every kind goes to the caller's thread, raised there
            self.hand_over(ProducerFailed(error))
            return
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        self.hand_over(PRODUCER_DONE)

    def hand_over(self, item: Any) -> bool:
        """Put ``item`` in the queue once there is room; False when the caller stopped meanwhile."""
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self.take()
            if item is PRODUCER_DONE:
                return
            if isinstance(item, ProducerFailed):
                raise item.error
            yield self.side.received(*item)

    def take(self) -> Any:
        """The next item; waits in short slices, so Ctrl-C reaches the caller's thread promptly."""
        while True:
            try:
                return self.queue.get(timeout=POLL_S)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError("the batch producer thread ended without handing over its batches") from None

    def stop(self) -> None:
        """End the thread: it finishes the batch in hand, sees the request and returns; waits for it."""
        self.stopping.set()
        while True:  # make room, so a thread blocked on a full queue sees the request at once
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join()


def produced(batches: Iterator[Batch], device: torch.device, depth: int) -> Iterator[Batch]:
    """``batches``, made by a :class:`BatchProducer` ``depth`` batches ahead (0: made here, as they are taken)."""
    if depth <= 0:
        yield from batches
        return
    producer = BatchProducer(batches, device, depth)
    try:
        yield from producer
    finally:
        producer.stop()


class DeviceTrainBatches:
    """The device path's training batches: decoded on the device (or read from ``cache``) and augmented there, by
    a producer thread ``prefetch`` batches ahead of the model's step (0: in the caller's thread, for debugging).

    Batch ``n`` of an epoch draws its augmentation from seed ``epoch_seed(seed, epoch) + n``: the batches are the
    same whether their images come from the files, from the cache or from both, and with or without the producer.
    ``warn``: say each image left out on the console, once per run.
    """

    def __init__(self, loader: DataLoader, decoder: DeviceDecoder, augment: gpu_augment.TrainAugment,
                 labels: Sequence[int], cache: DecodedImages | None, seed: int, accel: Accel,
                 warn: bool = True, prefetch: int = PREFETCH_BATCHES) -> None:
        self.loader, self.decoder, self.augment, self.cache = loader, decoder, augment, cache
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.seed, self.accel, self.epoch = seed, accel, 0
        self.warnings, self.prefetch = SkipWarnings(warn), prefetch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation to produce."""
        self.epoch = epoch
        set_epoch(self.loader, epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        # The loader's iterator is made here, in the caller's thread: its workers start (fork) from it.
        batches = self.augmented(iter(self.loader), self.epoch)
        return self.warnings.passing(produced(batches, self.accel.device, self.prefetch))

    def augmented(self, loaded: Iterator[EncodedBatch], epoch: int) -> Iterator[Batch]:
        """The epoch's batches, decoded and augmented."""
        batches = decoded_batches(loaded, self.decoder, self.cache, self.accel.device, self.loader.dataset.paths)
        for number, (images, positions, failed) in enumerate(batches):
            if not images:
                yield Batch(None, None, [], failed)
                continue
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch) + number)
            targets = self.labels[positions].to(self.accel.device, non_blocking=True)
            yield Batch(self.accel.images_to_device(self.augment(images, generator)), targets, positions, failed)


class DeviceEvalBatches:
    """The device path's evaluation batches, in order: decoded on the device, resized and centre-cropped there
    by a producer thread ``prefetch`` batches ahead (0: in the caller's thread); the crops kept in ``cache``
    (validation, across epochs) when given. ``warn``: say each image left out on the console, once per run."""

    def __init__(self, loader: DataLoader, decoder: DeviceDecoder, transform: gpu_augment.EvalTransform,
                 labels: Sequence[int] | None, cache: DecodedImages | None, accel: Accel,
                 warn: bool = False, prefetch: int = PREFETCH_BATCHES) -> None:
        self.loader, self.decoder, self.transform, self.cache, self.accel = loader, decoder, transform, cache, accel
        self.labels = None if labels is None else torch.tensor(labels, dtype=torch.int64)
        self.warnings, self.prefetch = SkipWarnings(warn), prefetch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        batches = self.normalized(iter(self.loader))
        return self.warnings.passing(produced(batches, self.accel.device, self.prefetch))

    def normalized(self, loaded: Iterator[EncodedBatch]) -> Iterator[Batch]:
        """The batches, decoded, cropped and normalized."""
        device = self.accel.device
        for crops, positions, failed in decoded_batches(loaded, self.cropped, self.cache, device,
                                                        self.loader.dataset.paths):
            if not crops:
                yield Batch(None, None, [], failed)
                continue
            targets = None if self.labels is None else self.labels[positions].to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, enabled=False):
                images = self.transform.normalize_crops(crops)
            yield Batch(self.accel.images_to_device(images), targets, positions, failed)

    def cropped(self, items: Sequence[Encoded]) -> tuple[list[tuple[Encoded, Tensor]], list[DecodeFailure]]:
        """The items decoded and centre-cropped (what the cache keeps), and the failures."""
        decoded, failed = self.decoder(items)
        if not decoded:
            return [], failed
        crops = self.transform.crops([image for _, image in decoded]).unbind(0)  # one batched resize, not one a crop
        return [(item, crop) for (item, _), crop in zip(decoded, crops)], failed


# --------------------------------------------------------------------------- the two splits


def train_batches(paths: Sequence[str], labels: Sequence[int], img_size: int, batch_size: int, workers: int,
                  seed: int, accel: Accel, on_device: bool, cache: DecodedImages | None = None,
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, recipe: TrainRecipe = TrainRecipe(),
                  world: World = World(), plain_jpegs: dict[str, tuple[int, int]] | None = None,
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


def eval_batches(paths: Sequence[str], labels: Sequence[int] | None, img_size: int, mean: Sequence[float],
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


class ImageFiles(Dataset):
    """The CPU path's items: ``(image tensor, label, position)``, decoded with PIL and transformed in the worker.

    Keys are positions, or ``(position, seed)`` from :class:`EpochSampler`: the transform's randomness is then drawn
    from that seed. ``labels`` None gives label -1 (unlabeled images). An image that fails to decode yields a
    :class:`DecodeFailure` (said on the console by :class:`HostBatches`). ``decode_min_side`` lets large images
    decode at a reduced scale (see :func:`load_rgb`); ``max_pixels`` is the size limit of :func:`check_pixel_count`.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | None,
        transform: Callable[[Image.Image], torch.Tensor],
        decode_min_side: int | None = None,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.paths = [str(path) for path in paths]
        self.labels = [-1] * len(self.paths) if labels is None else [int(label) for label in labels]
        self.transform = transform
        self.decode_min_side = decode_min_side
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int] | DecodeFailure:
        position, seed = key if isinstance(key, tuple) else (key, None)
        path = self.paths[position]
        image = decode_or_failure(path, self.decode_min_side, self.max_pixels)
        if isinstance(image, DecodeFailure):
            return image._replace(position=position)
        return transform_seeded(self.transform, image, seed), self.labels[position], position


def transform_seeded(transform: Callable[[Image.Image], torch.Tensor], image: Image.Image,
                     seed: int | None) -> torch.Tensor:
    """``transform(image)``, its randomness drawn from ``seed`` when given, leaving the global RNG untouched.

    Only the CPU generator is seeded (torchvision's transforms draw from it): ``torch.manual_seed`` would also
    reseed the CUDA generator, and dropout on the GPU would then repeat its masks (with ``--workers 0``).
    """
    if seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return transform(image)


def decode_or_failure(path: str, min_side: int | None = None,
                      max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image | DecodeFailure:
    """The RGB image of ``path`` (see :func:`load_rgb`), or a :class:`DecodeFailure` saying why there is none."""
    try:
        return load_rgb(path, min_side, max_pixels)
    except DECODE_ERRORS as error:
        return DecodeFailure(path, decode_error_reason(error, path))


def split_failures(batch: list[Any]) -> tuple[list[Any], list[DecodeFailure]]:
    """Separate decoded items from :class:`DecodeFailure` markers."""
    failed = [item for item in batch if isinstance(item, DecodeFailure)]
    return [item for item in batch if not isinstance(item, DecodeFailure)], failed


@dataclass
class Loaders:
    """The training and validation batches (``common.Batch`` es on the device), and where the cache is."""

    train: HostBatches | DeviceTrainBatches
    val: HostBatches | DeviceEvalBatches | None  # None with --train-on-all
    cache: CacheChoice


def choose_data_path(request: str, device: torch.device) -> str:
    """Which path decodes and augments (``gpu`` or ``cpu``), for train.py, predict.py and evaluate.py alike:
    ``auto`` decodes and augments on the GPU when training on CUDA, else on the CPU in the
    loader workers. ``gpu`` on another device runs that path there (batched in the main process: slower than the
    workers on a CPU, but the same code as on a GPU), with a note."""
    if request == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    if request == "gpu" and device.type != "cuda":
        print(f"note: --augment-device gpu on a {device.type} run: images are decoded and augmented batched on the "
              f"{device.type} by the GPU path's code (slower than --augment-device cpu here)")
    return request


def cached_bytes(args: argparse.Namespace, samples: Sequence[tuple[str, int]], data: TrainValData,
                 training: bool) -> int:
    """Bytes the cache needs for ``samples``: decoded training images (sizes from the headers), or eval crops."""
    if training:
        sizes = [data.sizes.get(path, (0, 0)) for path, _ in samples]
        return cache_bytes(sizes, train_decode_side(args.img_size))
    return len(samples) * 3 * (args.test_size or args.img_size) ** 2


def resolve_cache(args: argparse.Namespace, data: TrainValData, accel: Accel, on_device: bool,
                  train_bytes: int) -> CacheChoice:
    """Where ``--cache`` keeps the decoded training images (``train_bytes``) and validation crops, said in one
    line. Processes on one node (torchrun) share its host memory."""
    needed = train_bytes + cached_bytes(args, data.val_samples, data, training=False)
    choice = choose_cache(args.cache, needed, gpu_free_bytes(accel.device), available_ram_bytes(), on_device,
                          processes_on_node=processes_per_node())
    if on_device or args.cache != "auto":
        print(f"cache: {choice.place} ({choice.reason})")
    return choice


def load_data(data: TrainValData, args: argparse.Namespace, accel: Accel, mean: Sequence[float], std: Sequence[float],
              world: World = World(), data_path: str | None = None) -> Loaders:
    """Training batches (shuffled, augmented) and validation batches (the eval transform predict.py uses).

    On the CPU path the loader workers decode and augment each image with PIL; on the GPU path they read the
    files' bytes, and decoding and augmentation run on the device (see pipeline.py). Under torchrun each process
    gets its share of every step's batch and its contiguous part of the validation images. ``data_path``: the path
    ``choose_data_path`` chose already (train.py chooses once), else chosen here from ``--augment-device``.
    """
    on_device = (data_path or choose_data_path(args.augment_device, accel.device)) == "gpu"
    if on_device and args.auto_augment != "none":
        print(f"note: --auto-augment {args.auto_augment} runs in the loader workers: training images take the CPU "
              "path (PIL), validation stays on the device")
    train_bytes = cached_bytes(args, data.train_samples, data, training=True)
    choice = resolve_cache(args, data, accel, on_device, train_bytes)
    recipe = TrainRecipe(args.auto_augment, args.random_erase, args.sampler == "balanced", mean, std)
    place = {"gpu": accel.device, "ram": torch.device("cpu")}.get(choice.place)
    train_paths, train_labels = [path for path, _ in data.train_samples], [label for _, label in data.train_samples]
    own_val = [data.val_samples[index] for index in shard_range(len(data.val_samples), world)]
    val_paths, val_labels = [path for path, _ in own_val], [label for _, label in own_val]
    train_on_device = on_device and args.auto_augment == "none"
    train_cache = val_cache = None
    if place is not None:
        val_cache = DecodedImages(len(val_paths), place, capacity=cached_bytes(args, own_val, data, training=False))
        if train_on_device:
            train_cache = DecodedImages(len(train_paths), place, capacity=train_bytes)
    plain_jpegs = plain_jpeg_sizes(data.sizes)
    train = train_batches(train_paths, train_labels, args.img_size, args.batch_size, args.workers, args.seed, accel,
                          train_on_device, train_cache, args.max_image_pixels, recipe, world, plain_jpegs)
    val = None if not val_paths else eval_batches(
        val_paths, val_labels, args.test_size or args.img_size, mean, std, args.batch_size,
        args.workers, accel, on_device, val_cache, args.max_image_pixels, warn=True, plain_jpegs=plain_jpegs)
    return Loaders(train, val, choice)


def checkpoint_batches(paths: Sequence[str], checkpoint: dict[str, Any], accel: Accel, batch_size: int = 128,
                       workers: int = 0, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                       data_path: str = "auto") -> HostBatches | DeviceEvalBatches:
    """Unlabeled batches of ``paths`` through ``checkpoint``'s eval recipe (its size, mean and std), on the path
    ``data_path`` names (``auto``, ``cpu`` or ``gpu``, as :func:`choose_data_path` takes it; train.py passes the path
    its validation ran on): what predict.py and evaluate.py feed a trained model."""
    on_device = (data_path if data_path in ("cpu", "gpu") else choose_data_path(data_path, accel.device)) == "gpu"
    return eval_batches(list(paths), None, eval_size(checkpoint), checkpoint["mean"], checkpoint["std"], batch_size,
                        workers, accel, on_device, max_pixels=max_pixels)
