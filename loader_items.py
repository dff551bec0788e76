"""What the DataLoader's workers make of each key, on both paths, and how a batch of it is collated on the host.

The CPU path's :class:`ImageFiles` decode each file with PIL and run the recipe on it (an image tensor per key);
:func:`collate_decoded` stacks them. The device path's :class:`FileBytes` only read each file's bytes (an
:class:`Encoded` per key; files the device cannot decode are decoded here with the CPU path's rules);
:func:`collate_encoded` packs a batch of them into one buffer (an :class:`EncodedBatch`), and :class:`SkipCached`
spares the workers the files the cache already holds. Either way a file that cannot be read becomes a
``common.DecodeFailure`` that travels with its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler, default_collate

from cache import DecodedImages
from common import Batch, DecodeFailure
from images import (
    DECODE_ERRORS,
    DEFAULT_MAX_IMAGE_PIXELS,
    decode_error_reason,
    decode_rgb,
    device_decodable,
    load_rgb,
    open_image,
)

# --------------------------------------------------------------------------- the CPU path


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


def collate_decoded(items: list[Any]) -> Batch:
    """Stack the CPU path's ``(image, label, position)`` items (on the host); failures set aside."""
    kept, failed = split_failures(items)
    if not kept:
        return Batch(None, None, [], failed)
    images, labels, positions = default_collate(kept)  # in a worker, stacks straight into shared memory
    return Batch(images, labels, positions.tolist(), failed)


# --------------------------------------------------------------------------- the device path


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
    one's, for ``batch_iterables.set_epoch``."""

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
    placed = iter(zip(starts, encoded, strict=False))  # starts holds one more: the end of the last
    packed: list[Packed | Cached] = [item if isinstance(item, Cached) else pack(*next(placed)) for item in kept]
    return EncodedBatch(buffer, packed, failed)


def pack(start: int, item: Encoded) -> Packed:
    """``item``'s record once its data lies in the batch's buffer from ``start``."""
    return Packed(start, tuple(item.data.shape), item.encoded, item.label, item.position, item.path, item.size)
