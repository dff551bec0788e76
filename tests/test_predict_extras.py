"""predict.py's test-time augmentation, checkpoint ensembles, calibrated probabilities (the checkpoint's
temperature, --min-confidence) and their file, image files on the command line, and the outputs checked and written
whatever the folder or the file names."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_evaluate import make_tiny_checkpoint
from torch import nn

import predict
import submission
from accel import Accel
from checkpoint import load_checkpoint, save_checkpoint
from common import Batch
from conftest import (
    PREDICT_FLAGS,
    assert_user_error,
    call_main,
    read_csv_rows,
    run_script,
    write_colour_dataset,
    write_labels_csv,
)
from engine import predict_probabilities

CPU = Accel(torch.device("cpu"), None, channels_last=False)


class EdgePixels(nn.Module):
    """A stub classifier whose three logits are the top-left pixel, the top-right pixel and 0."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([images[:, 0, 0, 0], images[:, 0, 0, -1], torch.zeros(len(images))], dim=1)


class FixedLogits(nn.Module):
    """A stub classifier answering the same logits for every image."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(images), -1)


def edge_batch(left: float, right: float) -> torch.Tensor:
    images = torch.zeros(1, 3, 8, 8)
    images[:, :, :, 0], images[:, :, :, -1] = left, right
    return images


def test_flip_averages_the_softmax_of_both_views() -> None:
    images = edge_batch(2.0, -1.0)
    averaged = predict.AveragedSoftmax([EdgePixels()], predict.tta_views("flip"))(images).exp()
    expected = (torch.tensor([[2.0, -1.0, 0.0]]).softmax(1) + torch.tensor([[-1.0, 2.0, 0.0]]).softmax(1)) / 2
    torch.testing.assert_close(averaged, expected)


def test_ensemble_averages_models_and_survives_predict_probabilities() -> None:
    first, second = [2.0, 0.0, -1.0], [0.0, 3.0, 0.0]
    wrapper = predict.AveragedSoftmax([FixedLogits(first), FixedLogits(second)], predict.tta_views("none"))
    loader = [Batch(torch.zeros(2, 3, 4, 4), None, [0, 1], [])]
    probabilities, failed = predict_probabilities(wrapper, loader, 2, CPU, show_progress=False)
    expected = (torch.tensor(first).softmax(0) + torch.tensor(second).softmax(0)) / 2
    torch.testing.assert_close(probabilities, expected.expand(2, -1))
    assert failed == {}


def test_multi_views_keep_the_batch_shape_and_zoom_into_the_centre() -> None:
    images = torch.arange(2 * 3 * 20 * 20, dtype=torch.float32).reshape(2, 3, 20, 20)
    views = predict.tta_views("multi")
    assert len(views) == 4
    for view in views:
        assert view(images).shape == images.shape
    torch.testing.assert_close(predict.zoom_centre(torch.ones(1, 3, 20, 20)), torch.ones(1, 3, 20, 20))
    # Zooming in shrinks the left-right spread of a horizontal ramp by the zoom factor.
    ramp = torch.linspace(0, 1, 40).expand(1, 3, 40, 40)
    zoomed = predict.zoom_centre(ramp)
    spread = (zoomed[0, 0, 0, -1] - zoomed[0, 0, 0, 0]) / (ramp[0, 0, 0, -1] - ramp[0, 0, 0, 0])
    assert spread == pytest.approx(1 / predict.MULTI_ZOOM, abs=0.03)
    torch.testing.assert_close(views[3](images), views[2](images).flip(-1))


@pytest.fixture(scope="module")
def ensemble_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Test images and two untrained 3-class checkpoints with different input sizes (two decoding passes)."""
    root = tmp_path_factory.mktemp("ensemble")
    write_colour_dataset(root / "data", num_classes=3, train_per_class=1, val_per_class=0, test_per_class=2, seed=3)
    first = make_tiny_checkpoint(root / "a" / "best.pt", ["0", "1", "2"], img_size=32, seed=1)
    second = make_tiny_checkpoint(root / "b" / "best.pt", ["0", "1", "2"], img_size=40, seed=2)
    return root / "data", first, second


def probabilities_by_label(path: Path) -> dict[str, dict[str, float]]:
    """``image_name -> {label: probability}`` from a probabilities file."""
    table = {}
    for row in read_csv_rows(path):
        ranks = (len(row) - 1) // 2
        table[row["image_name"]] = {row[f"label_{rank}"]: float(row[f"prob_{rank}"]) for rank in range(1, ranks + 1)}
    return table


def run_predict(data: Path, out: Path, *args: str | Path):
    return call_main(predict.main, "--test-dir", data / "test", "--output", out / "prediction.csv", *args,
                     *PREDICT_FLAGS)


def test_ensemble_of_two_checkpoints_is_the_mean_of_each(ensemble_inputs, tmp_path: Path) -> None:
    data, first, second = ensemble_inputs
    for name, checkpoints in (("a", [first]), ("b", [second]), ("ab", [first, second])):
        result = run_predict(data, tmp_path / name, "--checkpoint", *checkpoints, "--topk", "3", "--tta", "flip")
        assert result.returncode == 0, result.stderr
    alone_a = probabilities_by_label(tmp_path / "a" / "prediction_probabilities.csv")
    alone_b = probabilities_by_label(tmp_path / "b" / "prediction_probabilities.csv")
    together = probabilities_by_label(tmp_path / "ab" / "prediction_probabilities.csv")
    assert together.keys() == alone_a.keys() and len(together) == 6
    for image, probabilities in together.items():
        for label, value in probabilities.items():
            assert value == pytest.approx((alone_a[image][label] + alone_b[image][label]) / 2, abs=2e-6)


def test_topk_file_format(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    result = run_predict(data, tmp_path, "--checkpoint", first, "--topk", "2", "--tta", "multi",
                         "--labels", data / "test_labels.csv")
    assert result.returncode == 0, result.stderr
    assert result.value["probabilities"] == str(tmp_path / "prediction_probabilities.csv")
    assert 0 <= result.value["accuracy"] <= 1  # --labels still scores the (averaged) predictions
    header = (tmp_path / "prediction_probabilities.csv").read_text().splitlines()[0]
    assert header == "image_name,label_1,prob_1,label_2,prob_2"
    submission = {row["image_name"]: row["pred_label"] for row in read_csv_rows(tmp_path / "prediction.csv")}
    rows = read_csv_rows(tmp_path / "prediction_probabilities.csv")
    assert [row["image_name"] for row in rows] == list(submission)
    for row in rows:
        assert row["label_1"] == submission[row["image_name"]] and row["label_1"] != row["label_2"]
        assert 1 >= float(row["prob_1"]) >= float(row["prob_2"]) >= 0


def test_topk_beyond_the_class_count_writes_every_class(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    result = run_predict(data, tmp_path, "--checkpoint", first, "--topk", "9")
    assert result.returncode == 0 and "writing all 3" in result.stdout
    for probabilities in probabilities_by_label(tmp_path / "prediction_probabilities.csv").values():
        assert sorted(probabilities) == ["0", "1", "2"] and sum(probabilities.values()) == pytest.approx(1, abs=1e-5)


def test_no_probabilities_file_without_topk(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    assert run_predict(data, tmp_path, "--checkpoint", first).returncode == 0
    assert not (tmp_path / "prediction_probabilities.csv").exists()


def test_checkpoints_with_different_classes_are_refused(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    other = make_tiny_checkpoint(tmp_path / "other.pt", ["0", "1", "cat"])
    result = run_predict(data, tmp_path, "--checkpoint", first, other)
    assert_user_error(result, str(first), str(other), "different class lists", "cat")
    assert not (tmp_path / "prediction.csv").exists()
    reordered = make_tiny_checkpoint(tmp_path / "reordered.pt", ["2", "1", "0"])
    assert_user_error(run_predict(data, tmp_path, "--checkpoint", first, reordered), "different order")


def test_negative_topk_is_refused(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    assert_user_error(run_predict(data, tmp_path, "--checkpoint", first, "--topk", "-1"), "--topk -1")


# --------------------------------------------------------------------------- temperature


def with_temperature(checkpoint: Path, temperature: float, path: Path) -> Path:
    """A copy of ``checkpoint`` holding a fitted ``temperature``, as train.py writes it."""
    state = replace(load_checkpoint(checkpoint), temperature=temperature)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, path)
    return path


def test_each_model_divides_its_logits_by_its_own_temperature() -> None:
    first, second = [2.0, 0.0, -1.0], [0.0, 3.0, 0.0]
    wrapper = predict.AveragedSoftmax([FixedLogits(first), FixedLogits(second)], predict.tta_views("flip"),
                                      temperatures=[2.0, 0.5])
    expected = (torch.tensor(first).div(2.0).softmax(0) + torch.tensor(second).div(0.5).softmax(0)) / 2
    torch.testing.assert_close(wrapper(torch.zeros(1, 3, 4, 4)).exp(), expected.expand(1, -1))


def test_the_checkpoints_temperature_calibrates_every_probability(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    calibrated = with_temperature(first, 2.0, tmp_path / "t2" / "best.pt")
    plain = run_predict(data, tmp_path / "plain", "--checkpoint", first, "--topk", "3")
    scaled = run_predict(data, tmp_path / "scaled", "--checkpoint", calibrated, "--topk", "3")
    assert plain.returncode == 0 and scaled.returncode == 0, plain.stderr + scaled.stderr
    assert f"note: no temperature in {first} (train.py stores one in best.pt when a run ends;" in plain.stdout
    assert "probabilities uncalibrated, T=1.0" in plain.stdout
    assert "no temperature" not in scaled.stdout
    before = probabilities_by_label(tmp_path / "plain" / "prediction_probabilities.csv")
    after = probabilities_by_label(tmp_path / "scaled" / "prediction_probabilities.csv")
    for image, probabilities in before.items():
        # softmax(z / 2) is softmax(z) square-rooted and renormalized
        roots = {label: value ** 0.5 for label, value in probabilities.items()}
        for label, root in roots.items():
            assert after[image][label] == pytest.approx(root / sum(roots.values()), abs=2e-6)


# --------------------------------------------------------------------------- --min-confidence


def test_min_confidence_marks_rows_counts_them_and_keeps_every_submission_row(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    result = run_predict(data, tmp_path, "--checkpoint", first, "--topk", "2", "--min-confidence", "0.4")
    assert result.returncode == 0, result.stderr
    rows = read_csv_rows(tmp_path / "prediction_probabilities.csv")
    low = [row["image_name"] for row in rows if row["low_confidence"] == "True"]
    assert low == [row["image_name"] for row in rows if float(row["prob_1"]) < 0.4]
    assert all(row["low_confidence"] in ("True", "False") for row in rows)
    assert f"{len(low)} of 6 image(s) have a top probability under --min-confidence 0.4" in result.stdout
    assert result.value["low_confidence"] == len(low)
    assert len(read_csv_rows(tmp_path / "prediction.csv")) == 6


def test_min_confidence_without_topk_writes_the_top_label_only(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    result = run_predict(data, tmp_path, "--checkpoint", first, "--min-confidence", "1")
    assert result.returncode == 0, result.stderr
    assert "--min-confidence without --topk" in result.stdout
    header = (tmp_path / "prediction_probabilities.csv").read_text().splitlines()[0]
    assert header == "image_name,label_1,prob_1,low_confidence"
    assert result.value["low_confidence"] == 6  # no probability is under 1... except all of them


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_min_confidence_outside_0_1_is_refused(ensemble_inputs, tmp_path: Path, value: str) -> None:
    data, first, _ = ensemble_inputs
    assert_user_error(run_predict(data, tmp_path, "--checkpoint", first, "--min-confidence", value),
                      f"--min-confidence {float(value):g}", "from 0 to 1")


# --------------------------------------------------------------------------- the probabilities file's name


def test_two_submissions_in_one_folder_keep_their_own_probabilities(ensemble_inputs, tmp_path: Path) -> None:
    data, first, second = ensemble_inputs
    for name, checkpoint in (("a.csv", first), ("b.csv", second)):
        result = call_main(predict.main, "--test-dir", data / "test", "--output", tmp_path / name, "--checkpoint",
                           checkpoint, "--topk", "1", *PREDICT_FLAGS)
        assert result.returncode == 0, result.stderr
        assert result.value["probabilities"] == str(tmp_path / name.replace(".csv", "_probabilities.csv"))
    assert (tmp_path / "a_probabilities.csv").read_text() != (tmp_path / "b_probabilities.csv").read_text()
    assert not (tmp_path / "probabilities.csv").exists()


# --------------------------------------------------------------------------- --labels rows that match no image


def test_labels_rows_without_a_test_image_are_counted_and_named(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    labels = {row["image_name"]: row["label"] for row in read_csv_rows(data / "test_labels.csv")}
    labels.update({"gone-1": "0", "gone-2": "1"})
    write_labels_csv(tmp_path / "labels.csv", labels)
    result = run_predict(data, tmp_path, "--checkpoint", first, "--labels", tmp_path / "labels.csv")
    assert result.returncode == 0, result.stderr
    assert (f"note: --labels {tmp_path / 'labels.csv'}: 2 of its 8 row(s) name no image being predicted and are "
            "ignored: gone-1, gone-2") in result.stdout


# --------------------------------------------------------------------------- image files on the command line


def test_files_print_a_table_of_their_top_labels(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    photo = sorted((data / "test").glob("*.jpg"))[0]
    # --checkpoint takes several values: the image after it is still a file to predict, not a checkpoint
    result = call_main(predict.main, "--checkpoint", first, photo, *PREDICT_FLAGS)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()[-2:]
    assert header.split() == ["file", "top", "1", "top", "2", "top", "3"]  # 3 labels by default, all 3 classes
    assert row.startswith(str(photo)) and len(row.split()) == 7
    assert not (tmp_path / "prediction.csv").exists() and result.value == {}


def test_files_and_globs_expanded_by_predict_write_the_csv_with_output(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    photos = sorted((data / "test").glob("*.jpg"))
    folder_run = run_predict(data, tmp_path / "folder", "--checkpoint", first)
    # a quoted glob, as a Windows shell passes it: predict.py expands it
    result = call_main(predict.main, "--checkpoint", first, photos[0], str(data / "test" / "*.jpg"), "--topk", "2",
                       "--output", tmp_path / "files.csv", *PREDICT_FLAGS)
    assert folder_run.returncode == 0 and result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    table = lines[next(index for index, line in enumerate(lines) if line.startswith("file ")):][:7]
    assert table[0].split() == ["file", "top", "1", "top", "2"]
    assert [line.split()[0] for line in table[1:]] == [str(photo) for photo in photos]  # each file once
    assert (tmp_path / "files.csv").read_text() == (tmp_path / "folder" / "prediction.csv").read_text()
    assert result.value["probabilities"] == str(tmp_path / "files_probabilities.csv")


def test_a_missing_file_or_a_glob_matching_nothing_is_named_in_one_line(ensemble_inputs, tmp_path: Path) -> None:
    _, first, _ = ensemble_inputs
    result = call_main(predict.main, "--checkpoint", first, tmp_path / "nope.jpg", tmp_path / "*.png", *PREDICT_FLAGS)
    assert_user_error(result, f"{tmp_path / 'nope.jpg'} (file not found)", f"{tmp_path / '*.png'} (no image file "
                      "matches it)")
    assert "checkpoint:" not in result.stdout  # refused before the model is loaded


def test_files_and_a_test_dir_together_are_refused(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    photo = sorted((data / "test").glob("*.jpg"))[0]
    assert_user_error(run_predict(data, tmp_path, "--checkpoint", first, photo), "--test-dir", "pass one of them")


# --------------------------------------------------------------------------- names that are not UTF-8


def test_a_file_name_that_is_not_utf8_keeps_its_row_and_its_bytes(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    test_dir = tmp_path / "test"
    shutil.copytree(data / "test", test_dir)
    source = sorted(test_dir.glob("*.jpg"))[0]
    try:  # caf\xe9.jpg as a Windows zip unzipped on Linux leaves it: Latin-1 bytes, not UTF-8
        os.rename(source, os.path.join(os.fsencode(test_dir), b"caf\xe9.jpg"))
    except (OSError, UnicodeError) as error:
        pytest.skip(f"this file system refuses a name that is not UTF-8 ({error})")

    result = run_script("predict.py", "--checkpoint", first, "--test-dir", test_dir, "--output",
                        tmp_path / "out" / "prediction.csv", "--zip", "--topk", "1", *PREDICT_FLAGS)

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "warning: 1 image name(s) are not UTF-8" in result.stderr and "caf\\xe9" in result.stderr
    written = (tmp_path / "out" / "prediction.csv").read_bytes()
    assert written.count(b"\n") == 7 and b"\ncaf\xe9," in written  # the header and 6 rows; the name as on disk
    assert os.path.exists(os.path.join(os.fsencode(test_dir), written.split(b"\n")[1].split(b",")[0] + b".jpg"))
    assert b"\ncaf\xe9," in (tmp_path / "out" / "prediction_probabilities.csv").read_bytes()


# --------------------------------------------------------------------------- outputs that cannot be written


def assert_refused_before_loading(result, *fragments: str | Path) -> None:
    """A one-line refusal that came before any checkpoint was read."""
    assert_user_error(result, *fragments)
    assert "checkpoint:" not in result.stdout


def test_a_read_only_output_folder_is_refused_before_loading(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a folder without write permission still takes files "
                        "(the EROFS case is covered with a simulated file system below)")
        result = run_predict(data, folder, "--checkpoint", first)
    finally:
        folder.chmod(0o755)
    assert_refused_before_loading(result, f"--output: {folder} is read-only for you")


def test_a_folder_the_system_refuses_is_refused_before_loading(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    folder = Path("/sys")  # refuses new files even to root (sysfs); absent off Linux
    try:
        probe = tempfile.NamedTemporaryFile(dir=folder)
    except OSError:
        pass
    else:
        probe.close()
        pytest.skip("/sys takes files here")
    result = call_main(predict.main, "--test-dir", data / "test", "--output", folder / "prediction.csv",
                       "--checkpoint", first, *PREDICT_FLAGS)
    assert_refused_before_loading(result, "--output: /sys")


@pytest.mark.parametrize(("code", "said"), [(errno.EROFS, "is on a read-only file system"),
                                            (errno.EACCES, "is read-only for you"),
                                            (errno.ENOSPC, "is full")])
def test_read_only_and_full_disks_are_told_apart(ensemble_inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  code: int, said: str) -> None:
    data, first, _ = ensemble_inputs

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(submission.tempfile, "mkstemp", refuse)
    result = run_predict(data, tmp_path / "new" / "folder", "--checkpoint", first, "--zip", "--topk", "1")
    # the nearest folder that exists is where the files would be created
    assert_refused_before_loading(result, f"--output: the disk of {tmp_path}" if code == errno.ENOSPC else
                                  f"--output: {tmp_path} {said}", said)


def test_a_disk_that_fills_up_on_writing_is_said_to_be_full(ensemble_inputs, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data, first, _ = ensemble_inputs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(submission.os, "write", full)
    assert_refused_before_loading(run_predict(data, tmp_path, "--checkpoint", first), "is full", "MiB free")
    assert [path.name for path in tmp_path.iterdir()] == []  # the probe file is gone
