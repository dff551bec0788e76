"""Training augmentation run batched on the device instead of in the DataLoader workers.

The CPU recipe (``dataset.build_train_transform``) decodes, crops, flips, jitters and rotates every image in a
worker process. Here the workers only decode an image and resize it, ignoring its aspect ratio, to a fixed
``S x S`` "staging" square (``StagedImages``), keeping the original width and height. Everything random then runs
on the whole batch on the device (``GpuTrainAugment``), with per-sample parameters drawn like torchvision's:

* ``RandomResizedCrop`` boxes are drawn in *original* pixels. The anisotropic staging resize maps the original
  image's normalized coordinates ``[-1, 1]`` linearly onto the staging square's, so a box in original pixels is
  an exact box in normalized coordinates of the staging image.
* crop, horizontal flip and rotation (about the centre of the ``img_size`` square, as ``RandomRotation`` does
  after the crop was resized) are composed into one affine matrix per sample, applied by a single
  ``affine_grid`` + bilinear ``grid_sample``. Pixels whose rotated position falls outside the crop get the fill 0
  (in ``[0, 1]`` space, i.e. ``-mean/std`` once normalized), like ``RandomRotation(fill=0)``.
* ``ColorJitter`` runs brightness, contrast, saturation and hue in a random order per sample.
* ``GpuEvalTransform`` expresses the eval recipe (shorter side resize, centre crop) as one box per sample.

All of it is pure torch, in float32 whatever autocast is active, and device-agnostic: the same code runs on
CPU and CUDA. Randomness comes from an optional ``torch.Generator``; the parameters (a few numbers per image)
are drawn on the generator's device, the CPU by default, and copied to the images' device asynchronously.
Keep ``original_sizes`` on the host and use a CPU generator (or none) and a training step never waits on
the device for them; a CUDA generator works too, at the price of one small synchronisation per batch.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, default_collate

import dataset

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale and PIL's convert("L") use.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
DECODE_ERRORS = dataset.DECODE_ERRORS
# Column order of crop boxes, the order of torchvision's RandomResizedCrop.get_params.
BOX_TOP, BOX_LEFT, BOX_HEIGHT, BOX_WIDTH = range(4)
# Colour-jitter operation indices, as in torchvision's ColorJitter.get_params permutation.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def staging_size(img_size: int) -> int:
    """Side S of the square the workers resize every image to: ``2 * img_size`` (448 for 224).

    The staging image is all the detail the device ever sees, so S bounds how sharp a crop can be: a crop of
    area fraction ``a`` covers about ``sqrt(a) * S`` staging pixels per side, and crops below ``img_size`` of
    them are upsampled (blurred) where the CPU recipe reads the full-resolution original. On 1/f-noise
    ("natural-statistics") images of 375 to 1024 pixels, outputs at S = 256 (the eval resize size) kept only
    ~60% of the CPU recipe's gradient energy (mean |pixel - CPU pixel| 0.029); at S = 448, ~87% (0.014);
    S = 512 gave 0.012, with diminishing returns. S = 2 * img_size costs 3 * 448**2 bytes of uint8 per image,
    exactly the bytes of the float32 ``3 x 224 x 224`` tensor the CPU recipe already sends from workers and
    to the device, so worker IPC and host-to-device traffic do not grow. The largest crops are then
    downsampled up to 2x by the (not antialiased) bilinear ``grid_sample``; measured, supersampling to fix
    that did not bring the output closer to the CPU recipe's (its extra blur cancels the aliasing gained).
    """
    return int(round(img_size * 2))


# --------------------------------------------------------------------------- worker side: decode and stage


def decode_staged(path: str, staging: int,
                  max_pixels: int = dataset.DEFAULT_MAX_IMAGE_PIXELS) -> tuple[Tensor, Tensor]:
    """Decode ``path`` to RGB and resize it to ``staging x staging`` ignoring aspect ratio.

    Returns the ``uint8 [3, S, S]`` image and ``[width, height]`` of the full-resolution, EXIF-oriented image.
    JPEGs are decoded at a reduced DCT scale (``draft``) when they are at least twice as big as needed; the
    drafted image still covers the whole picture, so the original size is what crops are drawn in.
    Raises what ``dataset.decode_rgb`` raises on an undecodable file.
    """
    rgb, (width, height) = dataset.decode_rgb(path, min_size=(staging, staging), max_pixels=max_pixels)
    staged = rgb.resize((staging, staging), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(staged, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    return pixels, torch.tensor([width, height], dtype=torch.int64)


class StagedImages(Dataset):
    """``(uint8 [3, S, S] image, [orig_w, orig_h], label)`` per sample, or a ``dataset.DecodeFailure`` if it cannot be decoded."""

    def __init__(self, samples: Sequence[tuple[str, int]], staging: int,
                 max_pixels: int = dataset.DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.samples = list(samples)
        self.staging = staging
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor, int] | dataset.DecodeFailure:
        # dataset.EpochSampler yields (index, seed); staging is deterministic, so the seed is not needed here
        index = key[0] if isinstance(key, tuple) else key
        path, label = self.samples[index]
        try:
            pixels, size = decode_staged(path, self.staging, self.max_pixels)
        except DECODE_ERRORS as error:
            failure = dataset.DecodeFailure(path, dataset.decode_error_reason(error, path))
            print(f"\nwarning: skipping {path}: cannot decode ({failure.reason})", file=sys.stderr)
            return failure
        return pixels, size, label


class StagedBatch(NamedTuple):
    """Staged images ``[B,3,S,S]`` uint8, original sizes ``[B,2]``, labels, and the paths that failed to decode."""

    images: Tensor | None
    sizes: Tensor | None
    targets: Tensor | None
    failed: list[dataset.DecodeFailure]


def collate_staged(batch: list[Any]) -> StagedBatch:
    """Stack staged samples; images that failed to decode are left out and named in ``failed``."""
    kept, failed = dataset.split_failures(batch)
    if not kept:
        return StagedBatch(None, None, None, failed)
    return StagedBatch(*default_collate(kept), failed)  # in a worker, stacks straight into shared memory


# --------------------------------------------------------------------------- random parameters


@dataclass
class AugmentParams:
    """Per-sample parameters of one ``GpuTrainAugment`` call (all tensors have the batch as first dimension).

    ``boxes``: ``[B, 4]`` float, integer-valued ``(top, left, height, width)`` in original pixels.
    ``flips``: ``[B]`` bool. ``angles``: ``[B]`` degrees, counter-clockwise like ``RandomRotation``.
    ``brightness``, ``contrast``, ``saturation``: ``[B]`` factors (1 = unchanged); ``hue``: ``[B]`` shifts in
    turns (0 = unchanged). ``order``: ``[B, 4]`` int64, the jitter operations (``BRIGHTNESS`` ... ``HUE``) in
    the order they are applied, like ``ColorJitter``'s ``torch.randperm(4)``.
    """

    boxes: Tensor
    flips: Tensor
    angles: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    order: Tensor

    def to(self, device: torch.device | str) -> AugmentParams:
        """The same parameters on ``device`` (asynchronous copies from the host)."""
        moved = {name: getattr(self, name).to(device, non_blocking=True) for name in self.__dataclass_fields__}
        return AugmentParams(**moved)


def random_device(generator: torch.Generator | None) -> torch.device:
    """Where random numbers are drawn: the generator's device, else the CPU (torch's default generator)."""
    return generator.device if generator is not None else torch.device("cpu")


def random_uniform(
    shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None = None
) -> Tensor:
    """Float32 uniform samples in ``[low, high)``, on ``random_device(generator)``."""
    unit = torch.rand(shape, generator=generator, device=random_device(generator), dtype=torch.float32)
    return low + (high - low) * unit


def sample_crop_boxes(
    sizes: Tensor,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> Tensor:
    """``RandomResizedCrop.get_params`` for a batch: ``[B, 2]`` (width, height) -> ``[B, 4]`` boxes.

    Each sample gets ``attempts`` tries of (area fraction uniform in ``scale``, aspect ratio log-uniform in
    ``ratio``); the first try that fits is used, at a uniform position. Samples with no fitting try fall back
    to the whole image clamped to the ratio bounds, centred. Boxes are ``(top, left, height, width)`` floats
    holding integers, in the pixels of each original image, on ``random_device(generator)``.
    """
    sizes = sizes.to(random_device(generator))
    width, height = sizes[:, 0].to(torch.float32), sizes[:, 1].to(torch.float32)
    count = sizes.shape[0]
    area = (width * height)[:, None]
    fraction = random_uniform((count, attempts), scale[0], scale[1], generator)
    log_ratio = random_uniform((count, attempts), math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = torch.exp(log_ratio)
    tries_w = torch.round(torch.sqrt(area * fraction * aspect))
    tries_h = torch.round(torch.sqrt(area * fraction / aspect))
    fits = (tries_w > 0) & (tries_w <= width[:, None]) & (tries_h > 0) & (tries_h <= height[:, None])
    first = fits.to(torch.int32).argmax(dim=1, keepdim=True)  # index of the first True (0 when none)
    found = fits.any(dim=1)
    fallback_h, fallback_w = _fallback_crop(width, height, ratio)
    box_w = torch.where(found, tries_w.gather(1, first).squeeze(1), fallback_w)
    box_h = torch.where(found, tries_h.gather(1, first).squeeze(1), fallback_h)
    position = random_uniform((count, 2), 0.0, 1.0, generator)
    random_top = torch.minimum(torch.floor(position[:, 0] * (height - box_h + 1)), height - box_h)
    random_left = torch.minimum(torch.floor(position[:, 1] * (width - box_w + 1)), width - box_w)
    top = torch.where(found, random_top, torch.div(height - box_h, 2, rounding_mode="floor"))
    left = torch.where(found, random_left, torch.div(width - box_w, 2, rounding_mode="floor"))
    return torch.stack([top, left, box_h, box_w], dim=1)


def _fallback_crop(width: Tensor, height: Tensor, ratio: Sequence[float]) -> tuple[Tensor, Tensor]:
    """The ``(height, width)`` of RandomResizedCrop's fallback: the whole image clamped to the ratio bounds."""
    low, high = min(ratio), max(ratio)
    in_ratio = width / height
    too_tall, too_wide = in_ratio < low, in_ratio > high
    box_w = torch.where(too_wide, torch.round(height * high), width)
    box_h = torch.where(too_tall, torch.round(width / low), height)
    return box_h, box_w


def random_permutations(count: int, generator: torch.Generator | None = None) -> Tensor:
    """``[count, 4]`` int64, one uniformly random permutation of ``0..3`` per row."""
    return torch.argsort(random_uniform((count, 4), 0.0, 1.0, generator), dim=1)


def jitter_range(amount: float, centre: float, clamp_low: float | None) -> tuple[float, float]:
    """ColorJitter's range for one amount: ``[centre - amount, centre + amount]``, floored at ``clamp_low``."""
    low = centre - amount
    return (max(low, clamp_low) if clamp_low is not None else low), centre + amount


# --------------------------------------------------------------------------- geometry


def rotation_matrices(angles: Tensor) -> Tensor:
    """``[B, 2, 2]`` maps from output to input normalized coordinates (y down) for counter-clockwise degrees.

    This is PIL's ``Image.rotate`` convention (used by torchvision's ``RandomRotation`` on PIL images).
    """
    radians = torch.deg2rad(angles.to(torch.float32))
    cos, sin = torch.cos(radians), torch.sin(radians)
    return torch.stack([torch.stack([cos, -sin], dim=-1), torch.stack([sin, cos], dim=-1)], dim=-2)


def box_to_normalized(boxes: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
    """Centre ``[B, 2]`` (x, y) and half-extent ``[B, 2]`` of pixel boxes in ``[-1, 1]`` image coordinates."""
    width, height = sizes[:, 0].to(torch.float32), sizes[:, 1].to(torch.float32)
    top, left = boxes[:, BOX_TOP], boxes[:, BOX_LEFT]
    box_h, box_w = boxes[:, BOX_HEIGHT], boxes[:, BOX_WIDTH]
    centre = torch.stack([(2 * left + box_w) / width - 1, (2 * top + box_h) / height - 1], dim=1)
    half = torch.stack([box_w / width, box_h / height], dim=1)
    return centre, half


def crop_flip_rotate_grid(
    boxes: Tensor, sizes: Tensor, flips: Tensor, angles: Tensor, out_size: int
) -> tuple[Tensor, Tensor]:
    """Sampling grid ``[B, out, out, 2]`` of crop -> flip -> rotate, and the rotation's valid-pixel mask.

    Output pixel ``o`` (normalized in the ``out x out`` square) comes from ``c = R o`` in the resized,
    flipped crop (rotation about the square's centre, as RandomRotation turns the already-resized crop), then
    from ``(flip * c_x * half_w + centre_x, c_y * half_h + centre_y)`` in the original image. The mask is 1
    where ``c`` lies in ``[-1, 1)`` (the source pixel of PIL's nearest lookup exists) and 0 where
    RandomRotation writes its fill.
    """
    count = boxes.shape[0]
    rotation = torch.cat([rotation_matrices(angles), angles.new_zeros(count, 2, 1)], dim=2)
    rotated = F.affine_grid(rotation, [count, 1, out_size, out_size], align_corners=False)
    inside = ((rotated >= -1) & (rotated < 1)).all(dim=-1)
    centre, half = box_to_normalized(boxes, sizes)
    sign = torch.where(flips, -1.0, 1.0).to(half.dtype)
    scale = torch.stack([half[:, 0] * sign, half[:, 1]], dim=1)
    grid = rotated * scale[:, None, None, :] + centre[:, None, None, :]
    return grid, inside[:, None].to(torch.float32)


def box_grid(boxes: Tensor, sizes: Tensor, out_size: int) -> Tensor:
    """Sampling grid ``[B, out, out, 2]`` that resizes each pixel box to ``out x out``."""
    centre, half = box_to_normalized(boxes, sizes)
    zeros = torch.zeros_like(half[:, 0])
    row_x = torch.stack([half[:, 0], zeros, centre[:, 0]], dim=1)
    row_y = torch.stack([zeros, half[:, 1], centre[:, 1]], dim=1)
    theta = torch.stack([row_x, row_y], dim=1)
    return F.affine_grid(theta, [boxes.shape[0], 1, out_size, out_size], align_corners=False)


def resample(images: Tensor, grid: Tensor) -> Tensor:
    """Bilinear samples of uint8 ``images`` at ``grid``, as float32 in ``[0, 1]``.

    Coordinates are clamped at the image border (as PIL's resize treats edges); the rotation fill is applied
    separately with the mask, so no sample blends with an artificial zero border.
    """
    sampled = F.grid_sample(
        images.to(torch.float32), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled.mul_(1 / 255)


def eval_crop_boxes(sizes: Tensor, img_size: int) -> Tensor:
    """Boxes ``[B, 4]`` in original pixels of ``Resize(round(img_size*256/224))`` + ``CenterCrop(img_size)``.

    Follows torchvision's integer arithmetic: the longer side becomes ``int(R * long / short)``, the crop
    offset ``round((resized - img_size) / 2)``; the box is then scaled back to original pixels (fractional).
    """
    resize = dataset.eval_resize_size(img_size)
    width, height = sizes[:, 0].to(torch.int64), sizes[:, 1].to(torch.int64)
    short, long = torch.minimum(width, height), torch.maximum(width, height)
    new_long = torch.div(resize * long, short, rounding_mode="floor")
    resized_w = torch.where(width <= height, torch.full_like(width, resize), new_long).to(torch.float32)
    resized_h = torch.where(width <= height, new_long, torch.full_like(height, resize)).to(torch.float32)
    top = torch.round((resized_h - img_size) / 2)
    left = torch.round((resized_w - img_size) / 2)
    scale_x, scale_y = width.to(torch.float32) / resized_w, height.to(torch.float32) / resized_h
    return torch.stack([top * scale_y, left * scale_x, img_size * scale_y, img_size * scale_x], dim=1)


# --------------------------------------------------------------------------- colour


def grayscale(images: Tensor) -> Tensor:
    """``[B, 1, H, W]`` luma of ``[B, 3, H, W]`` RGB images."""
    red, green, blue = images.unbind(dim=1)
    weights = GRAY_WEIGHTS
    return (weights[0] * red + weights[1] * green + weights[2] * blue).unsqueeze(1)


def blend(images: Tensor, other: Tensor, factors: Tensor) -> Tensor:
    """``factors * images + (1 - factors) * other`` per sample, clamped to ``[0, 1]`` (torchvision's _blend)."""
    weight = factors.view(-1, 1, 1, 1)
    return (weight * images + (1 - weight) * other).clamp_(0, 1)


def adjust_brightness(images: Tensor, factors: Tensor) -> Tensor:
    """Multiply by per-sample factors, clamped."""
    return (images * factors.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(images: Tensor, factors: Tensor, mask: Tensor) -> Tensor:
    """Blend with the per-image mean luma, taken over the ``mask``-ed pixels (the image before rotation)."""
    total = (grayscale(images) * mask).sum(dim=(1, 2, 3))
    mean = total / mask.sum(dim=(1, 2, 3)).clamp_min(1)
    return blend(images, mean.view(-1, 1, 1, 1), factors)


def adjust_saturation(images: Tensor, factors: Tensor) -> Tensor:
    """Blend with the image's own luma."""
    return blend(images, grayscale(images), factors)


def adjust_hue(images: Tensor, shifts: Tensor) -> Tensor:
    """Rotate hue by per-sample ``shifts`` (turns) keeping HSV value and saturation, like torchvision's."""
    value = images.amax(dim=1, keepdim=True)
    chroma = value - images.amin(dim=1, keepdim=True)
    hue = torch.remainder(rgb_hue_sextants(images, value, chroma) + 6 * shifts.view(-1, 1, 1, 1), 6)
    return hsv_to_rgb(hue, chroma, value)


def rgb_hue_sextants(images: Tensor, value: Tensor, chroma: Tensor) -> Tensor:
    """HSV hue in sextants of the colour wheel, in ``[-1, 5]`` (take it modulo 6); 0 for gray pixels.

    The maximum channel picks the sextant pair: red -> ``(g - b) / c``, green -> ``2 + (b - r) / c``,
    blue -> ``4 + (r - g) / c``. A gray pixel has ``value == red`` and a zero numerator.
    """
    red, green, blue = images.split(1, dim=1)
    is_red, is_green = value == red, value == green
    numerator = torch.where(is_red, green - blue, torch.where(is_green, blue - red, red - green))
    offset = torch.where(is_red, 0.0, torch.where(is_green, 2.0, 4.0))
    return numerator / chroma.clamp_min(1e-12) + offset


def hsv_to_rgb(hue: Tensor, chroma: Tensor, value: Tensor) -> Tensor:
    """RGB from hue in ``[0, 6)``, chroma (= value * saturation) and value, all ``[B, 1, H, W]``."""
    offsets = torch.arange(5.0, 0.0, -2.0, device=hue.device, dtype=hue.dtype).view(1, 3, 1, 1)  # r, g, b
    position = torch.remainder(hue + offsets, 6)
    ramp = torch.minimum(position, 4 - position).clamp_(0, 1)
    return value - chroma * ramp


def apply_color_jitter(
    images: Tensor, params: AugmentParams, mask: Tensor, enabled: Sequence[bool], order: Tensor | None = None
) -> Tensor:
    """Apply the four jitter operations in each sample's own order (``params.order``).

    At step ``k`` each operation runs once, on the samples whose ``order[:, k]`` names it (index selection),
    so every sample gets each operation exactly once. The groups are read from ``params.order`` on the host:
    free when the parameters were drawn on the CPU, one small device synchronisation otherwise.
    ``enabled[op]`` False skips an operation whose range is empty (ColorJitter's ``None``). ``order``: a host
    copy of ``params.order`` when the caller has one.
    """
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    order = (params.order if order is None else order).cpu()
    images = images.clone()
    for step in range(4):
        for op in (BRIGHTNESS, CONTRAST, SATURATION, HUE):
            if not enabled[op]:
                continue
            chosen = torch.nonzero(order[:, step] == op).squeeze(1)
            if chosen.numel() == 0:
                continue
            chosen = chosen.to(images.device, non_blocking=True)
            adjusted = _jitter_op(images[chosen], op, factors[op][chosen], mask[chosen])
            images.index_copy_(0, chosen, adjusted)
    return images


def _jitter_op(images: Tensor, op: int, factors: Tensor, mask: Tensor) -> Tensor:
    if op == BRIGHTNESS:
        return adjust_brightness(images, factors)
    if op == CONTRAST:
        return adjust_contrast(images, factors, mask)
    if op == SATURATION:
        return adjust_saturation(images, factors)
    return adjust_hue(images, factors)


# --------------------------------------------------------------------------- modules


class _Normalizing(torch.nn.Module):
    """Shared: mean/std buffers and normalization of ``[0, 1]`` images."""

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.img_size = int(img_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """``(images - mean) / std`` with the buffers moved to the images' device if needed."""
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images - mean) / std


class GpuTrainAugment(_Normalizing):
    """The training recipe on a batch of staged images, with per-sample random parameters.

    Equivalent in distribution to ``RandomResizedCrop(img_size, scale, ratio)``, ``RandomHorizontalFlip(flip_p)``,
    ``ColorJitter(brightness, contrast, saturation, hue)``, ``RandomRotation(degrees)``, ``ToTensor()``,
    ``Normalize(mean, std)``, except that the crop is resampled from the staging image (not the original) and the
    rotation is bilinear and done in the same resample as the crop (not a second, nearest-neighbour pass).
    """

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.1,
        degrees: float = 15.0,
    ) -> None:
        super().__init__(img_size, mean, std)
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue {hue}: must be in [0, 0.5]")
        self.scale, self.ratio, self.flip_p, self.degrees = tuple(scale), tuple(ratio), flip_p, float(degrees)
        self.brightness = jitter_range(brightness, 1.0, 0.0)
        self.contrast = jitter_range(contrast, 1.0, 0.0)
        self.saturation = jitter_range(saturation, 1.0, 0.0)
        self.hue = jitter_range(hue, 0.0, None)
        ranges = (self.brightness, self.contrast, self.saturation, self.hue)
        self.jitter_enabled = tuple(low != high for low, high in ranges)

    def sample_params(self, original_sizes: Tensor, generator: torch.Generator | None = None) -> AugmentParams:
        """Draw every sample's crop box, flip, angle, jitter factors and jitter order.

        They are drawn on ``generator``'s device (the CPU when it is None: a few hundred numbers, and the
        jitter grouping then needs no device synchronisation).
        """
        count = original_sizes.shape[0]
        return AugmentParams(
            boxes=sample_crop_boxes(original_sizes, self.scale, self.ratio, generator),
            flips=random_uniform((count,), 0.0, 1.0, generator) < self.flip_p,
            angles=random_uniform((count,), -self.degrees, self.degrees, generator),
            brightness=random_uniform((count,), *self.brightness, generator),
            contrast=random_uniform((count,), *self.contrast, generator),
            saturation=random_uniform((count,), *self.saturation, generator),
            hue=random_uniform((count,), *self.hue, generator),
            order=random_permutations(count, generator),
        )

    def apply(self, images: Tensor, original_sizes: Tensor, params: AugmentParams) -> Tensor:
        """Augment ``uint8 [B, 3, S, S]`` staged images with given parameters -> normalized float32."""
        sizes = original_sizes.to(images.device, non_blocking=True)
        on_device = params.to(images.device)
        with torch.autocast(device_type=images.device.type, enabled=False):
            grid, inside = crop_flip_rotate_grid(
                on_device.boxes, sizes, on_device.flips, on_device.angles, self.img_size
            )
            pixels = resample(images, grid)
            pixels = apply_color_jitter(pixels, on_device, inside, self.jitter_enabled, order=params.order)
            return self.normalize(pixels * inside)

    def forward(
        self, images: Tensor, original_sizes: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Augment ``uint8 [B, 3, S, S]`` staged images (original ``[B, 2]`` (w, h)) -> ``[B, 3, img, img]``."""
        params = self.sample_params(original_sizes, generator)
        return self.apply(images, original_sizes, params)


class GpuEvalTransform(_Normalizing):
    """The eval recipe (shorter side to ``round(img_size*256/224)``, centre crop) as one resample per image."""

    def forward(self, images: Tensor, original_sizes: Tensor) -> Tensor:
        """``uint8 [B, 3, S, S]`` staged images and original ``[B, 2]`` (w, h) -> normalized ``[B, 3, img, img]``."""
        sizes = original_sizes.to(images.device)
        with torch.autocast(device_type=images.device.type, enabled=False):
            grid = box_grid(eval_crop_boxes(sizes, self.img_size), sizes, self.img_size)
            return self.normalize(resample(images, grid))
