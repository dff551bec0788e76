"""``--cache``: decoded training images kept between epochs, on the GPU when they fit, else in host memory.

The device path (``pipeline.py``) decodes every training image in the first epoch, scaled down once to a shorter
side of at most ``recipe.train_decode_side(img_size)`` (792 px for 224: RandomResizedCrop's smallest crop still
holds ``img_size`` pixels a side, so no crop is blurred by it). With a cache those ``uint8`` images are kept, and
later epochs decode nothing: the augmentation reads them directly.

``--cache auto`` holds them on the GPU when all of them fit in :data:`GPU_SHARE` of its free memory (the rest is
for the model's activations), else in host memory when they fit in :data:`RAM_SHARE` of the available memory,
else nowhere; it says what it chose and why in one line. The size is known before the first epoch, from the
headers read at the start (``images.check_images``), so each split's images go in one slab allocated up front
(no thousands of separate tensors among the activations). Host memory is pageable and written once; each batch
comes back through a reusable pinned staging buffer, in one copy to the GPU. Under torchrun the processes of a node
share its host memory: each gets its part of :data:`RAM_SHARE`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class CacheChoice:
    """Where decoded training images are kept (``gpu``, ``ram`` or ``none``) and the one-line reason."""

    place: str
    reason: str


def host_share(ram_free: int, processes_on_node: int) -> str:
    """The host memory the cache may take, in words: :data:`RAM_SHARE` of ``ram_free``, split between the processes
    of this node when there are several."""
    share = f"{RAM_SHARE:.0%} of the {ram_free / 1e9:.1f} GB of host memory available"
    return share if processes_on_node <= 1 else f"{share}, split between the {processes_on_node} processes on this node"


def choose_cache(request: str, needed: int, gpu_free: int | None, ram_free: int, device_path: bool,
                 processes_on_node: int = 1) -> CacheChoice:
    """Where ``--cache`` keeps ``needed`` bytes of decoded images, given the free GPU memory (None: no GPU; each
    process has its own GPU) and the available host memory, shared by ``processes_on_node`` processes (torchrun's
    ``LOCAL_WORLD_SIZE``), each keeping its own copy. An explicit place that cannot hold them is a
    :class:`UserError`."""
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
    ram_room = int(ram_free * RAM_SHARE) // max(processes_on_node, 1)
    size = f"{needed / 1e9:.2f} GB of decoded images"
    host = host_share(ram_free, processes_on_node)
    slab = f"; held in one slab per split allocated up front ({needed / 1e9:.2f} GB in all)"
    if request in ("auto", "gpu") and needed <= gpu_room:
        return CacheChoice("gpu", f"{size} fit in {GPU_SHARE:.0%} of the GPU's {gpu_free / 1e9:.1f} GB free{slab}")
    if request == "gpu":
        raise UserError(f"--cache gpu: {size} do not fit in {GPU_SHARE:.0%} of the GPU's "
                        f"{(gpu_free or 0) / 1e9:.1f} GB free; use --cache ram, auto or none")
    if needed <= ram_room:
        where = ("" if gpu_free is None else
                 f"more than {GPU_SHARE:.0%} of the GPU's {gpu_free / 1e9:.1f} GB free; ")
        return CacheChoice("ram", f"{size}: {where}they fit in {host}{slab}")
    if request == "ram":
        raise UserError(f"--cache ram: {size} do not fit in {host}; use --cache auto or none")
    return CacheChoice("none", f"{size} fit neither on the GPU nor in {host}; every epoch decodes")


SLAB_ALIGN = 16  # bytes: each image in a slab starts on this boundary, for the kernels' vectorized loads


class DecodedImages:
    """Decoded ``uint8`` images by dataset position, held on ``device`` (the GPU, or the CPU for host memory).

    The images lie in one slab of ``capacity`` bytes (``cache_bytes`` of the headers' sizes; 0: no slab) allocated
    up front, each placed after the last: thousands of separate tensors among the activations would fragment the
    GPU's memory. An image that does not fit (decoded larger than its header said) gets a tensor of its own and is
    counted in ``outside_slab``. Host memory is pageable, written once; :meth:`fetch` sends a batch to a CUDA
    device through a pinned :class:`Staging` buffer.

    An image that could not be decoded is remembered as its failure reason, so later epochs skip it too.
    """

    def __init__(self, count: int, device: torch.device, capacity: int = 0) -> None:
        self.device = device
        self.images: list[Tensor | None] = [None] * count
        self.failures: dict[int, str] = {}
        padding = count * (SLAB_ALIGN - 1) if capacity > 0 else 0
        self.slab = torch.empty(capacity + padding, dtype=torch.uint8, device=device)
        self.used, self.outside_slab = 0, 0
        self.staging: Staging | None = None

    def __len__(self) -> int:
        return len(self.images)

    def put(self, position: int, image: Tensor) -> None:
        """Keep a copy of ``image`` for ``position`` on the cache's device (a position held already keeps its own).
        Into host memory the copy waits for the device: once per image, in the first epoch only."""
        if self.has(position):
            return
        stored = self.room_for(image)
        stored.copy_(image)
        self.images[position] = stored

    def room_for(self, image: Tensor) -> Tensor:
        """Uninitialized ``uint8`` memory of ``image``'s shape: the slab's next free bytes, else a tensor of its
        own (counted in ``outside_slab``)."""
        start = -(-self.used // SLAB_ALIGN) * SLAB_ALIGN
        end = start + image.numel()
        if end <= self.slab.numel():
            self.used = end
            return self.slab[start:end].view(image.shape)
        self.outside_slab += 1
        return torch.empty(image.shape, dtype=torch.uint8, device=self.device)

    def fail(self, position: int, reason: str) -> None:
        """Remember that ``position`` cannot be decoded."""
        self.failures[position] = reason

    def has(self, position: int) -> bool:
        """True when ``position`` holds an image or a failure."""
        return self.images[position] is not None or position in self.failures

    def fetch(self, positions: Sequence[int], device: torch.device) -> list[Tensor]:
        """The images at ``positions`` on ``device``: the stored tensors when they are there already, else gathered
        and sent in one transfer."""
        images = [self.images[position] for position in positions]
        if self.device == device or not images:
            return images
        flat = self.transfer(images, device)
        return [chunk.view(image.shape) for chunk, image in zip(flat.split([image.numel() for image in images]),
                                                                images, strict=True)]

    def transfer(self, images: list[Tensor], device: torch.device) -> Tensor:
        """``images`` flattened and concatenated on ``device``: through a pinned staging buffer on CUDA (one copy
        on the host, one asynchronous transfer), else through a plain concatenation."""
        if device.type != "cuda":
            return torch.cat([image.reshape(-1) for image in images]).to(device)
        if self.staging is None:
            self.staging = Staging(device)
        return self.staging.transfer(images)


def pinned_bytes(size: int) -> Tensor:
    """``size`` bytes of page-locked host memory (from PyTorch's caching host allocator)."""
    return torch.empty(size, dtype=torch.uint8, pin_memory=True)


class Staging:
    """Two pinned host buffers, used in turn, that a batch is gathered into before one asynchronous copy to a CUDA
    ``device``. A buffer is written again only once the copy that last read it has finished (its CUDA event), so
    the host never overwrites bytes still on their way. ``allocate`` and ``new_event`` are for tests."""

    def __init__(self, device: torch.device, allocate: Callable[[int], Tensor] = pinned_bytes,
                 new_event: Callable[[], Any] = torch.cuda.Event) -> None:
        self.device, self.allocate, self.new_event = device, allocate, new_event
        self.buffers: list[Tensor | None] = [None, None]
        self.copies: list[Any] = [None, None]  # the event recorded after each buffer's last copy
        self.turn = 0

    def transfer(self, images: list[Tensor]) -> Tensor:
        """``images`` flattened and concatenated on the device: one copy into the buffer, one transfer out."""
        buffer = self.free_buffer(sum(image.numel() for image in images))
        torch.cat([image.reshape(-1) for image in images], out=buffer)
        flat = buffer.to(self.device, non_blocking=True)
        self.copies[self.turn] = self.new_event()
        self.copies[self.turn].record()
        self.turn = 1 - self.turn
        return flat

    def free_buffer(self, size: int) -> Tensor:
        """``size`` bytes of this turn's buffer, once its last copy has finished; grown when smaller, to the next
        power of two (what the caching host allocator takes anyway), so that it seldom grows again."""
        last_copy = self.copies[self.turn]
        if last_copy is not None and not last_copy.query():  # usually done long ago: no wait, and no sync call
            last_copy.synchronize()
        buffer = self.buffers[self.turn]
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[self.turn] = self.allocate(1 << max(size - 1, 0).bit_length())
        return buffer[:size]
