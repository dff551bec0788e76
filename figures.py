"""What every figure shares: a stand-alone figure with the fonts its text needs, its atomic save, shortened labels.

Figures are built with matplotlib's object API (``Figure``, never pyplot), so
drawing them works on headless machines and never changes the plotting backend
of a notebook that imports ``train``. Each figure is rendered in memory and
written with :func:`utils.atomic_write_bytes`, so a crash mid-write never leaves
a truncated image behind; the figure is not kept by pyplot, so long training
runs do not leak memory. Text the default font cannot draw (CJK class names) is
drawn with installed fonts that have the glyphs, see :func:`fonts.fonts_for`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from matplotlib.figure import Figure

import fonts
import utils

DPI = 130
# Longer class names are shortened so one odd folder name cannot swamp the plot.
MAX_LABEL_CHARS = 32
# How many characters a shortened label gains per round while it still collides with another.
LABEL_GROWTH_CHARS = 8


@contextmanager
def new_figure(figsize: tuple[float, float], texts: Iterable[str] = ()) -> Iterator[Figure]:
    """Yield a new stand-alone figure (not registered with pyplot) and free its artists afterwards.

    ``texts`` are the figure's user-supplied strings (class names, captions,
    title): the figure is drawn with fonts that have their glyphs, see
    :func:`fonts.fonts_for`.
    """
    with fonts.fonts_for(texts):
        fig = Figure(figsize=figsize)
        try:
            yield fig
        finally:
            fig.clear()


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write ``fig`` to ``path`` atomically, in the format its suffix names (PNG without one)."""
    image_format = Path(path).suffix.lstrip(".").lower() or "png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format=image_format, dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    utils.atomic_write_bytes(path, buffer.getvalue())


def shorten_middle(name: str, limit: int) -> str:
    """``name`` cut to ``limit`` characters by an ellipsis in the middle, keeping its head and tail."""
    if len(name) <= limit:
        return name
    tail = (limit - 1) // 2
    head = limit - 1 - tail
    return f"{name[:head]}…{name[-tail:]}"


def _colliding_shortened(labels: list[str], names: list[str]) -> list[int]:
    """Positions of shortened labels that equal the label of a different name."""
    names_by_label: dict[str, set[str]] = {}
    for label, name in zip(labels, names, strict=True):
        names_by_label.setdefault(label, set()).add(name)
    return [position for position, (label, name) in enumerate(zip(labels, names, strict=True))
            if label != name and len(names_by_label[label]) > 1]


def shorten_labels(names: Sequence[str], limit: int = MAX_LABEL_CHARS) -> list[str]:
    """Class names as tick labels, those over ``limit`` characters shortened in the middle.

    Head and tail are kept (``Quercus_robur_su…orma_fastigiata``) because class
    folders often share a prefix or a suffix. Labels that would still collide
    are shortened less, a few characters per round, until they differ, so the
    labels are pairwise distinct whenever the names are.
    """
    names = [str(name) for name in names]
    limits = [limit] * len(names)
    labels = [shorten_middle(name, limit) for name in names]
    while colliding := _colliding_shortened(labels, names):
        for position in colliding:
            limits[position] += LABEL_GROWTH_CHARS
            labels[position] = shorten_middle(names[position], limits[position])
    return labels
