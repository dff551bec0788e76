"""Figures of a run and its evaluation: loss and accuracy curves, the confusion matrix, the reliability diagram.

Each figure is a stand-alone matplotlib ``Figure`` drawn with the fonts its
text needs and saved atomically (see figures.py); the confusion matrix draws
its classes in :func:`class_order.auto_class_order`. The image grids
(misclassified examples, the training batch) are drawn by image_grids.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib import colormaps, transforms
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator, PercentFormatter

import calibration
import class_order
import figures
import metrics

TRAIN_COLOR = "tab:blue"
VAL_COLOR = "tab:orange"
EMA_COLOR = "tab:purple"  # the validation curve of the moving average of the weights (--ema)
BEST_COLOR = "tab:green"
STOP_COLOR = "tab:red"
LR_COLOR = "0.55"  # grey: the learning rate is context, not the story
CONFUSION_CMAP = "Blues"
DEFAULT_CONFUSION_TITLE = "Confusion matrix (normalized by true class)"
GROUPED_BY_CONFUSION = "classes grouped by confusion"

# Past this many classes the x tick labels are turned fully vertical: at 45°
# neighbouring labels already touch once the cells get narrow.
VERTICAL_LABELS_ABOVE = 15
# A loss more than this many times the median loss is drawn clipped at the top edge, so that
# the huge first-epoch validation loss of a fresh head does not flatten the rest of the curve.
LOSS_OUTLIER_FACTOR = 5.0
# With losses drawn clipped on the top edge, the learning-rate line keeps to this lower share of the plot.
LR_HEIGHT_UNDER_CLIPPED = 0.85


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
    """y limits for a loss plot (the losses above ``top`` are drawn clipped at the top edge)."""

    bottom: float
    top: float


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
    return LossAxisRange(bottom=low - 0.05 * span, top=top)


# Values listed in a legend entry for the losses drawn above the axis, before "and N more".
MAX_OFF_SCALE_VALUES = 4


def _mark_clipped(ax: Axes, epochs: list[int], curve: Curve, top: float, shifts: dict[int, float]) -> None:
    """Draw ``curve``'s losses above ``top`` as triangles on the top edge, moved sideways by ``shifts`` (points, by
    epoch) where other curves are clipped too; their values go in the legend, where nothing crowds them."""
    points = [(epoch, value) for epoch, value in zip(epochs, curve.values, strict=True) if value > top]
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
    above = [[epoch for epoch, value in zip(epochs, curve.values, strict=True) if value > limits.top]
             for curve in curves]
    for curve, epochs_above in zip(curves, above, strict=True):
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
    with figures.new_figure((8, 5)) as fig:
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
        figures.save_figure(fig, path)


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
    with figures.new_figure((8, 5)) as fig:
        ax = fig.add_subplot()
        _draw_curves(ax, epochs, curves)
        _mark_epochs(ax, history, val, best_epoch, stopped_epoch)
        _set_epoch_axis(ax, epochs, best_epoch, stopped_epoch)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
        ax.set_ylabel("accuracy")
        ax.set_title(_curve_title("Accuracy", curves))
        _legend_below(ax)
        figures.save_figure(fig, path)


# --------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------


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
    row_labels = [f"{label} (n=0)" if n == 0 else label for label, n in zip(labels, row_support, strict=True)]
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
    if num_classes > class_order.MAX_CLASSES_WITH_CELL_TEXT:
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
    if num_classes <= class_order.MAX_CLASSES_WITH_CELL_TEXT:
        return Normalize(vmin=0.0, vmax=1.0)
    return PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)


def _colorbar_ticks(num_classes: int) -> list[float]:
    """Colour-bar ticks; denser at the low end on the square-root scale, where it is stretched."""
    if num_classes <= class_order.MAX_CLASSES_WITH_CELL_TEXT:
        return [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    return [0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0]


def _draw_confusion(fig: Figure, counts: np.ndarray, labels: list[str], title: str) -> None:
    """The heat map of ``counts`` (already in display order) with its colour bar, tick labels and title."""
    num_classes = counts.shape[0]
    normalized = class_order.normalize_confusion(counts)
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
    if num_classes <= class_order.MAX_CLASSES_WITH_CELL_TEXT:
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
    drawn in :func:`class_order.auto_class_order` (folder order up to 30
    classes, grouped by confusion beyond, which the title then says), so every
    caller draws the same model the same way; ``order`` (a permutation of
    0..K-1) overrides it.
    The overall accuracy is appended to ``title``. The figure grows with K;
    cell percentages are written only while K <= 30, and past that the colour
    scale is a square root so that 2-10% confusions still show. Zero cells are
    left white, true classes without samples get an "(n=0)" label, and long
    names are shortened (see :func:`figures.shorten_labels`).
    """
    counts = _check_confusion(confusion, class_names)
    if order is None:
        order = class_order.auto_class_order(counts)
        title = _with_grouping_note(title, order)
    else:
        order = _check_order(order, counts.shape[0])
    counts = counts[np.ix_(order, order)]
    labels = figures.shorten_labels([class_names[index] for index in order])
    title = f"{title} — {_accuracy_text(counts)}"
    side = _matrix_side_inches(counts.shape[0])
    with figures.new_figure((side, side), texts=[title, *labels]) as fig:
        _draw_confusion(fig, counts, labels, title)
        figures.save_figure(fig, path)
    return order


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
# The reliability diagram (calibration)
# --------------------------------------------------------------------------


UNCALIBRATED_COLOR = "tab:orange"
CALIBRATED_COLOR = "tab:blue"
DIAGONAL_COLOR = "0.45"
COUNT_ALPHA = 0.22  # the bin counts are context, drawn light behind the curves
COUNT_AXIS_HEADROOM = 3.0  # the tallest count bar reaches a third of the way up


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
    with figures.new_figure((6.5, 6.0), texts=[title]) as fig:
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
        figures.save_figure(fig, path)
