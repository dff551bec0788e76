"""What a new user met on landed main, round three (issue 23): a broken link named as an image, read-only folders, a
second Ctrl-C, a full disk told apart from a read-only one, a fake weights file, the held-out share, top-k with k at
least the class count, SIGTERM's wording, --help in a notebook, a typo'd config key, the order of the first lines,
a short --help, and DataLoader worker warnings."""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from test_evaluate import make_tiny_checkpoint
from test_resume import EPOCH_LINE, TrainingProcess

import dataset
import evaluate
import train
import utils
from checkpoint import load_checkpoint
from conftest import (
    PREDICT_FLAGS,
    REPO_ROOT,
    TINY_TRAIN_FLAGS,
    ColourData,
    assert_user_error,
    call_main,
    write_colour_dataset,
)
from dataset import describe_data, list_images, load_train_val
from model import read_state_dict
from resume import StopRequest
from utils import UserError

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

    result = call_main(importlib.import_module("predict").main, "--checkpoint", checkpoint, "--test-dir",
                       own_data / "test", "--output", output, *PREDICT_FLAGS)

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


# --------------------------------------------------------------------------- 4, 6: read-only storage, a full disk


@pytest.fixture
def read_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A folder whose writes fail as on a read-only mount (tests run as root, whom chmod does not stop)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    real_probe = utils.write_probe

    def probe(where: Path) -> None:
        if where == folder or folder in where.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(where))
        real_probe(where)

    monkeypatch.setattr(utils, "write_probe", probe)
    return folder


def test_an_output_dir_on_read_only_storage_is_refused_before_the_data_scan(small_data: ColourData,
                                                                             read_only: Path) -> None:
    result = tiny_run(small_data.root, read_only / "run", "--epochs", "1")

    assert_user_error(result, f"--output-dir {read_only / 'run'}: cannot write there (read-only file system in "
                      f"{read_only})", "pass an --output-dir you can write to")
    assert "data:" not in result.stdout and "device:" not in result.stdout


def test_evaluate_refuses_a_read_only_report_folder_beside_the_checkpoint_before_evaluating(
        small_data: ColourData, read_only: Path) -> None:
    checkpoint = make_tiny_checkpoint(read_only / "best.pt", CLASSES)

    result = call_main(evaluate.main, "--checkpoint", checkpoint, "--data-dir", small_data.root, *PREDICT_FLAGS)

    assert_user_error(result, f"the report folder beside the checkpoint, {read_only / 'report'}, cannot be written "
                      "(read-only file system", "pass --report-dir")
    assert "device:" not in result.stdout


def test_a_write_on_read_only_storage_says_so_not_make_room(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only_mount(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".last.pt.x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only_mount)

    with pytest.raises(UserError) as raised:
        utils.atomic_torch_save({"weights": torch.zeros(10)}, tmp_path / "last.pt")

    assert str(raised.value) == (f"cannot write {tmp_path / 'last.pt'} (read-only file system; not a matter of room); "
                                 "use an output folder you can write to")


def test_a_full_disk_says_how_much_room_the_write_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(obj: Any, path: Any) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6447232 vs 6447128")

    monkeypatch.setattr(torch, "save", full_disk)

    with pytest.raises(UserError) as raised:
        utils.atomic_torch_save({"weights": torch.zeros(3 * 2**20 // 4)}, tmp_path / "last.pt")  # 3 MiB of floats

    assert "MiB free there, and the new file needs about 3 MiB (it is written whole before it replaces the old): " \
           "make room, or use another output folder" in str(raised.value)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- 5, 15: a second Ctrl-C, SIGTERM


def test_a_second_ctrl_c_during_a_checkpoint_write_quits_in_one_line_and_keeps_last_pt(
        small_data: ColourData, tmp_path: Path, processes: list[TrainingProcess]) -> None:
    output = tmp_path / "out"
    run = TrainingProcess(["--data-dir", small_data.root, "--output-dir", output, "--epochs", "20", *TINY_TRAIN_FLAGS],
                          tmp_path / "run.log")
    processes.append(run)
    run.wait_for_line(EPOCH_LINE)  # epoch 1 is saved
    run.wait_for(lambda: bool(list(output.glob(".*.pt.*.tmp"))), "a later checkpoint write")

    run.send(signal.SIGINT)
    run.wait_for(lambda: "SIGINT: stopping" in run.stderr_path.read_text(), "the first Ctrl-C's line")
    run.send(signal.SIGINT)  # sent together, the two would arrive as one
    code = run.wait(60)

    stderr = run.stderr_path.read_text()
    assert code == 130, run.output()[-3000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"SIGINT again: quitting at once; {output / 'last.pt'} holds the last finished epoch; continue with: "
        f"python {REPO_ROOT / 'train.py'} --resume {output / 'last.pt'}")
    assert not list(output.glob(".*.tmp"))  # no half-written file left
    assert load_checkpoint(output / "last.pt").epoch >= 1


def test_sigterm_says_what_a_second_signal_does_without_asking_for_ctrl_c(capsys: pytest.CaptureFixture) -> None:
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGTERM)

    assert stop.requested
    assert capsys.readouterr().err.strip() == ("SIGTERM: stopping after this batch (a second SIGTERM or a Ctrl-C to "
                                               "quit at once)")


# --------------------------------------------------------------------------- 10: a file that is not weights


@pytest.mark.parametrize("content", [b"hello", b"echo", b"fake weights\n"])
def test_a_fake_weights_file_is_refused_in_words(tmp_path: Path, content: bytes) -> None:
    fake = tmp_path / "fake.pt"
    fake.write_bytes(content)  # torch.load says '101', 'pop from empty list' or to load it unsafely

    with pytest.raises(UserError) as raised:
        read_state_dict(fake)

    assert str(raised.value) == (f"--weights {fake}: not a readable PyTorch weights file: truncated or corrupt, or "
                                 "not saved with torch.save at all; pass a state dict saved with torch.save (.pt, "
                                 ".pth), or imagenet, or none")


# --------------------------------------------------------------------------- 11: the share held out


def test_the_val_line_gives_the_real_share_held_out_and_why(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_colour_dataset(tmp_path, num_classes=2, train_per_class=3, val_per_class=0, test_per_class=1)

    describe_data(load_train_val(tmp_path, 0.1, seed=0))

    assert (f"val 2 images from {tmp_path / 'train'}: 33% of its 6, not the 10% of --val-fraction, as each class "
            "gives its share in whole images and at least one (stratified, seed 0)") in capsys.readouterr().out


def test_a_share_held_out_as_asked_is_said_as_before(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_colour_dataset(tmp_path, num_classes=2, train_per_class=10, val_per_class=0, test_per_class=1)

    describe_data(load_train_val(tmp_path, 0.1, seed=0))

    assert f"val 2 images from 10% of {tmp_path / 'train'} (stratified, seed 0)" in capsys.readouterr().out


# --------------------------------------------------------------------------- 12: top-k with k >= the class count


def test_top_5_accuracy_of_3_classes_is_left_out_of_metrics_and_report(small_data: ColourData, checkpoint: Path,
                                                                       tmp_path: Path) -> None:
    result = call_main(evaluate.main, "--checkpoint", checkpoint, "--data-dir", small_data.root, "--report-dir",
                       tmp_path / "report", *PREDICT_FLAGS)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "top_k" not in json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert "top-" not in (tmp_path / "report" / "report.md").read_text()
    assert "top-" not in result.stdout


# --------------------------------------------------------------------------- 16, 17, 19: help and typos


@pytest.fixture
def notebook(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in Jupyter: IPython is loaded and a shell runs."""
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: object()))


def test_help_in_a_notebook_prints_the_help_and_returns(notebook: None, capsys: pytest.CaptureFixture) -> None:
    assert train.main("--help") is None  # not SystemExit: 0, which a notebook shows as an exception

    assert capsys.readouterr().out.startswith("usage: train.py [--config FILE]")


@pytest.mark.parametrize("script", ["predict", "evaluate", "export"])
def test_the_other_scripts_print_their_help_in_a_notebook_too(notebook: None, capsys: pytest.CaptureFixture,
                                                              script: str) -> None:
    assert importlib.import_module(script).main("--help") is None

    assert capsys.readouterr().out.startswith(f"usage: {script}.py")


def test_a_mistyped_predict_flag_in_a_notebook_is_one_line_with_the_nearest(notebook: None) -> None:
    with pytest.raises(UserError, match=r"unrecognized arguments: --topp \(did you mean --topk\?\)"):
        importlib.import_module("predict").main("--topp 3")


def test_help_is_short_and_says_how_to_see_every_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    result = call_main(train.main, "--help")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) <= 40, result.stdout
    for flag in ("--data-dir", "--output-dir", "--epochs", "--batch-size", "--lr", "--config", "--device"):
        assert any(line.lstrip().startswith(flag) for line in lines), flag
    assert "--auto-augment" not in result.stdout
    assert "python train.py --help-all lists all" in " ".join(lines)
    everything = call_main(train.main, "--help-all")
    assert everything.returncode == 0 and "--auto-augment" in everything.stdout


def test_help_with_a_config_lists_what_the_config_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    result = call_main(train.main, "--config", REPO_ROOT / "configs" / "sample.yaml", "--help")

    text = result.stdout
    assert "set by the --config file:" in text
    assert "--img-size" in text.split("set by the --config file:")[1] and "--auto-augment" not in text


def test_a_mistyped_flag_is_refused_with_the_nearest_one(small_data: ColourData) -> None:
    result = call_main(train.main, "--data-dir", small_data.root, "--epochz", "5")

    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("train.py: error: unrecognized arguments: --epochz 5 (did you "
                                                      "mean --epochs?)")


def test_a_mistyped_config_key_is_refused_with_the_nearest_one(small_data: ColourData, tmp_path: Path) -> None:
    config = tmp_path / "recipe.yaml"
    config.write_text("epochz: 5\n")

    result = tiny_run(small_data.root, tmp_path / "out", "--config", config)

    assert_user_error(result, "unknown option(s) epochz (did you mean epochs?)", "--help-all")


# --------------------------------------------------------------------------- 18: checks before what will run


def test_a_data_folder_error_comes_before_any_device_line(tmp_path: Path) -> None:
    result = tiny_run(tmp_path / "missing", tmp_path / "out", "--epochs", "1")

    assert_user_error(result, "folder not found")
    assert "device:" not in result.stdout


def test_a_test_folder_error_in_predict_comes_before_the_model_and_device(checkpoint: Path, tmp_path: Path) -> None:
    result = call_main(importlib.import_module("predict").main, "--checkpoint", checkpoint, "--test-dir",
                       tmp_path / "missing", "--output", tmp_path / "p.csv")

    assert_user_error(result, str(tmp_path / "missing"))
    assert "device:" not in result.stdout


# --------------------------------------------------------------------------- 20: loader workers


def test_workers_auto_counts_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # a big node, of which a job scheduler gave us 3 cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)

    assert utils.resolve_workers("auto") == 3


def test_a_non_image_file_whose_name_is_not_utf8_is_listed_without_a_crash(capsys: pytest.CaptureFixture,
                                                                            tmp_path: Path) -> None:
    """A strict UTF-8 console cannot print ``notes\\xe9.txt`` as it is: the note shows the byte as \\xe9."""
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/notes\xe9.txt"))
    dataset.report_ignored("data/test", [odd])

    out = capsys.readouterr().out
    out.encode("utf-8")  # strict: no lone surrogate left to crash a console
    assert "notes\\xe9.txt" in out
