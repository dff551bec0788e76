"""Tests for gpu_augment.py: parameter distributions vs torchvision's, each operation and whole outputs vs the
CPU recipe (torchvision on PIL images) and vs the per-image implementation it replaced (``augment_reference.py``:
the same parameter draws, the same pixels), determinism; the batched resize of ``batch_resize.py`` and the parameter
draws of ``augment_params.py`` with them.

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

import augment_params
import augment_reference
import batch_resize
import common
import gpu_augment as ga
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
    boxes = augment_params.sample_crop_boxes(sizes, generator=torch.Generator().manual_seed(seed), **kwargs)
    return boxes.double().numpy()


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
    boxes = augment_params.sample_crop_boxes(sizes, generator=torch.Generator().manual_seed(3))
    assert (boxes[:, 0] + boxes[:, 2] <= sizes[:, 1]).all() and (boxes[:, 1] + boxes[:, 3] <= sizes[:, 0]).all()
    narrow = boxes[1::2]
    theirs = torchvision_boxes(64, 300, 2000, seed=3)
    assert narrow[:, 3].max() <= 64
    assert ks_statistic(narrow[:, 3].double().numpy(), theirs[:, 3]) < 2.23 * (2 / 2000) ** 0.5


def test_flip_angle_and_jitter_parameters():
    augment = ga.TrainAugment(IMG, MEAN, STD)
    count = 20000
    params = augment.sample_params(np.array([[100, 80]]).repeat(count, 0), torch.Generator().manual_seed(4))
    # Binomial(20000, 0.5): standard error 0.0035, tolerance 4 of them.
    assert abs(params.flips.mean() - 0.5) < 0.014
    uniform_ranges = {
        "angles": (params.angles, -15.0, 15.0),
        "brightness": (params.brightness, 0.8, 1.2),
        "contrast": (params.contrast, 0.8, 1.2),
        "saturation": (params.saturation, 0.8, 1.2),
        "hue": (params.hue, -0.1, 0.1),
    }
    for name, (values, low, high) in uniform_ranges.items():
        assert values.min() >= low and values.max() <= high, name
        assert ks_uniform(values, low, high) < KS_ONE_SAMPLE_20K, name

    orders = params.order
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


def resized_crops(images: list[torch.Tensor], boxes: np.ndarray, flips: np.ndarray, **plan) -> torch.Tensor:
    """The batched crop-and-resize alone: ``[B, 3, IMG, IMG]`` in [0, 1], normal layout."""
    count = len(images)
    chunks = batch_resize.plan_resize(ga.host_sizes(images), boxes[:, :2], boxes[:, 2:], np.full((count, 2), IMG),
                                      np.zeros((count, 2), np.int64), flips, IMG, 1 / 255, **plan)
    tensors = iter(batch_resize.to_device(batch_resize.resize_arrays(chunks), torch.device("cpu")))
    resized = batch_resize.resize_regions(images, chunks, tensors, torch.device("cpu"))
    return resized.view(count, 3, IMG, IMG).transpose(2, 3)


def jittered(augment: ga.TrainAugment, pixels: torch.Tensor, params: augment_params.AugmentParams) -> torch.Tensor:
    """The batched colour jitter alone on ``[B, 3, H, W]`` pixels in [0, 1]."""
    colour = ga.plan_colour(params, augment.jitter_enabled)
    matrices = colour.matrices if colour.means is None else np.concatenate([colour.matrices, colour.means])
    shifts = None if colour.hue_shifts is None else torch.from_numpy(colour.hue_shifts)
    flat = pixels.reshape(len(pixels), 3, -1)
    return augment.jitter(flat, colour, torch.from_numpy(matrices).unbind(0), shifts).view(pixels.shape)


def test_linear_colour_steps_match_torchvision_tensor_ops():
    generator = torch.Generator().manual_seed(5)
    pixels = torch.rand(6, 3, 144, generator=generator)
    factors = np.array([0.0, 0.5, 0.8, 1.0, 1.2, 2.0], dtype=np.float32)
    references = {ga.BRIGHTNESS: TF.adjust_brightness, ga.CONTRAST: TF.adjust_contrast,
                  ga.SATURATION: TF.adjust_saturation}
    for op, reference_op in references.items():
        matrix, mean_matrix = (torch.from_numpy(m) for m in ga.colour_matrices(op, factors))
        ours = ga.linear_step(pixels, matrix, mean_matrix)
        reference = torch.stack([reference_op(pixels[i].view(3, 12, 12), float(factors[i])).view(3, -1)
                                 for i in range(6)])
        torch.testing.assert_close(ours, reference, atol=2e-6, rtol=0)


def test_hue_matches_torchvision_on_gray_pure_colours_and_ties():
    generator = torch.Generator().manual_seed(5)
    special = torch.tensor([  # gray, black, white, pure primaries and secondaries, two- and three-way ties
        [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
        [1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.7, 0.7, 0.2], [0.2, 0.7, 0.7], [0.7, 0.2, 0.7],
        [0.3, 0.3, 0.9], [0.9, 0.3, 0.3], [0.3, 0.9, 0.3], [0.25, 0.5, 0.75],
    ]).T
    pixels = torch.cat([special[None].repeat(6, 1, 1), torch.rand(6, 3, 128, generator=generator)], dim=2)
    shifts = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.1, 0.45])
    kernel, tiny = ga.hue_kernel()
    offsets = torch.tensor(ga.HUE_CHANNEL_OFFSETS).view(1, 3, 1)
    ours = ga.rotate_hue(pixels, offsets + 6 * shifts.view(-1, 1, 1), kernel, tiny)
    reference = torch.stack([TF.adjust_hue(pixels[i].view(3, 12, 12), float(shifts[i])).view(3, -1)
                             for i in range(6)])
    # The tiny chroma bias moves a pixel by at most ~3e-6 (0.0008 of an 8-bit level).
    torch.testing.assert_close(ours, reference, atol=5e-6, rtol=0)


def test_jitter_applies_each_samples_own_order():
    generator = torch.Generator().manual_seed(6)
    count = 48
    pixels = torch.rand(count, 3, 10, 10, generator=generator)
    augment = ga.TrainAugment(IMG, MEAN, STD, TrainAugmentation(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.3))
    params = augment.sample_params(np.array([[10, 10]]).repeat(count, 0), generator)
    ours = jittered(augment, pixels, params)

    reference_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    for index in range(count):
        expected = pixels[index]
        for op in params.order[index].tolist():
            expected = reference_ops[op](expected, float(factors[op][index]))
        torch.testing.assert_close(ours[index], expected, atol=1e-5, rtol=0)
    assert len({tuple(row) for row in params.order.tolist()}) > 16  # the batch really mixes orders


def test_crop_and_resize_is_torchvisions_antialiased_resized_crop(images):
    tensors = decoded(images[:8]) + [torch.randint(0, 256, (3, 30, 41), dtype=torch.uint8)]  # upscaled too
    boxes = augment_params.sample_crop_boxes(ga.image_sizes(tensors), generator=torch.Generator().manual_seed(15))
    boxes = boxes.numpy().astype(np.int64)
    flips = np.arange(len(tensors)) % 2 == 1
    ours = resized_crops(tensors, boxes, flips)
    for image, box, flip, got in zip(tensors, boxes.tolist(), flips, ours, strict=True):
        expected = TF.resized_crop(image.float(), *box, [IMG, IMG], antialias=True).clamp(0, 255) / 255
        expected = expected.flip(-1) if flip else expected
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        pil = TF.to_tensor(TF.resized_crop(TF.to_pil_image(image), *box, [IMG, IMG]))
        pil = pil.flip(-1) if flip else pil
        assert (got - pil).abs().mean() < 0.002  # PIL's filter rounds to 8 bits: measured 0.0008 at most


def test_rotation_matches_torchvision_pil():
    image = synthetic_image(IMG, IMG, seed=7)
    pixels = TF.to_tensor(image)[None].repeat(4, 1, 1, 1)
    angles = np.array([15.0, -15.0, 9.0, -4.0], dtype=np.float32)
    transposed = pixels.transpose(2, 3).contiguous()  # the batch's layout before the rotation: [b, c, x, y]
    use_cosine = torch.tensor([[False, True, False], [True, False, False]])
    ours = ga.rotate_transposed(transposed, torch.from_numpy(ga.rotation_angles(angles)), use_cosine)
    for index in range(4):
        expected = TF.to_tensor(TF.rotate(image, float(angles[index])))  # nearest, fill 0: RandomRotation's way
        wrong_way = TF.to_tensor(TF.rotate(image, -float(angles[index])))
        differs = (ours[index] - expected).abs().amax(0) > 1e-6
        assert differs.float().mean() < 0.005  # identical here; a pixel exactly between two sources may differ
        assert ((ours[index] - wrong_way).abs().amax(0) > 1e-6).float().mean() > 0.2


def test_tf32_rounding_of_the_first_pass_moves_a_pixel_by_at_most_an_eighth_of_a_level(images):
    # On CUDA the first resize product may run in TF32 (accel.py enables it): its integer pixels are exact, its
    # weights keep 10 bits of mantissa. Emulated here by rounding the column weights so.
    tensors = decoded(images[:8])
    boxes = augment_params.sample_crop_boxes(ga.image_sizes(tensors), generator=torch.Generator().manual_seed(16))
    boxes, flips = boxes.numpy().astype(np.int64), np.zeros(8, bool)
    exact = resized_crops(tensors, boxes, flips)
    original = batch_resize.antialias_taps

    def tf32_taps(*args):
        first, weights = original(*args)
        bits = weights.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0xFFF + ((bits >> 13) & 1)) & ~np.uint64(0x1FFF)).astype(np.uint32).view(np.float32)
        return first, rounded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch_resize, "antialias_taps", tf32_taps)
        rounded = resized_crops(tensors, boxes, flips)
    error = (rounded - exact).abs().max().item() * 255
    # Bound 255 * 2**-11 = 0.125 level per rounded axis (both are rounded here, so up to twice that); measured 0.128.
    assert 0 < error < 0.25


def test_resize_in_chunks_or_without_chunk_cat_gives_the_same_pixels(images):
    tensors = decoded(images[:8])
    boxes = augment_params.sample_crop_boxes(ga.image_sizes(tensors), generator=torch.Generator().manual_seed(17))
    boxes, flips = boxes.numpy().astype(np.int64), np.arange(8) % 3 == 0
    whole = resized_crops(tensors, boxes, flips)
    chunked = resized_crops(tensors, boxes, flips, max_elements=3 * 160 * 160 * 2)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.delattr(torch, "_chunk_cat")
        torch.testing.assert_close(resized_crops(tensors, boxes, flips), whole, atol=0, rtol=0)


def test_packed_host_to_device_copy_views_every_array_back():
    arrays = [np.arange(6, dtype=np.int64).reshape(2, 3), np.linspace(0, 1, 7, dtype=np.float32),
              np.eye(3, dtype=np.float32)[None].repeat(2, 0), np.array([[5]], dtype=np.int64)]
    packed = batch_resize.to_device(arrays, torch.device("cpu"), pack=True)
    for array, tensor in zip(arrays, packed, strict=True):
        assert tensor.dtype == torch.from_numpy(array).dtype and np.array_equal(tensor.numpy(), array)


# --------------------------------------------------------------------------- against the per-image implementation


def mixed_images(count: int, seed: int, low: int = 20, high: int = 120) -> list[torch.Tensor]:
    """Random uint8 images of mixed sizes and orientations, some smaller than the output (upscaled)."""
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.integers(0, 256, (3, *rng.integers(low, high, 2)), dtype=np.uint8))
            for _ in range(count)]


def assert_same_params(ours: augment_params.AugmentParams, theirs: augment_params.AugmentParams) -> None:
    for name in ("boxes", "flips", "angles", "brightness", "contrast", "saturation", "hue", "order"):
        assert np.array_equal(getattr(ours, name), getattr(theirs, name)), name
    assert ours.erase_boxes == theirs.erase_boxes


def test_one_rand_call_gives_the_stream_of_many_calls():
    # What sample_params relies on: on the CPU (mt19937) generator, draws do not depend on how they are split.
    whole = torch.rand(1000, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    parts = torch.cat([torch.rand(shape, generator=generator).reshape(-1) for shape in [(7, 10), (1,), (929,)]])
    assert torch.equal(whole, parts)


def test_parameters_are_the_per_image_codes_draws_for_thousands_of_samples():
    augment = ga.TrainAugment(IMG, MEAN, STD)
    rng = np.random.default_rng(0)
    # 20,000 samples of many shapes (narrow, wide, tiny: fallback crops) and 200 seeds of a 64-image batch.
    sizes = np.concatenate([rng.integers(8, 900, (19000, 2)), rng.integers(1, 12, (500, 2)),
                            np.array([[1000, 20], [20, 1000]]).repeat(250, 0)])
    assert_same_params(augment.sample_params(sizes, torch.Generator().manual_seed(1)),
                       augment_reference.sample_params(augment, torch.from_numpy(sizes),
                                                       torch.Generator().manual_seed(1)))
    for seed in range(200):
        sizes = rng.integers(40, 800, (64, 2))
        assert_same_params(augment.sample_params(sizes, torch.Generator().manual_seed(seed)),
                           augment_reference.sample_params(augment, torch.from_numpy(sizes),
                                                           torch.Generator().manual_seed(seed)))


def test_erasing_draws_and_the_generator_end_where_the_per_image_code_left_them():
    augment = ga.TrainAugment(IMG, MEAN, STD, random_erase=0.5)
    sizes = np.random.default_rng(2).integers(40, 300, (300, 2))
    ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ours_params = augment.sample_params(sizes, ours)
    assert_same_params(ours_params, augment_reference.sample_params(augment, torch.from_numpy(sizes), theirs))
    assert 100 < len(ours_params.erase_boxes) < 200
    assert torch.equal(torch.rand(5, generator=ours), torch.rand(5, generator=theirs))


@pytest.mark.parametrize("recipe", [
    TrainAugmentation(),
    TrainAugmentation(brightness=0.6, contrast=0.6, saturation=0.6, hue=0.4, degrees=30, scale=(0.02, 1.0)),
    TrainAugmentation(hue=0.0),
    TrainAugmentation(contrast=0.0, degrees=0.0),
    TrainAugmentation(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.3, flip_p=1.0),
], ids=["reference", "strong", "no-hue", "no-contrast-no-rotation", "hue-only-flipped"])
def test_training_output_is_the_per_image_implementations(recipe):
    augment = ga.TrainAugment(IMG, MEAN, STD, recipe)
    tensors = mixed_images(96, seed=3)
    params = augment.sample_params(ga.host_sizes(tensors), torch.Generator().manual_seed(18))
    ours = augment.apply(tensors, params) * augment.std + augment.mean
    theirs = augment_reference.train_pixels(augment, tensors, params)
    assert len({tuple(row) for row in params.order.tolist()}) == 24 and params.flips.any()
    assert (params.boxes[:, 2:] < IMG).any(axis=1).any()  # some crops are upscaled
    # Within 8-bit rounding by far: measured 3.4e-6 (float summation order, the hue's tiny chroma bias).
    assert (ours - theirs).abs().max().item() < 1e-4


def test_whole_call_with_erasing_is_the_per_image_implementations():
    augment = ga.TrainAugment(IMG, MEAN, STD, random_erase=0.7)
    tensors = mixed_images(32, seed=4)
    ours = augment(tensors, torch.Generator().manual_seed(19))
    theirs = augment_reference.train_augment(augment, tensors, torch.Generator().manual_seed(19))
    assert (ours == 0).all(dim=1).float().mean() > 0.05  # erased boxes (0 in every channel) are there
    assert ((ours - theirs) * augment.std).abs().max().item() < 1e-4


def test_eval_output_is_the_per_image_implementations():
    transform = ga.EvalTransform(IMG, MEAN, STD)
    tensors = mixed_images(64, seed=5, high=400)
    crops = transform.crops(tensors)
    expected = torch.stack([augment_reference.eval_crop(image, IMG) for image in tensors])
    difference = (crops.int() - expected.int()).abs()
    assert crops.dtype == torch.uint8 and crops.is_contiguous()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3  # a value at .5 may round either way
    assert torch.equal(transform.crop(tensors[3]), crops[3])
    normalized = transform(tensors)
    assert normalized.is_contiguous()
    torch.testing.assert_close(normalized, augment_reference.eval_transform(transform, tensors), atol=1 / 255 / 0.224
                               + 1e-5, rtol=0)
    torch.testing.assert_close(transform.normalize_crops(crops), transform.normalize_crops(list(crops.unbind(0))))


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
        pil = TF.resized_crop(image, *params.boxes[index].tolist(), [IMG, IMG])
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
        on_cpu = batch_resize.centre_crop(batch_resize.resize_shorter_side(image, side), IMG)
        on_cuda = batch_resize.centre_crop(batch_resize.resize_shorter_side(image.cuda(), side), IMG)
        torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-3, rtol=0)
    evaluated = ga.EvalTransform(IMG, MEAN, STD).cuda()([image.cuda() for image in tensors]).cpu()
    one_level = 1 / 255 / min(STD)  # one uint8 step, normalized
    difference = (evaluated - ga.EvalTransform(IMG, MEAN, STD)(tensors)).abs()
    assert difference.max() <= one_level + 1e-5 and (difference > 1e-5).float().mean() < 1e-3
