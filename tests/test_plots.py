"""Tests for the figures (plots.py and the modules it draws with): every figure is a valid PNG, written atomically,
and closed."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.font_manager import FontEntry
from PIL import Image
from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
from scipy.spatial.distance import squareform

import class_order
import figures
import fonts
import image_grids
import metrics
import plots
import utils


def make_history(num_epochs: int) -> list[dict]:
    """A plausible training history with a decaying learning rate."""
    return [
        {
            "epoch": epoch,
            "train_loss": 2.0 / epoch + 0.1,
            "train_acc": 1.0 - 0.9 / epoch,
            "val_loss": 2.2 / epoch + 0.2,
            "val_acc": 0.95 - 0.85 / epoch,
            "lr": 1e-3 * 0.1 ** (epoch - 1),
            "seconds": 12.5,
        }
        for epoch in range(1, num_epochs + 1)
    ]


def random_confusion(num_classes: int, seed: int = 0) -> np.ndarray:
    """Random counts with a heavy diagonal, like a half-trained classifier."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 4, size=(num_classes, num_classes))
    counts[np.arange(num_classes), np.arange(num_classes)] += rng.integers(10, 40, size=num_classes)
    return counts


def assert_png(path: Path) -> tuple[int, int]:
    """Check that ``path`` is a readable PNG and return its pixel size."""
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


@pytest.fixture(autouse=True)
def no_figures_left_open():
    """Every test must leave pyplot with no open figures."""
    plt.close("all")
    yield
    assert plt.get_fignums() == []


@pytest.fixture(autouse=True)
def warnings_are_errors():
    """A divide-by-zero or matplotlib warning should fail the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_normalize_confusion_divides_rows_and_keeps_empty_rows_zero():
    confusion = np.array([[3, 1, 0], [0, 0, 0], [1, 1, 2]])
    expected = np.array([[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    normalized = class_order.normalize_confusion(confusion)
    np.testing.assert_allclose(normalized, expected)
    assert not np.isnan(normalized).any()
    assert confusion.dtype.kind == "i"  # input untouched


def test_normalize_confusion_rejects_non_matrix():
    with pytest.raises(ValueError):
        class_order.normalize_confusion(np.zeros(3))


@pytest.mark.parametrize("plot", [plots.plot_loss_curve, plots.plot_accuracy_curve])
def test_curve_single_epoch(tmp_path, plot):
    path = tmp_path / "curve.png"
    plot(make_history(1), path)
    assert_png(path)


@pytest.mark.parametrize("plot", [plots.plot_loss_curve, plots.plot_accuracy_curve])
def test_curve_with_best_and_early_stop(tmp_path, plot):
    path = tmp_path / "curve.png"
    plot(make_history(5), path, best_epoch=3, stopped_epoch=5)
    assert_png(path)


@pytest.mark.parametrize("plot", [plots.plot_loss_curve, plots.plot_accuracy_curve])
def test_curve_rejects_empty_history(tmp_path, plot):
    with pytest.raises(ValueError):
        plot([], tmp_path / "curve.png")
    assert list(tmp_path.iterdir()) == []


def test_curve_overwrites_existing_file(tmp_path):
    path = tmp_path / "loss.png"
    path.write_bytes(b"stale")
    plots.plot_loss_curve(make_history(2), str(path))
    assert_png(path)


def test_confusion_matrix_grows_with_class_count(tmp_path):
    small = tmp_path / "cm3.png"
    large = tmp_path / "cm100.png"
    plots.plot_confusion_matrix(random_confusion(3), ["cat", "dog", "bird"], small)
    plots.plot_confusion_matrix(random_confusion(100), [f"class_{i:03d}" for i in range(100)], large)
    small_w, small_h = assert_png(small)
    large_w, large_h = assert_png(large)
    assert large_w > small_w and large_h > small_h


def test_confusion_matrix_handles_empty_rows_and_matrix(tmp_path):
    confusion = random_confusion(4)
    confusion[1] = 0
    plots.plot_confusion_matrix(confusion, list("abcd"), tmp_path / "empty_row.png")
    plots.plot_confusion_matrix(np.zeros((2, 2), dtype=int), ["a", "b"], tmp_path / "empty.png")
    assert_png(tmp_path / "empty_row.png")
    assert_png(tmp_path / "empty.png")


def test_confusion_matrix_rejects_mismatched_names(tmp_path):
    with pytest.raises(ValueError):
        plots.plot_confusion_matrix(random_confusion(3), ["a", "b"], tmp_path / "cm.png")


def test_all_plots_leave_only_final_files(tmp_path):
    history = make_history(5)
    plots.plot_loss_curve(history, tmp_path / "loss.png", best_epoch=4, stopped_epoch=5)
    plots.plot_accuracy_curve(history, tmp_path / "acc.png", best_epoch=4, stopped_epoch=5)
    plots.plot_confusion_matrix(random_confusion(3), ["a", "b", "c"], tmp_path / "cm.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.png", "cm.png", "loss.png"]
    assert plt.get_fignums() == []


def test_failed_save_leaves_no_temp_file_and_no_open_figure(tmp_path):
    # An unknown extension makes savefig raise after the temp file was opened.
    with pytest.raises(ValueError):
        plots.plot_loss_curve(make_history(2), tmp_path / "loss.notaformat")
    assert list(tmp_path.iterdir()) == []
    assert plt.get_fignums() == []


def test_creates_missing_output_folder(tmp_path):
    path = tmp_path / "nested" / "dir" / "acc.png"
    plots.plot_accuracy_curve(make_history(3), path)
    assert_png(path)


def test_confusion_matrix_rejects_non_square(tmp_path):
    with pytest.raises(ValueError):
        plots.plot_confusion_matrix(np.zeros((2, 3)), ["a", "b"], tmp_path / "cm.png")


# --------------------------------------------------------------------------- figure contents


@pytest.fixture
def drawn(monkeypatch) -> list[dict]:
    """What each figure shows (title, tick labels, y limits, fonts) instead of writing it: fast and inspectable."""
    recorded = []

    def record(fig, path):
        ax = fig.axes[0]
        recorded.append({
            "path": Path(path),
            "title": ax.get_title(),
            "title_fonts": ax.title.get_fontfamily(),
            "xticklabels": [tick.label1.get_text() for tick in ax.xaxis.get_major_ticks()],
            "yticklabels": [tick.label1.get_text() for tick in ax.yaxis.get_major_ticks()],
            "ylim": ax.get_ylim(),
        })

    monkeypatch.setattr(figures, "save_figure", record)
    return recorded


OAK_NAMES = [
    "Quercus_robur_subspecies_pedunculata_forma_fastigiata",
    "Quercus_robur_subspecies_pedunculata_forma_pendula",
    "Quercus_robur_subspecies_brutia_forma_fastigiata",
    "Quercus_robur_subspecies_imeretina_forma_fastigiata",
    "Quercus_petraea",
]


def test_shorten_labels_cuts_in_the_middle_and_keeps_labels_distinct():
    labels = figures.shorten_labels(OAK_NAMES, limit=32)
    assert len(set(labels)) == len(OAK_NAMES)
    assert labels[1] == "Quercus_robur_su…a_forma_pendula"  # unique at 32 characters: head, ellipsis, tail
    assert labels[4] == "Quercus_petraea"  # short names are left alone
    for label, name in zip(labels, OAK_NAMES, strict=True):
        head, _, tail = label.partition("…")
        assert name.startswith(head) and name.endswith(tail)
    # The three "..._forma_fastigiata" names clash at 32 characters, so they get longer labels.
    assert all(len(labels[index]) > 32 for index in (0, 2, 3))


def test_confusion_matrix_tick_labels_are_distinct_for_long_shared_names(tmp_path, drawn):
    plots.plot_confusion_matrix(random_confusion(5), OAK_NAMES, tmp_path / "cm.png")
    (figure,) = drawn
    assert len(set(figure["xticklabels"])) == 5
    assert len(set(figure["yticklabels"])) == 5


# --------------------------------------------------------------------------- fonts for CJK class names

CJK_NAMES = ["猫", "狗", "鸟", "ネコ"]


def test_cjk_class_names_plot_without_glyph_warnings(tmp_path, capsys, monkeypatch):
    # No per-glyph warnings (the autouse fixture turns any warning into an error), and at most one note,
    # whether or not this machine has a CJK font.
    monkeypatch.setattr(fonts, "_REPORTED_MISSING_GLYPHS", set())
    plots.plot_confusion_matrix(random_confusion(4), CJK_NAMES, tmp_path / "cm.png")
    images = [np.zeros((8, 8, 3), dtype=np.uint8)] * 2
    captions = ["true: 猫\npred: 狗 (90%)", "true: ネコ\npred: 鸟 (60%)"]
    image_grids.plot_image_grid(images, captions, tmp_path / "grid.png", "t")
    assert_png(tmp_path / "cm.png")
    assert_png(tmp_path / "grid.png")
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) <= 1
    if notes:
        assert "fonts-noto-cjk" in notes[0] and "猫" in notes[0]


def test_fallback_font_family_picks_the_font_with_the_glyphs(monkeypatch):
    installed = [
        FontEntry(fname="/fonts/LastResortHE-Regular.ttf", name="Last Resort High-Efficiency"),  # boxes only
        FontEntry(fname="/fonts/DejaVuSans.ttf", name="DejaVu Sans"),
        FontEntry(fname="/fonts/NotoSansCJK-Regular.ttc", name="Noto Sans CJK JP"),
        FontEntry(fname="/fonts/Unifont.ttf", name="Unifont"),
    ]
    glyphs = {
        "/fonts/LastResortHE-Regular.ttf": "abcéü猫狗鸟ネコ",
        "/fonts/DejaVuSans.ttf": "abcé",
        "/fonts/NotoSansCJK-Regular.ttc": "abc猫狗鸟ネコ",
        "/fonts/Unifont.ttf": "猫",
    }
    monkeypatch.setattr(fonts, "_glyphs_in_font", lambda path, chars: frozenset(chars & set(glyphs[path])))
    assert fonts.fallback_font_family(frozenset("猫狗ネ"), installed) == ("Noto Sans CJK JP", frozenset())
    assert fonts.fallback_font_family(frozenset("猫ü"), installed) == ("Noto Sans CJK JP", frozenset("ü"))
    assert fonts.fallback_font_family(frozenset("ü"), installed) == (None, frozenset("ü"))


def test_cjk_labels_are_drawn_with_the_installed_fallback_font(tmp_path, drawn, monkeypatch):
    monkeypatch.setattr(fonts, "_installed_fallback_families", lambda chars: (("Noto Sans CJK JP",), frozenset()))
    plots.plot_confusion_matrix(random_confusion(4), CJK_NAMES, tmp_path / "cm.png")
    assert drawn[0]["title_fonts"][-1] == "Noto Sans CJK JP"


def test_plain_names_never_look_for_a_fallback_font(tmp_path, drawn, monkeypatch):
    def no_font_search(chars):
        raise AssertionError(f"looked for a fallback font for {chars}")

    monkeypatch.setattr(fonts, "_installed_fallback_families", no_font_search)
    plots.plot_confusion_matrix(random_confusion(3), ["cat", "dog", "café"], tmp_path / "cm.png")
    assert "Noto Sans CJK JP" not in drawn[0]["title_fonts"]


# --------------------------------------------------------------------------- loss axis


def history_with_huge_first_val_loss() -> list[dict]:
    """Epoch 1's validation loss is 73 (a fresh head), the other 19 epochs stay between 0.5 and 1.5."""
    history = make_history(20)
    rng = np.random.default_rng(0)
    for row in history:
        row["train_loss"], row["val_loss"] = rng.uniform(0.5, 1.5, size=2)
    history[0]["val_loss"] = 73.0
    return history


def test_loss_axis_range_leaves_ordinary_losses_alone():
    assert plots.loss_axis_range([2.3, 1.4, 0.9, 0.7, float("nan"), 0.6]) is None
    assert plots.loss_axis_range([]) is None


def test_loss_axis_range_clips_losses_far_above_the_rest():
    limits = plots.loss_axis_range([73.0, 41.0, 1.5, 1.2, 1.0, 0.8, 0.7, 0.6])
    assert limits.bottom < 0.6 and 1.5 < limits.top < 2.0


def test_loss_curve_keeps_the_usual_losses_readable(tmp_path, drawn):
    plots.plot_loss_curve(history_with_huge_first_val_loss(), tmp_path / "loss.png", best_epoch=19)
    bottom, top = drawn[0]["ylim"]
    assert bottom < 0.5 and 1.5 < top < 2.0


def test_loss_curve_without_outliers_keeps_automatic_limits(tmp_path, drawn):
    history = make_history(5)
    plots.plot_loss_curve(history, tmp_path / "loss.png")
    bottom, top = drawn[0]["ylim"]
    assert top >= max(row["val_loss"] for row in history)


def history_with_two_curves_clipped() -> list[dict]:
    """A fresh head: train and val losses far above the rest in epochs 1-2 (val in epoch 3 too), lr falling."""
    history = make_history(10)
    for row, train, val in zip(history, (40.0, 25.0), (55.0, 30.0, 12.0), strict=False):  # epochs 1-2 only
        row["train_loss"], row["val_loss"] = train, val
    history[2]["val_loss"] = 12.0
    return history


@pytest.fixture
def loss_figure(monkeypatch) -> list[dict]:
    """What the loss figure shows, read when it would be written: legend, texts on the plot, where the clipped
    losses' triangles sit at epoch 1 (display x), and how high the learning-rate line reaches (share of the height)."""
    recorded = []

    def record(fig, path):
        ax, lr_ax = fig.axes
        triangles = [line for line in ax.lines if line.get_marker() == "^"]
        lr_line = lr_ax.lines[0]
        highest = lr_ax.transData.transform((1, max(lr_line.get_ydata())))[1]
        bottom, top = lr_ax.transAxes.transform([(0, 0), (0, 1)])[:, 1]
        recorded.append({
            "legend": [text.get_text() for text in ax.get_legend().get_texts()],
            "texts_on_plot": [text.get_text() for text in ax.texts],
            "triangles_at_epoch_1": [line.get_transform().transform((1, 0))[0] for line in triangles
                                     if list(line.get_xdata()) == [1]],
            "lr_reaches": (highest - bottom) / (top - bottom),
        })

    monkeypatch.setattr(figures, "save_figure", record)
    return recorded


def test_clipped_losses_are_listed_in_the_legend_not_crowded_on_the_plot(tmp_path, loss_figure):
    plots.plot_loss_curve(history_with_two_curves_clipped(), tmp_path / "loss.png")

    drawn = loss_figure[0]
    assert "train above the axis: 40 (epoch 1), 25 (2)" in drawn["legend"]
    assert "val above the axis: 55 (epoch 1), 30 (2), 12 (3)" in drawn["legend"]
    assert drawn["texts_on_plot"] == []  # no value labels in the corner, where the lr line crossed them
    first, second = drawn["triangles_at_epoch_1"]
    assert abs(first - second) > 5  # side by side: both curves' triangles show


def test_the_learning_rate_line_stays_under_the_clipped_losses(tmp_path, loss_figure):
    plots.plot_loss_curve(history_with_two_curves_clipped(), tmp_path / "loss.png")

    assert loss_figure[0]["lr_reaches"] < 0.9


def test_the_legend_of_clipped_losses_reads_well(tmp_path):
    plots.plot_loss_curve(history_with_two_curves_clipped(), tmp_path / "loss.png")
    assert_png(tmp_path / "loss.png")


# --------------------------------------------------------------------------- class order


def test_confusion_matrix_default_order_is_the_automatic_one(tmp_path, drawn):
    confusion = random_confusion(40) * 0
    confusion[np.arange(40), np.arange(40)] = 20
    confusion[3, 31] = confusion[31, 17] = confusion[10, 25] = 5
    names = [f"class_{index:02d}" for index in range(40)]
    auto = class_order.auto_class_order(confusion)
    assert auto != list(range(40))
    assert plots.plot_confusion_matrix(confusion, names, tmp_path / "default.png") == auto
    assert plots.plot_confusion_matrix(confusion, names, tmp_path / "explicit.png", order=auto) == auto
    default, explicit = drawn
    assert default["xticklabels"] == explicit["xticklabels"] == [names[index] for index in auto]
    assert "classes grouped by confusion" in default["title"]
    assert plots.plot_confusion_matrix(confusion, names, tmp_path / "folder.png", order=range(40)) == list(range(40))


def test_cluster_order_within_a_group_is_scipys_optimal_leaf_order():
    # Classes 0..6 (at spread-out indices of a 40-class model) are confused with each other in a triangle with tails.
    confused = [(0, 1, 3), (1, 2, 5), (1, 6, 6), (3, 1, 4), (4, 6, 7), (5, 4, 7), (6, 0, 6)]
    members = np.array([2, 7, 11, 19, 23, 30, 36])
    confusion = np.eye(40, dtype=int) * 20
    for true, predicted, count in confused:
        confusion[members[true], members[predicted]] = count
    shares = class_order.normalize_confusion(confusion)[np.ix_(members, members)]
    distance = 1.0 - (shares + shares.T) / 2  # one minus the mean share of each mistaken for the other
    np.fill_diagonal(distance, 0.0)
    condensed = squareform(distance)
    leaves = leaves_list(optimal_leaf_ordering(linkage(condensed, method="average"), condensed))
    expected = [int(members[leaf]) for leaf in leaves]
    order = class_order.auto_class_order(confusion)
    start = order.index(members.min())
    assert order[start:start + 7] in (expected, expected[::-1])


# --------------------------------------------------------------------------- shared helpers


def test_figures_are_written_with_the_shared_atomic_writer(tmp_path, monkeypatch):
    written = {}
    monkeypatch.setattr(utils, "atomic_write_bytes", lambda path, data: written.update({Path(path).name: data}))
    plots.plot_accuracy_curve(make_history(2), tmp_path / "acc.png")
    image_grids.plot_image_grid([], [], tmp_path / "grid.png", "t")
    assert sorted(written) == ["acc.png", "grid.png"]
    assert all(data.startswith(b"\x89PNG") for data in written.values())


def test_confusion_title_takes_its_accuracy_from_metrics(tmp_path, drawn, monkeypatch):
    monkeypatch.setattr(metrics, "accuracy", lambda confusion: 0.5)
    plots.plot_confusion_matrix(random_confusion(3), ["a", "b", "c"], tmp_path / "cm.png")
    plots.plot_confusion_matrix(np.zeros((2, 2), dtype=int), ["a", "b"], tmp_path / "empty.png")
    assert drawn[0]["title"].endswith("accuracy 50.0%")
    assert drawn[1]["title"].endswith("accuracy n/a (no samples)")
