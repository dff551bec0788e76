"""Tests for gpu_augment.py: parameter distributions vs torchvision's, each operation and whole outputs vs the
CPU recipe (torchvision on PIL images), determinism.

Images are small (originals 96 to 200 pixels, output 56) so the file runs in seconds on two CPU cores. Every
test is seeded, so the statistical checks are deterministic; their tolerances are still set at several
standard errors of the quantity compared, so that a re-seed would not make them flaky.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw

# Let `pytest` find the repo-root modules however it is invoked.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common
import gpu_augment as ga  # noqa: E402
import recipe
from recipe import TrainAugmentation

MEAN, STD = common.IMAGENET_MEAN, common.IMAGENET_STD
IMG = 56
# Kolmogorov-Smirnov critical values at alpha = 1e-4, sqrt(ln(2 / alpha) / 2) = 2.23 times sqrt(1/n) (one sample
# of n) or sqrt(2/n) (two samples of n).
KS_ONE_SAMPLE_20K = 2.23 * (1 / 20000) ** 0.5  # 0.0158
KS_TWO_SAMPLE_20K = 2.23 * (2 / 20000) ** 0.5  # 0.0223
ORIGINAL_SIZES = [(160, 120), (120, 160), (140, 140), (200, 100), (100, 150), (180, 135), (150, 150), (128, 96)]


# --------------------------------------------------------------------------- helpers


def synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """A natural-ish RGB image: a colour gradient, mild noise and a few flat ellipses/rectangles.

    Values stay in [12, 243], so no pixel is exactly black: an output pixel equal to the fill is a rotation
    corner, never image content.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    slope_x, slope_y = rng.uniform(-0.3, 0.3, 3), rng.uniform(-0.3, 0.3, 3)
    base = rng.uniform(0.2, 0.8, 3) + slope_x * x[..., None] + slope_y * y[..., None]
    base = base + rng.normal(0, 0.02, base.shape)
    image = Image.fromarray((np.clip(base, 0.05, 0.95) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        colour = tuple(int(v) for v in rng.integers(15, 240, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x1 + 1, y1 + 1], fill=colour)
    return image


def decoded(images: list[Image.Image]) -> list[torch.Tensor]:
    """What the device path hands the augmentation: each image as ``uint8 [3, H, W]``."""
    return [torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous() for image in images]


def ks_statistic(first: np.ndarray, second: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    first, second = np.sort(first), np.sort(second)
    points = np.concatenate([first, second])
    cdf_first = np.searchsorted(first, points, side="right") / len(first)
    cdf_second = np.searchsorted(second, points, side="right") / len(second)
    return float(np.abs(cdf_first - cdf_second).max())


def ks_uniform(values: np.ndarray, low: float, high: float) -> float:
    """One-sample KS statistic against the uniform distribution on [low, high]."""
    values = np.sort(values)
    expected = (values - low) / (high - low)
    below = np.arange(len(values)) / len(values)
    above = np.arange(1, len(values) + 1) / len(values)
    return float(max(np.abs(expected - below).max(), np.abs(above - expected).max()))


def torchvision_boxes(width: int, height: int, count: int, seed: int, **kwargs) -> np.ndarray:
    """``count`` boxes (top, left, height, width) from torchvision's RandomResizedCrop.get_params."""
    torch.manual_seed(seed)
    image = Image.new("RGB", (width, height))
    scale, ratio = kwargs.get("scale", (0.08, 1.0)), kwargs.get("ratio", (3 / 4, 4 / 3))
    return np.array([T.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(count)], dtype=np.float64)


def our_boxes(width: int, height: int, count: int, seed: int, **kwargs) -> np.ndarray:
    sizes = torch.tensor([[width, height]]).repeat(count, 1)
    return ga.sample_crop_boxes(sizes, generator=torch.Generator().manual_seed(seed), **kwargs).double().numpy()


def pixel_mae(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute difference of two normalized batches, in [0, 1] pixel units."""
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((first - second) * std).abs().mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """32 synthetic originals of 8 sizes (landscape, portrait, square, 2:1)."""
    return [synthetic_image(*ORIGINAL_SIZES[index % len(ORIGINAL_SIZES)], seed=index) for index in range(32)]


# --------------------------------------------------------------------------- random parameters


def test_crop_boxes_match_torchvision_distribution():
    # 20k boxes each on a 500x375 original; the statistics measured 0.005-0.013. Drawing the ratio uniformly
    # instead of log-uniformly gives 0.067 on the log aspect ratio.
    ours = our_boxes(500, 375, 20000, seed=0)
    theirs = torchvision_boxes(500, 375, 20000, seed=0)
    top, left, height, width = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 375).all() and (left + width <= 500).all()
    assert np.array_equal(ours, np.round(ours))

    def area(boxes: np.ndarray) -> np.ndarray:
        return boxes[:, 2] * boxes[:, 3] / (500 * 375)

    def log_aspect(boxes: np.ndarray) -> np.ndarray:
        return np.log(boxes[:, 3] / boxes[:, 2])

    def centre_x(boxes: np.ndarray) -> np.ndarray:
        return (boxes[:, 1] + boxes[:, 3] / 2) / 500

    def centre_y(boxes: np.ndarray) -> np.ndarray:
        return (boxes[:, 0] + boxes[:, 2] / 2) / 375

    for statistic in (area, log_aspect, centre_x, centre_y):
        assert ks_statistic(statistic(ours), statistic(theirs)) < KS_TWO_SAMPLE_20K, statistic.__name__
        assert abs(statistic(ours).mean() - statistic(theirs).mean()) < 0.01, statistic.__name__
    deciles = [0.1, 0.5, 0.9]
    assert np.quantile(area(ours), deciles) == pytest.approx(np.quantile(area(theirs), deciles), abs=0.02)


def test_crop_fallback_matches_torchvision():
    # A 1000x200 image with scale (0.9, 1): no try can fit, so torchvision's fallback (height 200, width
    # round(200 * 4/3) = 267, centred) is used every time.
    ours = our_boxes(1000, 200, 500, seed=1, scale=(0.9, 1.0))
    theirs = torchvision_boxes(1000, 200, 500, seed=1, scale=(0.9, 1.0))
    assert (ours == np.array([0, 366, 200, 267])).all()
    assert (ours == theirs).all()
    # A tall one, 100x900, clamps the other way: width 100, height round(100 / (3/4)) = 133.
    tall = our_boxes(100, 900, 10, seed=2, scale=(0.9, 1.0))
    assert (tall == np.array([383, 0, 133, 100])).all()
    assert (tall == torchvision_boxes(100, 900, 10, seed=2, scale=(0.9, 1.0))).all()


def test_mixed_sizes_in_one_batch_get_their_own_boxes():
    sizes = torch.tensor([[500, 375], [64, 300]]).repeat(2000, 1)
    boxes = ga.sample_crop_boxes(sizes, generator=torch.Generator().manual_seed(3))
    assert (boxes[:, 0] + boxes[:, 2] <= sizes[:, 1]).all() and (boxes[:, 1] + boxes[:, 3] <= sizes[:, 0]).all()
    narrow = boxes[1::2]
    theirs = torchvision_boxes(64, 300, 2000, seed=3)
    assert narrow[:, 3].max() <= 64
    assert ks_statistic(narrow[:, 3].double().numpy(), theirs[:, 3]) < 2.23 * (2 / 2000) ** 0.5


def test_flip_angle_and_jitter_parameters():
    augment = ga.TrainAugment(IMG, MEAN, STD)
    count = 20000
    params = augment.sample_params(torch.tensor([[100, 80]]).repeat(count, 1), torch.Generator().manual_seed(4))
    # Binomial(20000, 0.5): standard error 0.0035, tolerance 4 of them.
    assert abs(params.flips.float().mean().item() - 0.5) < 0.014
    uniform_ranges = {
        "angles": (params.angles, -15.0, 15.0),
        "brightness": (params.brightness, 0.8, 1.2),
        "contrast": (params.contrast, 0.8, 1.2),
        "saturation": (params.saturation, 0.8, 1.2),
        "hue": (params.hue, -0.1, 0.1),
    }
    for name, (values, low, high) in uniform_ranges.items():
        values = values.numpy()
        assert values.min() >= low and values.max() <= high, name
        assert ks_uniform(values, low, high) < KS_ONE_SAMPLE_20K, name

    orders = params.order.numpy()
    assert (np.sort(orders, axis=1) == np.arange(4)).all()
    _, counts = np.unique(orders, axis=0, return_counts=True)
    assert len(counts) == 24  # every one of the 4! orders appears, about equally (expected 833 each)
    assert counts.min() > 0.85 * count / 24 and counts.max() < 1.15 * count / 24


def test_jitter_ranges_follow_colorjitter_rules():
    augment = ga.TrainAugment(IMG, MEAN, STD, TrainAugmentation(brightness=1.5, contrast=0.0, saturation=0.3, hue=0.5))
    assert augment.brightness == (0.0, 2.5)  # the lower bound is clamped at 0
    assert augment.contrast == (1.0, 1.0) and augment.jitter_enabled == (True, False, True, True)
    assert augment.hue == (-0.5, 0.5)
    with pytest.raises(ValueError):
        ga.TrainAugment(IMG, MEAN, STD, TrainAugmentation(hue=0.6))


# --------------------------------------------------------------------------- the operations vs torchvision's


def test_colour_operations_match_torchvision_tensor_ops():
    generator = torch.Generator().manual_seed(5)
    pixels = torch.rand(6, 3, 12, 12, generator=generator)
    factors = torch.tensor([0.0, 0.5, 0.8, 1.0, 1.2, 2.0])
    shifts = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.1, 0.45])
    cases = [
        (ga.adjust_brightness(pixels, factors), TF.adjust_brightness, factors),
        (ga.adjust_contrast(pixels, factors), TF.adjust_contrast, factors),
        (ga.adjust_saturation(pixels, factors), TF.adjust_saturation, factors),
        (ga.adjust_hue(pixels, shifts), TF.adjust_hue, shifts),
    ]
    for ours, reference_op, values in cases:
        reference = torch.stack([reference_op(pixels[i], float(values[i])) for i in range(6)])
        torch.testing.assert_close(ours, reference, atol=2e-6, rtol=0)


def test_jitter_applies_each_samples_own_order():
    generator = torch.Generator().manual_seed(6)
    count = 24
    pixels = torch.rand(count, 3, 10, 10, generator=generator)
    augment = ga.TrainAugment(IMG, MEAN, STD, TrainAugmentation(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.3))
    params = augment.sample_params(torch.tensor([[10, 10]]).repeat(count, 1), generator)
    ours = ga.apply_color_jitter(pixels, params, augment.jitter_enabled)

    reference_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    for index in range(count):
        expected = pixels[index]
        for op in params.order[index].tolist():
            expected = reference_ops[op](expected, float(factors[op][index]))
        torch.testing.assert_close(ours[index], expected, atol=1e-5, rtol=0)
    assert len({tuple(row) for row in params.order.tolist()}) > 12  # the batch really mixes orders


def test_crop_and_resize_is_torchvisions_antialiased_resized_crop(images):
    tensors = decoded(images[:8])
    boxes = ga.sample_crop_boxes(ga.image_sizes(tensors), generator=torch.Generator().manual_seed(15))
    ours = ga.crop_and_resize(tensors, boxes, IMG)
    for image, box, got in zip(tensors, boxes.int().tolist(), ours):
        expected = TF.resized_crop(image.float(), *box, [IMG, IMG], antialias=True).clamp(0, 255) / 255
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        pil = TF.to_tensor(TF.resized_crop(TF.to_pil_image(image), *box, [IMG, IMG]))
        assert (got - pil).abs().mean() < 0.002  # PIL's filter rounds to 8 bits: measured 0.0008 at most


def test_rotation_and_flip_match_torchvision_pil():
    image = synthetic_image(IMG, IMG, seed=7)
    pixels = TF.to_tensor(image)[None].repeat(4, 1, 1, 1)
    angles = torch.tensor([15.0, -15.0, 9.0, -4.0])
    flips = torch.tensor([False, True, True, False])

    ours = ga.rotate(ga.flip_horizontally(pixels, flips), angles)

    for index in range(4):
        base = TF.hflip(image) if flips[index] else image
        expected = TF.to_tensor(TF.rotate(base, float(angles[index])))  # nearest, fill 0: RandomRotation's way
        wrong_way = TF.to_tensor(TF.rotate(base, -float(angles[index])))
        differs = (ours[index] - expected).abs().amax(0) > 1e-6
        assert differs.float().mean() < 0.005  # identical here; a pixel exactly between two sources may differ
        assert ((ours[index] - wrong_way).abs().amax(0) > 1e-6).float().mean() > 0.2


def test_identity_settings_reproduce_a_plain_resize(images):
    augment = ga.TrainAugment(IMG, MEAN, STD, TrainAugmentation(
        scale=(1.0, 1.0), ratio=(0.5, 2.0), flip_p=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
        degrees=0.0,
    ))
    ours = augment(decoded(images), torch.Generator().manual_seed(8))
    expected = torch.stack([TF.normalize(TF.to_tensor(TF.resize(image, [IMG, IMG])), MEAN, STD) for image in images])
    # The whole image resized, antialiased: PIL rounds to 8 bits, torch does not. Measured 0.003.
    assert pixel_mae(ours, expected).max().item() < 0.005


def test_output_statistics_match_the_cpu_recipe(images):
    # 32 images x 16 draws per pipeline. Between two seeds of the CPU recipe itself the per-channel means
    # moved by up to 0.05 and the stds by up to 0.03 (normalized units) at 8 draws; tolerances are about 4
    # standard errors of the difference at 16 draws. The fill fraction (~5.4%) depends only on the angles:
    # its standard error is ~0.002 per pipeline.
    draws = 16
    torch.manual_seed(9)
    train_transform = recipe.build_train_transform(IMG)
    cpu = torch.stack([train_transform(image) for _ in range(draws) for image in images])
    augment = ga.TrainAugment(IMG, MEAN, STD)
    generator = torch.Generator().manual_seed(9)
    tensors = decoded(images)
    gpu = torch.cat([augment(tensors, generator) for _ in range(draws)])

    assert gpu.shape == cpu.shape == (32 * draws, 3, IMG, IMG) and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.mean(dim=(0, 2, 3)), cpu.mean(dim=(0, 2, 3)), atol=0.1, rtol=0)
    torch.testing.assert_close(gpu.std(dim=(0, 2, 3)), cpu.std(dim=(0, 2, 3)), atol=0.06, rtol=0)

    fill = (-torch.tensor(MEAN) / torch.tensor(STD)).view(1, 3, 1, 1)

    def fill_fraction(batch: torch.Tensor) -> float:
        return ((batch - fill).abs().amax(dim=1) < 1e-5).float().mean().item()

    assert 0.03 < fill_fraction(cpu) < 0.08
    assert abs(fill_fraction(gpu) - fill_fraction(cpu)) < 0.01


def test_the_same_parameters_give_the_cpu_recipes_image(images):
    """One set of parameters through both pipelines: the same crop, flip, jitter and rotation, so the images
    agree up to 8-bit rounding."""
    augment = ga.TrainAugment(IMG, MEAN, STD)
    tensors = decoded(images[:8])
    params = augment.sample_params(ga.image_sizes(tensors), torch.Generator().manual_seed(14))
    ours = augment.apply(tensors, params)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    for index, image in enumerate(images[:8]):
        pil = TF.resized_crop(image, *params.boxes[index].int().tolist(), [IMG, IMG])
        pil = TF.hflip(pil) if params.flips[index] else pil
        for op in params.order[index].tolist():
            pil = ops[op](pil, float(factors[op][index]))
        pil = TF.rotate(pil, float(params.angles[index]))
        expected = TF.normalize(TF.to_tensor(pil), MEAN, STD)
        # Measured 0.005-0.010: PIL rounds to 8 bits after each step, and shifts hue in 1/256 turns.
        assert pixel_mae(ours[index : index + 1], expected[None]).item() < 0.02


def test_eval_transform_matches_cpu_eval(images):
    ours = ga.EvalTransform(IMG, MEAN, STD)(decoded(images))
    eval_transform = recipe.build_eval_transform(IMG)
    expected = torch.stack([eval_transform(image) for image in images])
    errors = pixel_mae(ours, expected)
    # The same resize (shorter side 64, torchvision's rounding), antialiased, and the same crop: only the
    # resampling filters' rounding differs. Measured 0.0005.
    assert errors.max().item() < 0.002


def test_eval_crop_follows_torchvision_rounding():
    transform = ga.EvalTransform(224, MEAN, STD)
    for width, height in [(500, 375), (375, 500), (300, 300), (1001, 333), (259, 256)]:
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
        expected = TF.center_crop(TF.resize(image, 256, antialias=True), 224)
        assert transform.crop(image).shape == (3, 224, 224)
        assert (transform.crop(image).float() - expected.float()).abs().max() <= 1  # rounding of the resize


# --------------------------------------------------------------------------- determinism, dtype, device


def test_same_seed_same_output_and_float32_under_autocast(images):
    tensors = decoded(images[:8])
    augment = ga.TrainAugment(IMG, MEAN, STD)
    first = augment(tensors, torch.Generator().manual_seed(10))
    second = augment(tensors, torch.Generator().manual_seed(10))
    other = augment(tensors, torch.Generator().manual_seed(11))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast = augment(tensors, torch.Generator().manual_seed(10))
    assert autocast.dtype == torch.float32 and torch.equal(autocast, first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(images):
    tensors = decoded(images[:8])
    augment = ga.TrainAugment(IMG, MEAN, STD)
    on_cpu = augment(tensors, torch.Generator().manual_seed(12))
    on_cuda = augment.to("cuda")([image.cuda() for image in tensors], torch.Generator().manual_seed(12))
    assert on_cuda.device.type == "cuda" and on_cuda.dtype == torch.float32
    # Same parameters: equal up to float rounding, except a pixel exactly between two sources of the rotation.
    differs = (on_cuda.cpu() - on_cpu).abs() > 1e-3
    assert differs.float().mean().item() < 1e-3
    # The eval crop compared before its rounding to uint8: a CUDA kernel's last-bit difference may flip a pixel
    # that sits at .5 (the CPU alone flips 15 of 75,264 in fp32 against fp64).
    side = recipe.eval_resize_size(IMG)
    for image in tensors:
        on_cpu = ga.centre_crop(ga.resize_shorter_side(image, side), IMG)
        on_cuda = ga.centre_crop(ga.resize_shorter_side(image.cuda(), side), IMG)
        torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-3, rtol=0)
    evaluated = ga.EvalTransform(IMG, MEAN, STD).cuda()([image.cuda() for image in tensors]).cpu()
    one_level = 1 / 255 / min(STD)  # one uint8 step, normalized
    difference = (evaluated - ga.EvalTransform(IMG, MEAN, STD)(tensors)).abs()
    assert difference.max() <= one_level + 1e-5 and (difference > 1e-5).float().mean() < 1e-3
