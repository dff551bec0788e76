"""The batched antialiased bilinear resize of the GPU path: a list of images of any size, each with its own region
and output, resized in a fixed number of tensor operations, with the pixels of ``F.interpolate(antialias=True)``.

``gpu_augment.TrainAugment`` resizes each random crop box to ``img_size`` (its columns mirrored for a flip) and
``gpu_augment.EvalTransform`` resizes each image's shorter side and keeps the centre crop. Both plan the resize on
the host (:func:`plan_resize`: each output's taps and weights, those of ATen's kernel, which follows PIL) and run
it on the device (:func:`resize_regions`): every image is packed into one flat buffer (one ``torch._chunk_cat``),
the rows of each region are gathered as windows of that buffer (one index), and two batched matrix products with
per-sample weight matrices apply the column and row weights. Batches too large for one pass are cut into chunks.

Also here: moving the host arrays to the device in one copy (:func:`to_device`), full float32 matrix products on
CUDA (:func:`full_float32_matmul`), and the per-image resize and centre crop ``pipeline.py`` uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The largest padded batch of float32 source pixels one resize pass holds; more is resized in several chunks.
MAX_RESIZE_ELEMENTS = 2**28


# --------------------------------------------------------------------------- resize weights (host)


def antialias_taps(in_size: np.ndarray, out_size: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The antialiased bilinear filter of ``F.interpolate(antialias=True)``: for rows of axes resized from
    ``in_size`` to ``out_size`` (``[R]`` each), the taps of output positions ``index`` (``[R, S]``).

    Returns ``first`` (``[R, S]``, the first source index) and ``weights`` (``[R, S, T]`` float32, normalized):
    output ``i`` is ``sum_t weights[i, t] * source[first[i] + t]``. The arithmetic is ATen's CPU kernel's
    (``_compute_indices_min_size_weights_aa``), float32 and float64 where it uses them: a triangle of support
    ``max(scale, 1)`` centred at ``scale * (i + 0.5)``, clipped to the axis, its weights summed in order.
    """
    scale = (in_size.astype(np.float32) / out_size.astype(np.float32))[:, None]
    upscale = scale < 1
    support = np.where(upscale, np.float32(1), scale)
    invscale = np.where(upscale, np.float32(1), (1.0 / scale.astype(np.float64)).astype(np.float32))
    centre = (scale.astype(np.float64) * (index + 0.5)).astype(np.float32)
    first = np.maximum(np.trunc((centre - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    last = np.minimum(np.trunc((centre + support).astype(np.float64) + 0.5).astype(np.int64), in_size[:, None])
    most = (np.ceil(support.astype(np.float64)) * 2 + 1).astype(np.int64)
    count = np.clip(last - first, 0, most)
    taps = np.arange(max(int(count.max(initial=1)), 1))
    distance = (first[..., None] + taps).astype(np.float32) - centre[..., None]
    position = ((distance.astype(np.float64) + 0.5) * invscale[..., None]).astype(np.float32)
    weights = np.where(np.abs(position) < 1, np.float32(1) - np.abs(position), np.float32(0))
    weights = np.where(taps < count[..., None], weights, np.float32(0))
    total = np.zeros(weights.shape[:-1], dtype=np.float32)
    for tap in range(weights.shape[-1]):  # ATen sums in order, in float32
        total += weights[..., tap]
    weights = np.where(total[..., None] != 0, weights / np.where(total == 0, 1, total)[..., None], weights)
    return first, weights.astype(np.float32)


@dataclass
class ResizeChunk:
    """Host arrays for resizing some of a batch's images: which images, the gathered window rows, the weights.

    ``rows``: ``[b, 3 * side]`` int64, the start of each gathered window (source row ``h``, channel ``c`` at
    ``3 * h + c``) in the chunk's packed buffer. ``weights``/``positions``: ``[2, b, T, out]`` float32/int64, the
    taps of each output row (axis 0) and column (axis 1) and their positions within the ``side``-long window.
    ``pad``: the image appended to the packed buffer so that every window lies inside it.
    """

    images: list[int]
    side: int
    rows: np.ndarray
    weights: np.ndarray
    positions: np.ndarray
    pad: int


def plan_resize(  # noqa: PLR0913
    sizes: np.ndarray, origins: np.ndarray, in_sizes: np.ndarray, out_sizes: np.ndarray, first_out: np.ndarray,
    flips: np.ndarray, out_size: int, value_scale: float, max_elements: int = MAX_RESIZE_ELEMENTS,
) -> list[ResizeChunk]:
    """The resize of each image's region to ``out_size`` square, as host arrays, in chunks of bounded memory.

    Per sample (``[B, 2]`` arrays, (y, x) columns): the region's ``origins`` in the image and its ``in_sizes``, the
    length ``out_sizes`` it is resized to, and the first output index kept (``first_out``: a centre crop's offset).
    ``sizes``: ``[B, 2]`` image (width, height). ``flips``: ``[B]`` mirror the columns. ``value_scale`` multiplies
    every output (1/255 gives [0, 1] pixels).
    """
    count = sizes.shape[0]
    index = np.arange(out_size)
    outputs = first_out[..., None] + np.where(flips[:, None, None] & (np.arange(2) == 1)[None, :, None],
                                              out_size - 1 - index, index)
    first, weights = antialias_taps(in_sizes.reshape(-1), out_sizes.reshape(-1), outputs.reshape(count * 2, -1))
    first, weights = first.reshape(count, 2, out_size), weights.reshape(count, 2, out_size, -1)
    weights[:, 0] *= np.float32(value_scale)
    start = first.min(axis=2)  # each sample's window within its region, per axis: every tap of every output
    length = np.minimum(first.max(axis=2) + weights.shape[-1], in_sizes) - start
    chunks, members = [], []
    for sample in range(count):
        side = int(max(length[members + [sample]].max(), weights.shape[-1]))
        if members and len(members + [sample]) * 3 * side * side > max_elements:
            chunks.append(members)
            members = []
        members.append(sample)
    chunks.append(members)
    return [chunk_arrays(chunk, sizes, origins + start, length, first - start[..., None], weights)
            for chunk in chunks]


def chunk_arrays(members: list[int], sizes: np.ndarray, window: np.ndarray, length: np.ndarray, first: np.ndarray,
                 weights: np.ndarray) -> ResizeChunk:
    """The :class:`ResizeChunk` of samples ``members``: ``window`` (``[B, 2]``, (y, x)) and ``length`` are each
    sample's window in its image, ``first`` its taps' first positions within the window."""
    side = int(max(length[members].max(), weights.shape[-1]))
    taps = weights.shape[-1]
    chosen = np.array(members)
    width, height = sizes[chosen, 0], sizes[chosen, 1]
    offsets = np.concatenate([[0], np.cumsum(3 * width * height)[:-1]])
    source_row = window[chosen, 0, None] + np.arange(side)
    source_row = np.where(np.arange(side) < length[chosen, 0, None], source_row, window[chosen, 0, None])
    rows = (offsets[:, None, None] + np.arange(3) * (width * height)[:, None, None]
            + (source_row * width[:, None])[..., None] + window[chosen, 1, None, None])
    base = np.minimum(first[chosen], side - taps)  # keep every tap inside the window, at distinct positions
    shift = first[chosen] - base
    tap = np.arange(taps) - shift[..., None]
    placed = np.take_along_axis(weights[chosen], np.clip(tap, 0, taps - 1), axis=-1)
    placed = np.where((tap >= 0) & (tap < taps), placed, np.float32(0))
    positions = base[..., None] + np.arange(taps)
    pad = int(chosen[np.argmax(np.maximum(width, height))])
    return ResizeChunk(
        images=members, side=side, rows=rows.reshape(len(members), 3 * side).astype(np.int64),
        weights=np.ascontiguousarray(placed.transpose(1, 0, 3, 2), dtype=np.float32),
        positions=np.ascontiguousarray(positions.transpose(1, 0, 3, 2), dtype=np.int64), pad=pad)


# --------------------------------------------------------------------------- device helpers


def to_device(arrays: Sequence[np.ndarray], device: torch.device, pack: bool | None = None) -> list[Tensor]:
    """Host arrays as tensors on ``device``: on the CPU the same memory (one operation each); elsewhere packed
    into one pinned buffer (CUDA), copied once without waiting, and viewed back (``pack`` forces that path)."""
    if not (device.type != "cpu" if pack is None else pack):
        return [torch.from_numpy(np.ascontiguousarray(array)) for array in arrays]
    offsets, total = [], 0
    for array in arrays:
        offsets.append(total)
        total += -(-array.nbytes // 8) * 8
    staging = torch.empty(max(total, 8), dtype=torch.uint8, pin_memory=device.type == "cuda")
    host = staging.numpy()
    for array, offset in zip(arrays, offsets, strict=True):
        host[offset : offset + array.nbytes] = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    moved = staging.to(device, non_blocking=True)
    views = {np.dtype(np.float32): moved.view(torch.float32), np.dtype(np.int64): moved.view(torch.int64)}
    tensors = []
    for array, offset in zip(arrays, offsets, strict=True):
        strides = tuple(stride // array.itemsize for stride in np.ascontiguousarray(array).strides)
        tensors.append(views[array.dtype].as_strided(array.shape, strides, offset // array.itemsize))
    return tensors


@contextlib.contextmanager
def full_float32_matmul(device: torch.device) -> Iterator[None]:
    """Matrix products and convolutions in full float32 on CUDA (TF32 off) inside the block; nothing elsewhere.

    ``accel.py`` enables TF32, which rounds both operands to 10 bits of mantissa: harmless for the first resize pass
    (integer pixels are exact, the weights' rounding moves a pixel by at most 255 * 2**-11 = 0.125 of an 8-bit
    level), but the colour steps would compound it, so they and the second resize pass run in full float32."""
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def pack_images(images: Sequence[Tensor]) -> Tensor:
    """The images' pixels end to end in one ``[1, N]`` buffer: one ``torch._chunk_cat`` (a single copy kernel on
    CUDA); ``torch.cat`` of flattened views where that does not exist."""
    if hasattr(torch, "_chunk_cat"):
        return torch._chunk_cat(list(images), 0, 1)
    return torch.cat([image.reshape(-1) for image in images])[None]


def resize_chunk(images: Sequence[Tensor], chunk: ResizeChunk, rows: Tensor, weights: Tensor, positions: Tensor,
                 device: torch.device) -> Tensor:
    """One chunk's regions resized: ``[b, 3 * out, out]`` float32, channel, output column, output row.

    The windows (one per source row and channel) are gathered from the packed images as uint8, then two batched
    products apply the column weights (first) and the row weights; padding rows and columns have weight 0."""
    packed = pack_images([images[index] for index in chunk.images] + [images[chunk.pad]])
    side, out_size = chunk.side, positions.shape[-1]
    windows = packed.as_strided((packed.shape[-1] - side + 1, side), (1, 1))
    pixels = windows[rows].to(torch.float32)  # [b, 3 * side, side]: source row, channel; column
    filters = torch.zeros(2, len(chunk.images), side, out_size, device=device).scatter_(2, positions, weights)
    row_filter, column_filter = filters.unbind(0)
    columns = torch.bmm(pixels, column_filter)  # [b, side * 3, out]: source row, channel; output column
    count = columns.shape[0]
    by_channel = columns.as_strided((count, 3 * out_size, side), (3 * side * out_size, 1, 3 * out_size))
    with full_float32_matmul(device):
        return torch.bmm(by_channel, row_filter)


def resize_regions(images: Sequence[Tensor], chunks: Sequence[ResizeChunk], tensors: Iterator[Tensor],
                   device: torch.device) -> Tensor:
    """Every chunk resized, in the batch's order: ``[B, 3, out * out]`` float32 with the pixels column-major."""
    parts = [resize_chunk(images, chunk, next(tensors), next(tensors), next(tensors), device) for chunk in chunks]
    resized = parts[0] if len(parts) == 1 else torch.cat(parts)
    return resized.view(resized.shape[0], 3, -1)


def resize_arrays(chunks: Sequence[ResizeChunk]) -> list[np.ndarray]:
    """The host arrays :func:`resize_regions` reads, in order."""
    return [array for chunk in chunks for array in (chunk.rows, chunk.weights, chunk.positions)]


# --------------------------------------------------------------------------- per-image helpers (pipeline.py)


def resize_shorter_side(image: Tensor, size: int) -> Tensor:
    """``Resize(size)`` of one ``[3, H, W]`` image (torchvision's rounding: the longer side becomes
    ``int(size * long / short)``), antialiased bilinear, float32 in the image's value range."""
    return F.interpolate(image[None].to(torch.float32), size=shorter_side_size(image, size), mode="bilinear",
                         antialias=True, align_corners=False)[0]


def shorter_side_size(image: Tensor, size: int) -> tuple[int, int]:
    """``(height, width)`` of ``Resize(size)`` of a ``[3, H, W]`` image, torchvision's integer arithmetic."""
    height, width = image.shape[-2:]
    return (int(size * height / width), size) if width <= height else (size, int(size * width / height))


def centre_crop(image: Tensor, size: int) -> Tensor:
    """``CenterCrop(size)`` of a ``[3, H, W]`` image at least ``size`` on each side (torchvision's rounding)."""
    height, width = image.shape[-2:]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image[:, top : top + size, left : left + size]
