"""Tests for plots.py: every figure is a valid PNG, written atomically, and closed."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

import plots


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
    normalized = plots.normalize_confusion(confusion)
    np.testing.assert_allclose(normalized, expected)
    assert not np.isnan(normalized).any()
    assert confusion.dtype.kind == "i"  # input untouched


def test_normalize_confusion_rejects_non_matrix():
    with pytest.raises(ValueError):
        plots.normalize_confusion(np.zeros(3))


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
