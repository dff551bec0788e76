"""The training and evaluation recipes run batched on the device, from decoded images of any size.

``pipeline.py`` decodes a batch on the device (or takes it from the decoded-image cache): a list of ``uint8
[3, H, W]`` images, each of its own size. Here the random part of ``recipe.build_train_transform`` runs on the
list, with per-sample parameters drawn like torchvision's, in the CPU recipe's order:

* ``RandomResizedCrop``: boxes drawn in the pixels of each image, each crop resized to ``img_size`` with an
  antialiased bilinear filter (``F.interpolate(antialias=True)``, torchvision's tensor resize, which follows
  PIL's), one call per image;
* ``RandomHorizontalFlip`` and ``ColorJitter`` (brightness, contrast, saturation and hue in a random order per
  sample) on the batch;
* ``RandomRotation``: nearest-neighbour, about the centre, corners filled with 0 (before normalization), as
  torchvision does on PIL images; one ``affine_grid`` + ``grid_sample`` for the batch.

``EvalTransform`` is the eval recipe (shorter side resized to ``round(img_size * 256 / 224)`` with torchvision's
integer arithmetic, antialiased; centre crop). All of it is pure torch, in float32 whatever autocast is active,
and device-agnostic: the same code runs on the CPU (where the tests run it) and on CUDA. Randomness comes from an
optional ``torch.Generator``: the parameters (a few numbers per image) are drawn on the generator's device, the CPU
by default, from sizes the host knows (tensor shapes), so a training step never waits on the device for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

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


def image_sizes(images: Sequence[Tensor]) -> Tensor:
    """``[B, 2]`` int64 (width, height) of ``[3, H, W]`` images, from their shapes (no device access)."""
    return torch.tensor([[image.shape[-1], image.shape[-2]] for image in images], dtype=torch.int64)


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
    erase_boxes: list[tuple[int, int, int, int, int]] = field(default_factory=list)

    def to(self, device: torch.device | str) -> AugmentParams:
        """The same parameters on ``device`` (asynchronous copies from the host)."""
        moved = {name: getattr(self, name).to(device, non_blocking=True) for name in self.__dataclass_fields__
                 if name != "erase_boxes"}
        return AugmentParams(**moved, erase_boxes=self.erase_boxes)


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


def crop_and_resize(images: Sequence[Tensor], boxes: Tensor, out_size: int) -> Tensor:
    """Each ``uint8 [3, H, W]`` image's box ``(top, left, height, width)`` resized to ``out_size`` square,
    antialiased bilinear, as ``[B, 3, out, out]`` float32 in ``[0, 1]``."""
    crops = []
    for image, (top, left, height, width) in zip(images, boxes.to(torch.int64).tolist()):
        crop = image[None, :, top : top + height, left : left + width].to(torch.float32)
        crops.append(F.interpolate(crop, size=(out_size, out_size), mode="bilinear", antialias=True,
                                   align_corners=False))
    return torch.cat(crops).clamp_(0, 255).mul_(1 / 255)


def flip_horizontally(images: Tensor, flips: Tensor) -> Tensor:
    """Mirror the samples whose ``flips`` is True."""
    return torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)


def rotation_matrices(angles: Tensor) -> Tensor:
    """``[B, 2, 2]`` maps from output to input normalized coordinates (y down) for counter-clockwise degrees.

    This is PIL's ``Image.rotate`` convention (used by torchvision's ``RandomRotation`` on PIL images).
    """
    radians = torch.deg2rad(angles.to(torch.float32))
    cos, sin = torch.cos(radians), torch.sin(radians)
    return torch.stack([torch.stack([cos, -sin], dim=-1), torch.stack([sin, cos], dim=-1)], dim=-2)


def rotate(images: Tensor, angles: Tensor) -> Tensor:
    """Rotate each square image about its centre by its angle (degrees, counter-clockwise), nearest neighbour,
    with 0 where the rotated image does not reach (``RandomRotation(fill=0)``)."""
    count, _, height, width = images.shape
    theta = torch.cat([rotation_matrices(angles), angles.new_zeros(count, 2, 1, dtype=torch.float32)], dim=2)
    grid = F.affine_grid(theta, [count, 1, height, width], align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def resize_shorter_side(image: Tensor, size: int) -> Tensor:
    """``Resize(size)`` of one ``[3, H, W]`` image (torchvision's rounding: the longer side becomes
    ``int(size * long / short)``), antialiased bilinear, float32 in the image's value range."""
    height, width = image.shape[-2:]
    if width <= height:
        new_size = (int(size * height / width), size)
    else:
        new_size = (size, int(size * width / height))
    return F.interpolate(image[None].to(torch.float32), size=new_size, mode="bilinear", antialias=True,
                         align_corners=False)[0]


def centre_crop(image: Tensor, size: int) -> Tensor:
    """``CenterCrop(size)`` of a ``[3, H, W]`` image at least ``size`` on each side (torchvision's rounding)."""
    height, width = image.shape[-2:]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image[:, top : top + size, left : left + size]


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


def adjust_contrast(images: Tensor, factors: Tensor) -> Tensor:
    """Blend with the per-image mean luma."""
    mean = grayscale(images).mean(dim=(1, 2, 3))
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
    images: Tensor, params: AugmentParams, enabled: Sequence[bool], order: Tensor | None = None
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
            adjusted = _jitter_op(images[chosen], op, factors[op][chosen])
            images.index_copy_(0, chosen, adjusted)
    return images


def _jitter_op(images: Tensor, op: int, factors: Tensor) -> Tensor:
    if op == BRIGHTNESS:
        return adjust_brightness(images, factors)
    if op == CONTRAST:
        return adjust_contrast(images, factors)
    if op == SATURATION:
        return adjust_saturation(images, factors)
    return adjust_hue(images, factors)


# --------------------------------------------------------------------------- erasing and mixing


def sample_erase_boxes(count: int, size: int, probability: float, generator: torch.Generator | None = None,
                       scale: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3),
                       attempts: int = 10) -> list[tuple[int, int, int, int, int]]:
    """``RandomErasing(p=probability)``'s boxes for ``count`` square images of ``size``: ``(sample, top, left, height,
    width)`` for each sample erased (a sample whose ``attempts`` tries all fail is left alone, as torchvision does)."""
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


def erase(images: Tensor, boxes: Sequence[tuple[int, int, int, int, int]]) -> Tensor:
    """Normalized images with each box set to 0 (``RandomErasing``'s default value)."""
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


class TrainAugment(_Normalizing):
    """The training recipe (``recipe.TrainAugmentation``) on a list of decoded images, with per-sample random
    parameters: equivalent in distribution to the CPU path's ``recipe.build_train_transform`` applied to each image,
    computed in float32 (PIL rounds to 8 bits after each step)."""

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

    def sample_params(self, sizes: Tensor, generator: torch.Generator | None = None) -> AugmentParams:
        """Draw every sample's crop box (for images of ``[B, 2]`` (width, height)), flip, angle, jitter factors
        and jitter order, on ``generator``'s device (the CPU when it is None)."""
        count = sizes.shape[0]
        return AugmentParams(
            boxes=sample_crop_boxes(sizes, self.scale, self.ratio, generator),
            flips=random_uniform((count,), 0.0, 1.0, generator) < self.flip_p,
            angles=random_uniform((count,), -self.degrees, self.degrees, generator),
            brightness=random_uniform((count,), *self.brightness, generator),
            contrast=random_uniform((count,), *self.contrast, generator),
            saturation=random_uniform((count,), *self.saturation, generator),
            hue=random_uniform((count,), *self.hue, generator),
            order=random_permutations(count, generator),
            erase_boxes=sample_erase_boxes(count, self.img_size, self.random_erase, generator),
        )

    def apply(self, images: Sequence[Tensor], params: AugmentParams) -> Tensor:
        """Augment ``uint8 [3, H, W]`` images with given parameters -> normalized float32 ``[B, 3, img, img]``."""
        device = images[0].device
        on_device = params.to(device)
        with torch.autocast(device_type=device.type, enabled=False):
            pixels = crop_and_resize(images, params.boxes, self.img_size)
            pixels = flip_horizontally(pixels, on_device.flips)
            pixels = apply_color_jitter(pixels, on_device, self.jitter_enabled, order=params.order)
            normalized = self.normalize(rotate(pixels, on_device.angles))
            return erase(normalized, params.erase_boxes) if params.erase_boxes else normalized

    def forward(self, images: Sequence[Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Augment a list of ``uint8 [3, H, W]`` images -> normalized ``[B, 3, img_size, img_size]``."""
        return self.apply(images, self.sample_params(image_sizes(images), generator))


class EvalTransform(_Normalizing):
    """The eval recipe (``recipe.build_eval_transform``) on a list of decoded images: shorter side resized to
    ``recipe.eval_resize_size``, centre crop, normalization."""

    def crop(self, image: Tensor) -> Tensor:
        """One ``uint8 [3, H, W]`` image resized and centre-cropped: ``uint8 [3, img, img]``."""
        resized = resize_shorter_side(image, eval_resize_size(self.img_size))
        return centre_crop(resized, self.img_size).round_().clamp_(0, 255).to(torch.uint8)

    def normalize_crops(self, crops: Sequence[Tensor]) -> Tensor:
        """Crops from :meth:`crop` -> normalized float32 ``[B, 3, img, img]``."""
        return self.normalize(torch.stack(list(crops)).to(torch.float32).mul_(1 / 255))

    def forward(self, images: Sequence[Tensor]) -> Tensor:
        """``uint8 [3, H, W]`` images of any size -> normalized ``[B, 3, img, img]``."""
        with torch.autocast(device_type=images[0].device.type, enabled=False):
            return self.normalize_crops([self.crop(image) for image in images])
