"""Figures: loss and accuracy curves, the confusion matrix (with a class order for many classes), image grids.

Figures are built with matplotlib's object API (``Figure``, never pyplot), so
drawing them works on headless machines and never changes the plotting backend
of a notebook that imports ``train``. Each figure is rendered in memory and
written with :func:`utils.atomic_write_bytes`, so a crash mid-write never leaves
a truncated image behind; the figure is not kept by pyplot, so long training
runs do not leak memory. Text the default font cannot draw (CJK class names) is
drawn with installed fonts that have the glyphs, when there are some; a note
names what no installed font can draw, with a hint that fits it (a CJK font
for CJK, an outline emoji font for emoji).
"""

from __future__ import annotations

import functools
import io
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib import colormaps, font_manager, rc_context, rcParams, transforms
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.font_manager import FontEntry, FontProperties
from matplotlib.ft2font import FT2Font
from matplotlib.image import AxesImage
from matplotlib.textpath import text_to_path
from matplotlib.ticker import MaxNLocator, PercentFormatter
from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import squareform

import calibration
import metrics
import utils

DPI = 130
TRAIN_COLOR = "tab:blue"
VAL_COLOR = "tab:orange"
EMA_COLOR = "tab:purple"  # the validation curve of the moving average of the weights (--ema)
BEST_COLOR = "tab:green"
STOP_COLOR = "tab:red"
LR_COLOR = "0.55"  # grey: the learning rate is context, not the story
CONFUSION_CMAP = "Blues"
DEFAULT_CONFUSION_TITLE = "Confusion matrix (normalized by true class)"
GROUPED_BY_CONFUSION = "classes grouped by confusion"

# Per-cell numbers are only legible up to this many classes.
MAX_CLASSES_WITH_CELL_TEXT = 30
# Past this many classes the x tick labels are turned fully vertical: at 45°
# neighbouring labels already touch once the cells get narrow.
VERTICAL_LABELS_ABOVE = 15
# Longer class names are shortened so one odd folder name cannot swamp the plot.
MAX_LABEL_CHARS = 32
# How many characters a shortened label gains per round while it still collides with another.
LABEL_GROWTH_CHARS = 8
# A loss more than this many times the median loss is drawn clipped at the top edge, so that
# the huge first-epoch validation loss of a fresh head does not flatten the rest of the curve.
LOSS_OUTLIER_FACTOR = 5.0
# With losses drawn clipped on the top edge, the learning-rate line keeps to this lower share of the plot.
LR_HEIGHT_UNDER_CLIPPED = 0.85

MISSING_FONT_HINT = "install a CJK font such as fonts-noto-cjk"
EMOJI_FONT_HINT = ("for emoji install an outline emoji font such as fonts-symbola "
                   "(matplotlib cannot draw colour emoji fonts)")
OTHER_SCRIPT_FONT_HINT = "install a font that has them, such as fonts-noto-core"
# Code point ranges of emoji, their modifiers and joiners (skin tones, U+200D, variation selectors, tags).
EMOJI_RANGES = ((0x1F000, 0x1FAFF), (0x2600, 0x27BF), (0x2300, 0x23FF), (0x2B00, 0x2BFF), (0xFE00, 0xFE0F),
                (0x200D, 0x200D), (0x20E3, 0x20E3), (0xE0000, 0xE007F))
# FreeType's FT_FACE_FLAG_SCALABLE: the font has outlines. Bitmap-only fonts (colour emoji) cannot be drawn
# at an arbitrary size: matplotlib fails with "Could not set the fontsize".
FT_FACE_FLAG_SCALABLE = 1
# Fonts that map every character to a placeholder box (matplotlib ships "Last Resort High-Efficiency"):
# choosing one as fallback would hide that the real glyphs are missing.
PLACEHOLDER_FONT_PREFIXES = ("Last Resort",)
_GLYPH_WARNING = r"Glyph \d+ .* missing from font"
# Characters already named in a "no installed font" note: each is reported once per process,
# not once per figure (training and evaluation draw the same class names several times).
_REPORTED_MISSING_GLYPHS: set[str] = set()


# --------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------


@contextmanager
def _figure(figsize: tuple[float, float], texts: Iterable[str] = ()) -> Iterator[Figure]:
    """Yield a new stand-alone figure (not registered with pyplot) and free its artists afterwards.

    ``texts`` are the figure's user-supplied strings (class names, captions,
    title): the figure is drawn with fonts that have their glyphs, see
    :func:`_fonts_for`.
    """
    with _fonts_for(texts):
        fig = Figure(figsize=figsize)
        try:
            yield fig
        finally:
            fig.clear()


def _save_figure(fig: Figure, path: str | Path) -> None:
    """Write ``fig`` to ``path`` atomically, in the format its suffix names (PNG without one)."""
    image_format = Path(path).suffix.lstrip(".").lower() or "png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format=image_format, dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    utils.atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------
# Fonts for text the default font cannot draw (CJK class names)
# --------------------------------------------------------------------------


def _is_scalable(font: FT2Font) -> bool:
    """True when ``font`` has outlines, so matplotlib can draw it at any size (colour emoji fonts are bitmaps)."""
    flags = font.face_flags  # an int before matplotlib 3.10, a FaceFlags enum since
    return bool(int(getattr(flags, "value", flags)) & FT_FACE_FLAG_SCALABLE)


def _glyphs_in_font(font_path: str, chars: frozenset[str]) -> frozenset[str]:
    """The characters of ``chars`` that the font file at ``font_path`` can draw (none if unreadable or bitmap-only)."""
    try:
        font = FT2Font(font_path)
    except (OSError, RuntimeError):
        return frozenset()
    if not _is_scalable(font):
        return frozenset()
    return frozenset(char for char in chars if font.get_char_index(ord(char)))


def _chars_missing_from_default_font(texts: Iterable[str]) -> frozenset[str]:
    """The characters of ``texts`` the default font has no glyph for; plain ASCII returns at once."""
    chars = frozenset(char for text in texts for char in text if not char.isascii() and not char.isspace())
    if not chars:
        return chars
    default_font = font_manager.findfont(font_manager.FontProperties())
    return chars - _glyphs_in_font(default_font, chars)


def fallback_font_family(chars: frozenset[str], fonts: Sequence[FontEntry]) -> tuple[str | None, frozenset[str]]:
    """The family of the font in ``fonts`` with glyphs for most of ``chars``, and the characters it lacks.

    The first font that has them all wins; ``(None, chars)`` when no font has any.
    Placeholder fonts (``PLACEHOLDER_FONT_PREFIXES``) are never chosen.
    """
    best_family, best_covered = None, frozenset()
    for font in fonts:
        if font.name.startswith(PLACEHOLDER_FONT_PREFIXES):
            continue
        covered = _glyphs_in_font(font.fname, chars)
        if len(covered) > len(best_covered):
            best_family, best_covered = font.name, covered
            if covered == chars:
                break
    return best_family, chars - best_covered


def fallback_font_families(chars: frozenset[str], fonts: Sequence[FontEntry]) -> tuple[tuple[str, ...], frozenset[str]]:
    """Families from ``fonts`` that together have glyphs for ``chars``, and the characters none of them has.

    Picked one at a time with :func:`fallback_font_family` (the font with most of
    the characters still lacking), so CJK and, say, Devanagari names in one
    figure each get a font that has them.
    """
    families: list[str] = []
    lacking = chars
    while lacking:
        family, still_lacking = fallback_font_family(lacking, fonts)
        if family is None:
            break
        families.append(family)
        lacking = still_lacking
    return tuple(families), lacking


@functools.lru_cache(maxsize=64)
def _installed_fallback_families(chars: frozenset[str]) -> tuple[tuple[str, ...], frozenset[str]]:
    """:func:`fallback_font_families` over the installed fonts, cached: scanning opens every font file."""
    return fallback_font_families(chars, font_manager.fontManager.ttflist)


def _is_emoji(char: str) -> bool:
    """True for an emoji or a character that joins or modifies one (see ``EMOJI_RANGES``)."""
    return any(low <= ord(char) <= high for low, high in EMOJI_RANGES)


def _font_hints(missing: frozenset[str]) -> list[str]:
    """What to install for the characters no font has: a CJK font, an outline emoji font, or a broad one."""
    emoji = {char for char in missing if _is_emoji(char)}
    wide = {char for char in missing - emoji if unicodedata.east_asian_width(char) in ("W", "F")}
    hints = [MISSING_FONT_HINT] if wide else []
    hints += [EMOJI_FONT_HINT] if emoji else []
    return hints + ([OTHER_SCRIPT_FONT_HINT] if missing - emoji - wide else [])


def missing_glyphs_note(texts: Sequence[str], missing: frozenset[str]) -> str:
    """The note naming the words of ``texts`` whose ``missing`` characters show as boxes, and what to install."""
    words = list(dict.fromkeys(word for text in texts for word in text.split() if missing & set(word)))
    shown = ", ".join(words[:3]) + (", ..." if len(words) > 3 else "")
    return (f"note: no installed font has the glyphs of {len(words)} label(s) ({shown}); "
            f"they show as boxes in the figures; {'; '.join(_font_hints(missing))}")


def _note_missing_glyphs(texts: list[str], missing: frozenset[str]) -> None:
    """Print :func:`missing_glyphs_note`, unless all of ``missing`` was reported before (or there is none)."""
    if missing <= _REPORTED_MISSING_GLYPHS:
        return
    _REPORTED_MISSING_GLYPHS.update(missing)
    print(missing_glyphs_note(texts, missing))


@contextmanager
def _fonts_for(texts: Iterable[str]) -> Iterator[None]:
    """Draw ``texts`` with installed fallback fonts for the characters the default font lacks.

    Characters that no installed font has are named in one note instead of
    matplotlib's warning per glyph. Costs nothing when the default font has
    every character.
    """
    texts = [str(text) for text in texts]
    missing = _chars_missing_from_default_font(texts)
    if not missing:
        yield
        return
    fallbacks, unavailable = _installed_fallback_families(missing)
    _note_missing_glyphs(texts, unavailable)
    families = list(rcParams["font.family"]) + list(fallbacks)
    with rc_context({"font.family": families}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_GLYPH_WARNING)
        yield


# --------------------------------------------------------------------------
# Tick labels
# --------------------------------------------------------------------------


def _shorten_middle(name: str, limit: int) -> str:
    """``name`` cut to ``limit`` characters by an ellipsis in the middle, keeping its head and tail."""
    if len(name) <= limit:
        return name
    tail = (limit - 1) // 2
    head = limit - 1 - tail
    return f"{name[:head]}…{name[-tail:]}"


def _colliding_shortened(labels: list[str], names: list[str]) -> list[int]:
    """Positions of shortened labels that equal the label of a different name."""
    names_by_label: dict[str, set[str]] = {}
    for label, name in zip(labels, names):
        names_by_label.setdefault(label, set()).add(name)
    return [position for position, (label, name) in enumerate(zip(labels, names))
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
    labels = [_shorten_middle(name, limit) for name in names]
    while colliding := _colliding_shortened(labels, names):
        for position in colliding:
            limits[position] += LABEL_GROWTH_CHARS
            labels[position] = _shorten_middle(names[position], limits[position])
    return labels


# --------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------


def _check_history(history: Sequence[dict]) -> None:
    """Raise ValueError if there is nothing to plot."""
    if len(history) == 0:
        raise ValueError("history is empty: nothing to plot")


def _column(history: Sequence[dict], key: str, scale: float = 1.0) -> list[float]:
    """One metric across epochs; missing or None values become NaN (a gap)."""
    values = []
    for row in history:
        value = row.get(key)
        values.append(float("nan") if value is None else float(value) * scale)
    return values


def _epochs(history: Sequence[dict]) -> list[int]:
    """The 1-based epoch numbers of ``history``."""
    return [int(row["epoch"]) for row in history]


def _best_label(history: Sequence[dict], best_epoch: int) -> str:
    """Legend text for the best epoch, with its validation accuracy if known."""
    for row in history:
        if int(row["epoch"]) == best_epoch and row.get("val_acc") is not None:
            return f"best val acc: {float(row['val_acc']) * 100:.1f}% @ epoch {best_epoch}"
    return f"best @ epoch {best_epoch}"


class Curve(NamedTuple):
    """One series of a training-curve plot: its legend label, its values per epoch (NaN: none) and its look."""

    label: str
    values: list[float]
    color: str
    linestyle: str = "-"


def _has_values(values: Sequence[float]) -> bool:
    """True when at least one value is a number (a series of NaN has nothing to draw)."""
    return bool(np.isfinite(np.asarray(values, dtype=float)).any())


def _curves(history: Sequence[dict], metric: str, scale: float = 1.0) -> list[Curve]:
    """The train, val and EMA val (``--ema``) series of ``metric`` (``loss`` or ``acc``) that have values.

    A run that validated nothing (``--train-on-all``) has only its train series;
    the EMA series exists only when the history has ``ema_val_*`` columns.
    """
    curves = [Curve("train", _column(history, f"train_{metric}", scale), TRAIN_COLOR),
              Curve("val", _column(history, f"val_{metric}", scale), VAL_COLOR),
              Curve("val (EMA weights)", _column(history, f"ema_val_{metric}", scale), EMA_COLOR, "--")]
    return [curve for curve in curves if _has_values(curve.values)]


def _val_values(curves: Sequence[Curve]) -> list[float] | None:
    """The values of the val curve, or None when nothing was validated."""
    return next((curve.values for curve in curves if curve.label == "val"), None)


def _draw_curves(ax: Axes, epochs: list[int], curves: Sequence[Curve]) -> None:
    """Plot each series with its label; markers when points are few."""
    marker = "o" if len(epochs) <= 30 else None
    for curve in curves:
        ax.plot(epochs, curve.values, color=curve.color, linestyle=curve.linestyle, marker=marker, markersize=5,
                label=curve.label)


def _curve_title(name: str, curves: Sequence[Curve]) -> str:
    """``name``, saying so when nothing was validated (``--train-on-all``) so the lone train curve is no surprise."""
    return name if _val_values(curves) is not None else f"{name} (training only: nothing validated)"


def _mark_epochs(
    ax: Axes,
    history: Sequence[dict],
    val: list[float] | None,
    best_epoch: int | None,
    stopped_epoch: int | None,
) -> None:
    """Draw the best-epoch line (plus a star on the val curve) and the early-stop line.

    Without a val curve (``val`` None: nothing was validated) there is no best epoch to mark.
    """
    epochs = _epochs(history)
    if best_epoch is not None and val is not None:
        ax.axvline(best_epoch, color=BEST_COLOR, linestyle=":", linewidth=1.5,
                   label=_best_label(history, best_epoch))
        if best_epoch in epochs:
            # Drawn under the curves so the val point stays visible in the star's centre.
            ax.plot(best_epoch, val[epochs.index(best_epoch)], marker="*", markersize=16,
                    color=BEST_COLOR, markeredgecolor="black", linestyle="none", zorder=1.5)
    if stopped_epoch is not None:
        ax.axvline(stopped_epoch, color=STOP_COLOR, linestyle="--", linewidth=1.2,
                   label=f"early stop @ epoch {stopped_epoch}")


def _set_epoch_axis(ax: Axes, epochs: list[int], best_epoch: int | None, stopped_epoch: int | None) -> None:
    """Integer epoch ticks, with limits wide enough for every point and line."""
    xs = epochs + [e for e in (best_epoch, stopped_epoch) if e is not None]
    lo, hi = min(xs), max(xs)
    pad = max(0.5, 0.03 * (hi - lo))  # a lone epoch would otherwise give a zero-width axis
    ax.set_xlim(lo - pad, hi + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)


def _draw_learning_rate(ax: Axes, history: Sequence[dict]) -> Axes | None:
    """Learning rate on a secondary y-axis; None when the history has no lr."""
    lrs = _column(history, "lr")
    finite = [v for v in lrs if np.isfinite(v)]
    if not finite:
        return None
    lr_ax = ax.twinx()
    marker = "." if len(lrs) <= 30 else None
    lr_ax.plot(_epochs(history), lrs, color=LR_COLOR, linewidth=1.2, marker=marker,
               markersize=4, label="learning rate", zorder=1)
    if min(finite) > 0 and max(finite) / min(finite) > 10:
        lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate", color=LR_COLOR)
    lr_ax.tick_params(axis="y", colors=LR_COLOR)
    lr_ax.spines["right"].set_color(LR_COLOR)
    return lr_ax


# Past this many characters a legend label needs a wider column: two columns, not three.
LONG_LEGEND_LABEL = 36


def _legend_below(ax: Axes, *extra_axes: Axes | None) -> None:
    """One legend for all axes, under the plot so it never hides a curve."""
    handles, labels = ax.get_legend_handles_labels()
    for other in extra_axes:
        if other is not None:
            more_handles, more_labels = other.get_legend_handles_labels()
            handles += more_handles
            labels += more_labels
    columns = 2 if max(map(len, labels), default=0) > LONG_LEGEND_LABEL else 3
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=min(len(labels), columns), frameon=False, fontsize=9)


class LossAxisRange(NamedTuple):
    """y limits for a loss plot, and the losses above ``top`` that are drawn clipped at the top edge."""

    bottom: float
    top: float
    outliers: list[float]


def loss_axis_range(values: Sequence[float]) -> LossAxisRange | None:
    """y limits that keep the bulk of the losses readable when a few are far above the rest.

    Losses over ``LOSS_OUTLIER_FACTOR`` times the median are left out of the
    range, which spans the other losses plus a band on top for the outlier
    markers. None when no loss is that far out: matplotlib's usual range then
    applies. NaN (missing) values are ignored.
    """
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    median = float(np.median(finite)) if finite.size else 0.0
    if median <= 0 or not (finite > LOSS_OUTLIER_FACTOR * median).any():
        return None
    inliers = finite[finite <= LOSS_OUTLIER_FACTOR * median]
    low, high = float(inliers.min()), float(inliers.max())
    span = high - low or abs(high)
    top = high + 0.12 * span  # headroom for the outlier markers and their values
    return LossAxisRange(bottom=low - 0.05 * span, top=top, outliers=sorted(finite[finite > top].tolist()))


# Values listed in a legend entry for the losses drawn above the axis, before "and N more".
MAX_OFF_SCALE_VALUES = 4


def _mark_clipped(ax: Axes, epochs: list[int], curve: Curve, top: float, shifts: dict[int, float]) -> None:
    """Draw ``curve``'s losses above ``top`` as triangles on the top edge, moved sideways by ``shifts`` (points, by
    epoch) where other curves are clipped too; their values go in the legend, where nothing crowds them."""
    points = [(epoch, value) for epoch, value in zip(epochs, curve.values) if value > top]
    for index, (epoch, _) in enumerate(points):
        sideways = transforms.offset_copy(ax.transData, fig=ax.figure, x=shifts.get(epoch, 0.0), y=0, units="points")
        ax.plot(epoch, top, marker="^", markersize=8, color=curve.color, markeredgecolor="black", linestyle="none",
                clip_on=False, zorder=3, transform=sideways,
                label=off_scale_label(curve.label, points) if index == 0 else "_nolegend_")


def off_scale_label(name: str, points: Sequence[tuple[int, float]]) -> str:
    """'val above the axis: 55 (epoch 1), 30 (2)': the losses drawn clipped, with their epochs."""
    shown = [f"{value:.3g} ({'epoch ' if index == 0 else ''}{epoch})"
             for index, (epoch, value) in enumerate(points[:MAX_OFF_SCALE_VALUES])]
    more = f" and {len(points) - MAX_OFF_SCALE_VALUES} more" if len(points) > MAX_OFF_SCALE_VALUES else ""
    return f"{name} above the axis: {', '.join(shown)}{more}"


def _clip_loss_outliers(ax: Axes, epochs: list[int], curves: Sequence[Curve]) -> bool:
    """Limit the y axis to the typical losses when a few are far above them (see :func:`loss_axis_range`); True
    when it did."""
    limits = loss_axis_range([value for curve in curves for value in curve.values])
    if limits is None:
        return False
    ax.set_ylim(limits.bottom, limits.top)
    above = [[epoch for epoch, value in zip(epochs, curve.values) if value > limits.top] for curve in curves]
    for curve, epochs_above in zip(curves, above):
        shifts = {}
        for epoch in epochs_above:  # side by side, 6 points apart, where several curves are clipped at one epoch
            sharing = [index for index, others in enumerate(above) if epoch in others]
            shifts[epoch] = (sharing.index(curves.index(curve)) - (len(sharing) - 1) / 2) * 6
        _mark_clipped(ax, epochs, curve, limits.top, shifts)
    return True


def _keep_under_top_band(ax: Axes, share: float = LR_HEIGHT_UNDER_CLIPPED) -> None:
    """Raise ``ax``'s top limit so its line stays in the lower ``share`` of the plot, clear of the losses drawn on
    the top edge."""
    log = ax.get_yscale() == "log"
    bottom, top = (np.log10(limit) for limit in ax.get_ylim()) if log else ax.get_ylim()
    raised = bottom + (top - bottom) / share
    ax.set_ylim(ax.get_ylim()[0], 10**raised if log else raised)


def plot_loss_curve(
    history: list[dict],
    path: str | Path,
    best_epoch: int | None = None,
    stopped_epoch: int | None = None,
) -> None:
    """Save train/val loss per epoch, with the learning rate on a secondary axis.

    ``history`` holds one dict per epoch with keys ``epoch``, ``train_loss``,
    ``val_loss`` and ``lr``, plus ``ema_val_loss`` with ``--ema`` (drawn as its
    own dashed line); other keys are ignored. ``best_epoch`` adds a dotted line
    labelled with that epoch's validation accuracy; ``stopped_epoch`` adds a
    dashed "early stop" line. Without validation values (``--train-on-all``)
    only the train curve is drawn, with no val legend entry and no best epoch.
    Losses far above the rest (a fresh head's first epochs) are marked at the
    top edge with their value instead of stretching the axis, see
    :func:`loss_axis_range`.
    """
    _check_history(history)
    epochs = _epochs(history)
    curves = _curves(history, "loss")
    val = _val_values(curves)
    best_epoch = best_epoch if val is not None else None
    with _figure((8, 5)) as fig:
        ax = fig.add_subplot()
        _draw_curves(ax, epochs, curves)
        _mark_epochs(ax, history, val, best_epoch, stopped_epoch)
        _set_epoch_axis(ax, epochs, best_epoch, stopped_epoch)
        clipped = _clip_loss_outliers(ax, epochs, curves)
        lr_ax = _draw_learning_rate(ax, history)
        if clipped and lr_ax is not None:
            _keep_under_top_band(lr_ax)
        ax.set_zorder(2)  # curves above the lr line, but keep the lr axis' background invisible
        ax.patch.set_visible(False)
        ax.set_ylabel("loss")
        ax.set_title(_curve_title("Loss", curves))
        _legend_below(ax, lr_ax)
        _save_figure(fig, path)


def plot_accuracy_curve(
    history: list[dict],
    path: str | Path,
    best_epoch: int | None = None,
    stopped_epoch: int | None = None,
) -> None:
    """Save train/val accuracy (in percent) per epoch.

    ``history`` holds one dict per epoch with keys ``epoch``, ``train_acc`` and
    ``val_acc`` (fractions in 0..1), plus ``ema_val_acc`` with ``--ema`` (drawn
    as its own dashed line). ``best_epoch`` adds a dotted line and a star on the
    validation curve; ``stopped_epoch`` adds a dashed "early stop" line.
    Without validation values (``--train-on-all``) only the train curve is
    drawn, with no val legend entry and no best epoch.
    """
    _check_history(history)
    epochs = _epochs(history)
    curves = _curves(history, "acc", scale=100.0)
    val = _val_values(curves)
    best_epoch = best_epoch if val is not None else None
    with _figure((8, 5)) as fig:
        ax = fig.add_subplot()
        _draw_curves(ax, epochs, curves)
        _mark_epochs(ax, history, val, best_epoch, stopped_epoch)
        _set_epoch_axis(ax, epochs, best_epoch, stopped_epoch)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
        ax.set_ylabel("accuracy")
        ax.set_title(_curve_title("Accuracy", curves))
        _legend_below(ax)
        _save_figure(fig, path)


# --------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------


def normalize_confusion(confusion: np.ndarray) -> np.ndarray:
    """Divide each row (true class) of a count matrix by its sum.

    Rows with no samples stay all zero instead of becoming NaN. Returns a new
    float array of the same shape.
    """
    counts = np.asarray(confusion, dtype=float)
    if counts.ndim != 2:
        raise ValueError(f"confusion must be 2-D, got shape {counts.shape}")
    row_sums = counts.sum(axis=1, keepdims=True)
    normalized = np.zeros_like(counts)
    np.divide(counts, row_sums, out=normalized, where=row_sums > 0)
    return normalized


def _accuracy_text(counts: np.ndarray) -> str:
    """Overall accuracy from raw counts, e.g. 'accuracy 87.3%'."""
    if counts.sum() <= 0:
        return "accuracy n/a (no samples)"
    return f"accuracy {metrics.accuracy(counts):.1%}"


def _matrix_side_inches(num_classes: int) -> float:
    """Side of the square matrix axes: grows with the class count, within limits."""
    return max(6.0, min(num_classes * 0.22, 30.0))


def _cell_text(value: float, num_classes: int) -> str:
    """Percent text for one cell: '87.5%' when cells are roomy, else just '88'."""
    percent = value * 100
    if num_classes <= 10:
        return f"{percent:.1f}%"
    return "<1" if 0 < percent < 0.5 else f"{percent:.0f}"


def _annotate_cells(
    ax: Axes, normalized: np.ndarray, counts: np.ndarray, image: AxesImage, cell_points: float
) -> None:
    """Write each non-empty cell's percentage, white on dark cells and black on light ones."""
    num_classes = normalized.shape[0]
    fontsize = min(10.0, 0.45 * cell_points)
    for (row, col), value in np.ndenumerate(normalized):
        if counts[row, col] == 0:
            continue  # blank zero cells keep the actual confusions easy to spot
        r, g, b, _ = image.cmap(image.norm(value))
        luminance = 0.299 * r + 0.587 * g + 0.114 * b
        ax.text(col, row, _cell_text(value, num_classes), ha="center", va="center",
                fontsize=fontsize, color="white" if luminance < 0.5 else "black")


def _label_axes(ax: Axes, labels: list[str], row_support: np.ndarray, cell_points: float) -> None:
    """Every class as a tick on both axes, font and rotation scaled to the class count."""
    num_classes = len(labels)
    fontsize = max(4.0, min(10.0, 0.6 * cell_points))
    # An all-blank row would otherwise look like a plotting bug.
    row_labels = [f"{label} (n=0)" if n == 0 else label for label, n in zip(labels, row_support)]
    ticks = np.arange(num_classes)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    if num_classes > VERTICAL_LABELS_ABOVE:
        ax.set_xticklabels(labels, rotation=90, fontsize=fontsize)
    else:
        ax.set_xticklabels(labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=fontsize)
    ax.set_yticklabels(row_labels, fontsize=fontsize)
    ax.set_xlabel("Predicted class", fontsize=11)
    ax.set_ylabel("True class", fontsize=11)
    ax.tick_params(length=2)
    if num_classes > MAX_CLASSES_WITH_CELL_TEXT:
        # On a big grid the bottom labels are far from the top rows: repeat them above.
        ax.tick_params(top=True, labeltop=True)


def _check_confusion(confusion: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """``confusion`` as an array, after checking it is (K, K) with K >= 1 and has K class names."""
    counts = np.asarray(confusion)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ValueError(f"confusion must be square (K, K) with K >= 1, got shape {counts.shape}")
    if len(class_names) != counts.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {counts.shape[0]}-class confusion matrix")
    return counts


def _check_order(order: Sequence[int], num_classes: int) -> list[int]:
    """``order`` as a list, after checking it is a permutation of 0..K-1."""
    order = [int(index) for index in order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"order must be a permutation of 0..{num_classes - 1}")
    return order


def _with_grouping_note(title: str, order: list[int]) -> str:
    """``title`` plus ", classes grouped by confusion" when ``order`` is not folder order, unless it says so already."""
    if order == sorted(order) or GROUPED_BY_CONFUSION in title:
        return title
    return f"{title}, {GROUPED_BY_CONFUSION}"


def _confusion_cmap() -> Colormap:
    """The heat-map colours, with masked (zero-count) cells pure white."""
    return colormaps[CONFUSION_CMAP].with_extremes(bad="white")


def _confusion_norm(num_classes: int) -> Normalize:
    """Linear shares while cells carry their numbers; a square-root scale once they do not."""
    if num_classes <= MAX_CLASSES_WITH_CELL_TEXT:
        return Normalize(vmin=0.0, vmax=1.0)
    return PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)


def _colorbar_ticks(num_classes: int) -> list[float]:
    """Colour-bar ticks; denser at the low end on the square-root scale, where it is stretched."""
    if num_classes <= MAX_CLASSES_WITH_CELL_TEXT:
        return [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    return [0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0]


def _draw_confusion(fig: Figure, counts: np.ndarray, labels: list[str], title: str) -> None:
    """The heat map of ``counts`` (already in display order) with its colour bar, tick labels and title."""
    num_classes = counts.shape[0]
    normalized = normalize_confusion(counts)
    side = fig.get_figwidth()
    cell_points = side * 72 / num_classes
    # Fixed axes geometry; labels and title spill outside and are kept by
    # bbox_inches="tight", so long class names never squash the matrix.
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    colorbar_ax = fig.add_axes((1.0 + 0.2 / side, 0.0, 0.3 / side, 1.0))
    image = ax.imshow(np.ma.masked_where(counts == 0, normalized), cmap=_confusion_cmap(),
                      norm=_confusion_norm(num_classes), interpolation="nearest")
    colorbar = fig.colorbar(image, cax=colorbar_ax, format=PercentFormatter(xmax=1.0, decimals=0))
    colorbar.set_ticks(_colorbar_ticks(num_classes))
    colorbar.set_label("share of true class", fontsize=11)
    _label_axes(ax, labels, counts.sum(axis=1), cell_points)
    if num_classes <= MAX_CLASSES_WITH_CELL_TEXT:
        _annotate_cells(ax, normalized, counts, image, cell_points)
    ax.set_title(title, fontsize=13, pad=12)


def plot_confusion_matrix(
    confusion: np.ndarray,
    class_names: list[str],
    path: str | Path,
    title: str = DEFAULT_CONFUSION_TITLE,
    order: Sequence[int] | None = None,
) -> list[int]:
    """Save the row-normalized confusion matrix as a heat map; return the class order drawn.

    ``confusion`` is a (K, K) matrix of raw counts indexed [true, predicted];
    ``class_names`` gives the K class names in index order. The classes are
    drawn in :func:`auto_class_order` (folder order up to 30 classes, grouped by
    confusion beyond, which the title then says), so every caller draws the
    same model the same way; ``order`` (a permutation of 0..K-1) overrides it.
    The overall accuracy is appended to ``title``. The figure grows with K;
    cell percentages are written only while K <= 30, and past that the colour
    scale is a square root so that 2-10% confusions still show. Zero cells are
    left white, true classes without samples get an "(n=0)" label, and long
    names are shortened (see :func:`shorten_labels`).
    """
    counts = _check_confusion(confusion, class_names)
    if order is None:
        order = auto_class_order(counts)
        title = _with_grouping_note(title, order)
    else:
        order = _check_order(order, counts.shape[0])
    counts = counts[np.ix_(order, order)]
    labels = shorten_labels([class_names[index] for index in order])
    title = f"{title} — {_accuracy_text(counts)}"
    side = _matrix_side_inches(counts.shape[0])
    with _figure((side, side), texts=[title, *labels]) as fig:
        _draw_confusion(fig, counts, labels, title)
        _save_figure(fig, path)
    return order


# --------------------------------------------------------------------------
# Class order for large confusion matrices
# --------------------------------------------------------------------------


def auto_class_order(confusion: np.ndarray) -> list[int]:
    """The order to draw classes in: folder order up to 30 classes, confusion clusters beyond.

    Up to 30 classes every cell carries its number and the folder order is the
    one readers know. Beyond that, mistakes scattered over a 100 x 100 grid are
    hard to pair up by eye, so :func:`confusion_cluster_order` pulls classes
    that are mistaken for each other next to one another, turning confusions
    into blocks along the diagonal. (Sorting by recall would rank the weak
    classes, which ``per_class.csv`` already does, but would scatter their
    confusions.)
    """
    num_classes = np.asarray(confusion).shape[0]
    if num_classes <= MAX_CLASSES_WITH_CELL_TEXT:
        return list(range(num_classes))
    return confusion_cluster_order(confusion)


def confusion_cluster_order(confusion: np.ndarray) -> list[int]:
    """Class indices ordered so that classes mistaken for each other sit side by side.

    Classes are linked when either is ever predicted as the other. Each group
    of linked classes is ordered by average-linkage clustering of the symmetric
    confusion shares, with optimal leaf ordering so the most confused
    neighbours touch. Groups, single classes included, are laid out by their
    lowest class index, so classes that are never confused keep folder order.
    """
    similarity = _confusion_similarity(confusion)
    num_groups, group_of = connected_components(similarity > 0, directed=False)
    groups = sorted((np.flatnonzero(group_of == group) for group in range(num_groups)), key=min)
    return [int(members[position]) for members in groups
            for position in _leaf_order(similarity[np.ix_(members, members)])]


def _confusion_similarity(confusion: np.ndarray) -> np.ndarray:
    """For each pair of classes, the mean of the share of each mistaken for the other; zero diagonal."""
    shares = normalize_confusion(confusion)
    similarity = (shares + shares.T) / 2
    np.fill_diagonal(similarity, 0.0)
    return similarity


def _leaf_order(similarity: np.ndarray) -> list[int]:
    """Positions 0..n-1 in the leaf order of the optimally ordered average-linkage tree, lower end first."""
    if len(similarity) <= 2:
        return list(range(len(similarity)))
    distance = 1.0 - similarity  # shares are at most 1, so distances stay in 0..1
    np.fill_diagonal(distance, 0.0)
    condensed = squareform(distance)
    tree = optimal_leaf_ordering(linkage(condensed, method="average"), condensed)
    leaves = [int(leaf) for leaf in leaves_list(tree)]
    return leaves if leaves[0] < leaves[-1] else leaves[::-1]


# --------------------------------------------------------------------------
# Image grids (misclassified examples)
# --------------------------------------------------------------------------

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
    shortened in the middle (as :func:`shorten_labels` does) as little as needed to wrap onto that many."""
    if _text_width(line, font) <= width:
        return [line]
    pieces = _wrap_to_width(line, width, font)
    if len(pieces) <= CAPTION_MAX_WRAPS:
        return pieces
    # The longest middle-shortened form ("a…z" at least) that wraps onto few enough lines.
    low, high = 3, len(line) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if len(_wrap_to_width(_shorten_middle(line, middle), width, font)) <= CAPTION_MAX_WRAPS:
            low = middle
        else:
            high = middle - 1
    return _wrap_to_width(_shorten_middle(line, low), width, font)


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
    with _figure((1.0, 1.0), texts=[title, *captions]) as fig:
        layout = fit_captions(captions, CAPTION_WIDTH_INCHES * 72)
        cell_width = GRID_IMAGE_INCHES + GRID_GAP_INCHES
        cell_height = _caption_inches(layout) + CAPTION_SPACE_INCHES + GRID_IMAGE_INCHES + GRID_GAP_INCHES
        width, height = columns * cell_width, GRID_TITLE_INCHES + rows * cell_height
        fig.set_size_inches(width, height)
        for position, (image, caption) in enumerate(zip(images, layout.captions)):
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
        _save_figure(fig, path)


def _plot_message(path: str | Path, title: str, message: str) -> None:
    """A small figure holding just a title and a message."""
    with _figure((6, 1.6), texts=[title, message]) as fig:
        fig.suptitle(title, fontsize=12)
        fig.text(0.5, 0.4, message, ha="center", va="center", fontsize=11, color="0.3")
        _save_figure(fig, path)


def save_final_plots(progress: Any, stopped_epoch: int | None, class_names: list[str], output_dir: Path) -> None:
    """A run's loss and accuracy curves, and its best model's normalized confusion matrix on val (``progress``: the
    run's ``resume.Progress``)."""
    plot_loss_curve(progress.history, output_dir / "loss_curve.png", progress.best_epoch, stopped_epoch)
    plot_accuracy_curve(progress.history, output_dir / "accuracy_curve.png", progress.best_epoch, stopped_epoch)
    if not progress.best_targets:  # --train-on-all: no validation predictions
        return
    matrix = metrics.confusion_matrix(progress.best_targets, progress.best_predictions, len(class_names))
    plot_confusion_matrix(matrix, class_names, output_dir / "confusion_matrix.png")


# --------------------------------------------------------------------------
# Calibration and the training batch
# --------------------------------------------------------------------------


UNCALIBRATED_COLOR = "tab:orange"
CALIBRATED_COLOR = "tab:blue"
DIAGONAL_COLOR = "0.45"
COUNT_ALPHA = 0.22  # the bin counts are context, drawn light behind the curves
COUNT_AXIS_HEADROOM = 3.0  # the tallest count bar reaches a third of the way up
BATCH_PICTURE_LIMIT = 32
BATCH_CAPTION_CHARS = 24


def _reliability_curve(ax: Axes, bins: calibration.ReliabilityBins, color: str, label: str) -> None:
    """Accuracy against mean confidence of the filled bins, as points joined by a line."""
    filled = bins.counts > 0
    ax.plot(bins.confidence[filled], bins.accuracy[filled], "o-", color=color, markersize=4, linewidth=1.6,
            label=label, zorder=3)


def _bin_counts(ax: Axes, curves: Sequence[tuple[calibration.ReliabilityBins, str]]) -> None:
    """Each curve's images per bin as light bars, side by side within the bin, on their own axis at the right."""
    edges = curves[0][0].edges
    width = np.diff(edges) / len(curves)
    for index, (bins, color) in enumerate(curves):
        ax.bar(edges[:-1] + index * width, bins.counts, width=width, align="edge", color=color, alpha=COUNT_ALPHA,
               linewidth=0)
    ax.set_ylim(0, max(1, max(bins.counts.max() for bins, _ in curves)) * COUNT_AXIS_HEADROOM)
    ax.set_ylabel("images per bin", color="0.4")
    ax.tick_params(axis="y", colors="0.4")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))


def plot_reliability_diagram(
    before: calibration.ReliabilityBins,
    after: calibration.ReliabilityBins | None,
    temperature: float,
    path: str | Path,
    title: str = "Reliability diagram",
) -> None:
    """Save accuracy per confidence bin against the diagonal of perfect calibration, for the probabilities as the
    model gave them (``before``, T = 1) and divided by ``temperature`` (``after``; None: not calibrated), the
    expected calibration error of each in the legend and the images per bin as a light histogram behind."""
    curves = [(before, UNCALIBRATED_COLOR, f"uncalibrated (T = 1): ECE {calibration.calibration_error(before):.1%}")]
    if after is not None:
        curves.append((after, CALIBRATED_COLOR,
                       f"calibrated (T = {temperature:.2f}): ECE {calibration.calibration_error(after):.1%}"))
    with _figure((6.5, 6.0), texts=[title]) as fig:
        ax = fig.add_subplot()
        counts_ax = ax.twinx()
        _bin_counts(counts_ax, [(bins, color) for bins, color, _ in curves])
        ax.set_zorder(counts_ax.get_zorder() + 1)  # the curves in front of the bars
        ax.patch.set_visible(False)
        ax.plot([0, 1], [0, 1], linestyle="--", color=DIAGONAL_COLOR, linewidth=1, label="perfect calibration")
        for bins, color, label in curves:
            _reliability_curve(ax, bins, color, label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.xaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
        ax.set_xlabel(f"confidence (top probability; {len(before.counts)} bins)")
        ax.set_ylabel("accuracy")
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.25)
        _legend_below(ax)
        _save_figure(fig, path)


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
    names = shorten_labels(class_names, BATCH_CAPTION_CHARS)
    captions = [names[int(label)] for label in labels[:shown]]
    title = (f"The first training batch, as the model sees it (augmented): {shown} of {batch_images} images"
             if shown < batch_images else f"The first training batch, as the model sees it (augmented): {shown} images")
    plot_image_grid(list(pictures[:shown]), captions, path, title)
