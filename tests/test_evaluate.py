"""evaluate.py, report.py and metrics.py: the numbers against scikit-learn, the report files, the error paths.

Models are untrained ResNet-18s at 32 px on a few generated images: the report only needs some predictions.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

import evaluate
import metrics
import plots
from accel import Accel
from checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from conftest import PREDICT_FLAGS, assert_user_error, call_main, read_csv_rows, write_colour_dataset
from dataset import IMAGENET_MEAN, IMAGENET_STD, scan_labeled_split
from model import model_from_config
from report import REPORT_FILES, Predictions, write_evaluation_report, write_report_files

CLASSES = ["0", "1", "2"]

# A fixed 5-class case: class 3 is predicted but never true, class 4 is neither (sklearn's defaults skip it).
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
Y_PRED = np.array([0, 1, 0, 1, 3, 2, 0, 2, 2, 0])
SCORES = np.array([
    [0.60, 0.20, 0.10, 0.06, 0.04],
    [0.20, 0.50, 0.14, 0.10, 0.06],
    [0.70, 0.05, 0.15, 0.06, 0.04],
    [0.10, 0.65, 0.12, 0.08, 0.05],
    [0.05, 0.30, 0.07, 0.55, 0.03],
    [0.11, 0.09, 0.70, 0.06, 0.04],
    [0.40, 0.12, 0.33, 0.10, 0.05],
    [0.02, 0.03, 0.90, 0.04, 0.01],
    [0.21, 0.22, 0.45, 0.07, 0.05],
    [0.80, 0.04, 0.09, 0.05, 0.02],
])


def make_tiny_checkpoint(path: Path, class_names: list[str], img_size: int = 32, seed: int = 0) -> Path:
    """An untrained ResNet-18 checkpoint in train.py's format."""
    torch.manual_seed(seed)
    config = {"arch": "resnet18", "img_size": img_size, "dropout": 0.0, "trainable": "all", "epochs": 3,
              "val_fraction": 0.25, "seed": 0}
    model = model_from_config(config, len(class_names))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(make_checkpoint(model, class_names, config, 2, {"val_acc": 0.5}, IMAGENET_MEAN, IMAGENET_STD),
                    path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3-class colour dataset (3 val images a class) and an untrained checkpoint with a history.csv beside it."""
    root = tmp_path_factory.mktemp("eval")
    write_colour_dataset(root / "data", num_classes=3, train_per_class=4, val_per_class=3, test_per_class=1, seed=2)
    checkpoint = make_tiny_checkpoint(root / "run" / "best.pt", CLASSES)
    (root / "run" / "history.csv").write_text(
        "epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\n"
        "1,1.1,0.4,1.0,0.50,0.001,1.0\n2,0.9,0.6,0.8,0.75,0.001,1.0\n3,0.8,0.7,0.9,0.70,0.001,1.0\n")
    return root / "data", checkpoint


def run_evaluate(*args: str | Path):
    return call_main(evaluate.main, *args, *PREDICT_FLAGS)


# --------------------------------------------------------------------------- metrics against scikit-learn


def test_summary_metrics_match_sklearn() -> None:
    summary = metrics.summary_metrics(SCORES, Y_TRUE, top_k=2)
    labels = list(range(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that class 3 is predicted but never true
        expected_balanced = skm.balanced_accuracy_score(Y_TRUE, Y_PRED)
    assert summary["images"] == 10
    assert summary["accuracy"] == pytest.approx(skm.accuracy_score(Y_TRUE, Y_PRED))
    assert summary["balanced_accuracy"] == pytest.approx(expected_balanced)
    assert summary["macro_f1"] == pytest.approx(skm.f1_score(Y_TRUE, Y_PRED, average="macro"))
    assert summary["top_k"] == 2
    assert summary["top_k_accuracy"] == pytest.approx(skm.top_k_accuracy_score(Y_TRUE, SCORES, k=2, labels=labels))
    assert summary["loss"] == pytest.approx(skm.log_loss(Y_TRUE, SCORES, labels=labels))


def test_per_class_precision_recall_f1_match_sklearn() -> None:
    scores = metrics.class_scores(metrics.confusion_matrix(Y_TRUE, Y_PRED, 5))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        Y_TRUE, Y_PRED, labels=list(range(5)), zero_division=0)
    np.testing.assert_allclose(scores.precision, precision)
    np.testing.assert_allclose(scores.recall, recall)
    np.testing.assert_allclose(scores.f1, f1)
    np.testing.assert_array_equal(scores.support, support)
    np.testing.assert_array_equal(metrics.confusion_matrix(Y_TRUE, Y_PRED, 5),
                                  skm.confusion_matrix(Y_TRUE, Y_PRED, labels=list(range(5))))


def test_top_k_is_capped_at_the_class_count() -> None:
    summary = metrics.summary_metrics(SCORES[:, :3] / SCORES[:, :3].sum(1, keepdims=True), np.minimum(Y_TRUE, 2))
    assert summary["top_k"] == 3 and summary["top_k_accuracy"] == 1.0


def test_loss_of_a_zero_probability_is_finite() -> None:
    assert np.isfinite(metrics.cross_entropy(np.array([[1.0, 0.0]]), np.array([1])))


def test_most_confused_and_top_confusions() -> None:
    confusion = np.array([[5, 3, 1], [0, 4, 0], [2, 2, 6]])
    assert metrics.most_confused_with(confusion) == [(1, pytest.approx(3 / 9)), None, (0, pytest.approx(0.2))]
    # Largest count first; equal count and share: the class indices break the tie.
    assert metrics.top_confusions(confusion, 3) == [
        (0, 1, 3, pytest.approx(3 / 9)), (2, 0, 2, pytest.approx(0.2)), (2, 1, 2, pytest.approx(0.2))]
    assert metrics.top_confusions(np.eye(3, dtype=int), 5) == []


# --------------------------------------------------------------------------- class order and figures


def test_auto_order_keeps_folder_order_for_few_classes() -> None:
    confusion = np.eye(10, dtype=int) * 5
    confusion[0, 9] = 3
    assert plots.auto_class_order(confusion) == list(range(10))


def test_cluster_order_puts_confused_classes_side_by_side() -> None:
    confusion = np.eye(40, dtype=int) * 20
    confusion[3, 31] = confusion[31, 3] = 6
    confusion[31, 17] = 4
    confusion[10, 25] = 2
    order = plots.auto_class_order(confusion)
    assert sorted(order) == list(range(40))
    position = {index: rank for rank, index in enumerate(order)}
    assert abs(position[3] - position[31]) == 1
    assert abs(position[17] - position[31]) == 1  # 31 sits between its two partners
    assert abs(position[10] - position[25]) == 1
    untouched = [index for index in order if index not in {3, 31, 17, 10, 25}]
    assert untouched == sorted(untouched)  # never-confused classes keep folder order


def test_confusion_matrix_plot_with_order(tmp_path: Path) -> None:
    confusion = np.array([[3, 1, 0], [0, 2, 2], [1, 0, 4]])
    plots.plot_confusion_matrix(confusion, ["a", "b", "c"], tmp_path / "cm.png", order=[2, 0, 1])
    assert Image.open(tmp_path / "cm.png").format == "PNG"
    with pytest.raises(ValueError):
        plots.plot_confusion_matrix(confusion, ["a", "b", "c"], tmp_path / "bad.png", order=[0, 0, 1])


def test_image_grid_and_its_empty_message(tmp_path: Path) -> None:
    images = [np.full((28, 28, 3), 40 * index, dtype=np.uint8) for index in range(7)]
    plots.plot_image_grid(images, [f"true: a\npred: b ({index}0%)" for index in range(7)], tmp_path / "g.png", "t")
    plots.plot_image_grid([], [], tmp_path / "empty.png", "t", empty_message="no misclassified images")
    grid, empty = Image.open(tmp_path / "g.png"), Image.open(tmp_path / "empty.png")
    assert grid.height > empty.height and grid.width > empty.width


# --------------------------------------------------------------------------- evaluate.py end to end


def test_evaluate_writes_every_report_file(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, checkpoint = tiny
    result = run_evaluate("--checkpoint", checkpoint, "--data-dir", data_dir, "--report-dir", tmp_path / "r")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (tmp_path / "r").iterdir()) == sorted(REPORT_FILES)
    summary = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert summary["images"] == 9 and summary["classes"] == 3 and summary["top_k"] == 3
    assert summary["top_k_accuracy"] == 1.0
    assert summary["split"] == str(data_dir / "val")
    assert result.value["accuracy"] == summary["accuracy"]
    rows = read_csv_rows(tmp_path / "r" / "per_class.csv")
    assert [row["class"] for row in rows] == CLASSES and all(row["support"] == "3" for row in rows)
    assert sum(int(row["predicted"]) for row in rows) == 9
    with (tmp_path / "r" / "top_confusions.csv").open() as handle:
        assert next(csv.reader(handle)) == ["true", "predicted", "count", "share_of_true"]
    report = (tmp_path / "r" / "report.md").read_text()
    for figure in ("](confusion_matrix.png)", "](misclassified.png)"):
        assert figure in report
    assert "Best epoch 2 (val accuracy 75.00%); final epoch 3 of 3 configured" in report
    assert "arch: resnet18" in report


def test_default_report_dir_is_beside_the_checkpoint(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, _ = tiny
    checkpoint = make_tiny_checkpoint(tmp_path / "run" / "best.pt", CLASSES)
    result = run_evaluate("--checkpoint", checkpoint, "--data-dir", data_dir, "--misclassified", "2")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "report" / "report.md").is_file()
    assert "No `history.csv` beside the checkpoint." in (tmp_path / "run" / "report" / "report.md").read_text()


def test_split_dir_with_a_subset_of_classes_and_an_undecodable_file(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, checkpoint = tiny
    split = tmp_path / "split"
    for name in ("0", "2"):
        for image in (data_dir / "val" / name).iterdir():
            (split / name).mkdir(parents=True, exist_ok=True)
            (split / name / image.name).write_bytes(image.read_bytes())
    (split / "2" / "broken.jpg").write_bytes(b"not a jpeg")
    result = run_evaluate("--checkpoint", checkpoint, "--split-dir", split, "--report-dir", tmp_path / "r")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert summary["images"] == 6
    assert summary["undecodable"] == [str(split / "2" / "broken.jpg")]
    assert "broken.jpg" in result.stdout
    report = (tmp_path / "r" / "report.md").read_text()
    assert "1 class(es) have no images in this split." in report and "broken.jpg" in report


def test_without_val_folder_the_held_out_split_is_rebuilt(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, checkpoint = tiny
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train").symlink_to(data_dir / "train")
    result = run_evaluate("--checkpoint", checkpoint, "--data-dir", tmp_path / "data", "--report-dir", tmp_path / "r")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["images"] == 3  # 25% of 4 a class


def test_library_call_as_train_py_makes_it(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, checkpoint_path = tiny
    checkpoint = load_checkpoint(checkpoint_path)
    samples, _ = scan_labeled_split(data_dir / "val", checkpoint["class_names"])
    accel = Accel(torch.device("cpu"), None)
    summary = write_evaluation_report(
        accel.prepare_model(model_from_checkpoint(checkpoint)), checkpoint, samples, tmp_path / "report", accel,
        source="val", history_path=checkpoint_path.parent / "history.csv", batch_size=4, show_progress=False)
    assert summary["images"] == 9 and Path(summary["report_dir"]).is_dir()


def test_report_with_no_mistakes(tmp_path: Path) -> None:
    predictions = Predictions(paths=[], targets=np.array([0, 1]), probabilities=np.eye(2), failed=[])
    summary = write_report_files(predictions, {"class_names": ["a", "b"], "config": {}}, tmp_path)
    assert summary["accuracy"] == 1.0
    assert read_csv_rows(tmp_path / "top_confusions.csv") == []
    assert "No misclassified images." in (tmp_path / "report.md").read_text()


# --------------------------------------------------------------------------- error paths


def test_unknown_class_folder_is_a_clean_error(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, checkpoint = tiny
    split = tmp_path / "split"
    (split / "7").mkdir(parents=True)
    (split / "7" / "x.jpg").write_bytes((data_dir / "val" / "0" / "0_0.jpg").read_bytes())
    (split / "empty-folder").mkdir()  # no images: ignored, not an error
    result = run_evaluate("--checkpoint", checkpoint, "--split-dir", split, "--report-dir", tmp_path / "r")
    assert_user_error(result, str(split), "7", "not classes of the checkpoint", "0, 1, 2")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("case", ["missing split", "empty split", "no val or train", "bad count", "no checkpoint"])
def test_error_paths(case: str, tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, checkpoint = tiny
    (tmp_path / "empty" / "0").mkdir(parents=True)
    args, fragments = {
        "missing split": (["--split-dir", tmp_path / "nope"], ["--split-dir", "folder not found"]),
        "empty split": (["--split-dir", tmp_path / "empty"], ["--split-dir", "no images"]),
        "no val or train": (["--data-dir", tmp_path / "empty"], ["--data-dir", "--split-dir"]),
        "bad count": (["--data-dir", data_dir, "--misclassified", "-1"], ["--misclassified -1"]),
        "no checkpoint": (["--data-dir", data_dir, "--checkpoint", tmp_path / "x.pt"], ["--checkpoint", "not found"]),
    }[case]
    result = run_evaluate("--checkpoint", checkpoint, *args, "--report-dir", tmp_path / "r")
    assert_user_error(result, *fragments)
    assert not (tmp_path / "r").exists()
