"""What a new user hands the scripts, round two: image files named as Pillow allows, labels CSVs as Excel saves them,
names with dots, accents spelled two ways, folds too many, Ctrl-C, and every unreadable test image named at once."""

from __future__ import annotations

import io
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features
from test_evaluate import make_tiny_checkpoint

import evaluate
import images
import predict
import submission
from conftest import PREDICT_FLAGS, assert_user_error, call_main, read_csv_rows, write_colour_dataset
from dataset import list_images, load_train_val, scan_labeled_split, unknown_class_folders
from utils import UserError

CLASSES = ["0", "1", "2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 3-class checkpoint (classes 0, 1, 2): what it predicts does not matter here."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "best.pt", CLASSES)


def save_image(path: Path, image_format: str, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A small noisy image saved in ``image_format`` whatever ``path``'s extension says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    pixels = np.clip(np.asarray(colour) + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=image_format)
    return path


def truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header is intact but whose data stops at 60%: opens fine, fails when decoded."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 6 // 10])
    return path


def run_predict(checkpoint: Path, test_dir: Path, output: Path, *args: str | Path):
    return call_main(predict.main, "--checkpoint", checkpoint, "--test-dir", test_dir, "--output", output, *args,
                     *PREDICT_FLAGS)


# --------------------------------------------------------------------------- 1. every extension Pillow reads


def test_test_images_are_predicted_whatever_extension_pillow_reads(checkpoint: Path, tmp_path: Path) -> None:
    test_dir = tmp_path / "test"
    save_image(test_dir / "a.jpg", "JPEG")
    save_image(test_dir / "b.jfif", "JPEG")
    save_image(test_dir / "c.jpe", "JPEG")
    save_image(test_dir / "d.JPEG", "JPEG")
    if features.check("avif"):  # Pillow wheels read AVIF; a Pillow built without libavif lists no .avif
        save_image(test_dir / "e.avif", "AVIF")
    save_image(test_dir / "f", "PNG")  # no extension at all, as a download may be saved
    save_image(test_dir / "g.jpg_large", "JPEG")  # as a browser saves a large picture
    (test_dir / "notes.txt").write_text("not an image\n")
    output = tmp_path / "prediction.csv"

    result = run_predict(checkpoint, test_dir, output)

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    expected = ["a", "b", "c", "d"] + (["e"] if features.check("avif") else []) + ["f", "g"]
    assert [row["image_name"] for row in read_csv_rows(output)] == expected
    assert "2 file(s) without an image extension hold images and are predicted too: f, g.jpg_large" in result.stdout
    assert f"ignored 1 non-image entry in {test_dir}: {test_dir / 'notes.txt'}" in result.stdout


def test_training_folders_take_jfif_jpe_and_other_pillow_extensions(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jfif", "c.jpe", "d.tga", "e.qoi"):
        save_image(tmp_path / "cat" / name, {"tga": "TGA", "qoi": "QOI"}.get(name[-3:], "JPEG"))
    (tmp_path / "cat" / "labels.csv").write_text("image_name,label\n")

    images, ignored = list_images(tmp_path / "cat")

    assert [path.name for path in images] == ["a.jpg", "b.jfif", "c.jpe", "d.tga", "e.qoi"]
    assert [path.name for path in ignored] == ["labels.csv"]


# --------------------------------------------------------------------------- 2. names with dots


def test_labels_are_matched_on_the_whole_file_name_not_on_the_part_before_the_first_dot(
    checkpoint: Path, tmp_path: Path
) -> None:
    test_dir = tmp_path / "test"
    for index, colour in enumerate([(250, 250, 250), (5, 5, 5), (250, 5, 5)], start=1):
        save_image(test_dir / f"scan.00{index}.jpg", "JPEG", colour)
    output = tmp_path / "prediction.csv"
    assert run_predict(checkpoint, test_dir, output).returncode == 0
    predicted = {row["image_name"]: row["pred_label"] for row in read_csv_rows(output)}
    assert sorted(predicted) == ["scan.001", "scan.002", "scan.003"]
    # As the file names are written, extension included: every image is scored against its own row.
    labels = tmp_path / "labels.csv"
    labels.write_text("image_name,label\n" + "".join(f"{name}.jpg,{label}\n" for name, label in predicted.items()))

    result = run_predict(checkpoint, test_dir, output, "--labels", labels)

    assert result.returncode == 0, result.stderr
    assert result.value["accuracy"] == 1.0 and "score on 3 labeled images: accuracy 100.00%" in result.stdout
    # Without the extension (and saved by Excel: BOM, semicolons): one wrong label costs one image in three.
    wrong = {**predicted, "scan.002": next(label for label in CLASSES if label != predicted["scan.002"])}
    labels.write_text("image_name;label\n" + "".join(f"{name};{label}\n" for name, label in wrong.items()),
                      encoding="utf-8-sig")

    result = run_predict(checkpoint, test_dir, output, "--labels", labels)

    assert result.returncode == 0, result.stderr
    assert result.value["accuracy"] == pytest.approx(2 / 3) and "score on 3 labeled images" in result.stdout


def test_a_name_without_extension_matches_only_when_one_test_file_has_it() -> None:
    paths = [Path("t/a.jpg"), Path("t/a.png"), Path("t/b.jpg"), Path("t/scan.001.jpg"), Path("t/c.jpg")]
    truth = {"a": "cat", "b": "dog", "scan.001": "cat", "scan": "dog", "c.png": "dog"}

    assert submission.labels_of(paths, truth) == [None, None, "dog", "cat", None]
    assert submission.labels_of(paths, {"a.png": "dog"}) == [None, "dog", None, None, None]


# --------------------------------------------------------------------------- 5-7. labels CSVs as people save them


def test_labels_saved_by_excel_as_csv_utf8_with_a_bom_are_read(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes("image_name,label\r\nx1,café\r\nx2,dog\r\n".encode("utf-8-sig"))

    assert submission.read_labels(path) == {"x1": "café", "x2": "dog"}


def test_labels_saved_in_windows_cp1252_are_read(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes("image_name,label\r\nphoto_é,crème brûlée\r\nx2,dog\r\n".encode("cp1252"))

    assert submission.read_labels(path) == {"photo_é": "crème brûlée", "x2": "dog"}


def test_semicolons_tabs_and_common_header_names_are_read(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("image_name;label\n001;07\nb.jpg;NA\n")
    assert submission.read_labels(path) == {"001": "07", "b.jpg": "NA"}  # read as text: no 1, 7 or missing value
    path.write_text("id,label\nx1,cat\n")
    assert submission.read_labels(path) == {"x1": "cat"}
    path.write_text("Filename\tClass\nx1\tcat\n")
    assert submission.read_labels(path) == {"x1": "cat"}


def test_an_unknown_header_is_named_with_the_columns_accepted(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("picture;answer\nx1;cat\n")

    with pytest.raises(UserError) as error:
        submission.read_labels(path)

    message = str(error.value)
    assert message.startswith(f"--labels {path}: its header has the column(s) 'picture', 'answer'; ")
    assert "image_name or image or image_id or id or filename" in message and "(label or class or category)" in message
    assert "\n" not in message


def test_the_same_image_with_two_labels_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("image_name,label\nx1,cat\nx1,dog\nx2,cat\nx2,cat\n")

    with pytest.raises(UserError, match=r"'x1' is listed twice, as 'cat' and 'dog'; keep one row per image"):
        submission.read_labels(path)


def test_a_row_with_more_fields_than_the_header_is_named_by_its_line(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("image_name,label\nx1,cat\nx2,dog,young\n")

    with pytest.raises(UserError, match=r"cannot be read as CSV \(.*Expected 2 fields in line 3, saw 3\); fix that"):
        submission.read_labels(path)


# --------------------------------------------------------------------------- 8. --report-dir under a file


def test_evaluate_checks_the_report_dir_before_any_work(checkpoint: Path, tmp_path: Path) -> None:
    write_colour_dataset(tmp_path / "data", num_classes=3, train_per_class=2, val_per_class=1, test_per_class=0)
    (tmp_path / "notes").write_text("a file, not a folder\n")

    result = call_main(evaluate.main, "--checkpoint", checkpoint, "--data-dir", tmp_path / "data", "--report-dir",
                       tmp_path / "notes" / "report", *PREDICT_FLAGS)

    assert_user_error(result, f"--report-dir {tmp_path / 'notes' / 'report'}: {tmp_path / 'notes'} is a file, "
                              "not a folder")
    assert "images from" not in result.stdout  # refused before the scan and the model


# --------------------------------------------------------------------------- 9. more folds than images a class


def test_more_folds_than_any_class_has_images_is_one_line(tmp_path: Path) -> None:
    for label, count in (("ant", 2), ("bee", 3), ("cow", 4)):
        for index in range(count):
            save_image(tmp_path / "train" / label / f"{index}.png", "PNG")

    with pytest.raises(UserError) as error:
        load_train_val(tmp_path, val_fraction=0.1, seed=0, fold=(2, 5))

    assert str(error.value) == ("--fold 2/5: every class has fewer than 5 images (the smallest, ant, has 2; the "
                                "largest has 4); use at most 4 folds (--fold 2/4)")


# --------------------------------------------------------------------------- 10. Ctrl-C


def test_ctrl_c_in_predict_says_so_in_one_line_and_exits_130(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_image(tmp_path / "test" / "a.jpg", "JPEG")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "ensemble_probabilities", interrupted)
    try:
        result = run_predict(checkpoint, tmp_path / "test", tmp_path / "prediction.csv")
    except KeyboardInterrupt:
        pytest.fail("predict.main let KeyboardInterrupt through (a traceback for the user)")

    assert result.returncode == 130
    assert result.stderr.strip() == f"interrupted: no submission written ({tmp_path / 'prediction.csv'} is as it was)"
    assert not (tmp_path / "prediction.csv").exists()


# --------------------------------------------------------------------------- 11. accents written two ways


def test_class_folders_match_whatever_unicode_normalization_their_names_use(tmp_path: Path) -> None:
    composed, decomposed = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert composed != decomposed
    for split, name in (("train", composed), ("val", decomposed)):
        for label in (name, "tea"):
            for index in range(2):
                save_image(tmp_path / split / label / f"{index}.png", "PNG")

    data = load_train_val(tmp_path, val_fraction=0.1, seed=0)

    assert data.class_names == [composed, "tea"]  # the train folder's spelling
    assert sorted(label for _, label in data.val_samples) == [0, 0, 1, 1]
    assert unknown_class_folders(tmp_path / "val", data.class_names) == []
    samples, _ = scan_labeled_split(tmp_path / "val", data.class_names)  # as evaluate.py reads a split
    assert len(samples) == 4


def test_two_train_folders_named_alike_but_for_normalization_are_refused(tmp_path: Path) -> None:
    for name in (unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café"), "tea"):
        save_image(tmp_path / "train" / name / "a.png", "PNG")

    with pytest.raises(UserError, match="same name written with different Unicode characters"):
        load_train_val(tmp_path, val_fraction=0.5, seed=0)


# --------------------------------------------------------------------------- 14. every unreadable file, one run


def test_predict_names_every_unreadable_test_image_in_one_run(checkpoint: Path, tmp_path: Path) -> None:
    test_dir = tmp_path / "test"
    save_image(test_dir / "a.jpg", "JPEG")
    truncated_jpeg(test_dir / "cut.jpg")  # its header reads; its data stops short
    (test_dir / "empty.jpg").write_bytes(b"")  # not even a header
    output = tmp_path / "prediction.csv"

    result = run_predict(checkpoint, test_dir, output)

    line = assert_user_error(result, "2 test image(s) could not be decoded, so no submission was written",
                             f"{test_dir / 'cut.jpg'} (image file is truncated", f"{test_dir / 'empty.jpg'} (cannot "
                             "identify image file")
    assert line.index("cut.jpg") < line.index("empty.jpg") and not output.exists()


# --------------------------------------------------------------------------- 17. --val-fraction beside val/


def test_a_given_val_fraction_beside_a_val_folder_is_noted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_colour_dataset(tmp_path, num_classes=2, train_per_class=2, val_per_class=1, test_per_class=0)

    load_train_val(tmp_path, val_fraction=0.3, seed=0, val_fraction_given=True)
    assert f"note: --val-fraction 0.3 is not used: {tmp_path / 'val'} exists and is the validation set" in \
        capsys.readouterr().out

    load_train_val(tmp_path, val_fraction=0.1, seed=0)  # the default, not given: nothing to say
    assert "--val-fraction" not in capsys.readouterr().out


def test_the_default_pixel_limit_follows_the_machines_memory(tmp_path: Path) -> None:
    """A clip-art PNG above Pillow's bomb limit (179 Mpx) is read where memory allows it: the default limit is a
    sixteenth of the available memory in pixels, never below Pillow's."""
    assert images.machine_pixel_limit(10 * 10**9) >= 623_001_600  # the largest PNG a user met
    assert images.machine_pixel_limit(1 * 10**9) == images.PILLOW_PIXEL_LIMIT
    path = tmp_path / "poster.png"
    Image.new("1", (14_000, 13_000)).save(path)  # 182 Mpx of one bit: tiny on disk, only its header is read here
    limit = images.machine_pixel_limit(16 * 182_000_000)
    assert images.find_unreadable([str(path)], max_pixels=limit) == []
    assert "above the limit" in images.find_unreadable([str(path)], max_pixels=images.PILLOW_PIXEL_LIMIT)[0][1]
