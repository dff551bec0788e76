"""Image grids: the misclassified examples of the report and the first training batch, each under a caption.

Each caption fits its column: the font shrinks a little, then a line still too
wide wraps onto a second line, and a very long one is shortened in the middle
as well (see :func:`fit_captions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import text_to_path

import figures

GRID_COLUMNS = 6
# Inches: each cell is a square image box with its caption lines above it; a band on top holds the title.
GRID_IMAGE_INCHES = 2.0
GRID_GAP_INCHES = 0.3
GRID_TITLE_INCHES = 0.45
# Below this size a thumbnail is drawn with visible pixels instead of being smoothed into a blur.
PIXELATED_BELOW = 96
# A caption may use its image's width and most of the gap before the next column.
CAPTION_WIDTH_INCHES = GRID_IMAGE_INCHES + GRID_GAP_INCHES - 0.12
CAPTION_SPACE_INCHES = 0.04  # between a caption and its image
# Caption font sizes, largest first: a grid uses the largest at which every caption line fits its column.
CAPTION_POINTS = (8.5, 8.0, 7.5, 7.0)
CAPTION_LINE_SPACING = 1.3
# A line too wide even at the smallest size wraps onto at most this many lines (the later ones indented);
# one that needs more is shortened in the middle as well.
CAPTION_MAX_WRAPS = 2
CAPTION_CONTINUATION = "  "
CAPTION_BREAK_AFTER = " _-/.,…)"  # a wrapped line preferably ends after one of these
# The picture of the first training batch: at most this many images, class names of at most this many characters.
BATCH_PICTURE_LIMIT = 32
BATCH_CAPTION_CHARS = 24


class CaptionLayout(NamedTuple):
    """Captions as drawn (wrapped or shortened to fit their column) and their font size in points."""

    captions: list[str]
    fontsize: float


def _text_width(text: str, font: FontProperties) -> float:
    """The width in points of one line of plain ``text`` (no mathtext) drawn in ``font``."""
    width, _, _ = text_to_path.get_text_width_height_descent(text, font, ismath=False)
    return width


def _longest_fitting(prefix: str, text: str, width: float, font: FontProperties) -> int:
    """How many leading characters of ``text`` fit in ``width`` after ``prefix``; at least one."""
    low, high = 1, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if _text_width(prefix + text[:middle], font) <= width:
            low = middle
        else:
            high = middle - 1
    return low


def _break_point(text: str, fitting: int) -> int:
    """Where to end a wrapped line of ``text`` that fits ``fitting`` characters: after a separator in its second
    half (see ``CAPTION_BREAK_AFTER``), else at ``fitting``."""
    if fitting >= len(text):
        return fitting
    for position in range(fitting - 1, fitting // 2 - 1, -1):
        if text[position] in CAPTION_BREAK_AFTER:
            return position + 1
    return fitting


def _wrap_to_width(line: str, width: float, font: FontProperties) -> list[str]:
    """``line`` broken into lines that each fit ``width`` points, the later ones indented."""
    pieces: list[str] = []
    rest = line
    while rest:
        prefix = CAPTION_CONTINUATION if pieces else ""
        end = _break_point(rest, _longest_fitting(prefix, rest, width, font))
        pieces.append(prefix + rest[:end])
        rest = rest[end:]
    return pieces


def _fit_line(line: str, width: float, font: FontProperties) -> list[str]:
    """One caption line as lines that fit ``width`` points: itself, wrapped onto ``CAPTION_MAX_WRAPS`` lines, or
    shortened in the middle (as :func:`figures.shorten_labels` does) as little as needed to wrap onto that many."""
    if _text_width(line, font) <= width:
        return [line]
    pieces = _wrap_to_width(line, width, font)
    if len(pieces) <= CAPTION_MAX_WRAPS:
        return pieces
    # The longest middle-shortened form ("a…z" at least) that wraps onto few enough lines.
    low, high = 3, len(line) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if len(_wrap_to_width(figures.shorten_middle(line, middle), width, font)) <= CAPTION_MAX_WRAPS:
            low = middle
        else:
            high = middle - 1
    return _wrap_to_width(figures.shorten_middle(line, low), width, font)


def fit_captions(captions: Sequence[str], width: float) -> CaptionLayout:
    """Captions whose every line fits ``width`` points, in the largest of ``CAPTION_POINTS`` where they fit as given.

    When a line is too wide even at the smallest size, that line is wrapped (and,
    if very long, shortened in the middle), see :func:`_fit_line`. Measured with
    the current fonts, so call it where the figure's fonts are in effect.
    """
    reference = FontProperties(size=CAPTION_POINTS[0])
    lines = [line for caption in captions for line in caption.split("\n")]
    widest = max((_text_width(line, reference) for line in lines), default=0.0)
    for size in CAPTION_POINTS:
        if widest * size / CAPTION_POINTS[0] <= width:  # text widths scale with the font size
            return CaptionLayout(list(captions), size)
    font = FontProperties(size=CAPTION_POINTS[-1])
    fitted = ["\n".join(piece for line in caption.split("\n") for piece in _fit_line(line, width, font))
              for caption in captions]
    return CaptionLayout(fitted, CAPTION_POINTS[-1])


def _caption_inches(layout: CaptionLayout) -> float:
    """Height of the band that holds the tallest caption of ``layout``."""
    lines = max((caption.count("\n") + 1 for caption in layout.captions), default=1)
    _, line_height, _ = text_to_path.get_text_width_height_descent("lp", FontProperties(size=layout.fontsize),
                                                                   ismath=False)
    return lines * line_height * CAPTION_LINE_SPACING / 72


def plot_image_grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    path: str | Path,
    title: str,
    empty_message: str = "nothing to show",
) -> None:
    """Save images (H x W x 3 uint8 arrays, any sizes) in a grid, each under a caption of a few lines.

    Each caption fits its column: the font shrinks a little, then a line still
    too wide wraps (see :func:`fit_captions`). With no images the figure shows
    ``empty_message`` instead, so the file always exists.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        _plot_message(path, title, empty_message)
        return
    columns = min(GRID_COLUMNS, len(images))
    rows = -(-len(images) // columns)
    with figures.new_figure((1.0, 1.0), texts=[title, *captions]) as fig:
        layout = fit_captions(captions, CAPTION_WIDTH_INCHES * 72)
        cell_width = GRID_IMAGE_INCHES + GRID_GAP_INCHES
        cell_height = _caption_inches(layout) + CAPTION_SPACE_INCHES + GRID_IMAGE_INCHES + GRID_GAP_INCHES
        width, height = columns * cell_width, GRID_TITLE_INCHES + rows * cell_height
        fig.set_size_inches(width, height)
        for position, (image, caption) in enumerate(zip(images, layout.captions, strict=True)):
            row, column = divmod(position, columns)
            bottom = height - GRID_TITLE_INCHES - (row + 1) * cell_height + GRID_GAP_INCHES
            box = (column * cell_width / width, bottom / height, GRID_IMAGE_INCHES / width, GRID_IMAGE_INCHES / height)
            ax = fig.add_axes(box, anchor="NW")  # a non-square image hangs from its caption, flush left
            ax.set_axis_off()
            small = max(image.shape[:2]) < PIXELATED_BELOW
            ax.imshow(image, interpolation="nearest" if small else "antialiased")
            fig.text(box[0], (bottom + GRID_IMAGE_INCHES + CAPTION_SPACE_INCHES) / height, caption, ha="left",
                     va="bottom", fontsize=layout.fontsize, linespacing=CAPTION_LINE_SPACING, parse_math=False)
        fig.text(0.0, 1.0, title, ha="left", va="top", fontsize=12)
        figures.save_figure(fig, path)


def _plot_message(path: str | Path, title: str, message: str) -> None:
    """A small figure holding just a title and a message."""
    with figures.new_figure((6, 1.6), texts=[title, message]) as fig:
        fig.suptitle(title, fontsize=12)
        fig.text(0.5, 0.4, message, ha="center", va="center", fontsize=11, color="0.3")
        figures.save_figure(fig, path)


def denormalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> list[np.ndarray]:
    """Normalized model inputs ``[images, 3, H, W]`` back to viewable ``H x W x 3`` uint8 pictures."""
    mean_, std_ = np.asarray(mean).reshape(1, -1, 1, 1), np.asarray(std).reshape(1, -1, 1, 1)
    pixels = np.clip(np.asarray(images, dtype=np.float64) * std_ + mean_, 0.0, 1.0)
    return list(np.rint(pixels * 255).astype(np.uint8).transpose(0, 2, 3, 1))


def plot_training_batch(pictures: Sequence[np.ndarray], labels: Sequence[int], class_names: Sequence[str],
                        path: str | Path, batch_images: int) -> None:
    """Save up to ``BATCH_PICTURE_LIMIT`` augmented training ``pictures`` (see :func:`denormalize`) in a grid, each
    under its class name; ``batch_images`` is the size of the batch they come from."""
    shown = min(len(pictures), BATCH_PICTURE_LIMIT)
    names = figures.shorten_labels(class_names, BATCH_CAPTION_CHARS)
    captions = [names[int(label)] for label in labels[:shown]]
    title = (f"The first training batch, as the model sees it (augmented): {shown} of {batch_images} images"
             if shown < batch_images else f"The first training batch, as the model sees it (augmented): {shown} images")
    plot_image_grid(list(pictures[:shown]), captions, path, title)
