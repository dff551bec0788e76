"""What a new user met on landed main, round three (issue 23): a broken link named as an image, read-only folders, a
second Ctrl-C, a full disk told apart from a read-only one, a fake weights file, the held-out share, top-k with k at
least the class count, SIGTERM's wording, --help in a notebook, a typo'd config key, the order of the first lines,
a short --help, and DataLoader worker warnings."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_evaluate import make_tiny_checkpoint

import train
from conftest import (
    PREDICT_FLAGS,
    REPO_ROOT,
    TINY_TRAIN_FLAGS,
    ColourData,
    assert_user_error,
    call_main,
    read_csv_rows,
    run_script,
)
from dataset import list_images, load_train_val

CLASSES = ["0", "1", "2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 3-class checkpoint (classes 0, 1, 2): what it predicts does not matter here."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "best.pt", CLASSES)


@pytest.fixture
def own_data(small_data: ColourData, tmp_path: Path) -> Path:
    """A copy of small_data that a test may change."""
    root = tmp_path / "data"
    shutil.copytree(small_data.root, root)
    return root


def tiny_run(data_root: Path, output: Path, *flags: str | Path):
    """``train.main`` on tiny data, in this process."""
    return call_main(train.main, "--data-dir", data_root, "--output-dir", output, *TINY_TRAIN_FLAGS, *flags)


# --------------------------------------------------------------------------- 1: a broken link named as an image


def test_a_broken_link_in_the_test_folder_refuses_the_submission_naming_it(own_data: Path, checkpoint: Path,
                                                                            tmp_path: Path) -> None:
    broken = own_data / "test" / "broken.jpg"
    broken.symlink_to("/nonexistent/img.jpg")
    output = tmp_path / "prediction.csv"

    result = run_script("predict.py", "--checkpoint", checkpoint, "--test-dir", own_data / "test", "--output", output,
                        *PREDICT_FLAGS)

    assert_user_error(result, "could not be decoded, so no submission was written", broken)
    assert "non-image" not in result.stdout
    assert not output.exists()


def test_a_broken_link_in_a_class_folder_is_skipped_and_listed(own_data: Path, tmp_path: Path) -> None:
    broken = own_data / "train" / "1" / "gone.jpg"
    broken.symlink_to("/nonexistent/img.jpg")
    assert list_images(broken.parent)[1] == []  # not ignored as a non-image

    result = tiny_run(own_data, tmp_path / "out", "--epochs", "1")

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "non-image" not in result.stdout
    listed = dict(line.split("\t") for line in (tmp_path / "out" / "skipped_files.txt").read_text().splitlines())
    assert str(broken) in listed
