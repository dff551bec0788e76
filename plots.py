"""Training figures: loss and accuracy curves, and the confusion matrix.

Figures are built with matplotlib's object API (``Figure``, never pyplot), so
drawing them works on headless machines and never changes the plotting backend
of a notebook that imports ``train``. Each figure is written to a temporary file
in the destination folder and then moved into place with ``os.replace``, so a
crash mid-write never leaves a truncated image behind; the figure is
not kept by pyplot, so long training runs do not leak memory.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator, PercentFormatter

DPI = 130
TRAIN_COLOR = "tab:blue"
VAL_COLOR = "tab:orange"
BEST_COLOR = "tab:green"
STOP_COLOR = "tab:red"
LR_COLOR = "0.55"  # grey: the learning rate is context, not the story
CONFUSION_CMAP = "Blues"

# Per-cell numbers are only legible up to this many classes.
MAX_CLASSES_WITH_CELL_TEXT = 30
# Past this many classes the x tick labels are turned fully vertical: at 45°
# neighbouring labels already touch once the cells get narrow.
VERTICAL_LABELS_ABOVE = 15
# Longer class names are shortened so one odd folder name cannot swamp the plot.
MAX_LABEL_CHARS = 32


# --------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------


@contextmanager
def _figure(figsize: tuple[float, float]) -> Iterator[Figure]:
    """Yield a new stand-alone figure (not registered with pyplot) and free its artists afterwards."""
    fig = Figure(figsize=figsize)
    try:
        yield fig
    finally:
        fig.clear()


def _save_atomically(fig: Figure, path: str | Path) -> None:
    """Save ``fig`` to ``path`` via a temporary file in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_format = path.suffix.lstrip(".").lower() or "png"
    # A plain open() (not mkstemp) so the file gets the usual umask permissions.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            fig.savefig(f, format=image_format, dpi=DPI, bbox_inches="tight", pad_inches=0.15)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def _draw_train_val(ax: Axes, epochs: list[int], train: list[float], val: list[float]) -> None:
    """Plot the train and validation series; markers when points are few."""
    marker = "o" if len(epochs) <= 30 else None
    ax.plot(epochs, train, color=TRAIN_COLOR, marker=marker, markersize=5, label="train")
    ax.plot(epochs, val, color=VAL_COLOR, marker=marker, markersize=5, label="val")


def _mark_epochs(
    ax: Axes,
    history: Sequence[dict],
    val: list[float],
    best_epoch: int | None,
    stopped_epoch: int | None,
) -> None:
    """Draw the best-epoch line (plus a star on the val curve) and the early-stop line."""
    epochs = _epochs(history)
    if best_epoch is not None:
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


def _legend_below(ax: Axes, *extra_axes: Axes | None) -> None:
    """One legend for all axes, under the plot so it never hides a curve."""
    handles, labels = ax.get_legend_handles_labels()
    for other in extra_axes:
        if other is not None:
            more_handles, more_labels = other.get_legend_handles_labels()
            handles += more_handles
            labels += more_labels
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=min(len(labels), 3), frameon=False, fontsize=9)


def plot_loss_curve(
    history: list[dict],
    path: str | Path,
    best_epoch: int | None = None,
    stopped_epoch: int | None = None,
) -> None:
    """Save train/val loss per epoch, with the learning rate on a secondary axis.

    ``history`` holds one dict per epoch with keys ``epoch``, ``train_loss``,
    ``val_loss`` and ``lr`` (other keys are ignored). ``best_epoch`` adds a
    dotted line labelled with that epoch's validation accuracy;
    ``stopped_epoch`` adds a dashed "early stop" line.
    """
    _check_history(history)
    epochs = _epochs(history)
    val = _column(history, "val_loss")
    with _figure((8, 5)) as fig:
        ax = fig.add_subplot()
        _draw_train_val(ax, epochs, _column(history, "train_loss"), val)
        _mark_epochs(ax, history, val, best_epoch, stopped_epoch)
        _set_epoch_axis(ax, epochs, best_epoch, stopped_epoch)
        lr_ax = _draw_learning_rate(ax, history)
        ax.set_zorder(2)  # curves above the lr line, but keep the lr axis' background invisible
        ax.patch.set_visible(False)
        ax.set_ylabel("loss")
        ax.set_title("Loss")
        _legend_below(ax, lr_ax)
        _save_atomically(fig, path)


def plot_accuracy_curve(
    history: list[dict],
    path: str | Path,
    best_epoch: int | None = None,
    stopped_epoch: int | None = None,
) -> None:
    """Save train/val accuracy (in percent) per epoch.

    ``history`` holds one dict per epoch with keys ``epoch``, ``train_acc`` and
    ``val_acc`` (fractions in 0..1). ``best_epoch`` adds a dotted line and a
    star on the validation curve; ``stopped_epoch`` adds a dashed "early stop"
    line.
    """
    _check_history(history)
    epochs = _epochs(history)
    val = _column(history, "val_acc", scale=100.0)
    with _figure((8, 5)) as fig:
        ax = fig.add_subplot()
        _draw_train_val(ax, epochs, _column(history, "train_acc", scale=100.0), val)
        _mark_epochs(ax, history, val, best_epoch, stopped_epoch)
        _set_epoch_axis(ax, epochs, best_epoch, stopped_epoch)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
        ax.set_ylabel("accuracy")
        ax.set_title("Accuracy")
        _legend_below(ax)
        _save_atomically(fig, path)


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
    total = counts.sum()
    if total <= 0:
        return "accuracy n/a (no samples)"
    return f"accuracy {np.trace(counts) / total:.1%}"


def _matrix_side_inches(num_classes: int) -> float:
    """Side of the square matrix axes: grows with the class count, within limits."""
    return max(6.0, min(num_classes * 0.22, 30.0))


def _shorten(name: str) -> str:
    """Clip very long class names with an ellipsis."""
    name = str(name)
    return name if len(name) <= MAX_LABEL_CHARS else name[: MAX_LABEL_CHARS - 1] + "…"


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


def _label_axes(ax: Axes, class_names: list[str], row_support: np.ndarray, cell_points: float) -> None:
    """Every class as a tick on both axes, font and rotation scaled to the class count."""
    num_classes = len(class_names)
    fontsize = max(4.0, min(10.0, 0.6 * cell_points))
    labels = [_shorten(name) for name in class_names]
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


def plot_confusion_matrix(
    confusion: np.ndarray,
    class_names: list[str],
    path: str | Path,
    title: str = "Confusion matrix (normalized by true class)",
) -> None:
    """Save the row-normalized confusion matrix as a heat map.

    ``confusion`` is a (K, K) matrix of raw counts indexed [true, predicted];
    ``class_names`` gives the K tick labels in index order. The overall
    accuracy (from the raw counts) is appended to ``title``. The figure grows
    with K; cell percentages are written only while K <= 30 (blank cells are
    zero counts), and true classes without samples get an "(n=0)" label.
    """
    counts = np.asarray(confusion)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ValueError(f"confusion must be square (K, K) with K >= 1, got shape {counts.shape}")
    num_classes = counts.shape[0]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-class confusion matrix")
    normalized = normalize_confusion(counts)

    side = _matrix_side_inches(num_classes)
    cell_points = side * 72 / num_classes
    with _figure((side, side)) as fig:
        # Fixed axes geometry; labels and title spill outside and are kept by
        # bbox_inches="tight", so long class names never squash the matrix.
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
        colorbar_ax = fig.add_axes((1.0 + 0.2 / side, 0.0, 0.3 / side, 1.0))
        image = ax.imshow(normalized, cmap=CONFUSION_CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
        colorbar = fig.colorbar(image, cax=colorbar_ax, format=PercentFormatter(xmax=1.0, decimals=0))
        colorbar.set_label("share of true class", fontsize=11)
        _label_axes(ax, [str(name) for name in class_names], counts.sum(axis=1), cell_points)
        if num_classes <= MAX_CLASSES_WITH_CELL_TEXT:
            _annotate_cells(ax, normalized, counts, image, cell_points)
        ax.set_title(f"{title} — {_accuracy_text(counts)}", fontsize=13, pad=12)
        _save_atomically(fig, path)
