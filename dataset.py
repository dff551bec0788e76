"""Data: finding images in an ImageFolder tree, decoding them to RGB, the train/eval recipes, class weights."""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import re
import sys
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from utils import UserError, available_ram_bytes, some_names

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
# RandomResizedCrop's smallest crop, as a share of the image's area (torchvision's default).
TRAIN_MIN_SCALE = 0.08
# Where Pillow refuses to open an image by default (twice its warning limit): about 179 megapixels.
PILLOW_PIXEL_LIMIT = 2 * Image.MAX_IMAGE_PIXELS
# Bytes of memory an image's pixel may take while it is decoded: RGBA (4) and a converted copy, with room to spare.
BYTES_PER_DECODED_PIXEL = 16


def machine_pixel_limit(available_bytes: int) -> int:
    """The default ``--max-image-pixels``: the largest image that decodes comfortably in ``available_bytes`` of
    memory (a sixteenth of it per pixel's bytes), never below Pillow's own limit; a 600-megapixel clip-art PNG
    passes on a machine with 10 GB or more available."""
    return max(PILLOW_PIXEL_LIMIT, available_bytes // BYTES_PER_DECODED_PIXEL)


DEFAULT_MAX_IMAGE_PIXELS = machine_pixel_limit(available_ram_bytes())
# EXIF orientations that transpose the image (swap width and height).
AXIS_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# Formats Pillow recognizes but cannot decode (besides its stub plugins, which need a handler): MPEG video.
UNDECODABLE_FORMATS = frozenset({"MPEG"})
# The extensions the error messages name first; every one Pillow reads is accepted (see readable_extensions).
COMMON_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

Sample = tuple[str, int]  # (image path, class index)


# --------------------------------------------------------------------------- finding files


def readable_formats() -> frozenset[str]:
    """The formats Pillow can open and decode here (its plugins, less :data:`UNDECODABLE_FORMATS` and stubs)."""
    Image.init()
    formats = {name for name, (factory, _) in Image.OPEN.items()
               if name not in UNDECODABLE_FORMATS and not _is_stub(factory)}
    if "JPEG" in formats:
        formats.add("MPO")  # multi-picture JPEGs (.mpo, and many phone photos) open through the JPEG plugin
    return frozenset(formats)


def _is_stub(factory: Any) -> bool:
    return isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)


def readable_extensions(formats: frozenset[str]) -> frozenset[str]:
    """Every file extension Pillow registers for one of ``formats`` (``.jpg``, ``.jfif``, ``.avif`` ...)."""
    return frozenset(ext.lower() for ext, name in Image.registered_extensions().items() if name in formats)


IMAGE_FORMATS = readable_formats()
IMAGE_EXTENSIONS = readable_extensions(IMAGE_FORMATS)


def is_image_name(path: Path) -> bool:
    """True for a visible file whose extension is an image format we read (``.DS_Store``, ``.txt``: False)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def is_image_content(path: Path) -> bool:
    """True when ``path``'s header is that of an image Pillow can decode, whatever its name (``photo.jpg_large``)."""
    try:
        with open_image(path, max_pixels=0) as image:
            return image.format in IMAGE_FORMATS
    except DECODE_ERRORS:
        return False


def sort_class_names(names: Sequence[str]) -> list[str]:
    """Order class names numerically when all are integers (``2`` before ``10``), else alphabetically."""
    if names and all(re.fullmatch(r"[+-]?\d+", name) for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files in ``folder`` and its sub-folders (as torchvision's ImageFolder reads a class folder), in path
    order, and the entries that were ignored: other files, hidden files and folders (``.DS_Store``,
    ``.ipynb_checkpoints/``), broken links, a folder met a second time through a symbolic link, and a link to a
    folder that holds ``folder`` (which would pull in other classes' images).
    """
    images: list[Path] = []
    ignored: list[Path] = []
    root = folder.resolve()
    _collect_images(folder, images, ignored, {root} | set(root.parents))
    return images, ignored


def _collect_images(folder: Path, images: list[Path], ignored: list[Path], visited: set[Path]) -> None:
    try:
        entries = sorted(folder.iterdir(), key=lambda path: path.name)
    except OSError:  # no permission to list it
        ignored.append(folder)
        return
    for entry in entries:
        if entry.name.startswith("."):
            ignored.append(entry)
        elif entry.is_dir():
            real = entry.resolve()
            if real in visited:  # a link back up the tree, or to a folder already read
                ignored.append(entry)
                continue
            visited.add(real)
            _collect_images(entry, images, ignored, visited)
        elif entry.is_file() and is_image_name(entry):
            images.append(entry)
        else:
            ignored.append(entry)


def visible_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` whose names do not start with a dot, sorted by name."""
    return sorted((entry for entry in folder.iterdir() if not entry.name.startswith(".")), key=lambda path: path.name)


def same_name(name: str) -> str:
    """``name`` in Unicode's composed form (NFC), so that ``café`` as macOS writes it (NFD) matches other copies."""
    return unicodedata.normalize("NFC", name)


def class_folders(split_dir: Path) -> list[str]:
    """Names of the (visible) sub-folders of ``split_dir``, in class order."""
    return sort_class_names([entry.name for entry in visible_entries(split_dir) if entry.is_dir()])


def require_no_loose_images(split_dir: Path) -> None:
    """Refuse images lying directly in a labeled split folder: they belong to no class, so they would be lost."""
    loose = [entry for entry in visible_entries(split_dir) if entry.is_file() and is_image_name(entry)]
    if loose:
        raise UserError(f"{split_dir}: {len(loose)} image(s) lie directly in it ({_first_names(loose)}) rather than "
                        f"in a class folder; move them into {split_dir}/<class>/ (or pass the folder above the "
                        "class folders)")


def require_not_nested_once_more(split_dir: Path, flag: str | None = None) -> None:
    """Refuse a Kaggle-style ``train/train/<class>/``: one folder whose sub-folders hold the images.

    ``flag`` names the option that would point one level down instead (``--data-dir`` for ``train/``).
    """
    entries = visible_entries(split_dir)
    if len(entries) != 1 or not entries[0].is_dir():
        return
    inner = entries[0]
    if not any(entry.is_file() and is_image_name(entry) for entry in inner.iterdir()) and \
            sum(entry.is_dir() for entry in visible_entries(inner)) >= 2:
        instead = f", or pass {flag} {split_dir}" if flag else ""
        raise UserError(f"{split_dir}: its only folder, {inner.name}/, holds the class folders ({inner}/<class>/); "
                        f"move them up into {split_dir}/{instead}")


def _first_names(paths: Sequence[Path], limit: int = 3) -> str:
    return some_names([path.name for path in paths], limit)


def scan_labeled_split(split_dir: Path, class_names: Sequence[str]) -> tuple[list[Sample], list[Path]]:
    """Samples ``(path, class index)`` of each class folder present in ``split_dir`` (sub-folders included), and
    the entries ignored. Images lying directly in ``split_dir`` are refused (see :func:`require_no_loose_images`).
    """
    require_no_loose_images(split_dir)
    samples: list[Sample] = []
    ignored: list[Path] = []
    folders = {same_name(name): split_dir / name for name in class_folders(split_dir)}
    for index, name in enumerate(class_names):
        folder = folders.get(same_name(name))
        if folder is None:
            continue
        images, skipped = list_images(folder)
        samples.extend((str(path), index) for path in images)
        ignored.extend(skipped)
    ignored.extend(entry for entry in split_dir.iterdir() if not entry.is_dir() or entry.name.startswith("."))
    return samples, ignored


def find_test_images(test_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """Every image file in ``test_dir`` and its sub-folders (in path order) and the entries ignored.

    Errors when there are none, or when the folder holds nothing but one sub-folder (``test/test/*.jpg``): that
    sub-folder is what to pass.
    """
    test_dir = Path(test_dir)
    if not test_dir.is_dir():
        raise UserError(f"--test-dir {test_dir}: folder not found; point it at the folder of unlabeled test images")
    entries = visible_entries(test_dir)
    if len(entries) == 1 and entries[0].is_dir():
        raise UserError(f"--test-dir {test_dir}: holds only the folder {entries[0].name}/; pass --test-dir "
                        f"{entries[0]}")
    images, ignored = list_images(test_dir)
    images, ignored = _add_images_named_otherwise(test_dir, images, ignored)
    if not images:
        raise UserError(f"--test-dir {test_dir}: no image files found (looked for {', '.join(COMMON_EXTENSIONS)} and "
                        f"the {len(IMAGE_EXTENSIONS) - len(COMMON_EXTENSIONS)} other extensions Pillow reads)")
    nested = sorted({path.parent.relative_to(test_dir).as_posix() for path in images} - {"."})
    if nested:
        print(f"note: {test_dir}: also predicting the images in its sub-folder(s) {', '.join(nested)}")
    return images, ignored


def _add_images_named_otherwise(
    folder: Path, images: list[Path], ignored: list[Path]
) -> tuple[list[Path], list[Path]]:
    """Move the ignored visible files whose content is an image (``photo``, ``a.jpg_large``) to ``images``, with a
    note: a test image is never left out of the submission for its name alone."""
    found = [path for path in ignored if not path.name.startswith(".") and path.is_file() and is_image_content(path)]
    if not found:
        return images, ignored
    print(f"note: {folder}: {len(found)} file(s) without an image extension hold images and are predicted too: "
          f"{_first_names(found, limit=10)}")
    named = set(found)
    rest = [path for path in ignored if path not in named]
    return sorted(images + found, key=lambda path: path.relative_to(folder).parts), rest


class ImageCheck(NamedTuple):
    """What reading the images' headers found: the unreadable files with the reason, and every other file's
    ``(width, height)`` as stored (before EXIF orientation)."""

    unreadable: list[tuple[str, str]]
    sizes: dict[str, tuple[int, int]]


def check_images(paths: Sequence[str | Path], full_decode: bool = False, workers: int = 0,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageCheck:
    """Read every image's header: which cannot be read as an image (empty, not an image, no permission, too
    large), and the sizes of the others.

    A header read is fast; a file truncated further in is caught when it is decoded. ``full_decode`` decodes
    every image, in ``workers`` processes. ``max_pixels``: see :func:`check_pixel_count`.
    """
    checker = _ImageCheck([str(path) for path in paths], full_decode, max_pixels)
    unreadable, sizes = [], {}
    for path, reason, size in iterate_items(checker, workers if full_decode else 0):
        if reason:
            unreadable.append((path, reason))
        else:
            sizes[path] = tuple(size)
    return ImageCheck(unreadable, sizes)


def find_unreadable(paths: Sequence[str | Path], full_decode: bool = False, workers: int = 0,
                    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[tuple[str, str]]:
    """The files of ``paths`` that cannot be read as images, with the reason (see :func:`check_images`)."""
    return check_images(paths, full_decode, workers, max_pixels).unreadable


def iterate_items(items: Dataset, workers: int) -> Iterable[Any]:
    """Every item of ``items`` in order: in this process when ``workers`` is 0, else in that many processes."""
    if workers == 0:
        return (items[index] for index in range(len(items)))
    return DataLoader(items, batch_size=None, num_workers=workers)


class _ImageCheck(Dataset):
    """``(path, reason or '', (width, height))`` for each path: reads the header, or decodes the whole image."""

    def __init__(self, paths: list[str], full_decode: bool, max_pixels: int) -> None:
        self.paths, self.full_decode, self.max_pixels = paths, full_decode, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, str, tuple[int, int]]:
        path = self.paths[index]
        try:
            with open_image(path, self.max_pixels) as image:  # opening reads the header and checks the size
                size = image.size
            if self.full_decode:
                decode_rgb(path, max_pixels=self.max_pixels)
        except DECODE_ERRORS as error:
            return path, decode_error_reason(error, path), (0, 0)
        return path, "", size


def decode_error_reason(error: Exception, path: str | Path) -> str:
    """Why ``path`` could not be decoded, in one line and without the path itself (the caller names it)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    for name in {str(path), str(getattr(error, "filename", "") or "")} - {""}:
        text = text.replace(f"'{name}'", "").replace(name, "")
    return text.strip(" :'") or type(error).__name__


def report_ignored(label: str, paths: Sequence[Path], limit: int = 20) -> None:
    """Print once which files of ``label`` were ignored as not being images."""
    if not paths:
        return
    shown = ", ".join(str(path) for path in paths[:limit])
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    print(f"note: ignored {len(paths)} non-image entr{'y' if len(paths) == 1 else 'ies'} in {label}: {shown}{more}")


# --------------------------------------------------------------------------- decoding


class ImageTooLarge(ValueError):
    """An image with more pixels than ``--max-image-pixels`` allows."""


def check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    """Refuse an image of ``size`` (width, height) above ``max_pixels`` pixels (0: no limit).

    Decoding one uses 3 bytes a pixel and more, so a limit keeps a stray poster-sized file (or a crafted
    "decompression bomb") from exhausting memory. The default is where Pillow itself refuses.
    """
    pixels = size[0] * size[1]
    if max_pixels and pixels > max_pixels:
        raise ImageTooLarge(f"{size[0]}x{size[1]} pixels ({pixels:,}) is above the limit of {max_pixels:,} "
                            "(--max-image-pixels N raises it; 0 = no limit)")


def add_max_image_pixels_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--max-image-pixels``, shared by train.py, predict.py and evaluate.py."""
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                        help="images with more pixels are skipped and listed as too large (decoding one takes "
                             "3 bytes a pixel and more); 0 = no limit. The default follows this machine's available "
                             f"memory (here {DEFAULT_MAX_IMAGE_PIXELS:,}: a sixteenth of it in bytes), and is never "
                             "below Pillow's own limit")


def check_max_image_pixels(value: int) -> None:
    """Refuse a negative ``--max-image-pixels``."""
    if value < 0:
        raise UserError(f"--max-image-pixels {value}: must be 0 (no limit) or a pixel count")


@contextlib.contextmanager
def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Iterator[Image.Image]:
    """``Image.open(path)`` with :func:`check_pixel_count` instead of Pillow's own limit, which has no flag."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # restored below; Pillow reads it while opening and while loading some formats
    try:
        with Image.open(path) as image:
            check_pixel_count(image.size, max_pixels)
            yield image
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def load_rgb(path: str | Path, min_side: int | None = None,
             max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image file to an RGB PIL image, with its EXIF orientation applied.

    With ``min_side``, a JPEG much larger than needed is decoded at a reduced scale (1/2, 1/4 or 1/8) whose
    shorter side stays at least ``min_side``: far less decoding work for the same resized result.
    """
    return decode_rgb(path, min_side=min_side, max_pixels=max_pixels)[0]


def decode_rgb(
    path: str | Path, min_side: int | None = None, min_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[Image.Image, tuple[int, int]]:
    """The RGB image (EXIF orientation applied) and its full-resolution ``(width, height)`` as oriented.

    JPEGs are decoded at a reduced DCT scale when that keeps the shorter side at least ``min_side``, or both
    sides at least ``min_size``; the returned size is that of the whole image, whatever scale was decoded.
    Images above ``max_pixels`` raise :class:`ImageTooLarge`.
    """
    with open_image(path, max_pixels) as image:
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


def train_decode_side(img_size: int, min_scale: float = TRAIN_MIN_SCALE) -> int:
    """The shorter side an image needs for training: 792 for 224.

    RandomResizedCrop's smallest crop covers ``min_scale`` of the area, a side of about ``sqrt(min_scale)``
    of the image's; for that crop to still hold ``img_size`` pixels a side, the image's shorter side needs
    ``img_size / sqrt(min_scale)``. Larger JPEGs may be decoded at a reduced scale down to it, and the device path
    scales larger images down to it once, without blurring any crop the recipe can draw.
    """
    return math.ceil(img_size / math.sqrt(min_scale))


AUTO_AUGMENT_CHOICES = ("none", "ta_wide", "ra", "aa")


def auto_augment_transform(name: str) -> Callable[[Image.Image], Image.Image] | None:
    """``--auto-augment``: TrivialAugmentWide (``ta_wide``), RandAugment (``ra``), AutoAugment's ImageNet policy
    (``aa``), or None (``none``)."""
    policies = {"ta_wide": T.TrivialAugmentWide, "ra": T.RandAugment,
                "aa": lambda: T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)}
    return policies[name]() if name in policies else None


def build_train_transform(
    img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
    auto_augment: str = "none", random_erase: float = 0.0,
) -> Callable[[Image.Image], torch.Tensor]:
    """The reference recipe's training augmentation, ending in a normalized tensor; with ``auto_augment`` a policy
    after the flip (as torchvision's reference scripts place it), with ``random_erase`` > 0 RandomErasing of that
    probability at the end."""
    policy = auto_augment_transform(auto_augment)
    return T.Compose(
        [
            T.RandomResizedCrop(img_size, scale=(TRAIN_MIN_SCALE, 1.0)),
            T.RandomHorizontalFlip(),
            *([policy] if policy is not None else []),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1),
            T.RandomRotation(15),
            T.ToTensor(),
            T.Normalize(mean, std),
            *([T.RandomErasing(p=random_erase)] if random_erase > 0 else []),
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


class DecodeFailure(NamedTuple):
    """What a dataset yields for an image it could not decode: its path, why, and its position in the dataset."""

    path: str
    reason: str = "cannot be decoded"
    position: int = -1


class ImageFiles(Dataset):
    """The CPU path's items: ``(image tensor, label, position)``, decoded with PIL and transformed in the worker.

    Keys are positions, or ``(position, seed)`` from :class:`EpochSampler`: the transform's randomness is then drawn
    from that seed. ``labels`` None gives label -1 (unlabeled images). An image that fails to decode yields a
    :class:`DecodeFailure` (with a warning when ``warn``). ``decode_min_side`` lets large JPEGs decode at a reduced
    scale (see :func:`load_rgb`); ``max_pixels`` is the size limit of :func:`check_pixel_count`.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | None,
        transform: Callable[[Image.Image], torch.Tensor],
        decode_min_side: int | None = None,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        warn: bool = True,
    ) -> None:
        self.paths = [str(path) for path in paths]
        self.labels = [-1] * len(self.paths) if labels is None else [int(label) for label in labels]
        self.transform = transform
        self.decode_min_side = decode_min_side
        self.max_pixels = max_pixels
        self.warn = warn

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int] | DecodeFailure:
        position, seed = key if isinstance(key, tuple) else (key, None)
        path = self.paths[position]
        image = decode_or_failure(path, self.decode_min_side, self.max_pixels)
        if isinstance(image, DecodeFailure):
            if self.warn:
                print(f"\nwarning: skipping {path}: cannot decode ({image.reason})", file=sys.stderr)
            return image._replace(position=position)
        return transform_seeded(self.transform, image, seed), self.labels[position], position


def transform_seeded(transform: Callable[[Image.Image], torch.Tensor], image: Image.Image,
                     seed: int | None) -> torch.Tensor:
    """``transform(image)``, its randomness drawn from ``seed`` when given, leaving the global RNG untouched.

    Only the CPU generator is seeded (torchvision's transforms draw from it): ``torch.manual_seed`` would also
    reseed the CUDA generator, and dropout on the GPU would then repeat its masks (with ``--workers 0``).
    """
    if seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return transform(image)


def decode_or_failure(path: str, min_side: int | None = None,
                      max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image | DecodeFailure:
    """The RGB image of ``path`` (see :func:`load_rgb`), or a :class:`DecodeFailure` saying why there is none."""
    try:
        return load_rgb(path, min_side, max_pixels)
    except DECODE_ERRORS as error:
        return DecodeFailure(path, decode_error_reason(error, path))


def split_failures(batch: list[Any]) -> tuple[list[Any], list[DecodeFailure]]:
    """Separate decoded items from :class:`DecodeFailure` markers."""
    failed = [item for item in batch if isinstance(item, DecodeFailure)]
    return [item for item in batch if not isinstance(item, DecodeFailure)], failed


class EpochSampler(Sampler):
    """A shuffled order, and one augmentation seed per sample, that depend only on ``(seed, epoch)``.

    Yields ``(index, sample_seed)`` keys. Because the randomness does not live in the worker processes, a run
    gives the same batches whatever ``--workers`` is, and a resumed run continues exactly as an uninterrupted
    one would, persistent workers included. With ``weights`` (one per sample) an epoch draws ``size`` samples
    with replacement in proportion to them instead (class-balanced sampling). Call :meth:`set_epoch` before each
    epoch.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, weights: Sequence[float] | None = None) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and seeds to yield."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        else:
            order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator)
        return iter(zip(order.tolist(), seeds.tolist()))


def balanced_sample_weights(labels: Sequence[int]) -> list[float]:
    """One weight per sample, the inverse of its class's size: each class is drawn equally often."""
    counts = Counter(labels)
    return [1.0 / counts[label] for label in labels]


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch of a run, distinct for every ``(seed, epoch)`` pair."""
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % 2**62


# --------------------------------------------------------------------------- splits and weights


@dataclass
class TrainValData:
    """What training needs to know about the data: samples of both splits and the class names in order.

    ``held_out`` lists the validation images split off ``train/`` (paths relative to it), to be stored with the
    run so that resuming and evaluating use exactly these; it is None when the data has a ``val/`` folder.
    ``sizes`` are the images' stored sizes from their headers (what the decoded-image cache will need).
    """

    class_names: list[str]
    train_samples: list[Sample]
    val_samples: list[Sample]
    val_source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    held_out: list[str] | None = None
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # (width, height) of each readable image


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


def split_by_list(samples: Sequence[Sample], root: Path, held_out: Sequence[str]) -> tuple[list[Sample], list[Sample],
                                                                                           list[str]]:
    """(train, val, missing): the samples whose path relative to ``root`` is in ``held_out`` are val, the others
    train; ``missing`` are the listed paths no sample has any more."""
    listed = set(held_out)
    val = [sample for sample in samples if relative_name(sample[0], root) in listed]
    train = [sample for sample in samples if relative_name(sample[0], root) not in listed]
    found = {relative_name(path, root) for path, _ in val}
    return train, val, [name for name in held_out if name not in found]


def relative_name(path: str | Path, root: Path) -> str:
    """``path`` relative to ``root``, with forward slashes (how a held-out list stores it on every OS)."""
    return Path(path).relative_to(root).as_posix()


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """How many samples each class index has."""
    counts = Counter(label for _, label in samples)
    return [counts.get(index, 0) for index in range(num_classes)]


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """scikit-learn's 'balanced' weights, ``n_samples / (n_classes * count)``, for class indices
    ``0..num_classes-1``; a class with no samples gets 0."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    weights = np.zeros(num_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.tensor(weights, dtype=torch.float32)


def load_train_val(
    data_dir: str | Path, val_fraction: float, seed: int, verify_images: bool = False, workers: int = 0,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, held_out: Sequence[str] | None = None,
    fold: tuple[int, int] | None = None, train_on_all: bool = False, val_fraction_given: bool = False,
) -> TrainValData:
    """Scan ``data_dir/train`` and ``data_dir/val`` (or split train) into samples; report what was left out.

    Unreadable files are found by their headers, or by decoding every image with ``verify_images``. Without
    ``val/``, ``held_out`` (a run's stored list) decides the validation images; without it, a stratified
    ``val_fraction`` of train/ drawn with ``seed``. With ``fold`` (I, K), train/ and val/ are pooled and fold I
    of a stratified K-fold split validates (``held_out`` then lists paths relative to ``data_dir``); with
    ``train_on_all`` every image trains and nothing validates. ``val_fraction_given``: the user set
    ``--val-fraction``, so a note says when it goes unused.
    """
    data_dir = Path(data_dir)
    train_dir = _require_train_dir(data_dir)
    class_names, train_samples = _scan_train(train_dir)

    val_dir = data_dir / "val"
    if val_fraction_given:
        note_unused_val_fraction(val_fraction, val_dir, fold, train_on_all)
    val_samples = _scan_val(val_dir, class_names) if val_dir.is_dir() else []
    # Drop unreadable files before any split, so the split's guarantees hold for the images actually used.
    check = check_images([path for path, _ in train_samples + val_samples], verify_images, workers, max_pixels)
    skipped = check.unreadable
    bad = {path for path, _ in skipped}
    train_samples = [sample for sample in train_samples if sample[0] not in bad]
    val_samples = [sample for sample in val_samples if sample[0] not in bad]
    _require_readable_images(train_dir, class_names, train_samples)

    if fold is not None or train_on_all:
        pooled = TrainValData(class_names, sorted(train_samples + val_samples), [], "", skipped, sizes=check.sizes)
        if train_on_all:
            pooled.val_source = "nothing (--train-on-all: " + ("train/ and val/ both train)" if val_samples else
                                                              "all of train/ trains)")
        else:
            _validate_on_fold(pooled, data_dir, fold, seed, held_out)
            _note_classes_without_val_images(pooled)
        return pooled
    data = TrainValData(class_names, train_samples, val_samples, str(val_dir), skipped, sizes=check.sizes)
    if not val_dir.is_dir():
        _hold_out_val(data, train_dir, val_fraction, seed, held_out)
    _note_classes_without_val_images(data)
    return data


def note_unused_val_fraction(val_fraction: float, val_dir: Path, fold: tuple[int, int] | None,
                             train_on_all: bool) -> None:
    """Say so when a given ``--val-fraction`` will not be used: --train-on-all, --fold or a val/ folder decides."""
    if train_on_all:
        reason = "--train-on-all validates on nothing"
    elif fold is not None:
        reason = f"--fold {fold[0]}/{fold[1]} validates on its fold"
    elif val_dir.is_dir():
        reason = f"{val_dir} exists and is the validation set (remove it to split train/ instead)"
    else:
        return
    print(f"note: --val-fraction {val_fraction} is not used: {reason}")


def parse_fold(text: str) -> tuple[int, int]:
    """``--fold 2/5`` as (2, 5): fold I of K, with 1 <= I <= K and K >= 2."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None or not 2 <= int(match.group(2)) or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise UserError(f"--fold {text}: write I/K, fold I of K folds, with 1 <= I <= K and K >= 2 (e.g. 1/5)")
    return int(match.group(1)), int(match.group(2))


def fold_split(samples: Sequence[Sample], fold: int, folds: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, val): fold ``fold`` (1-based) of scikit-learn's StratifiedKFold over ``samples``, shuffled with
    ``seed``, is val. The same samples, fold count and seed give the same folds, which together cover each sample
    exactly once."""
    samples = sorted(samples)
    labels = np.array([label for _, label in samples])
    with warnings.catch_warnings():  # classes with fewer images than folds: noted by the caller
        warnings.simplefilter("ignore", UserWarning)
        splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(labels, labels))
    train_indices, val_indices = splits[fold - 1]
    return [samples[index] for index in train_indices], [samples[index] for index in val_indices]


def _validate_on_fold(data: TrainValData, data_dir: Path, fold: tuple[int, int], seed: int,
                      held_out: Sequence[str] | None) -> None:
    index, folds = fold
    if len(data.train_samples) < folds:
        raise UserError(f"--fold {index}/{folds}: only {len(data.train_samples)} images in {data_dir}; use fewer folds")
    if held_out is not None:
        data.train_samples, data.val_samples, missing = split_by_list(data.train_samples, data_dir, held_out)
        _note_missing_held_out(missing, held_out, data_dir, len(data.val_samples))
    else:
        require_fold_count_possible(data, fold)
        data.train_samples, data.val_samples = fold_split(data.train_samples, index, folds, seed)
        counts = class_counts(data.train_samples + data.val_samples, len(data.class_names))
        few = [name for name, count in zip(data.class_names, counts) if count < folds]
        if few:
            print(f"note: --fold {index}/{folds}: {len(few)} class(es) have fewer images than folds ({', '.join(few[:5])}"
                  f"{' ...' if len(few) > 5 else ''}); some folds validate without them")
    data.val_source = f"fold {index}/{folds} of {data_dir}'s train/ and val/ pooled (stratified, seed {seed})"
    data.held_out = [relative_name(path, data_dir) for path, _ in data.val_samples]


def require_fold_count_possible(data: TrainValData, fold: tuple[int, int]) -> None:
    """Refuse ``--fold I/K`` when every class has fewer than K images: no stratified K-fold split exists."""
    index, folds = fold
    counts = class_counts(data.train_samples, len(data.class_names))
    fewest, most = min(counts), max(counts)
    if most >= folds:
        return
    instead = f"use at most {most} folds (--fold {min(index, most)}/{most})" if most >= 2 else \
        "add images: a fold split needs a class with at least 2"
    raise UserError(f"--fold {index}/{folds}: every class has fewer than {folds} images (the smallest, "
                    f"{data.class_names[counts.index(fewest)]}, has {fewest}; the largest has {most}); {instead}")


def _note_missing_held_out(missing: Sequence[str], held_out: Sequence[str], root: Path, kept: int) -> None:
    if missing:
        print(f"note: {len(missing)} of the {len(held_out)} validation images this run held out of {root} "
              f"are missing or unreadable now ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
              f"validating on the other {kept}")


def _hold_out_val(data: TrainValData, train_dir: Path, val_fraction: float, seed: int,
                  held_out: Sequence[str] | None) -> None:
    if held_out is not None:
        data.train_samples, data.val_samples, missing = split_by_list(data.train_samples, train_dir, held_out)
        _note_missing_held_out(missing, held_out, train_dir, len(data.val_samples))
        data.val_source = f"the {len(data.val_samples)} images of {train_dir} the run held out as val"
    else:
        if not 0 < val_fraction < 1:
            raise UserError(f"--val-fraction {val_fraction}: must be between 0 and 1 (no {train_dir.parent / 'val'} "
                            "folder exists)")
        data.train_samples, data.val_samples = stratified_split(data.train_samples, val_fraction, seed)
        data.val_source = f"{val_fraction:.0%} of {train_dir} (stratified, seed {seed})"
    data.held_out = [relative_name(path, train_dir) for path, _ in data.val_samples]
    if not data.val_samples:
        raise UserError(f"{train_dir}: no image left to validate on; add a val/ folder or more training images")


def _note_classes_without_val_images(data: TrainValData) -> None:
    counts = class_counts(data.val_samples, len(data.class_names))
    absent = [name for name, count in zip(data.class_names, counts) if count == 0]
    if absent and data.val_samples:
        shown = ", ".join(absent[:10]) + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
        print(f"note: {len(absent)} class(es) have no validation images ({shown}); validation accuracy cannot "
              "tell how well the model knows them")


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
    if not train_dir.is_dir() and data_dir.name in ("train", "val", "test"):
        raise UserError(f"--data-dir {data_dir}: is the {data_dir.name}/ folder itself; pass the folder that holds "
                        f"it: --data-dir {data_dir.parent}")
    if not train_dir.is_dir():
        raise UserError(f"--data-dir {data_dir}: no train/ folder inside; expected {train_dir}/<class>/*.jpg")
    return train_dir


def has_images(folder: Path) -> bool:
    """True when ``folder`` or one of its sub-folders holds a file with an image extension."""
    return bool(list_images(folder)[0])


def unknown_class_folders(split_dir: Path, class_names: Sequence[str]) -> list[str]:
    """Class folders of ``split_dir`` that hold images but are not among ``class_names``."""
    known = {same_name(name) for name in class_names}
    return [name for name in class_folders(split_dir)
            if same_name(name) not in known and has_images(split_dir / name)]


def _scan_train(train_dir: Path) -> tuple[list[str], list[Sample]]:
    """The class names (folders with images, in class order) and the samples of ``train_dir``."""
    require_not_nested_once_more(train_dir, flag="--data-dir")
    names = class_folders(train_dir)
    require_distinct_class_names(train_dir, names)
    samples, ignored = scan_labeled_split(train_dir, names)
    report_ignored(str(train_dir), ignored)
    counts = class_counts(samples, len(names))
    kept = [name for name, count in zip(names, counts) if count]
    empty = [name for name, count in zip(names, counts) if not count]
    if empty:
        print(f"note: left out {len(empty)} class folder(s) of {train_dir} with no images: {', '.join(empty)}")
    if not kept:
        raise UserError(f"{train_dir}: no class folders with images; expected {train_dir}/<class>/*.jpg")
    if len(kept) == 1:
        raise UserError(f"{train_dir}: only one class folder with images ({kept[0]}); a classifier needs at least "
                        f"two classes, as {train_dir}/<class>/*.jpg folders")
    new_index = {names.index(name): index for index, name in enumerate(kept)}
    return kept, [(path, new_index[label]) for path, label in samples]


def require_distinct_class_names(split_dir: Path, names: Sequence[str]) -> None:
    """Refuse two class folders whose names differ only in Unicode normalization (``café`` twice): they look alike
    and would be one class in every other folder."""
    first_with: dict[str, str] = {}
    for name in names:
        other = first_with.setdefault(same_name(name), name)
        if other != name:
            raise UserError(f"{split_dir}: the class folders {other!r} and {name!r} have the same name written with "
                            "different Unicode characters (composed and decomposed accents); merge them into one")


def _scan_val(val_dir: Path, class_names: list[str]) -> list[Sample]:
    require_not_nested_once_more(val_dir)
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
