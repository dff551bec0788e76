"""Figures: loss and accuracy curves, the confusion matrix (with a class order for many classes), image grids.

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
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize, PowerNorm
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
    if num_classes > MAX_CLASSES_WITH_CELL_TEXT:
        # On a big grid the bottom labels are far from the top rows: repeat them above.
        ax.tick_params(top=True, labeltop=True)


def _check_order(order: Sequence[int], num_classes: int) -> list[int]:
    """``order`` as a list, after checking it is a permutation of 0..K-1."""
    order = [int(index) for index in order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"order must be a permutation of 0..{num_classes - 1}")
    return order


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


def plot_confusion_matrix(
    confusion: np.ndarray,
    class_names: list[str],
    path: str | Path,
    title: str = "Confusion matrix (normalized by true class)",
    order: Sequence[int] | None = None,
) -> None:
    """Save the row-normalized confusion matrix as a heat map.

    ``confusion`` is a (K, K) matrix of raw counts indexed [true, predicted];
    ``class_names`` gives the K tick labels in index order. ``order`` (a
    permutation of 0..K-1, e.g. from :func:`auto_class_order`) sets the order
    of the classes along both axes; by default it is the index order. The
    overall accuracy (from the raw counts) is appended to ``title``. The figure
    grows with K; cell percentages are written only while K <= 30, and past that
    the colour scale is a square root so that 2-10% confusions still show. Zero
    cells are left white, and true classes without samples get an "(n=0)" label.
    """
    counts = np.asarray(confusion)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ValueError(f"confusion must be square (K, K) with K >= 1, got shape {counts.shape}")
    num_classes = counts.shape[0]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-class confusion matrix")
    if order is not None:
        order = _check_order(order, num_classes)
        counts = counts[np.ix_(order, order)]
        class_names = [class_names[index] for index in order]
    normalized = normalize_confusion(counts)

    side = _matrix_side_inches(num_classes)
    cell_points = side * 72 / num_classes
    with _figure((side, side)) as fig:
        # Fixed axes geometry; labels and title spill outside and are kept by
        # bbox_inches="tight", so long class names never squash the matrix.
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
        colorbar_ax = fig.add_axes((1.0 + 0.2 / side, 0.0, 0.3 / side, 1.0))
        image = ax.imshow(np.ma.masked_where(counts == 0, normalized), cmap=_confusion_cmap(),
                          norm=_confusion_norm(num_classes), interpolation="nearest")
        colorbar = fig.colorbar(image, cax=colorbar_ax, format=PercentFormatter(xmax=1.0, decimals=0))
        colorbar.set_ticks(_colorbar_ticks(num_classes))
        colorbar.set_label("share of true class", fontsize=11)
        _label_axes(ax, [str(name) for name in class_names], counts.sum(axis=1), cell_points)
        if num_classes <= MAX_CLASSES_WITH_CELL_TEXT:
            _annotate_cells(ax, normalized, counts, image, cell_points)
        ax.set_title(f"{title} — {_accuracy_text(counts)}", fontsize=13, pad=12)
        _save_atomically(fig, path)


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
    """Class indices ordered by average-linkage clustering of the symmetric confusion shares.

    The similarity of two classes is the mean of the share of each mistaken for
    the other. Clusters are merged most-similar first, each merge oriented so
    that the two most confused end classes touch. Merging stops when no
    confusion links the remaining clusters, which are then laid out by their
    lowest class index, so classes that are never confused keep folder order.
    """
    shares = normalize_confusion(confusion)
    similarity = (shares + shares.T) / 2
    np.fill_diagonal(similarity, 0.0)
    num_classes = len(similarity)
    clusters: dict[int, list[int]] = {index: [index] for index in range(num_classes)}
    linkage = similarity.copy()  # summed similarity between the members of two clusters
    sizes = np.ones(num_classes)
    while len(clusters) > 1:
        first, second = _most_similar_pair(linkage, sizes, list(clusters))
        if first is None:
            break
        clusters[first] = _join_ends(clusters[first], clusters.pop(second), similarity)
        linkage[first] += linkage[second]
        linkage[:, first] += linkage[:, second]
        linkage[first, first] = 0.0
        sizes[first] += sizes[second]
    return [index for members in sorted(clusters.values(), key=min) for index in members]


def _most_similar_pair(linkage: np.ndarray, sizes: np.ndarray, active: list[int]) -> tuple[int | None, int]:
    """The two active clusters with the highest mean similarity, or ``(None, 0)`` when none is positive."""
    rows = np.asarray(active)
    average = linkage[np.ix_(rows, rows)] / np.outer(sizes[rows], sizes[rows])
    np.fill_diagonal(average, -1.0)
    i, j = np.unravel_index(int(average.argmax()), average.shape)
    if average[i, j] <= 0:
        return None, 0
    return int(rows[min(i, j)]), int(rows[max(i, j)])


def _join_ends(left: list[int], right: list[int], similarity: np.ndarray) -> list[int]:
    """``left + right``, each possibly reversed, whichever puts the most similar pair of end classes side by side."""
    candidates = [left + right, left + right[::-1], left[::-1] + right, left[::-1] + right[::-1]]
    seams = [similarity[a[len(left) - 1], a[len(left)]] for a in candidates]
    return candidates[int(np.argmax(seams))]


# --------------------------------------------------------------------------
# Image grids (misclassified examples)
# --------------------------------------------------------------------------

GRID_COLUMNS = 6
# Inches: each cell is a square image box with its caption lines above it; a band on top holds the title.
GRID_IMAGE_INCHES = 2.0
GRID_CAPTION_INCHES = 0.72  # four lines of 8.5 pt text
GRID_GAP_INCHES = 0.3
GRID_TITLE_INCHES = 0.45
# Below this size a thumbnail is drawn with visible pixels instead of being smoothed into a blur.
PIXELATED_BELOW = 96


def plot_image_grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    path: str | Path,
    title: str,
    empty_message: str = "nothing to show",
) -> None:
    """Save images (H x W x 3 uint8 arrays, any sizes) in a grid, each under a caption of a few lines.

    With no images the figure shows ``empty_message`` instead, so the file always exists.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        _plot_message(path, title, empty_message)
        return
    columns = min(GRID_COLUMNS, len(images))
    rows = -(-len(images) // columns)
    cell_width = GRID_IMAGE_INCHES + GRID_GAP_INCHES
    cell_height = GRID_CAPTION_INCHES + GRID_IMAGE_INCHES + GRID_GAP_INCHES
    width, height = columns * cell_width, GRID_TITLE_INCHES + rows * cell_height
    with _figure((width, height)) as fig:
        for position, (image, caption) in enumerate(zip(images, captions)):
            row, column = divmod(position, columns)
            bottom = height - GRID_TITLE_INCHES - (row + 1) * cell_height + GRID_GAP_INCHES
            box = (column * cell_width / width, bottom / height, GRID_IMAGE_INCHES / width, GRID_IMAGE_INCHES / height)
            ax = fig.add_axes(box, anchor="NW")  # a non-square image hangs from its caption, flush left
            ax.set_axis_off()
            small = max(image.shape[:2]) < PIXELATED_BELOW
            ax.imshow(image, interpolation="nearest" if small else "antialiased")
            fig.text(box[0], (bottom + GRID_IMAGE_INCHES + 0.04) / height, caption, ha="left", va="bottom",
                     fontsize=8.5, linespacing=1.3)
        fig.text(0.0, 1.0, title, ha="left", va="top", fontsize=12)
        _save_atomically(fig, path)


def _plot_message(path: str | Path, title: str, message: str) -> None:
    """A small figure holding just a title and a message."""
    with _figure((6, 1.6)) as fig:
        fig.suptitle(title, fontsize=12)
        fig.text(0.5, 0.4, message, ha="center", va="center", fontsize=11, color="0.3")
        _save_atomically(fig, path)
