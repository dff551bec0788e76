"""Reading image files: which files are images, their headers, and decoding them to RGB (PIL)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from utils import available_ram_bytes

DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
# Where Pillow refuses to open an image by default (twice its warning limit): about 179 megapixels.
PILLOW_PIXEL_LIMIT = 2 * Image.MAX_IMAGE_PIXELS
# Bytes of memory an image's pixel may take while it is decoded: RGBA (4) and a converted copy, with room to spare.
BYTES_PER_DECODED_PIXEL = 16
# Bytes a pixel takes in Pillow's memory once loaded (RGB is stored as 4 bytes a pixel), by mode; others: 4.
PILLOW_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# The share of the memory available when an image is decoded that its one full-size copy may take.
DECODE_MEMORY_SHARE = 0.5


def total_ram_bytes() -> int:
    """This machine's physical memory (or the container's limit when lower): the same on every call."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 0
    limit = cgroup_memory_limit()
    return min(physical, limit) if physical and limit else physical or limit


def cgroup_memory_limit() -> int:
    """The container's memory limit in bytes (cgroup v2 ``memory.max``, or v1), 0 when there is none."""
    for name in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # v1 writes a huge number for "no limit"
            return int(text)
    return 0


def machine_pixel_limit(memory_bytes: int) -> int:
    """The default ``--max-image-pixels`` for a machine with ``memory_bytes`` of physical memory: one pixel per
    :data:`BYTES_PER_DECODED_PIXEL` bytes of it, never below Pillow's own limit; a 600-megapixel clip-art PNG passes
    on a machine with 10 GB or more."""
    return max(PILLOW_PIXEL_LIMIT, memory_bytes // BYTES_PER_DECODED_PIXEL)
DEFAULT_MAX_IMAGE_PIXELS = machine_pixel_limit(total_ram_bytes())
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


class ImageSize(tuple):
    """An image's ``(width, height)`` as stored (before EXIF orientation), which also says whether the file is a
    ``plain_jpeg``: 8-bit RGB or grey, not EXIF-rotated, so that the device path's workers send its bytes as they
    are, without opening it again (see :func:`device_decodable`). It is a pair wherever a size is expected."""

    plain_jpeg: bool

    def __new__(cls, width: int, height: int, plain_jpeg: bool = False) -> ImageSize:
        size = super().__new__(cls, (width, height))
        size.plain_jpeg = plain_jpeg
        return size

    def __reduce__(self) -> tuple[type, tuple[int, int, bool]]:
        return ImageSize, (self[0], self[1], self.plain_jpeg)


def device_decodable(image: Image.Image) -> bool:
    """True for a JPEG the device decoder reads as the CPU path would: 8-bit RGB or grey, not EXIF-rotated."""
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return False
    return image.getexif().get(ExifTags.Base.Orientation, 1) == 1


def plain_jpeg_sizes(sizes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The sizes, by path, of the files the header scan (:func:`check_images`) found to be plain JPEGs."""
    return {path: size for path, size in sizes.items() if getattr(size, "plain_jpeg", False)}


class ImageCheck(NamedTuple):
    """What reading the images' headers found: the unreadable files with the reason, and every other file's
    :class:`ImageSize` (``(width, height)`` as stored, before EXIF orientation)."""

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
    for path, reason, size, plain_jpeg in iterate_items(checker, workers if full_decode else 0):
        if reason:
            unreadable.append((path, reason))
        else:  # rebuilt here: a DataLoader turns tuples into lists
            sizes[path] = ImageSize(*size, plain_jpeg=bool(plain_jpeg))
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
    """``(path, reason or '', (width, height), plain JPEG)`` for each path: reads the header, or decodes the
    whole image."""

    def __init__(self, paths: list[str], full_decode: bool, max_pixels: int) -> None:
        self.paths, self.full_decode, self.max_pixels = paths, full_decode, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, str, tuple[int, int], bool]:
        path = self.paths[index]
        try:
            with open_image(path, self.max_pixels) as image:  # opening reads the header and checks the size
                size, plain_jpeg = image.size, device_decodable(image)
            if self.full_decode:
                decode_rgb(path, max_pixels=self.max_pixels)
        except DECODE_ERRORS as error:
            return path, decode_error_reason(error, path), (0, 0), False
        return path, "", size, plain_jpeg


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

    An image larger than needed is scaled down as it is decoded, so that its shorter side stays at least
    ``min_side`` (or both sides at least ``min_size``): JPEGs at a reduced DCT scale, other formats by an integer
    factor right after loading (``Image.reduce``), before any other copy is made. The returned size is that of the
    whole image, whatever scale was decoded. Images above ``max_pixels`` raise :class:`ImageTooLarge`, and so does
    one whose full-size copy would take more than :data:`DECODE_MEMORY_SHARE` of the memory available now.
    """
    with open_image(path, max_pixels) as image:
        width, height = image.size
        if image.format == "JPEG" and (min_side or min_size):
            image.draft(image.mode, min_size or _draft_request(image.size, min_side))
        check_decode_memory(image.size, image.mode, available_ram_bytes())
        image.load()
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in AXIS_SWAPPING_ORIENTATIONS:
            width, height = height, width
        factor = reduce_factor(image.size, min_side, min_size)
        if factor > 1:
            image = reduced(image, factor)
        return to_rgb(oriented(image, orientation)), (width, height)


def check_decode_memory(size: tuple[int, int], mode: str, available_bytes: int) -> None:
    """Refuse an image whose one full-size copy in Pillow's memory would take more than
    :data:`DECODE_MEMORY_SHARE` of ``available_bytes`` (0: unknown, no check)."""
    needed = size[0] * size[1] * PILLOW_PIXEL_BYTES.get(mode, 4)
    if available_bytes and needed > DECODE_MEMORY_SHARE * available_bytes:
        raise ImageTooLarge(f"{size[0]}x{size[1]} pixels need {memory_text(needed)} of memory to decode, more than "
                            f"{DECODE_MEMORY_SHARE:.0%} of the {memory_text(available_bytes)} available")


def memory_text(size: int) -> str:
    """``size`` bytes in words: GB, or MB below one GB."""
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def reduce_factor(size: tuple[int, int], min_side: int | None, min_size: tuple[int, int] | None) -> int:
    """The largest integer factor ``size`` can be divided by keeping its shorter side at least ``min_side`` (or
    each side at least ``min_size``); 1 when neither is given."""
    if min_size:
        return max(1, min(size[0] // max(min_size[0], 1), size[1] // max(min_size[1], 1)))
    if min_side:
        return max(1, min(size) // min_side)
    return 1


# Modes Image.reduce takes; the others are converted (strip by strip, never as a whole) to the mode in this table.
REDUCIBLE_AS = {"1": "L", "P": "RGBA", "I;16": "I", "I;16B": "I", "I;16L": "I", "I;16N": "I"}
REDUCE_STRIP_PIXELS = 1 << 22  # pixels converted at once for a mode Image.reduce does not take


def reduced(image: Image.Image, factor: int) -> Image.Image:
    """``image`` scaled down by ``factor`` (each output pixel the mean of a ``factor`` square): a mode
    ``Image.reduce`` does not take is converted strip by strip, so no second full-size copy is made."""
    if image.mode not in REDUCIBLE_AS:
        return image.reduce(factor)
    mode = REDUCIBLE_AS[image.mode]
    if image.mode == "P" and "transparency" not in image.info:
        mode = "RGB"
    width, height = image.size
    rows = max(factor, REDUCE_STRIP_PIXELS // max(width, 1) // factor * factor)
    out = Image.new(mode, (-(-width // factor), -(-height // factor)))  # as Image.reduce: a partial block at the end
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(top + rows, height)))
        out.paste(strip.convert(mode).reduce(factor), (0, top // factor))
    return out


# The transposition that undoes each EXIF orientation (as ImageOps.exif_transpose applies it).
ORIENTATION_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                         6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def oriented(image: Image.Image, orientation: int) -> Image.Image:
    """``image`` turned upright for its EXIF ``orientation`` (1 or unknown: as it is, no copy)."""
    method = ORIENTATION_TRANSPOSE.get(orientation)
    return image if method is None else image.transpose(method)


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
