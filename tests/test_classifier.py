"""predict.Classifier: a checkpoint loaded once, predicting paths and PIL images from Python into a pandas table,
on predict.py's preprocessing, precision and temperature."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from PIL import Image
from test_evaluate import make_tiny_checkpoint
from test_predict_extras import probabilities_by_label, with_temperature

import predict
from conftest import PREDICT_FLAGS, call_main, write_colour_dataset
from utils import UserError


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """Six test images and an untrained 3-class checkpoint holding a temperature."""
    root = tmp_path_factory.mktemp("classifier")
    write_colour_dataset(root / "data", num_classes=3, train_per_class=1, val_per_class=0, test_per_class=2, seed=4)
    plain = make_tiny_checkpoint(root / "plain.pt", ["0", "1", "2"], seed=3)
    return sorted((root / "data" / "test").glob("*.jpg")), with_temperature(plain, 1.7, root / "best.pt")


def test_predict_gives_one_row_an_image_with_the_top_labels(calibrated) -> None:
    photos, checkpoint = calibrated
    clf = predict.Classifier(checkpoint, amp="off", workers=0)
    table = clf.predict([str(photos[0]), photos[1]], topk=2)
    assert list(table.columns) == ["name", "label", "probability", "top1_label", "top1_probability", "top2_label",
                                   "top2_probability"]
    assert list(table["name"]) == [str(photos[0]), str(photos[1])]
    assert (table["label"] == table["top1_label"]).all() and (table["probability"] >= table["top2_probability"]).all()
    assert list(clf.predict(photos[0]).columns) == ["name", "label", "probability"]  # topk=1: the short table
    assert len(clf.predict(photos, topk=9).columns) == 3 + 2 * 3  # capped at the 3 classes


def test_its_probabilities_are_predict_pys_with_the_temperature(calibrated, tmp_path: Path) -> None:
    photos, checkpoint = calibrated
    result = call_main(predict.main, "--checkpoint", checkpoint, "--test-dir", photos[0].parent, "--output",
                       tmp_path / "prediction.csv", "--topk", "3", *PREDICT_FLAGS)
    assert result.returncode == 0, result.stderr
    expected = probabilities_by_label(tmp_path / "prediction_probabilities.csv")

    table = predict.Classifier(checkpoint, amp="off", workers=0).predict(photos, topk=3)

    for row in table.itertuples():
        for rank in (1, 2, 3):
            label, value = getattr(row, f"top{rank}_label"), getattr(row, f"top{rank}_probability")
            assert value == pytest.approx(expected[Path(row.name).stem][label], abs=2e-6)


def test_a_pil_image_goes_through_the_same_preprocessing_as_its_file(calibrated) -> None:
    photos, checkpoint = calibrated
    clf = predict.Classifier(checkpoint, amp="off", workers=0)
    with Image.open(photos[2]) as opened:
        table = clf.predict([photos[2], opened, opened.copy()])
    assert list(table["name"]) == [str(photos[2]), str(photos[2]), "image 2"]  # the file name when PIL knows it
    assert table["probability"].tolist() == pytest.approx([table["probability"][0]] * 3, abs=1e-6)
    assert len(set(table["label"])) == 1


def test_options_are_predict_pys_flags_with_the_same_defaults() -> None:
    parser_defaults = vars(predict.get_args_parser().parse_args([]))
    for name, parameter in inspect.signature(predict.Classifier).parameters.items():
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name in parser_defaults:
            assert parameter.default == parser_defaults[name], name
    assert inspect.signature(predict.Classifier).parameters["checkpoint"].default == parser_defaults["checkpoint"][0]


def test_missing_files_and_bad_options_are_one_line_errors(calibrated, tmp_path: Path) -> None:
    photos, checkpoint = calibrated
    clf = predict.Classifier(checkpoint, amp="off", workers=0)
    with pytest.raises(UserError, match="nope.jpg: file not found"):
        clf.predict([photos[0], tmp_path / "nope.jpg"])
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="1 image.*could not be decoded: .*broken.jpg"):
        clf.predict([photos[0], tmp_path / "broken.jpg"])
    with pytest.raises(UserError, match="--tta sideways"):
        predict.Classifier(checkpoint, tta="sideways")
