"""The training recipe's random parameters for a batch, drawn on the host as the per-image code drew them.

``gpu_augment.TrainAugment`` draws every sample's crop box, flip, angle, colour-jitter factors and order (and
``RandomErasing``'s boxes) with ONE ``torch.rand`` on a CPU generator and turns the uniforms into parameters with
numpy, step for step in torch's float32 arithmetic, so that the values are those torchvision's per-image draws give
(``RandomResizedCrop.get_params``, ``ColorJitter.get_params``, ``RandomErasing.get_params``). On a generator of
another device the draws are made one call per parameter, as before, and copied to the host once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

CROP_ATTEMPTS = 10
# Uniform draws per sample, in the order the per-image code drew them: crop area fractions and log aspect ratios
# (CROP_ATTEMPTS each), the crop position (2), flip, angle, brightness, contrast, saturation, hue, jitter order (4).
DRAWS_PER_SAMPLE = 2 * CROP_ATTEMPTS + 2 + 6 + 4
# RandomErasing's most draws per sample: the coin, then per attempt area and ratio, and top and left on success.
ERASE_DRAWS_PER_SAMPLE = 1 + 2 * CROP_ATTEMPTS + 2


@dataclass
class AugmentParams:
    """Per-sample parameters of one ``TrainAugment`` call, host numpy arrays with the batch first.

    ``boxes``: ``[B, 4]`` int64 ``(top, left, height, width)`` in original pixels. ``flips``: ``[B]`` bool.
    ``angles``: ``[B]`` float32 degrees, counter-clockwise like ``RandomRotation``. ``brightness``, ``contrast``,
    ``saturation``: ``[B]`` float32 factors (1 = unchanged); ``hue``: ``[B]`` float32 shifts in turns (0 =
    unchanged). ``order``: ``[B, 4]`` int64, the jitter operations (``gpu_augment.BRIGHTNESS`` ... ``HUE``) in the
    order they are applied, like ``ColorJitter``'s ``torch.randperm(4)``. ``erase_boxes``: ``(sample, top, left,
    height, width)`` of each sample ``RandomErasing`` erases.
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
    return [piece.reshape(shape) for piece, shape in zip(pieces, shapes, strict=True)]


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
        return sample_erase_boxes_one_by_one(count, size, probability, generator, scale, ratio, attempts)
    state = (generator if generator is not None else torch.default_generator).get_state()
    units = draw_units(count * ERASE_DRAWS_PER_SAMPLE, generator)[1]
    boxes, used = erase_boxes_from_units(units, count, size, probability, scale, ratio, attempts)
    rewind(generator, state, used)
    return boxes


def sample_erase_boxes_one_by_one(count: int, size: int, probability: float, generator: torch.Generator | None,
                                  scale: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3),
                                  attempts: int = CROP_ATTEMPTS) -> list[tuple[int, int, int, int, int]]:
    """The per-image code's RandomErasing boxes: one ``torch.rand`` and ``.item()`` per number (how
    :func:`sample_erase_boxes` draws on a generator that is not on the CPU)."""
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


def rewind(generator: torch.Generator | None, state: Tensor, consumed: int) -> None:
    """Put a CPU generator back at ``state`` advanced by ``consumed`` draws (one tensor operation)."""
    (generator if generator is not None else torch.default_generator).set_state(state)
    torch.rand(consumed, generator=generator)

