"""Reading image files: which files are images, their headers, and decoding them to RGB (PIL)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from utils import available_ram_bytes

DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
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


@contextlib.contextmanager
def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Iterator[Image.Image]:
    """``Image.open(path)`` with :func:`check_pixel_count` instead of Pillow's own limit, which has no flag."""
    # Pillow takes its limit from a module global only; it is lifted for this open and restored right after.
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
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
