"""Data: finding images in an ImageFolder tree, decoding them to RGB, the train/eval recipes, class weights."""

from __future__ import annotations

import random
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import transforms as T

from utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
# EXIF orientations that transpose the image (swap width and height).
AXIS_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

Sample = tuple[str, int]  # (image path, class index)


# --------------------------------------------------------------------------- finding files


def is_image_name(path: Path) -> bool:
    """True for a visible file whose extension is an image format we read (``.DS_Store``, ``.txt``: False)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def sort_class_names(names: Sequence[str]) -> list[str]:
    """Order class names numerically when all are integers (``2`` before ``10``), else alphabetically."""
    if names and all(re.fullmatch(r"[+-]?\d+", name) for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files directly in ``folder`` sorted by name, and the other entries that were ignored."""
    images, ignored = [], []
    for entry in sorted(folder.iterdir(), key=lambda path: path.name):
        if entry.is_file() and is_image_name(entry):
            images.append(entry)
        else:
            ignored.append(entry)
    return images, ignored


def class_folders(split_dir: Path) -> list[str]:
    """Names of the (visible) sub-folders of ``split_dir``, in class order."""
    names = [entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    return sort_class_names(names)


def scan_labeled_split(split_dir: Path, class_names: Sequence[str]) -> tuple[list[Sample], list[Path]]:
    """Samples ``(path, class index)`` for each class folder present in ``split_dir``, and ignored files."""
    samples: list[Sample] = []
    ignored: list[Path] = []
    for index, name in enumerate(class_names):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        images, skipped = list_images(folder)
        samples.extend((str(path), index) for path in images)
        ignored.extend(skipped)
    ignored.extend(entry for entry in split_dir.iterdir() if entry.is_file())
    return samples, ignored


def find_test_images(test_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """Every image file in ``test_dir`` (sorted by name) and the entries ignored; errors if there are none."""
    test_dir = Path(test_dir)
    if not test_dir.is_dir():
        raise UserError(f"--test-dir {test_dir}: folder not found; point it at the folder of unlabeled test images")
    images, ignored = list_images(test_dir)
    if not images:
        raise UserError(
            f"--test-dir {test_dir}: no image files found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return images, ignored


def find_unreadable(paths: Sequence[str | Path], full_decode: bool = False, workers: int = 0) -> list[tuple[str, str]]:
    """Files that cannot be read as images (empty, not an image, no permission, too large), with the reason.

    By default only headers are read (fast); a file truncated further in is caught when it is decoded.
    ``full_decode`` decodes every image, in ``workers`` processes.
    """
    checker = _ImageCheck([str(path) for path in paths], full_decode)
    results = iterate_items(checker, workers if full_decode else 0)
    return [(path, reason) for path, reason in results if reason]


def iterate_items(items: Dataset, workers: int) -> Iterable[Any]:
    """Every item of ``items`` in order: in this process when ``workers`` is 0, else in that many processes."""
    if workers == 0:
        return (items[index] for index in range(len(items)))
    return DataLoader(items, batch_size=None, num_workers=workers)


class _ImageCheck(Dataset):
    """``(path, reason or '')`` for each path: reads the header, or decodes the whole image."""

    def __init__(self, paths: list[str], full_decode: bool) -> None:
        self.paths, self.full_decode = paths, full_decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, str]:
        path = self.paths[index]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                if self.full_decode:
                    load_rgb(path)
                else:
                    with Image.open(path) as image:
                        image.size  # noqa: B018 - reading the header is the check
        except DECODE_ERRORS as error:
            return path, _short_reason(error)
        return path, ""


def _short_reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text.replace(str(getattr(error, "filename", "") or "\0"), "").strip(" :'") or type(error).__name__


def report_ignored(label: str, paths: Sequence[Path], limit: int = 20) -> None:
    """Print once which files of ``label`` were ignored as not being images."""
    if not paths:
        return
    shown = ", ".join(str(path) for path in paths[:limit])
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    print(f"note: ignored {len(paths)} non-image entr{'y' if len(paths) == 1 else 'ies'} in {label}: {shown}{more}")


# --------------------------------------------------------------------------- decoding


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode an image file to an RGB PIL image, with its EXIF orientation applied.

    With ``min_side``, a JPEG much larger than needed is decoded at a reduced scale (1/2, 1/4 or 1/8) whose
    shorter side stays at least ``min_side``: far less decoding work for the same resized result.
    """
    return decode_rgb(path, min_side=min_side)[0]


def decode_rgb(
    path: str | Path, min_side: int | None = None, min_size: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """The RGB image (EXIF orientation applied) and its full-resolution ``(width, height)`` as oriented.

    JPEGs are decoded at a reduced DCT scale when that keeps the shorter side at least ``min_side``, or both
    sides at least ``min_size``; the returned size is that of the whole image, whatever scale was decoded.
    """
    with Image.open(path) as image:
        width, height = image.size
        if image.format == "JPEG" and (min_side or min_size):
            image.draft(image.mode, min_size or _draft_request(image.size, min_side))
        image.load()
        if image.getexif().get(ExifTags.Base.Orientation, 1) in AXIS_SWAPPING_ORIENTATIONS:
            width, height = height, width
        return to_rgb(ImageOps.exif_transpose(image)), (width, height)


def _draft_request(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    width, height = size
    scale = max(min(width, height) / min_side, 1.0)
    return int(width / scale) + 1, int(height / scale) + 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: transparency over white, 16-bit and float scaled to 8 bits, CMYK as colours."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _high_depth_to_l(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _flatten_on_white(image.convert("RGBA"))
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        peak = 1.0 if pixels.size and pixels.max() <= 1.0 else 255.0
    else:
        peak = 65535.0 if pixels.size and pixels.max() > 255 else 255.0
    scaled = np.clip(pixels / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _flatten_on_white(image: Image.Image) -> Image.Image:
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")


# --------------------------------------------------------------------------- recipes


def eval_resize_size(img_size: int) -> int:
    """The shorter-side resize before the centre crop: 256 for 224, scaled alike for other sizes."""
    return int(round(img_size * 256 / 224))


def build_train_transform(
    img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Callable[[Image.Image], torch.Tensor]:
    """The reference recipe's training augmentation, ending in a normalized tensor."""
    return T.Compose(
        [
            T.RandomResizedCrop(img_size),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1),
            T.RandomRotation(15),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def build_eval_transform(
    img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic evaluation transform: resize the shorter side, centre crop, normalize."""
    return T.Compose(
        [
            T.Resize(eval_resize_size(img_size)),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


# --------------------------------------------------------------------------- datasets


class LabeledImages(Dataset):
    """``(image tensor, class index)`` pairs; an image that fails to decode yields a :class:`DecodeFailure`.

    ``decode_min_side`` lets large JPEGs decode at reduced scale (see :func:`load_rgb`).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], torch.Tensor],
        decode_min_side: int | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.decode_min_side = decode_min_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | DecodeFailure:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        image = _decode_or_warn(path, self.decode_min_side)
        if image is None:
            return DecodeFailure(path)
        return transform_seeded(self.transform, image, seed), label


def transform_seeded(transform: Callable[[Image.Image], torch.Tensor], image: Image.Image,
                     seed: int | None) -> torch.Tensor:
    """``transform(image)``, its randomness drawn from ``seed`` when given, leaving the global RNG untouched."""
    if seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


class UnlabeledImages(Dataset):
    """``(image tensor or None, position)`` for prediction; failures are reported, not dropped."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        transform: Callable[[Image.Image], torch.Tensor],
        decode_min_side: int | None = None,
    ) -> None:
        self.paths = [str(path) for path in paths]
        self.transform = transform
        self.decode_min_side = decode_min_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        image = _decode_or_warn(self.paths[index], self.decode_min_side, quiet=True)
        return (None if image is None else self.transform(image)), index


def _decode_or_warn(path: str, min_side: int | None = None, quiet: bool = False) -> Image.Image | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return load_rgb(path, min_side)
    except DECODE_ERRORS as error:
        if not quiet:
            print(f"\nwarning: skipping {path}: cannot decode ({_short_reason(error)})", file=sys.stderr)
        return None


class DecodeFailure(NamedTuple):
    """What a dataset yields for an image it could not decode."""

    path: str


class LabeledBatch(NamedTuple):
    """A training or validation batch; ``images``/``targets`` are None when every image in it failed to decode."""

    images: torch.Tensor | None
    targets: torch.Tensor | None
    failed: list[str]


def split_failures(batch: list[Any]) -> tuple[list[Any], list[str]]:
    """Separate decoded items from :class:`DecodeFailure` markers (returned as paths)."""
    failed = [item.path for item in batch if isinstance(item, DecodeFailure)]
    return [item for item in batch if not isinstance(item, DecodeFailure)], failed


def collate_skipping_failures(batch: list[Any]) -> LabeledBatch:
    """Collate labeled samples; images that failed to decode are left out and named in ``failed``."""
    kept, failed = split_failures(batch)
    if not kept:
        return LabeledBatch(None, None, failed)
    images, targets = default_collate(kept)
    return LabeledBatch(images, targets, failed)


def collate_with_failures(batch: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor | None, list[int], list[int]]:
    """Collate prediction samples into ``(images, decoded positions, failed positions)``."""
    decoded = [(tensor, index) for tensor, index in batch if tensor is not None]
    failed = [index for tensor, index in batch if tensor is None]
    images = torch.stack([tensor for tensor, _ in decoded]) if decoded else None
    return images, [index for _, index in decoded], failed


class EpochSampler(Sampler):
    """A shuffled order, and one augmentation seed per sample, that depend only on ``(seed, epoch)``.

    Yields ``(index, sample_seed)`` keys. Because the randomness does not live in the worker processes, a run
    gives the same batches whatever ``--workers`` is, and a resumed run continues exactly as an uninterrupted
    one would, persistent workers included. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and seeds to yield."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator)
        return iter(zip(order.tolist(), seeds.tolist()))


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch of a run, distinct for every ``(seed, epoch)`` pair."""
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % 2**62


def prediction_loader(
    paths: Sequence[str | Path],
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of ``(images, positions, failed positions)`` over ``paths`` with the eval transform, in order."""
    images = UnlabeledImages(paths, build_eval_transform(img_size, mean, std), eval_resize_size(img_size))
    return DataLoader(images, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                      collate_fn=collate_with_failures)


# --------------------------------------------------------------------------- splits and weights


@dataclass
class TrainValData:
    """What training needs to know about the data: samples of both splits and the class names in order."""

    class_names: list[str]
    train_samples: list[Sample]
    val_samples: list[Sample]
    val_source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)


def stratified_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split samples into (train, val) keeping ``fraction`` of each class for val (at least one if it has two)."""
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        members = sorted(by_class[label])
        rng.shuffle(members)
        count = int(round(len(members) * fraction))
        count = min(max(count, 1 if len(members) > 1 else 0), len(members) - 1)
        val.extend(members[:count])
        train.extend(members[count:])
    return sorted(train), sorted(val)


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """How many samples each class index has."""
    counts = Counter(label for _, label in samples)
    return [counts.get(index, 0) for index in range(num_classes)]


def balanced_class_weights(counts: Sequence[int]) -> torch.Tensor:
    """sklearn's 'balanced' weights, ``n_samples / (n_classes * count)``; classes with no samples get 0."""
    counts_tensor = torch.tensor(counts, dtype=torch.float64)
    present = counts_tensor > 0
    weights = torch.zeros_like(counts_tensor)
    weights[present] = counts_tensor.sum() / (present.sum() * counts_tensor[present])
    return weights.float()


def load_train_val(
    data_dir: str | Path, val_fraction: float, seed: int, verify_images: bool = False, workers: int = 0
) -> TrainValData:
    """Scan ``data_dir/train`` and ``data_dir/val`` (or split train) into samples; report what was left out.

    Unreadable files are found by their headers, or by decoding every image with ``verify_images``.
    """
    data_dir = Path(data_dir)
    train_dir = _require_train_dir(data_dir)
    class_names = _classes_with_images(train_dir)
    train_samples, ignored = scan_labeled_split(train_dir, class_names)
    report_ignored(str(train_dir), ignored)

    val_dir = data_dir / "val"
    val_samples = _scan_val(val_dir, class_names) if val_dir.is_dir() else []
    # Drop unreadable files before any split, so the split's guarantees hold for the images actually used.
    skipped = find_unreadable([path for path, _ in train_samples + val_samples], verify_images, workers)
    bad = {path for path, _ in skipped}
    train_samples = [sample for sample in train_samples if sample[0] not in bad]
    val_samples = [sample for sample in val_samples if sample[0] not in bad]
    _require_readable_images(train_dir, class_names, train_samples)

    if val_dir.is_dir():
        val_source = str(val_dir)
    else:
        if not 0 < val_fraction < 1:
            raise UserError(f"--val-fraction {val_fraction}: must be between 0 and 1 (no {val_dir} folder exists)")
        train_samples, val_samples = stratified_split(train_samples, val_fraction, seed)
        val_source = f"{val_fraction:.0%} of {train_dir} (stratified, seed {seed})"

    return TrainValData(
        class_names=class_names,
        train_samples=train_samples,
        val_samples=val_samples,
        val_source=val_source,
        skipped=skipped,
    )


def _require_readable_images(train_dir: Path, class_names: list[str], train_samples: list[Sample]) -> None:
    counts = class_counts(train_samples, len(class_names))
    unlearnable = [str(train_dir / name) for name, count in zip(class_names, counts) if count == 0]
    if unlearnable:
        raise UserError(
            f"no image in {', '.join(unlearnable)} can be decoded; replace the unreadable files or remove the folder"
        )


def _require_train_dir(data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir}: folder not found; it should hold train/<class>/*.jpg")
    train_dir = data_dir / "train"
    if not train_dir.is_dir():
        raise UserError(f"--data-dir {data_dir}: no train/ folder inside; expected {train_dir}/<class>/*.jpg")
    return train_dir


def has_images(folder: Path) -> bool:
    """True when ``folder`` holds at least one file with an image extension."""
    return any(is_image_name(path) for path in folder.iterdir())


def unknown_class_folders(split_dir: Path, class_names: Sequence[str]) -> list[str]:
    """Class folders of ``split_dir`` that hold images but are not among ``class_names``."""
    return [name for name in class_folders(split_dir) if name not in class_names and has_images(split_dir / name)]


def _classes_with_images(train_dir: Path) -> list[str]:
    names = class_folders(train_dir)
    kept = [name for name in names if has_images(train_dir / name)]
    empty = [name for name in names if name not in kept]
    if empty:
        print(f"note: left out {len(empty)} class folder(s) of {train_dir} with no images: {', '.join(empty)}")
    if not kept:
        raise UserError(f"{train_dir}: no class folders with images; expected {train_dir}/<class>/*.jpg")
    return kept


def _scan_val(val_dir: Path, class_names: list[str]) -> list[Sample]:
    unknown = unknown_class_folders(val_dir, class_names)
    if unknown:
        raise UserError(
            f"{val_dir}: class folder(s) {', '.join(unknown)} have no images in train/; "
            "add training images for them or remove them from val/"
        )
    samples, ignored = scan_labeled_split(val_dir, class_names)
    report_ignored(str(val_dir), ignored)
    if not samples:
        raise UserError(f"{val_dir}: no images; add val/<class>/*.jpg or remove val/ to split train/ instead")
    return samples
