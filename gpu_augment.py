"""The training and evaluation recipes run batched on the device, from decoded images of any size.

``pipeline.py`` decodes a batch on the device (or takes it from the decoded-image cache): a list of ``uint8
[3, H, W]`` images, each of its own size. Here the random part of ``recipe.build_train_transform`` runs on the
whole list in a fixed number of tensor operations (about sixty, whatever the batch size), because on a GPU every
operation is a kernel launch the host must issue:

* the parameters are drawn with ONE ``torch.rand`` on a CPU generator and turned into boxes, flips, angles and
  jitter factors with numpy on the host, with the same values as torchvision's per-image draws would give;
* ``RandomResizedCrop`` + ``RandomHorizontalFlip``: every image is packed into one flat buffer (one
  ``torch._chunk_cat``), the rows of each crop box are gathered as windows of that buffer (one index), and each
  crop is resized to ``img_size`` by two batched matrix products with per-sample weight matrices. The weights are
  those of torchvision's antialiased bilinear resize (``F.interpolate(antialias=True)``, which follows PIL),
  computed on the host and scattered into place on the device; the flip reverses the output columns' weights;
* ``ColorJitter`` (brightness, contrast, saturation and hue in a random order per sample): brightness, contrast
  and saturation are per-sample 3x3 colour matrices (plus the contrast's mean), applied with ``baddbmm`` to the
  whole batch; hue runs once for the whole batch, every sample's linear operations being placed before or after
  that one hue step in its own order (identity matrices fill the steps a sample does not use);
* ``RandomRotation``: nearest-neighbour, about the centre, corners filled with 0 (before normalization), as
  torchvision does on PIL images; one ``affine_grid`` + ``grid_sample`` for the batch.

``EvalTransform`` is the eval recipe (shorter side resized to ``round(img_size * 256 / 224)`` with torchvision's
integer arithmetic, antialiased; centre crop): the same resize, with each axis's weights restricted to the rows
and columns the centre crop keeps. All of it is pure torch, in float32 whatever autocast is active, device-agnostic
(the tests run it on the CPU) and free of host synchronisation on a CPU generator.

The per-image implementation these classes replaced is kept at the end of this file (``_reference_*``) as the
tests' oracle and the benchmark's baseline; nothing on the production path calls it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common import Mixed
from recipe import TRAIN_AUGMENTATION, TrainAugmentation, eval_resize_size

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale and PIL's convert("L") use.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# Column order of crop boxes, the order of torchvision's RandomResizedCrop.get_params.
BOX_TOP, BOX_LEFT, BOX_HEIGHT, BOX_WIDTH = range(4)
# Colour-jitter operation indices, as in torchvision's ColorJitter.get_params permutation.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
CROP_ATTEMPTS = 10
# Uniform draws per sample, in the order the per-image code drew them: crop area fractions and log aspect ratios
# (CROP_ATTEMPTS each), the crop position (2), flip, angle, brightness, contrast, saturation, hue, jitter order (4).
DRAWS_PER_SAMPLE = 2 * CROP_ATTEMPTS + 2 + 6 + 4
# RandomErasing's most draws per sample: the coin, then per attempt area and ratio, and top and left on success.
ERASE_DRAWS_PER_SAMPLE = 1 + 2 * CROP_ATTEMPTS + 2
# The HSV-to-RGB offsets of red, green and blue, in sextants of the colour wheel.
HUE_CHANNEL_OFFSETS = (5.0, 3.0, 1.0)
# Added to the channel differences (as the convolution's bias) so that a gray pixel's chroma is tiny instead of 0
# (no 0/0). The convolution may start its sum from the bias, so it must survive adding a pixel near 1: 8 units in
# the last place of 1. It moves a hue-rotated pixel by at most about 3 times this, 0.0008 of an 8-bit level.
TINY_CHROMA = 2.0**-20
# The largest padded batch of float32 source pixels one resize pass holds; more is resized in several chunks.
MAX_RESIZE_ELEMENTS = 2**28


def image_sizes(images: Sequence[Tensor]) -> Tensor:
    """``[B, 2]`` int64 (width, height) of ``[3, H, W]`` images, from their shapes (no device access)."""
    return torch.from_numpy(host_sizes(images))


def host_sizes(images: Sequence[Tensor]) -> np.ndarray:
    """``[B, 2]`` int64 numpy (width, height) of ``[3, H, W]`` images, from their shapes."""
    return np.array([[image.shape[-1], image.shape[-2]] for image in images], dtype=np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------- random parameters


@dataclass
class AugmentParams:
    """Per-sample parameters of one ``TrainAugment`` call, host numpy arrays with the batch first.

    ``boxes``: ``[B, 4]`` int64 ``(top, left, height, width)`` in original pixels. ``flips``: ``[B]`` bool.
    ``angles``: ``[B]`` float32 degrees, counter-clockwise like ``RandomRotation``. ``brightness``, ``contrast``,
    ``saturation``: ``[B]`` float32 factors (1 = unchanged); ``hue``: ``[B]`` float32 shifts in turns (0 =
    unchanged). ``order``: ``[B, 4]`` int64, the jitter operations (``BRIGHTNESS`` ... ``HUE``) in the order they
    are applied, like ``ColorJitter``'s ``torch.randperm(4)``. ``erase_boxes``: ``(sample, top, left, height,
    width)`` of each sample ``RandomErasing`` erases.
    """

    boxes: np.ndarray
    flips: np.ndarray
    angles: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray
    order: np.ndarray
    erase_boxes: list[tuple[int, int, int, int, int]] = field(default_factory=list)


def random_device(generator: torch.Generator | None) -> torch.device:
    """Where random numbers are drawn: the generator's device, else the CPU (torch's default generator)."""
    return generator.device if generator is not None else torch.device("cpu")


def random_uniform(
    shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None = None
) -> Tensor:
    """Float32 uniform samples in ``[low, high)``, on ``random_device(generator)``."""
    unit = torch.rand(shape, generator=generator, device=random_device(generator), dtype=torch.float32)
    return low + (high - low) * unit


def scaled(unit: np.ndarray, low: float, high: float) -> np.ndarray:
    """``low + (high - low) * unit`` with torch's float32 rounding (as :func:`random_uniform` computes it)."""
    return np.float32(low) + np.float32(high - low) * unit.astype(np.float32)


def jitter_range(amount: float, centre: float, clamp_low: float | None) -> tuple[float, float]:
    """ColorJitter's range for one amount: ``[centre - amount, centre + amount]``, floored at ``clamp_low``."""
    low = centre - amount
    return (max(low, clamp_low) if clamp_low is not None else low), centre + amount


def draw_units(count: int, generator: torch.Generator | None) -> tuple[Tensor, np.ndarray]:
    """``count`` float32 uniforms in ``[0, 1)`` from ONE ``torch.rand`` on a CPU generator, as a tensor and a numpy
    view of the same memory. On the CPU (mt19937) generator one call gives the same stream as successive calls."""
    draws = torch.rand(count, generator=generator, dtype=torch.float32)
    return draws, draws.numpy()


def exp_like_torch(draws: Tensor, units: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``torch.exp(values)`` bit for bit (numpy's float32 exp differs in the last bit for a third of the inputs,
    enough to move a rare crop box by a pixel), computed in place in ``draws``' memory: one tensor operation."""
    units[: values.size] = values.reshape(-1)
    draws.exp_()
    return units[: values.size].reshape(values.shape).copy()


def crop_boxes(
    sizes: np.ndarray, fractions: np.ndarray, aspects: np.ndarray, positions: np.ndarray,
    scale: Sequence[float], ratio: Sequence[float],
) -> np.ndarray:
    """``RandomResizedCrop.get_params`` for a batch, from its draws: ``[B, 4]`` int64 ``(top, left, height, width)``.

    ``sizes``: ``[B, 2]`` (width, height); ``fractions`` and ``aspects``: ``[B, attempts]`` area fractions and
    aspect ratios; ``positions``: ``[B, 2]`` uniforms. Each sample takes its first try that fits, at a uniform
    position; one with no fitting try falls back to the whole image clamped to the ratio bounds, centred. The
    arithmetic is float32, step for step as torch computes it, so the boxes are those the per-image code drew.
    """
    width, height = sizes[:, 0].astype(np.float32), sizes[:, 1].astype(np.float32)
    target = (width * height)[:, None] * fractions
    tries_w = np.round(np.sqrt(target * aspects))
    tries_h = np.round(np.sqrt(target / aspects))
    fits = (tries_w > 0) & (tries_w <= width[:, None]) & (tries_h > 0) & (tries_h <= height[:, None])
    first = fits.argmax(axis=1)[:, None]
    found = fits.any(axis=1)
    fallback_h, fallback_w = fallback_crop(width, height, ratio)
    box_w = np.where(found, np.take_along_axis(tries_w, first, 1)[:, 0], fallback_w)
    box_h = np.where(found, np.take_along_axis(tries_h, first, 1)[:, 0], fallback_h)
    one = np.float32(1)
    random_top = np.minimum(np.floor(positions[:, 0] * (height - box_h + one)), height - box_h)
    random_left = np.minimum(np.floor(positions[:, 1] * (width - box_w + one)), width - box_w)
    top = np.where(found, random_top, np.floor((height - box_h) / np.float32(2)))
    left = np.where(found, random_left, np.floor((width - box_w) / np.float32(2)))
    return np.stack([top, left, box_h, box_w], axis=1).astype(np.int64)


def fallback_crop(width: np.ndarray, height: np.ndarray, ratio: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The ``(height, width)`` of RandomResizedCrop's fallback: the whole image clamped to the ratio bounds."""
    low, high = np.float32(min(ratio)), np.float32(max(ratio))
    in_ratio = width / height
    box_w = np.where(in_ratio > high, np.round(height * high), width)
    box_h = np.where(in_ratio < low, np.round(width / low), height)
    return box_h, box_w


def sample_crop_boxes(
    sizes: Tensor | np.ndarray,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    attempts: int = CROP_ATTEMPTS,
) -> Tensor:
    """``RandomResizedCrop.get_params`` for a batch: ``[B, 2]`` (width, height) -> ``[B, 4]`` float boxes
    ``(top, left, height, width)`` holding integers, drawn like the per-image code (fractions, ratios, positions)."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    count = sizes.shape[0]
    units = host_units(generator, [(count, attempts), (count, attempts), (count, 2)])
    fractions = scaled(units[0], scale[0], scale[1])
    aspects = torch_exp(scaled(units[1], math.log(ratio[0]), math.log(ratio[1])))
    return torch.from_numpy(crop_boxes(sizes, fractions, aspects, units[2], scale, ratio).astype(np.float32))


def host_units(generator: torch.Generator | None, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniforms of the given shapes, drawn in that order on ``generator`` (one call for a CPU generator, one per
    shape, as the per-image code made them, for another device's), as host numpy arrays."""
    sizes = [int(np.prod(shape)) for shape in shapes]
    if random_device(generator).type == "cpu":
        flat = draw_units(sum(sizes), generator)[1].copy()
    else:  # one device-to-host copy, a synchronisation: the per-image code had one too
        flat = torch.cat([random_uniform((size,), 0.0, 1.0, generator) for size in sizes]).cpu().numpy()
    pieces = np.split(flat, np.cumsum(sizes)[:-1])
    return [piece.reshape(shape) for piece, shape in zip(pieces, shapes)]


def torch_exp(values: np.ndarray) -> np.ndarray:
    """``torch.exp`` of a float32 array, on the host (see :func:`exp_like_torch`)."""
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).exp().numpy()


def permutations_from_units(units: np.ndarray) -> np.ndarray:
    """``[B, 4]`` int64 permutations: the stable argsort of ``[B, 4]`` uniforms, as ``torch.argsort`` gives."""
    return np.argsort(units, axis=1, kind="stable").astype(np.int64)


def erase_boxes_from_units(
    units: np.ndarray, count: int, size: int, probability: float, scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3), attempts: int = CROP_ATTEMPTS,
) -> tuple[list[tuple[int, int, int, int, int]], int]:
    """``RandomErasing(p=probability)``'s boxes for ``count`` square images of ``size``, reading the draws one by
    one from ``units`` as the per-image code drew them; returns the boxes and how many draws were used."""
    boxes, used = [], 0

    def next_unit() -> float:
        nonlocal used
        used += 1
        return float(units[used - 1])

    for sample in range(count):
        if next_unit() >= probability:
            continue
        for _ in range(attempts):
            area = size * size * float(scaled(np.float32(next_unit()), *scale))
            aspect = math.exp(float(scaled(np.float32(next_unit()), math.log(ratio[0]), math.log(ratio[1]))))
            height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < height < size and 0 < width < size:
                top = int(scaled(np.float32(next_unit()), 0, size - height + 1))
                left = int(scaled(np.float32(next_unit()), 0, size - width + 1))
                boxes.append((sample, top, left, height, width))
                break
    return boxes, used


def sample_erase_boxes(count: int, size: int, probability: float, generator: torch.Generator | None = None,
                       scale: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3),
                       attempts: int = CROP_ATTEMPTS) -> list[tuple[int, int, int, int, int]]:
    """``RandomErasing(p=probability)``'s boxes for ``count`` square images of ``size``: ``(sample, top, left, height,
    width)`` for each sample erased (a sample whose ``attempts`` tries all fail is left alone, as torchvision does).

    On a CPU generator the draws come from one call and the generator ends where the per-image code left it."""
    if probability <= 0:
        return []
    if random_device(generator).type != "cpu":
        return _reference_sample_erase_boxes(count, size, probability, generator, scale, ratio, attempts)
    state = (generator if generator is not None else torch.default_generator).get_state()
    units = draw_units(count * ERASE_DRAWS_PER_SAMPLE, generator)[1]
    boxes, used = erase_boxes_from_units(units, count, size, probability, scale, ratio, attempts)
    rewind(generator, state, used)
    return boxes


def rewind(generator: torch.Generator | None, state: Tensor, consumed: int) -> None:
    """Put a CPU generator back at ``state`` advanced by ``consumed`` draws (one tensor operation)."""
    (generator if generator is not None else torch.default_generator).set_state(state)
    torch.rand(consumed, generator=generator)


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


def plan_resize(
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
    for array, offset in zip(arrays, offsets):
        host[offset : offset + array.nbytes] = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    moved = staging.to(device, non_blocking=True)
    views = {np.dtype(np.float32): moved.view(torch.float32), np.dtype(np.int64): moved.view(torch.int64)}
    tensors = []
    for array, offset in zip(arrays, offsets):
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


# --------------------------------------------------------------------------- colour


def colour_matrices(op: int, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``[n, 3, 3]`` matrices ``M``, ``N`` of one linear jitter operation, ``y = clamp(M x + N mean(x))``:
    brightness ``f I``; contrast ``f I`` and ``(1 - f) 1 w^T`` (blend with the mean luma); saturation
    ``f I + (1 - f) 1 w^T`` (blend with the pixel's luma), ``w`` the luma weights."""
    factors = factors.astype(np.float32)[:, None, None]
    identity = np.eye(3, dtype=np.float32)
    to_luma = np.ones((3, 1), dtype=np.float32) * np.array(GRAY_WEIGHTS, dtype=np.float32)[None]
    scaled_identity = factors * identity
    zero = np.zeros_like(scaled_identity)
    if op == BRIGHTNESS:
        return scaled_identity, zero
    if op == CONTRAST:
        return scaled_identity, (np.float32(1) - factors) * to_luma
    return scaled_identity + (np.float32(1) - factors) * to_luma, zero


@dataclass
class ColourPlan:
    """The jitter as fixed steps: ``matrices[s]``/``means[s]`` (``[B, 3, 3]``) of linear step ``s``, the hue step
    after ``hue_after`` linear steps (None: no hue), ``hue_shifts`` ``[B, 3, 1]`` (per-channel sextant offsets plus
    6 x the sample's shift). ``means`` is None when no operation needs the mean."""

    matrices: np.ndarray
    means: np.ndarray | None
    hue_after: int | None
    hue_shifts: np.ndarray | None


def plan_colour(params: AugmentParams, enabled: Sequence[bool]) -> ColourPlan:
    """Each sample's jitter order laid out on shared steps.

    With hue: ``n`` linear steps, the hue step, ``n`` more (``n`` = enabled linear operations); a sample's
    operations before its hue fill the last steps before the hue step, those after it the first steps after.
    Without: ``n`` steps in each sample's order. Steps a sample does not use are identities."""
    linear = [op for op in (BRIGHTNESS, CONTRAST, SATURATION) if enabled[op]]
    with_hue = enabled[HUE]
    steps = 2 * len(linear) if with_hue else len(linear)
    count = params.order.shape[0]
    matrices = np.broadcast_to(np.eye(3, dtype=np.float32), (steps, count, 3, 3)).copy()
    means = np.zeros_like(matrices) if enabled[CONTRAST] else None
    factors = {BRIGHTNESS: params.brightness, CONTRAST: params.contrast, SATURATION: params.saturation}
    slots = step_slots(params.order, enabled, len(linear))
    for op in linear:
        samples, steps_of_op = np.nonzero(slots == op)
        m, n = colour_matrices(op, factors[op][samples])
        matrices[steps_of_op, samples] = m
        if means is not None:
            means[steps_of_op, samples] = n
    if not with_hue:
        return ColourPlan(matrices, means, None, None)
    offsets = np.array(HUE_CHANNEL_OFFSETS, dtype=np.float32)
    shifts = (np.float32(6) * params.hue.astype(np.float32))[:, None] + offsets
    return ColourPlan(matrices, means, len(linear), shifts[..., None].astype(np.float32))


def step_slots(order: np.ndarray, enabled: Sequence[bool], linear: int) -> np.ndarray:
    """``[B, steps]`` int64: the linear operation each sample runs at each linear step, -1 for none."""
    steps = 2 * linear if enabled[HUE] else linear
    slots = np.full((order.shape[0], steps), -1, dtype=np.int64)
    for sample, row in enumerate(order.tolist()):
        ops = [op for op in row if enabled[op]]
        if enabled[HUE]:
            at = ops.index(HUE)
            before, after = ops[:at], ops[at + 1 :]
            slots[sample, linear - len(before) : linear] = before
            slots[sample, linear : linear + len(after)] = after
        else:
            slots[sample, : len(ops)] = ops
    return slots


def linear_step(pixels: Tensor, matrix: Tensor, mean_matrix: Tensor | None) -> Tensor:
    """``clamp(M x + N mean(x), 0, 1)`` per sample on ``[B, 3, P]`` pixels."""
    if mean_matrix is None:
        mixed = torch.bmm(matrix, pixels)
    else:
        mixed = torch.baddbmm(torch.bmm(mean_matrix, pixels.mean(dim=-1, keepdim=True)), matrix, pixels)
    return mixed.clamp_(0, 1)


def rotate_hue(pixels: Tensor, shifts: Tensor, differences: Tensor, tiny: Tensor) -> Tensor:
    """Rotate the hue of ``[B, 3, P]`` pixels keeping HSV value and chroma, as torchvision's ``adjust_hue``.

    ``shifts``: ``[B, 3, 1]``, each channel's HSV-to-RGB offset plus 6 x the sample's shift (turns).
    ``differences``/``tiny``: the ``[6, 3, 1]`` kernel and bias giving ``(g - b, b - r, r - g)`` and their
    negatives, plus a tiny constant. The maximum channel ``k`` picks the sextant: the hue is ``2k + d_k / c``
    (``c`` the chroma, the largest difference), and each output channel is ``v - c * ramp(hue + offset)``."""
    value, brightest = pixels.max(dim=1, keepdim=True)
    spread = F.conv1d(pixels, differences, tiny)
    chroma = spread.amax(dim=1, keepdim=True)
    sextant = torch.addcdiv(torch.add(shifts, brightest, alpha=2), spread.gather(1, brightest), chroma)
    position = sextant.remainder_(6)
    ramp = torch.minimum(position, 4 - position).clamp_(0, 1)
    return torch.addcmul(value, chroma, ramp, value=-1)


def hue_kernel() -> tuple[Tensor, Tensor]:
    """The ``conv1d`` weight ``[6, 3, 1]`` and bias ``[6]`` of :func:`rotate_hue`'s channel differences."""
    differences = torch.tensor([[0.0, 1.0, -1.0], [-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]])
    return torch.cat([differences, -differences])[..., None], torch.full((6,), TINY_CHROMA)


# --------------------------------------------------------------------------- rotation and erasing


def rotation_angles(angles: np.ndarray) -> np.ndarray:
    """``[B, 2, 3]`` float32 radians whose cosines and sines make the rotation's ``affine_grid`` theta for pixels
    stored column-major (see :func:`rotate_transposed`): ``[[r, r, 0], [r, -r, 0]]``. The radians are
    ``torch.deg2rad``'s float32 product, so the sampled pixels are those of a rotation computed on the device."""
    radians = angles.astype(np.float32) * np.float32(math.pi / 180)
    zero = np.zeros_like(radians)
    return np.stack([radians, radians, zero, radians, -radians, zero], axis=1).reshape(-1, 2, 3)


def rotate_transposed(pixels: Tensor, radians: Tensor, use_cosine: Tensor) -> Tensor:
    """Rotate ``[B, 3, S, S]`` images stored transposed (``pixels[b, c, x, y]``) about their centres,
    counter-clockwise, nearest neighbour, 0 where the image does not reach (PIL's ``Image.rotate``, which
    ``RandomRotation`` uses); the result is the usual ``[B, 3, S(y), S(x)]`` layout.

    Sampling the transposed image swaps the grid's two coordinates: theta ``[[s, c, 0], [c, -s, 0]]``, the
    cosines where ``use_cosine`` and the sines elsewhere of :func:`rotation_angles`."""
    theta = torch.where(use_cosine, torch.cos(radians), torch.sin(radians))
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def erase_masks(boxes: Sequence[tuple[int, int, int, int, int]], count: int, size: int) -> tuple[np.ndarray, ...]:
    """``RandomErasing``'s boxes as ``[B, 1, size, 1]`` row and ``[B, 1, 1, size]`` column indicators."""
    rows = np.zeros((count, 1, size, 1), dtype=np.float32)
    columns = np.zeros((count, 1, 1, size), dtype=np.float32)
    for sample, top, left, height, width in boxes:
        rows[sample, 0, top : top + height] = 1
        columns[sample, 0, 0, left : left + width] = 1
    return rows, columns


def erase(images: Tensor, boxes: Sequence[tuple[int, int, int, int, int]]) -> Tensor:
    """Normalized images with each box set to 0 (``RandomErasing``'s default value), one box at a time."""
    images = images.clone()
    for sample, top, left, height, width in boxes:
        images[sample, :, top : top + height, left : left + width] = 0
    return images


class BatchMix:
    """Mixup and CutMix of a batch with itself rolled by one (as torchvision.transforms.v2's MixUp and CutMix):
    one ``lam ~ Beta(alpha, alpha)`` a batch; with both enabled each batch uses one of them, at random. CutMix pastes
    a box of area ``1 - lam`` and sets ``lam`` to the share actually kept. Batch ``n`` draws from ``seed + n``, so an
    epoch mixes the same way however it is run."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, seed: int) -> None:
        self.mixup_alpha, self.cutmix_alpha, self.seed = mixup_alpha, cutmix_alpha, seed

    def __call__(self, images: Tensor, targets: Tensor, batch_number: int) -> Mixed:
        """The mixed batch; the weight ``lam`` goes to ``targets``, ``1 - lam`` to the rolled batch's."""
        rng = np.random.default_rng(self.seed + batch_number)
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < 0.5)
        lam = float(rng.beta(*(2 * [self.cutmix_alpha if use_cutmix else self.mixup_alpha])))
        other = images.roll(1, dims=0)
        if use_cutmix:
            images, lam = paste_box(images, other, lam, rng)
        else:
            images = images * lam + other * (1 - lam)
        return Mixed(images, targets, targets.roll(1, dims=0), lam)


def paste_box(images: Tensor, other: Tensor, lam: float, rng: np.random.Generator) -> tuple[Tensor, float]:
    """CutMix: a box of about ``1 - lam`` of the area, at a uniform centre, taken from ``other``; returns the images
    and the share of each image left as it was."""
    height, width = images.shape[-2:]
    centre_y, centre_x = int(rng.integers(height)), int(rng.integers(width))
    half_h, half_w = int(height * math.sqrt(1 - lam)) // 2, int(width * math.sqrt(1 - lam)) // 2
    top, bottom = max(centre_y - half_h, 0), min(centre_y + half_h, height)
    left, right = max(centre_x - half_w, 0), min(centre_x + half_w, width)
    images = images.clone()
    images[..., top:bottom, left:right] = other[..., top:bottom, left:right]
    return images, 1 - (bottom - top) * (right - left) / (height * width)


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


# --------------------------------------------------------------------------- modules


class _Normalizing(torch.nn.Module):
    """Shared: mean/std buffers and normalization of ``[0, 1]`` images as one ``addcmul``."""

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.img_size = int(img_size)
        self.max_resize_elements = MAX_RESIZE_ELEMENTS
        mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("norm_scale", (1 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("norm_shift", (-mean / std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: Tensor, pixel_scale: float = 1.0) -> Tensor:
        """``(images * pixel_scale - mean) / std``, one operation (buffers moved to the images' device if needed)."""
        scale = self.norm_scale.to(images.device) * pixel_scale if pixel_scale != 1.0 else self.norm_scale
        return torch.addcmul(self.norm_shift.to(images.device), images, scale.to(images.device))


class TrainAugment(_Normalizing):
    """The training recipe (``recipe.TrainAugmentation``) on a list of decoded images, with per-sample random
    parameters: the CPU path's ``recipe.build_train_transform`` applied to each image with the same draws, computed
    in float32 (PIL rounds to 8 bits after each step)."""

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float],
                 recipe: TrainAugmentation = TRAIN_AUGMENTATION, random_erase: float = 0.0) -> None:
        super().__init__(img_size, mean, std)
        if not 0 <= recipe.hue <= 0.5:
            raise ValueError(f"hue {recipe.hue}: must be in [0, 0.5]")
        self.random_erase = float(random_erase)
        self.scale, self.ratio, self.flip_p = tuple(recipe.scale), tuple(recipe.ratio), recipe.flip_p
        self.degrees = float(recipe.degrees)
        self.brightness = jitter_range(recipe.brightness, 1.0, 0.0)
        self.contrast = jitter_range(recipe.contrast, 1.0, 0.0)
        self.saturation = jitter_range(recipe.saturation, 1.0, 0.0)
        self.hue = jitter_range(recipe.hue, 0.0, None)
        ranges = (self.brightness, self.contrast, self.saturation, self.hue)
        self.jitter_enabled = tuple(low != high for low, high in ranges)
        differences, tiny = hue_kernel()
        self.register_buffer("hue_differences", differences, persistent=False)
        self.register_buffer("hue_tiny", tiny, persistent=False)
        self.register_buffer("one", torch.ones(()), persistent=False)
        self.register_buffer("use_cosine", torch.tensor([[False, True, False], [True, False, False]]),
                             persistent=False)

    def sample_params(self, sizes: Tensor | np.ndarray, generator: torch.Generator | None = None) -> AugmentParams:
        """Draw every sample's crop box (for images of ``[B, 2]`` (width, height)), flip, angle, jitter factors,
        jitter order and erasing, as the per-image code drew them from ``generator``: the same values, from one
        ``torch.rand`` on a CPU generator (one call per parameter, then one copy to the host, on another)."""
        sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        count = sizes.shape[0]
        if random_device(generator).type != "cpu":
            return self._params_from_device_draws(sizes, generator)
        erasing = self.random_erase > 0
        state = (generator if generator is not None else torch.default_generator).get_state() if erasing else None
        total = count * (DRAWS_PER_SAMPLE + (ERASE_DRAWS_PER_SAMPLE if erasing else 0))
        draws, units = draw_units(total, generator)
        parts = np.split(units[: count * DRAWS_PER_SAMPLE].copy(), np.cumsum([2 * CROP_ATTEMPTS * count, 2 * count]
                                                                                 + [count] * 6)[:])
        erase_units = units[count * DRAWS_PER_SAMPLE :].copy()
        log_ratios = scaled(parts[0][count * CROP_ATTEMPTS :], math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspects = exp_like_torch(draws, units, log_ratios).reshape(count, CROP_ATTEMPTS)
        params = self._params_from_units(sizes, parts, aspects)
        if erasing:
            params.erase_boxes, used = erase_boxes_from_units(erase_units, count, self.img_size, self.random_erase)
            rewind(generator, state, count * DRAWS_PER_SAMPLE + used)
        return params

    def _params_from_units(self, sizes: np.ndarray, parts: list[np.ndarray], aspects: np.ndarray) -> AugmentParams:
        """The parameters from the draws (``parts``: crop tries, crop position, flip, angle, brightness, contrast,
        saturation, hue, order; ``aspects``: the tries' ratios, already exponentiated)."""
        count = sizes.shape[0]
        fractions = scaled(parts[0][: count * CROP_ATTEMPTS], *self.scale).reshape(count, CROP_ATTEMPTS)
        boxes = crop_boxes(sizes, fractions, aspects, parts[1].reshape(count, 2), self.scale, self.ratio)
        return AugmentParams(
            boxes=boxes, flips=parts[2] < np.float32(self.flip_p),
            angles=scaled(parts[3], -self.degrees, self.degrees),
            brightness=scaled(parts[4], *self.brightness), contrast=scaled(parts[5], *self.contrast),
            saturation=scaled(parts[6], *self.saturation), hue=scaled(parts[7], *self.hue),
            order=permutations_from_units(parts[8].reshape(count, 4)))

    def _params_from_device_draws(self, sizes: np.ndarray, generator: torch.Generator) -> AugmentParams:
        """:meth:`sample_params` on a non-CPU generator: its draws made one call per parameter, as before."""
        count = sizes.shape[0]
        shapes = [(count, CROP_ATTEMPTS), (count, CROP_ATTEMPTS), (count, 2)] + [(count,)] * 6 + [(count, 4)]
        units = host_units(generator, shapes)
        aspects = torch_exp(scaled(units[1], math.log(self.ratio[0]), math.log(self.ratio[1])))
        parts = [np.concatenate([units[0].reshape(-1), units[1].reshape(-1)])] + [u.reshape(-1) for u in units[2:]]
        params = self._params_from_units(sizes, parts, aspects)
        params.erase_boxes = sample_erase_boxes(count, self.img_size, self.random_erase, generator)
        return params

    def apply(self, images: Sequence[Tensor], params: AugmentParams) -> Tensor:
        """Augment ``uint8 [3, H, W]`` images with given parameters -> normalized float32 ``[B, 3, img, img]``."""
        device, size, count = images[0].device, self.img_size, len(images)
        sizes = host_sizes(images)
        boxes = params.boxes
        chunks = plan_resize(sizes, boxes[:, :2], boxes[:, 2:], np.full((count, 2), size), np.zeros((count, 2), int),
                             params.flips.astype(bool), size, 1 / 255, self.max_resize_elements)
        colour = plan_colour(params, self.jitter_enabled)
        arrays = resize_arrays(chunks)
        if any(self.jitter_enabled):
            arrays += [colour.matrices if colour.means is None else np.concatenate([colour.matrices, colour.means])]
        arrays += [colour.hue_shifts] if colour.hue_shifts is not None else []
        arrays += [rotation_angles(params.angles)] if self.degrees else []
        arrays += list(erase_masks(params.erase_boxes, count, size)) if params.erase_boxes else []
        tensors = iter(to_device(arrays, device))
        with torch.autocast(device_type=device.type, enabled=False):
            pixels = resize_regions(images, chunks, tensors, device)
            with full_float32_matmul(device):
                if any(self.jitter_enabled):
                    pixels = self.jitter(pixels, colour, next(tensors).unbind(0),
                                          next(tensors) if colour.hue_shifts is not None else None)
                pixels = pixels.view(count, 3, size, size)  # column-major: [b, c, x, y]
                if self.degrees:
                    pixels = rotate_transposed(pixels, next(tensors), self.use_cosine.to(device))
                else:
                    pixels = pixels.transpose(2, 3).contiguous()
            normalized = self.normalize(pixels)
            if params.erase_boxes:
                rows, columns = next(tensors), next(tensors)
                normalized = normalized * torch.addcmul(self.one.to(device), rows, columns, value=-1)
            return normalized

    def jitter(self, pixels: Tensor, colour: ColourPlan, matrices: Sequence[Tensor], shifts: Tensor | None) -> Tensor:
        """The colour steps of ``colour`` on ``[B, 3, P]`` pixels in [0, 1]: ``matrices`` its linear steps' matrices
        then mean matrices (on the device), ``shifts`` its hue shifts."""
        steps = len(colour.matrices)
        means = matrices[steps:] if colour.means is not None else [None] * steps
        for step in range(steps):
            if step == colour.hue_after:
                pixels = rotate_hue(pixels, shifts, self.hue_differences.to(pixels.device),
                                    self.hue_tiny.to(pixels.device))
            pixels = linear_step(pixels, matrices[step], means[step])
        if colour.hue_after is not None and colour.hue_after == steps:  # hue only
            pixels = rotate_hue(pixels, shifts, self.hue_differences.to(pixels.device), self.hue_tiny.to(pixels.device))
        return pixels

    def forward(self, images: Sequence[Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Augment a list of ``uint8 [3, H, W]`` images -> normalized ``[B, 3, img_size, img_size]``."""
        return self.apply(images, self.sample_params(host_sizes(images), generator))


class EvalTransform(_Normalizing):
    """The eval recipe (``recipe.build_eval_transform``) on a list of decoded images: shorter side resized to
    ``recipe.eval_resize_size``, centre crop, normalization, all images in one resize."""

    def crops(self, images: Sequence[Tensor]) -> Tensor:
        """``uint8 [3, H, W]`` images resized and centre-cropped: ``uint8 [B, 3, img, img]`` (what the pipeline
        caches: ``crops(images).unbind(0)`` gives the per-image crops :meth:`crop` gives)."""
        with torch.autocast(device_type=images[0].device.type, enabled=False):
            resized = self._resized(images)
            return resized.round_().clamp_(0, 255).to(torch.uint8, memory_format=torch.contiguous_format)

    def crop(self, image: Tensor) -> Tensor:
        """One ``uint8 [3, H, W]`` image resized and centre-cropped: ``uint8 [3, img, img]``."""
        return self.crops([image])[0]

    def normalize_crops(self, crops: Sequence[Tensor] | Tensor) -> Tensor:
        """Crops from :meth:`crop` (a list) or :meth:`crops` -> normalized float32 ``[B, 3, img, img]``."""
        batch = crops if isinstance(crops, Tensor) else torch.stack(list(crops))
        return self.normalize(batch.to(torch.float32), 1 / 255)

    def forward(self, images: Sequence[Tensor]) -> Tensor:
        """``uint8 [3, H, W]`` images of any size -> normalized ``[B, 3, img, img]``."""
        with torch.autocast(device_type=images[0].device.type, enabled=False):
            resized = self._resized(images).round_().clamp_(0, 255)
            return self.normalize(resized, 1 / 255).contiguous()

    def _resized(self, images: Sequence[Tensor]) -> Tensor:
        """The resized centre crops, float32 in [0, 255] before rounding, ``[B, 3, img, img]`` (a transposed view)."""
        device, size, count = images[0].device, self.img_size, len(images)
        sizes = host_sizes(images)
        shorter = eval_resize_size(size)
        resized = np.array([shorter_side_size(image, shorter) for image in images]).reshape(count, 2)
        in_sizes = sizes[:, ::-1].copy()  # (height, width)
        offsets = np.round((resized - size) / 2.0).astype(np.int64)  # Python's round, as CenterCrop's
        chunks = plan_resize(sizes, np.zeros((count, 2), np.int64), in_sizes, resized, offsets,
                             np.zeros(count, bool), size, 1.0, self.max_resize_elements)
        tensors = iter(to_device(resize_arrays(chunks), device))
        with full_float32_matmul(device):
            pixels = resize_regions(images, chunks, tensors, device)
        return pixels.view(count, 3, size, size).transpose(2, 3)


# --------------------------------------------------------------------------- the per-image reference
# The implementation TrainAugment and EvalTransform replaced, one image or one group at a time (about 1,100 tensor
# operations for 128 images): the tests' oracle and the benchmark's baseline. Nothing on the production path uses it.


def _reference_sample_crop_boxes(sizes: Tensor, scale: Sequence[float], ratio: Sequence[float],
                                 generator: torch.Generator | None, attempts: int = CROP_ATTEMPTS) -> Tensor:
    """The per-image code's batched ``RandomResizedCrop.get_params``, in torch on the generator's device."""
    sizes = sizes.to(random_device(generator))
    width, height = sizes[:, 0].to(torch.float32), sizes[:, 1].to(torch.float32)
    count = sizes.shape[0]
    area = (width * height)[:, None]
    fraction = random_uniform((count, attempts), scale[0], scale[1], generator)
    aspect = torch.exp(random_uniform((count, attempts), math.log(ratio[0]), math.log(ratio[1]), generator))
    tries_w = torch.round(torch.sqrt(area * fraction * aspect))
    tries_h = torch.round(torch.sqrt(area * fraction / aspect))
    fits = (tries_w > 0) & (tries_w <= width[:, None]) & (tries_h > 0) & (tries_h <= height[:, None])
    first = fits.to(torch.int32).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    low, high = min(ratio), max(ratio)
    in_ratio = width / height
    fallback_w = torch.where(in_ratio > high, torch.round(height * high), width)
    fallback_h = torch.where(in_ratio < low, torch.round(width / low), height)
    box_w = torch.where(found, tries_w.gather(1, first).squeeze(1), fallback_w)
    box_h = torch.where(found, tries_h.gather(1, first).squeeze(1), fallback_h)
    position = random_uniform((count, 2), 0.0, 1.0, generator)
    random_top = torch.minimum(torch.floor(position[:, 0] * (height - box_h + 1)), height - box_h)
    random_left = torch.minimum(torch.floor(position[:, 1] * (width - box_w + 1)), width - box_w)
    top = torch.where(found, random_top, torch.div(height - box_h, 2, rounding_mode="floor"))
    left = torch.where(found, random_left, torch.div(width - box_w, 2, rounding_mode="floor"))
    return torch.stack([top, left, box_h, box_w], dim=1)


def _reference_sample_erase_boxes(count: int, size: int, probability: float, generator: torch.Generator | None,
                                  scale: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3),
                                  attempts: int = CROP_ATTEMPTS) -> list[tuple[int, int, int, int, int]]:
    """The per-image code's RandomErasing boxes: one ``torch.rand`` and ``.item()`` per number."""
    if probability <= 0:
        return []
    boxes = []
    for sample in range(count):
        if random_uniform((1,), 0.0, 1.0, generator).item() >= probability:
            continue
        for _ in range(attempts):
            area = size * size * random_uniform((1,), *scale, generator).item()
            aspect = math.exp(random_uniform((1,), math.log(ratio[0]), math.log(ratio[1]), generator).item())
            height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < height < size and 0 < width < size:
                top = int(random_uniform((1,), 0, size - height + 1, generator).item())
                left = int(random_uniform((1,), 0, size - width + 1, generator).item())
                boxes.append((sample, top, left, height, width))
                break
    return boxes


def _reference_sample_params(augment: TrainAugment, sizes: Tensor,
                             generator: torch.Generator | None = None) -> AugmentParams:
    """The per-image code's parameter draws (one ``torch.rand`` per parameter), as :class:`AugmentParams`."""
    count = sizes.shape[0]

    def host(values: Tensor) -> np.ndarray:
        return values.cpu().numpy()

    boxes = _reference_sample_crop_boxes(sizes, augment.scale, augment.ratio, generator)
    flips = random_uniform((count,), 0.0, 1.0, generator) < augment.flip_p
    angles = random_uniform((count,), -augment.degrees, augment.degrees, generator)
    factors = [random_uniform((count,), *bounds, generator)
               for bounds in (augment.brightness, augment.contrast, augment.saturation, augment.hue)]
    order = torch.argsort(random_uniform((count, 4), 0.0, 1.0, generator), dim=1)
    return AugmentParams(
        boxes=host(boxes).astype(np.int64), flips=host(flips), angles=host(angles), brightness=host(factors[0]),
        contrast=host(factors[1]), saturation=host(factors[2]), hue=host(factors[3]), order=host(order),
        erase_boxes=_reference_sample_erase_boxes(count, augment.img_size, augment.random_erase, generator))


def _reference_crop_and_resize(images: Sequence[Tensor], boxes: np.ndarray, out_size: int) -> Tensor:
    """Each image's box resized to ``out_size`` square, one ``F.interpolate`` per image, in [0, 1]."""
    crops = []
    for image, (top, left, height, width) in zip(images, boxes.tolist()):
        crop = image[None, :, top : top + height, left : left + width].to(torch.float32)
        crops.append(F.interpolate(crop, size=(out_size, out_size), mode="bilinear", antialias=True,
                                   align_corners=False))
    return torch.cat(crops).clamp_(0, 255).mul_(1 / 255)


def _reference_grayscale(images: Tensor) -> Tensor:
    red, green, blue = images.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * red + GRAY_WEIGHTS[1] * green + GRAY_WEIGHTS[2] * blue).unsqueeze(1)


def _reference_blend(images: Tensor, other: Tensor, factors: Tensor) -> Tensor:
    weight = factors.view(-1, 1, 1, 1)
    return (weight * images + (1 - weight) * other).clamp_(0, 1)


def _reference_adjust_hue(images: Tensor, shifts: Tensor) -> Tensor:
    value = images.amax(dim=1, keepdim=True)
    chroma = value - images.amin(dim=1, keepdim=True)
    red, green, blue = images.split(1, dim=1)
    is_red, is_green = value == red, value == green
    numerator = torch.where(is_red, green - blue, torch.where(is_green, blue - red, red - green))
    offset = torch.where(is_red, 0.0, torch.where(is_green, 2.0, 4.0))
    hue = torch.remainder(numerator / chroma.clamp_min(1e-12) + offset + 6 * shifts.view(-1, 1, 1, 1), 6)
    offsets = torch.arange(5.0, 0.0, -2.0, device=hue.device, dtype=hue.dtype).view(1, 3, 1, 1)
    position = torch.remainder(hue + offsets, 6)
    return value - chroma * torch.minimum(position, 4 - position).clamp_(0, 1)


def _reference_jitter_op(images: Tensor, op: int, factors: Tensor) -> Tensor:
    """One ColorJitter operation on a group of samples, as torchvision's tensor functions compute it."""
    if op == BRIGHTNESS:
        return (images * factors.view(-1, 1, 1, 1)).clamp_(0, 1)
    if op == CONTRAST:
        return _reference_blend(images, _reference_grayscale(images).mean(dim=(1, 2, 3)).view(-1, 1, 1, 1), factors)
    if op == SATURATION:
        return _reference_blend(images, _reference_grayscale(images), factors)
    return _reference_adjust_hue(images, factors)


def _reference_color_jitter(images: Tensor, params: AugmentParams, enabled: Sequence[bool]) -> Tensor:
    """The four jitter operations in each sample's order, one group of samples per (step, operation)."""
    factors = [torch.from_numpy(np.asarray(values)).to(images.device)
               for values in (params.brightness, params.contrast, params.saturation, params.hue)]
    order = torch.from_numpy(np.asarray(params.order))
    images = images.clone()
    for step in range(4):
        for op in (BRIGHTNESS, CONTRAST, SATURATION, HUE):
            chosen = torch.nonzero(order[:, step] == op).squeeze(1)
            if not enabled[op] or chosen.numel() == 0:
                continue
            chosen = chosen.to(images.device)
            images.index_copy_(0, chosen, _reference_jitter_op(images[chosen], op, factors[op][chosen]))
    return images


def _reference_rotate(images: Tensor, angles: Tensor) -> Tensor:
    """Rotate about the centre (degrees, counter-clockwise), nearest neighbour, fill 0."""
    radians = torch.deg2rad(angles.to(torch.float32))
    cos, sin = torch.cos(radians), torch.sin(radians)
    rotation = torch.stack([torch.stack([cos, -sin], dim=-1), torch.stack([sin, cos], dim=-1)], dim=-2)
    theta = torch.cat([rotation, angles.new_zeros(len(angles), 2, 1, dtype=torch.float32)], dim=2)
    grid = F.affine_grid(theta, [len(images), 1, *images.shape[-2:]], align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _reference_train_pixels(augment: TrainAugment, images: Sequence[Tensor], params: AugmentParams) -> Tensor:
    """The per-image code's training augmentation before normalization: ``[B, 3, img, img]`` in [0, 1]."""
    device = images[0].device
    pixels = _reference_crop_and_resize(images, params.boxes, augment.img_size)
    flips = torch.from_numpy(np.asarray(params.flips)).to(device)
    pixels = torch.where(flips.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
    pixels = _reference_color_jitter(pixels, params, augment.jitter_enabled)
    return _reference_rotate(pixels, torch.from_numpy(np.asarray(params.angles)).to(device))


def _reference_train_augment(augment: TrainAugment, images: Sequence[Tensor],
                             generator: torch.Generator | None = None) -> Tensor:
    """The per-image code's whole ``TrainAugment`` call: draws, augmentation, normalization, erasing."""
    params = _reference_sample_params(augment, image_sizes(images), generator)
    pixels = _reference_train_pixels(augment, images, params)
    mean, std = augment.mean.to(pixels.device), augment.std.to(pixels.device)
    return erase((pixels - mean) / std, params.erase_boxes)


def _reference_eval_crop(image: Tensor, img_size: int) -> Tensor:
    """The per-image code's eval crop: resize the shorter side, centre crop, round to uint8."""
    resized = resize_shorter_side(image, eval_resize_size(img_size))
    return centre_crop(resized, img_size).round_().clamp_(0, 255).to(torch.uint8)


def _reference_eval_transform(transform: EvalTransform, images: Sequence[Tensor]) -> Tensor:
    """The per-image code's whole ``EvalTransform`` call."""
    crops = torch.stack([_reference_eval_crop(image, transform.img_size) for image in images])
    mean, std = transform.mean.to(crops.device), transform.std.to(crops.device)
    return (crops.to(torch.float32).mul_(1 / 255) - mean) / std
