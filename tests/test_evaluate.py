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

import class_order
import engine
import evaluate
import figures
import image_grids
import metrics
import pipeline
import plots
import report
from accel import Accel
from checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from common import IMAGENET_MEAN, IMAGENET_STD, REPORT_FILES
from conftest import (
    PREDICT_FLAGS,
    assert_user_error,
    call_main,
    read_csv_rows,
    save_as_version_1,
    weightless_checkpoint,
    write_colour_dataset,
)
from dataset import scan_labeled_split
from engine import Predictions
from model import model_from_config
from report import MAX_CAPTION_CHARS, MAX_CAPTION_NAME_CHARS, mistake_caption, write_evaluation_report

CLASSES = ["0", "1", "2"]

# A fixed 5-class case: class 3 is predicted but never true, class 4 is neither. Only classes 0-2 have images.
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
    assert metrics.classes_with_images(metrics.confusion_matrix(Y_TRUE, Y_PRED, 5)) == [0, 1, 2]
    assert summary["images"] == 10
    assert summary["accuracy"] == pytest.approx(skm.accuracy_score(Y_TRUE, Y_PRED))
    assert summary["balanced_accuracy"] == pytest.approx(expected_balanced)
    # Macro-F1 averages over the classes with images, as balanced accuracy does: not f1_score's default labels,
    # which would add class 3 (predicted, never true) with an F1 of 0.
    assert summary["macro_f1"] == pytest.approx(skm.f1_score(Y_TRUE, Y_PRED, labels=[0, 1, 2], average="macro"))
    assert summary["macro_f1"] > skm.f1_score(Y_TRUE, Y_PRED, average="macro")
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


def test_top_k_is_left_out_when_k_reaches_the_class_count() -> None:
    summary = metrics.summary_metrics(SCORES[:, :3] / SCORES[:, :3].sum(1, keepdims=True), np.minimum(Y_TRUE, 2))
    assert "top_k" not in summary and "top_k_accuracy" not in summary  # top-3 of 3 classes: always 100%


def test_top_k_of_two_classes_and_of_classes_missing_from_the_targets() -> None:
    two_classes = np.array([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8]])
    assert metrics.top_k_accuracy(two_classes, np.array([1, 1, 1]), 1) == pytest.approx(2 / 3)
    assert metrics.top_k_accuracy(two_classes, np.array([1, 1, 1]), 2) == 1.0
    assert metrics.top_k_accuracy(SCORES, Y_TRUE, 3) == pytest.approx(
        skm.top_k_accuracy_score(Y_TRUE, SCORES, k=3, labels=list(range(5))))


def test_top_k_matches_sklearn_on_tied_probabilities() -> None:
    # The figure is scikit-learn's, ties included: among equal probabilities the higher class index ranks first.
    tied, target = np.array([[0.4, 0.2, 0.2, 0.2]]), np.array([3])
    expected = skm.top_k_accuracy_score(target, tied, k=2, labels=list(range(4)))
    assert metrics.top_k_accuracy(tied, target, 2) == expected == 1.0


def test_confusion_matrix_of_no_images_and_of_one_class() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn warns about a 1 x 1 matrix; predict.py may score one label
        np.testing.assert_array_equal(metrics.confusion_matrix([0, 0], [0, 0], 1), [[2]])
    np.testing.assert_array_equal(metrics.confusion_matrix([], [], 3), np.zeros((3, 3)))


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


def test_report_confusion_figure_leaves_order_and_grouping_title_to_plots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = []

    def draw(confusion: np.ndarray, class_names: list[str], path: Path, **options: object) -> list[int]:
        drawn.append(options)
        return class_order.auto_class_order(confusion)  # the order drawn, as plots.plot_confusion_matrix returns it

    monkeypatch.setattr(plots, "plot_confusion_matrix", draw)
    clustered = np.eye(40, dtype=int) * 20
    clustered[3, 31] = clustered[31, 3] = 6
    names = [str(index) for index in range(40)]
    assert report.plot_report_confusion(clustered, names, "val", tmp_path / "cm.png") is True  # grouped
    assert report.plot_report_confusion(np.eye(3, dtype=int), names[:3], "val", tmp_path / "cm.png") is False
    # No order given: plots draws auto_class_order and adds ", classes grouped by confusion" itself when it groups.
    assert drawn == [{"title": "Confusion matrix on val (normalized by true class)"}] * 2


def test_report_confusion_figure_is_drawn(tmp_path: Path) -> None:
    clustered = np.eye(40, dtype=int) * 20
    clustered[3, 31] = 6
    assert report.plot_report_confusion(clustered, [f"class {index}" for index in range(40)], "val",
                                        tmp_path / "cm.png") is True
    assert Image.open(tmp_path / "cm.png").format == "PNG"


def test_auto_order_keeps_folder_order_for_few_classes() -> None:
    confusion = np.eye(10, dtype=int) * 5
    confusion[0, 9] = 3
    assert class_order.auto_class_order(confusion) == list(range(10))


def test_cluster_order_puts_confused_classes_side_by_side() -> None:
    confusion = np.eye(40, dtype=int) * 20
    confusion[3, 31] = confusion[31, 3] = 6
    confusion[31, 17] = 4
    confusion[10, 25] = 2
    order = class_order.auto_class_order(confusion)
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
    captions = [f"true: a\npred: b ({index}0%)" for index in range(7)]
    image_grids.plot_image_grid(images, captions, tmp_path / "g.png", "t")
    image_grids.plot_image_grid([], [], tmp_path / "empty.png", "t", empty_message="no misclassified images")
    grid, empty = Image.open(tmp_path / "g.png"), Image.open(tmp_path / "empty.png")
    assert grid.height > empty.height and grid.width > empty.width


# --------------------------------------------------------------------------- evaluate.py end to end


def test_evaluate_writes_every_report_file(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, checkpoint = tiny
    result = run_evaluate("--checkpoint", checkpoint, "--data-dir", data_dir, "--report-dir", tmp_path / "r")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (tmp_path / "r").iterdir()) == sorted(REPORT_FILES)
    summary = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert summary["images"] == 9 and summary["classes"] == 3
    assert "top_k_accuracy" not in summary  # top-5 of 3 classes would always be 100%
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
    """Class 1 has no images here and one file is not an image: both are named in the output and the report."""
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
    assert summary["images"] == 6 and summary["classes_without_images"] == ["1"]
    [failure] = summary["undecodable"]
    assert failure["path"] == str(split / "2" / "broken.jpg") and failure["reason"]
    assert f"{failure['path']}: {failure['reason']}" in result.stdout
    assert f"note: 1 class(es) have no images in {split}: 1; " in result.stdout
    text = (tmp_path / "r" / "report.md").read_text()
    assert "1 class(es) have no images in this split." in text
    assert f"- `{failure['path']}`: {failure['reason']}" in text


def test_an_older_checkpoints_held_out_split_is_rebuilt(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, checkpoint = tiny
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train").symlink_to(data_dir / "train")
    older = load_checkpoint(checkpoint)
    save_as_version_1(older, tmp_path / "older.pt", leave_out=["held_out_val_files"])  # before the list was stored
    result = run_evaluate("--checkpoint", tmp_path / "older.pt", "--data-dir", tmp_path / "data", "--report-dir",
                          tmp_path / "r")
    assert result.returncode == 0, result.stderr
    assert "predates stored validation lists" in result.stdout
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["images"] == 3  # 25% of 4 a class


def test_a_run_that_validated_on_val_is_not_evaluated_on_a_rebuilt_split(tiny: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    data_dir, checkpoint = tiny  # trained (so to speak) with a val/ folder: no held-out list
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train").symlink_to(data_dir / "train")
    result = run_evaluate("--checkpoint", checkpoint, "--data-dir", tmp_path / "data")
    assert_user_error(result, "this checkpoint's run validated on a val/ folder", "--split-dir")


def test_library_call_as_train_py_makes_it(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, checkpoint_path = tiny
    checkpoint = load_checkpoint(checkpoint_path)
    samples, _ = scan_labeled_split(data_dir / "val", checkpoint.class_names)
    accel = Accel(torch.device("cpu"), None)
    batches = pipeline.inference_batches([path for path, _ in samples], *checkpoint.preprocessing, accel,
                                        on_device=False, batch_size=4)
    predictions = engine.predict_samples(accel.prepare_model(model_from_checkpoint(checkpoint)), batches, samples,
                                         accel, show_progress=False)
    summary = write_evaluation_report(predictions, checkpoint, tmp_path / "report", source="val",
                                      history_path=checkpoint_path.parent / "history.csv")
    assert summary["images"] == 9 and Path(summary["report_dir"]).is_dir()


def test_report_with_no_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = [str(tmp_path / f"{name}.png") for name in ("a", "b")]
    for path in paths:
        Image.new("RGB", (8, 8)).save(path)
    predictions = Predictions(paths=paths, targets=np.array([0, 1]), probabilities=np.eye(2), failed=[])
    summary = write_evaluation_report(predictions, weightless_checkpoint(["a", "b"]), tmp_path / "report")
    assert summary["accuracy"] == 1.0 and summary["classes_without_images"] == []
    assert read_csv_rows(tmp_path / "report" / "top_confusions.csv") == []
    text = (tmp_path / "report" / "report.md").read_text()
    assert "No misclassified images." in text
    assert "Balanced accuracy and macro-F1 average over the 2 classes with images in this split." in text
    assert "note:" not in capsys.readouterr().out


def test_classes_without_images_are_named_and_left_out_of_both_averages(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Classes b and d have no images; one image of c is predicted as b, which costs c's recall and F1 only.
    probabilities = np.array([[0.9, 0.1, 0.0, 0.0], [0.1, 0.1, 0.8, 0.0], [0.1, 0.6, 0.3, 0.0]])
    predictions = Predictions(paths=["a/0.jpg", "c/0.jpg", "c/1.jpg"], targets=np.array([0, 2, 2]),
                              probabilities=probabilities, failed=[])
    monkeypatch.setattr(report, "thumbnail", lambda path: np.zeros((8, 8, 3), np.uint8))  # no image files here
    summary = write_evaluation_report(predictions, weightless_checkpoint(["a", "b", "c", "d"]), tmp_path,
                                      source="data/val")
    assert summary["classes_without_images"] == ["b", "d"]
    assert json.loads((tmp_path / "metrics.json").read_text())["classes_without_images"] == ["b", "d"]
    assert summary["balanced_accuracy"] == pytest.approx((1 + 0.5) / 2)
    assert summary["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)  # not over b's F1 of 0 too
    assert ("note: 2 class(es) have no images in data/val: b, d; balanced accuracy and macro-F1 average over the "
            "other 2") in capsys.readouterr().out
    assert ("Balanced accuracy and macro-F1 average over the 2 classes with images in this split; class(es) b, d "
            "have none and are left out.") in (tmp_path / "report.md").read_text()


def test_undecodable_files_are_reported_with_their_reasons(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    samples = [("val/a/0.jpg", 0), ("val/b/huge.png", 1), ("val/b/1.jpg", 1), ("val/a/bad.jpg", 0)]
    reasons = {3: "cannot identify image file", 1: "image of 24960x24960 = 623.0 megapixels is above the limit"}
    probabilities = torch.tensor([[0.9, 0.1], [0.0, 0.0], [0.2, 0.8], [0.0, 0.0]])
    monkeypatch.setattr(engine, "predict_probabilities", lambda *args: (probabilities, reasons))
    checkpoint = weightless_checkpoint(["a", "b"])
    accel = Accel(torch.device("cpu"), None)
    batches = pipeline.inference_batches([path for path, _ in samples], *checkpoint.preprocessing, accel,
                                        on_device=False)
    predictions = engine.predict_samples(None, batches, samples, accel)
    assert predictions.paths == ["val/a/0.jpg", "val/b/1.jpg"] and predictions.targets.tolist() == [0, 1]
    assert predictions.failed == [("val/b/huge.png", reasons[1]), ("val/a/bad.jpg", reasons[3])]

    summary = write_evaluation_report(predictions, checkpoint, tmp_path)
    assert summary["undecodable"] == [{"path": "val/b/huge.png", "reason": reasons[1]},
                                      {"path": "val/a/bad.jpg", "reason": reasons[3]}]
    assert json.loads((tmp_path / "metrics.json").read_text())["undecodable"] == summary["undecodable"]
    assert ("warning: left out 2 image(s) that could not be decoded:\n"
            f"  val/b/huge.png: {reasons[1]}\n  val/a/bad.jpg: {reasons[3]}\n") in capsys.readouterr().out
    text = (tmp_path / "report.md").read_text()
    assert f"- `val/b/huge.png`: {reasons[1]}\n- `val/a/bad.jpg`: {reasons[3]}" in text


def test_mistake_captions_name_the_class_folder_and_keep_long_names_distinct() -> None:
    predictions = Predictions(paths=["data/val/3/0.jpg", "data/val/a_very_long_class_name_of_flowers/img_0001.jpg"],
                              targets=np.array([3, 0]), probabilities=np.eye(4)[[0, 3]], failed=[])
    assert mistake_caption(predictions, 0, ["0", "1", "2", "3"]).splitlines()[-1] == "3/0.jpg"
    long_line = mistake_caption(predictions, 1, ["0", "1", "2", "3"]).splitlines()[-1]
    assert len(long_line) == MAX_CAPTION_CHARS
    assert long_line.startswith("a_very_long") and long_line.endswith("img_0001.jpg") and "…" in long_line
    names = [f"very_long_common_prefix_for_class_names_{suffix}" for suffix in ("alpha", "beta", "gamma", "delta")]
    labels = figures.shorten_labels(names, MAX_CAPTION_NAME_CHARS)
    caption = mistake_caption(predictions, 1, labels).splitlines()
    assert caption[0] == f"true: {labels[0]}" and caption[1].startswith(f"pred: {labels[3]} (")
    assert len(set(labels)) == 4 and all(len(label) <= MAX_CAPTION_NAME_CHARS for label in labels)


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
