"""Decoding a batch's files on the device: the JPEG decoder's choice, the stream it runs on, and
:class:`DeviceDecoder`, which decodes a batch of the workers' items (``loader_items.Encoded``) to images there.

A batch's JPEGs are decoded together (``torchvision.io.decode_jpeg`` or TorchCodec's: nvJPEG on CUDA), in chunks
of at most :data:`DECODE_BUDGET` decoded bytes, on a :class:`DecodeStream` of their own on CUDA; a file the device
rejects is decoded by PIL on the CPU, and running out of GPU memory is never taken for a bad file. The decoder is
chosen once a process, when the first :class:`DeviceDecoder` is built: importing this module chooses nothing.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

import gpu_augment
from common import DecodeFailure
from images import DEFAULT_MAX_IMAGE_PIXELS
from loader_items import Encoded, decode_or_failure, pixels_of

JpegDecoder = Callable[[list[Tensor] | Tensor, torch.device], list[Tensor] | Tensor]
DEVICE_DECODE_ERRORS = (RuntimeError, ValueError)  # a file the device rejects; never an out-of-memory error
DECODE_BUDGET = 256 * 2**20  # bytes of decoded uint8 RGB at most per device decode call


@functools.cache
def jpeg_decoder() -> tuple[str, JpegDecoder]:
    """The batched JPEG decoder, by name: TorchCodec's when it is installed (PyTorch's maintained image decoders,
    from torchcodec 0.16 for torch 2.11 on), else torchvision's, which torchvision 0.29 deprecates in its favour.
    Both take encoded bytes and decode with nvJPEG on CUDA. Chosen on the first call, then the same for the
    process."""
    try:
        from torchcodec.decoders import decode_jpeg as torchcodec_decode
    except Exception:  # absent, or built for another torch: torchvision then
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


def jpeg_decoder_name() -> str:
    """The name of the batched JPEG decoder this process uses (``torchcodec`` or ``torchvision``)."""
    return jpeg_decoder()[0]


def decode_jpeg(data: list[Tensor] | Tensor, device: torch.device) -> list[Tensor] | Tensor:
    """JPEG bytes (one tensor, or a list decoded together) as ``uint8 [3, H, W]`` RGB images on ``device``, by the
    decoder :func:`jpeg_decoder` chose."""
    return jpeg_decoder()[1](data, device)


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
    the batches say each once (``batch_iterables.SkipWarnings``)."""

    def __init__(self, device: torch.device, bound: int | None, decode_min_side: int | None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, budget: int = DECODE_BUDGET) -> None:
        self.device, self.bound, self.budget = device, bound, budget
        self.decode_min_side, self.max_pixels = decode_min_side, max_pixels
        self.stream = DecodeStream(device)
        jpeg_decoder()  # chosen here, in the caller's thread, rather than at the first batch in the producer's

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
                for item, image in zip(items, images, strict=True)}

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
