"""The training and evaluation recipes run batched on the device, from decoded images of any size.

``pipeline.py`` decodes a batch on the device (or takes it from the decoded-image cache): a list of ``uint8
[3, H, W]`` images, each of its own size. Here the random part of ``recipe.build_train_transform`` runs on the
whole list in a fixed number of tensor operations (about sixty, whatever the batch size), because on a GPU every
operation is a kernel launch the host must issue:

* the parameters are drawn with ONE ``torch.rand`` on a CPU generator and turned into boxes, flips, angles and
  jitter factors with numpy on the host, with the same values as torchvision's per-image draws would give
  (``augment_params.py``);
* ``RandomResizedCrop`` + ``RandomHorizontalFlip``: each crop box is resized to ``img_size`` by the batched
  antialiased resize of ``batch_resize.py`` (one packed buffer, one gather, two batched matrix products with
  per-sample weights, those of ``F.interpolate(antialias=True)``, which follows PIL); the flip reverses the output
  columns' weights;
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

The per-image implementation these classes replaced is kept in ``tests/augment_reference.py`` as the tests' oracle
and the benchmarks' baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from augment_params import (
    CROP_ATTEMPTS,
    DRAWS_PER_SAMPLE,
    ERASE_DRAWS_PER_SAMPLE,
    AugmentParams,
    crop_boxes,
    draw_units,
    erase_boxes_from_units,
    exp_like_torch,
    host_units,
    jitter_range,
    permutations_from_units,
    random_device,
    rewind,
    sample_erase_boxes,
    scaled,
    torch_exp,
)
from batch_resize import (
    MAX_RESIZE_ELEMENTS,
    full_float32_matmul,
    plan_resize,
    resize_arrays,
    resize_regions,
    shorter_side_size,
    to_device,
)
from batch_resize import resize_shorter_side as resize_shorter_side  # re-exported: pipeline.py calls it from here
from common import Mixed
from recipe import TRAIN_AUGMENTATION, TrainAugmentation, eval_resize_size

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale and PIL's convert("L") use.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# Colour-jitter operation indices, as in torchvision's ColorJitter.get_params permutation.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
# The HSV-to-RGB offsets of red, green and blue, in sextants of the colour wheel.
HUE_CHANNEL_OFFSETS = (5.0, 3.0, 1.0)
# Added to the channel differences (as the convolution's bias) so that a gray pixel's chroma is tiny instead of 0
# (no 0/0). The convolution may start its sum from the bias, so it must survive adding a pixel near 1: 8 units in
# the last place of 1. It moves a hue-rotated pixel by at most about 3 times this, 0.0008 of an 8-bit level.
TINY_CHROMA = 2.0**-20


def image_sizes(images: Sequence[Tensor]) -> Tensor:
    """``[B, 2]`` int64 (width, height) of ``[3, H, W]`` images, from their shapes (no device access)."""
    return torch.from_numpy(host_sizes(images))


def host_sizes(images: Sequence[Tensor]) -> np.ndarray:
    """``[B, 2]`` int64 numpy (width, height) of ``[3, H, W]`` images, from their shapes."""
    return np.array([[image.shape[-1], image.shape[-2]] for image in images], dtype=np.int64).reshape(-1, 2)


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
