"""The per-image implementation ``gpu_augment.TrainAugment`` and ``EvalTransform`` replaced, one image or one group
at a time (about 1,100 tensor operations for 128 images): the tests' oracle and the benchmarks' baseline.

The same parameter draws as ``TrainAugment.sample_params`` (one ``torch.rand`` per parameter), the same pixels up to
float32 rounding: ``tests/test_gpu_augment.py`` compares them, ``tests/test_op_counts.py`` counts its operations,
and ``benchmarks/augment_ops.py`` and ``benchmarks/gpu_probes.py`` time it. Nothing in the production code uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from augment_params import CROP_ATTEMPTS, AugmentParams, random_device, random_uniform, sample_erase_boxes_one_by_one
from batch_resize import centre_crop, resize_shorter_side
from gpu_augment import (
    BRIGHTNESS,
    CONTRAST,
    GRAY_WEIGHTS,
    HUE,
    SATURATION,
    EvalTransform,
    TrainAugment,
    erase,
    image_sizes,
)
from recipe import eval_resize_size


def sample_crop_boxes(sizes: Tensor, scale: Sequence[float], ratio: Sequence[float],
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


def sample_params(augment: TrainAugment, sizes: Tensor, generator: torch.Generator | None = None) -> AugmentParams:
    """The per-image code's parameter draws (one ``torch.rand`` per parameter), as :class:`AugmentParams`."""
    count = sizes.shape[0]

    def host(values: Tensor) -> np.ndarray:
        return values.cpu().numpy()

    boxes = sample_crop_boxes(sizes, augment.scale, augment.ratio, generator)
    flips = random_uniform((count,), 0.0, 1.0, generator) < augment.flip_p
    angles = random_uniform((count,), -augment.degrees, augment.degrees, generator)
    factors = [random_uniform((count,), *bounds, generator)
               for bounds in (augment.brightness, augment.contrast, augment.saturation, augment.hue)]
    order = torch.argsort(random_uniform((count, 4), 0.0, 1.0, generator), dim=1)
    return AugmentParams(
        boxes=host(boxes).astype(np.int64), flips=host(flips), angles=host(angles), brightness=host(factors[0]),
        contrast=host(factors[1]), saturation=host(factors[2]), hue=host(factors[3]), order=host(order),
        erase_boxes=sample_erase_boxes_one_by_one(count, augment.img_size, augment.random_erase, generator))


def crop_and_resize(images: Sequence[Tensor], boxes: np.ndarray, out_size: int) -> Tensor:
    """Each image's box resized to ``out_size`` square, one ``F.interpolate`` per image, in [0, 1]."""
    crops = []
    for image, (top, left, height, width) in zip(images, boxes.tolist(), strict=True):
        crop = image[None, :, top : top + height, left : left + width].to(torch.float32)
        crops.append(F.interpolate(crop, size=(out_size, out_size), mode="bilinear", antialias=True,
                                   align_corners=False))
    return torch.cat(crops).clamp_(0, 255).mul_(1 / 255)


def grayscale(images: Tensor) -> Tensor:
    """``[B, 1, H, W]`` luma of ``[B, 3, H, W]`` images, as torchvision's ``rgb_to_grayscale``."""
    red, green, blue = images.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * red + GRAY_WEIGHTS[1] * green + GRAY_WEIGHTS[2] * blue).unsqueeze(1)


def blend(images: Tensor, other: Tensor, factors: Tensor) -> Tensor:
    """``factors * images + (1 - factors) * other`` per sample, clamped to [0, 1], as torchvision's ``_blend``."""
    weight = factors.view(-1, 1, 1, 1)
    return (weight * images + (1 - weight) * other).clamp_(0, 1)


def adjust_hue(images: Tensor, shifts: Tensor) -> Tensor:
    """The hue of each sample turned by its shift (turns) through HSV, as torchvision's ``adjust_hue``."""
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


def jitter_op(images: Tensor, op: int, factors: Tensor) -> Tensor:
    """One ColorJitter operation on a group of samples, as torchvision's tensor functions compute it."""
    if op == BRIGHTNESS:
        return (images * factors.view(-1, 1, 1, 1)).clamp_(0, 1)
    if op == CONTRAST:
        return blend(images, grayscale(images).mean(dim=(1, 2, 3)).view(-1, 1, 1, 1), factors)
    if op == SATURATION:
        return blend(images, grayscale(images), factors)
    return adjust_hue(images, factors)


def color_jitter(images: Tensor, params: AugmentParams, enabled: Sequence[bool]) -> Tensor:
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
            images.index_copy_(0, chosen, jitter_op(images[chosen], op, factors[op][chosen]))
    return images


def rotate(images: Tensor, angles: Tensor) -> Tensor:
    """Rotate about the centre (degrees, counter-clockwise), nearest neighbour, fill 0."""
    radians = torch.deg2rad(angles.to(torch.float32))
    cos, sin = torch.cos(radians), torch.sin(radians)
    rotation = torch.stack([torch.stack([cos, -sin], dim=-1), torch.stack([sin, cos], dim=-1)], dim=-2)
    theta = torch.cat([rotation, angles.new_zeros(len(angles), 2, 1, dtype=torch.float32)], dim=2)
    grid = F.affine_grid(theta, [len(images), 1, *images.shape[-2:]], align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def train_pixels(augment: TrainAugment, images: Sequence[Tensor], params: AugmentParams) -> Tensor:
    """The per-image code's training augmentation before normalization: ``[B, 3, img, img]`` in [0, 1]."""
    device = images[0].device
    pixels = crop_and_resize(images, params.boxes, augment.img_size)
    flips = torch.from_numpy(np.asarray(params.flips)).to(device)
    pixels = torch.where(flips.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
    pixels = color_jitter(pixels, params, augment.jitter_enabled)
    return rotate(pixels, torch.from_numpy(np.asarray(params.angles)).to(device))


def train_augment(augment: TrainAugment, images: Sequence[Tensor], generator: torch.Generator | None = None) -> Tensor:
    """The per-image code's whole ``TrainAugment`` call: draws, augmentation, normalization, erasing."""
    params = sample_params(augment, image_sizes(images), generator)
    pixels = train_pixels(augment, images, params)
    mean, std = augment.mean.to(pixels.device), augment.std.to(pixels.device)
    return erase((pixels - mean) / std, params.erase_boxes)


def eval_crop(image: Tensor, img_size: int) -> Tensor:
    """The per-image code's eval crop: resize the shorter side, centre crop, round to uint8."""
    resized = resize_shorter_side(image, eval_resize_size(img_size))
    return centre_crop(resized, img_size).round_().clamp_(0, 255).to(torch.uint8)


def eval_transform(transform: EvalTransform, images: Sequence[Tensor]) -> Tensor:
    """The per-image code's whole ``EvalTransform`` call."""
    crops = torch.stack([eval_crop(image, transform.img_size) for image in images])
    mean, std = transform.mean.to(crops.device), transform.std.to(crops.device)
    return (crops.to(torch.float32).mul_(1 / 255) - mean) / std
