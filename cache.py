"""``--cache``: decoded training images kept between epochs, on the GPU when they fit, else in host memory.

The device path (``pipeline.py``) decodes every training image in the first epoch, scaled down once to a shorter
side of at most ``dataset.train_decode_side(img_size)`` (792 px for 224: RandomResizedCrop's smallest crop still
holds ``img_size`` pixels a side, so no crop is blurred by it). With a cache those ``uint8`` images are kept, and
later epochs decode nothing: the augmentation reads them directly.

``--cache auto`` holds them on the GPU when all of them fit in :data:`GPU_SHARE` of its free memory (the rest is
for the model's activations), else in host memory when they fit in :data:`RAM_SHARE` of the available memory,
else nowhere; it says what it chose and why in one line. The size is known before the first epoch, from the
headers read at the start (``dataset.check_images``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from utils import UserError

CACHE_CHOICES = ("auto", "gpu", "ram", "none")
GPU_SHARE = 0.5  # of the GPU memory free at the start
RAM_SHARE = 0.5  # of the host memory available at the start


def bounded_size(width: int, height: int, bound: int) -> tuple[int, int]:
    """``(width, height)`` of an image once its shorter side is at most ``bound`` (torchvision's rounding)."""
    short, long = min(width, height), max(width, height)
    if short <= bound:
        return width, height
    new_long = int(bound * long / short)
    return (bound, new_long) if width <= height else (new_long, bound)


def cache_bytes(sizes: Sequence[tuple[int, int]], bound: int) -> int:
    """Bytes the decoded images of ``sizes`` take as ``uint8 [3, H, W]`` once bounded."""
    return sum(3 * width * height for width, height in (bounded_size(w, h, bound) for w, h in sizes))


def gpu_free_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA ``device`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


def available_ram_bytes() -> int:
    """Host memory available to this process (MemAvailable on Linux; total physical memory elsewhere)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass(frozen=True)
class CacheChoice:
    """Where decoded training images are kept (``gpu``, ``ram`` or ``none``) and the one-line reason."""

    place: str
    reason: str


def choose_cache(request: str, needed: int, gpu_free: int | None, ram_free: int, device_path: bool) -> CacheChoice:
    """Where ``--cache`` keeps ``needed`` bytes of decoded images, given the free GPU memory (None: no GPU) and
    the available host memory. An explicit place that cannot hold them is a :class:`UserError`."""
    if request not in CACHE_CHOICES:
        raise UserError(f"--cache {request}: expected one of {', '.join(CACHE_CHOICES)}")
    if request == "none":
        return CacheChoice("none", "--cache none")
    if not device_path:
        if request != "auto":
            raise UserError(f"--cache {request}: only the device path (--augment-device gpu) keeps decoded images; "
                            "the CPU path decodes and augments in its loader workers")
        return CacheChoice("none", "the CPU path decodes and augments each image in its loader workers")
    gpu_room = int(gpu_free * GPU_SHARE) if gpu_free is not None else 0
    ram_room = int(ram_free * RAM_SHARE)
    size = f"{needed / 1e9:.2f} GB of decoded images"
    if request in ("auto", "gpu") and needed <= gpu_room:
        return CacheChoice("gpu", f"{size} fit in {GPU_SHARE:.0%} of the GPU's {gpu_free / 1e9:.1f} GB free")
    if request == "gpu":
        raise UserError(f"--cache gpu: {size} do not fit in {GPU_SHARE:.0%} of the GPU's "
                        f"{(gpu_free or 0) / 1e9:.1f} GB free; use --cache ram, auto or none")
    if needed <= ram_room:
        where = ("" if gpu_free is None else
                 f"more than {GPU_SHARE:.0%} of the GPU's {gpu_free / 1e9:.1f} GB free; ")
        return CacheChoice("ram", f"{size}: {where}they fit in {RAM_SHARE:.0%} of the "
                                  f"{ram_free / 1e9:.1f} GB of host memory available")
    if request == "ram":
        raise UserError(f"--cache ram: {size} do not fit in {RAM_SHARE:.0%} of the {ram_free / 1e9:.1f} GB of host "
                        "memory available; use --cache auto or none")
    return CacheChoice("none", f"{size} fit neither on the GPU nor in {RAM_SHARE:.0%} of the "
                               f"{ram_free / 1e9:.1f} GB of host memory available; every epoch decodes")


class DecodedImages:
    """Decoded images by dataset position, held on ``device`` (the GPU, or the CPU for host memory).

    An image that could not be decoded is remembered as its failure reason, so later epochs skip it too.
    """

    def __init__(self, count: int, device: torch.device) -> None:
        self.device = device
        self.images: list[Tensor | None] = [None] * count
        self.failures: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.images)

    @property
    def complete(self) -> bool:
        """True when every position holds an image or a failure."""
        return all(image is not None or position in self.failures for position, image in enumerate(self.images))

    def put(self, position: int, image: Tensor) -> None:
        """Keep ``image`` for ``position`` (copied to the cache's device)."""
        self.images[position] = image.to(self.device, non_blocking=True)

    def fail(self, position: int, reason: str) -> None:
        """Remember that ``position`` cannot be decoded."""
        self.failures[position] = reason

    def has(self, position: int) -> bool:
        """True when ``position`` holds an image or a failure."""
        return self.images[position] is not None or position in self.failures

    def fetch(self, positions: Sequence[int], device: torch.device) -> list[Tensor]:
        """The images at ``positions`` on ``device``; from host memory in one pinned transfer."""
        images = [self.images[position] for position in positions]
        if self.device == device or not images:
            return images
        flat = torch.cat([image.reshape(-1) for image in images])
        if device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
        return [chunk.view(image.shape) for chunk, image in zip(flat.split([image.numel() for image in images]),
                                                                images)]
