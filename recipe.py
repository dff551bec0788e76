"""The recipes, their parameters written once: training augmentation and evaluation preprocessing.

The CPU path builds them here as torchvision.transforms.v2 pipelines on PIL images (run in the loader workers);
``gpu_augment.py`` runs the same parameters batched on tensors on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import v2

from common import IMAGENET_MEAN, IMAGENET_STD

AUTO_AUGMENT_CHOICES = ("none", "ta_wide", "ra", "aa")


@dataclass(frozen=True)
class TrainAugmentation:
    """The reference recipe's random training augmentation, in the order it runs: RandomResizedCrop(scale, ratio),
    RandomHorizontalFlip(flip_p), ColorJitter(brightness, contrast, saturation, hue), RandomRotation(degrees)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.1
    degrees: float = 15.0


TRAIN_AUGMENTATION = TrainAugmentation()
EVAL_RESIZE_RATIO = 256 / 224  # the shorter side before the centre crop, relative to the crop: 256 for 224


def eval_resize_size(img_size: int) -> int:
    """The shorter-side resize before the centre crop: 256 for 224, scaled alike for other sizes."""
    return int(round(img_size * EVAL_RESIZE_RATIO))


def train_decode_side(img_size: int, min_scale: float = TRAIN_AUGMENTATION.scale[0]) -> int:
    """The shorter side an image needs for training: 792 for 224.

    The smallest crop covers ``min_scale`` of the area, a side of about ``sqrt(min_scale)`` of the image's; for it
    to still hold ``img_size`` pixels a side, the shorter side needs ``img_size / sqrt(min_scale)``. Larger images
    may be decoded (or scaled once) down to it without blurring any crop the recipe can draw.
    """
    return math.ceil(img_size / math.sqrt(min_scale))


def auto_augment_transform(name: str) -> Callable[[Image.Image], Image.Image] | None:
    """``--auto-augment``: TrivialAugmentWide (``ta_wide``), RandAugment (``ra``), AutoAugment's ImageNet policy
    (``aa``), or None (``none``)."""
    # v1's policies: v2's draw their operations in another order, so a seeded run would augment differently.
    policies = {"ta_wide": transforms.TrivialAugmentWide, "ra": transforms.RandAugment,
                "aa": lambda: transforms.AutoAugment(transforms.AutoAugmentPolicy.IMAGENET)}
    return policies[name]() if name in policies else None


def to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    """PIL image -> float32 tensor in [0, 1] -> normalized, as a plain tensor."""
    return [v2.ToImage(), v2.Lambda(divided_by_255), v2.Normalize(mean, std), v2.ToPureTensor()]


def divided_by_255(image: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] by division, as v1's ToTensor: v2.ToDtype(scale=True) multiplies by 1/255, one
    rounding apart, and that alone moved the bundled sample's best epoch from 18 to 12."""
    return image.to(torch.float32).div_(255)


def build_train_transform(
    img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
    auto_augment: str = "none", random_erase: float = 0.0, recipe: TrainAugmentation = TRAIN_AUGMENTATION,
) -> Callable[[Image.Image], torch.Tensor]:
    """The training recipe on a PIL image, ending in a normalized tensor; ``auto_augment``: a policy after the
    flip (where torchvision's references put it); ``random_erase`` > 0: RandomErasing of that probability last."""
    policy = auto_augment_transform(auto_augment)
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=recipe.scale, ratio=recipe.ratio, antialias=True),
        v2.RandomHorizontalFlip(recipe.flip_p),
        *([policy] if policy is not None else []),
        v2.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue),
        v2.RandomRotation(recipe.degrees),
        *to_normalized_tensor(mean, std),
        *([v2.RandomErasing(p=random_erase)] if random_erase > 0 else []),
    ])


def build_eval_transform(
    img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation recipe: resize the shorter side (:func:`eval_resize_size`), centre crop, normalize."""
    return v2.Compose([v2.Resize(eval_resize_size(img_size), antialias=True), v2.CenterCrop(img_size),
                       *to_normalized_tensor(mean, std)])
