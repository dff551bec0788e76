"""Bad input: one ``error: ...`` line on stderr naming the path or flag and the fix, exit code 2, no traceback.

Every case runs in-process through ``main(argv)`` (fast: torch is already imported). A few run again as a real
``python train.py`` / ``python predict.py`` subprocess, to check what a shell sees; each of those costs several
seconds of interpreter start-up, so not all of them do.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

import options
import predict
import train
from checkpoint import make_checkpoint, save_checkpoint
from common import IMAGENET_MEAN, IMAGENET_STD
from conftest import (
    FAST_FLAGS,
    PREDICT_FLAGS,
    ColourData,
    assert_user_error,
    call_main,
    colour_image,
    go_offline,
    run_script,
)
from model import build_model, freeze_blocks, parse_trainable

MAINS = {"train.py": train.main, "predict.py": predict.main}
# Given before each failing train.py case's own flags (which win): were the check under test missing, the run would
# stay small and download nothing.
SAFE_TRAIN_FLAGS = ("--arch", "resnet18", "--weights", "none", "--epochs", "1", *FAST_FLAGS)


@dataclass
class BadRun:
    """A script invocation that must fail cleanly, the fragments its error line must contain, and files it
    must not write."""

    script: str
    args: list[str | Path]
    fragments: list[str | Path]
    not_written: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Inputs:
    """What the cases build on: a scratch folder, a valid small dataset and a valid (untrained) checkpoint."""

    tmp: Path
    data: ColourData
    checkpoint: Path


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint in train.py's format for 3 classes, without any training: enough to reach predict's checks."""
    args = options.parse_args(["--arch", "resnet18", "--weights", "none", *FAST_FLAGS])
    model = build_model(args.arch, num_classes=3, weights="none")
    freeze_blocks(model, parse_trainable(args.trainable))
    path = tmp_path_factory.mktemp("checkpoint") / "best.pt"
    save_checkpoint(make_checkpoint(model, ["0", "1", "2"], args.saved_options(), 0, {}, IMAGENET_MEAN,
                                    IMAGENET_STD), path)
    return path


@pytest.fixture
def inputs(tmp_path: Path, small_data: ColourData, untrained_checkpoint: Path) -> Inputs:
    return Inputs(tmp_path, small_data, untrained_checkpoint)


# --------------------------------------------------------------------------- train.py cases


def missing_data_dir(inputs: Inputs) -> BadRun:
    folder = inputs.tmp / "no-such-folder"
    return BadRun("train.py", ["--data-dir", folder], ["--data-dir", folder, "folder not found", "train/<class>"])


def data_dir_without_train(inputs: Inputs) -> BadRun:
    (inputs.tmp / "data" / "val").mkdir(parents=True)
    folder = inputs.tmp / "data"
    return BadRun("train.py", ["--data-dir", folder], ["--data-dir", folder, "no train/ folder", "train/<class>"])


def train_without_class_folders(inputs: Inputs) -> BadRun:
    train_dir = inputs.tmp / "data" / "train"
    train_dir.mkdir(parents=True)
    (train_dir / "readme.txt").write_text("images go in class folders\n")
    return BadRun("train.py", ["--data-dir", train_dir.parent],
                  [train_dir, "no class folders with images", "<class>/*.jpg"])


def class_folders_without_images(inputs: Inputs) -> BadRun:
    train_dir = inputs.tmp / "data" / "train"
    (train_dir / "cats").mkdir(parents=True)
    (train_dir / "cats" / "notes.txt").write_text("todo: add cats\n")
    (train_dir / "dogs").mkdir()
    return BadRun("train.py", ["--data-dir", train_dir.parent],
                  [train_dir, "no class folders with images", "<class>/*.jpg"])


def val_class_missing_from_train(inputs: Inputs) -> BadRun:
    data_dir = inputs.tmp / "data"
    shutil.copytree(inputs.data.root / "train", data_dir / "train")
    shutil.copytree(inputs.data.root / "val", data_dir / "val")
    (data_dir / "val" / "7").mkdir()
    colour_image((9, 9, 9), np.random.default_rng(0)).save(data_dir / "val" / "7" / "a.jpg")
    return BadRun("train.py", ["--data-dir", data_dir],
                  [data_dir / "val", "7", "no images in train/", "remove them from val/"])


def unknown_arch(inputs: Inputs) -> BadRun:
    return BadRun("train.py", ["--data-dir", inputs.data.root, "--arch", "resnet9000"],
                  ["--arch resnet9000", "unknown architecture", "resnet50"], [inputs.tmp / "out" / "config.yaml"])


def unknown_trainable_block(inputs: Inputs) -> BadRun:
    return BadRun("train.py", ["--data-dir", inputs.data.root, "--trainable", "layer4,layer9"],
                  ["--trainable layer4,layer9", "layer9 is not a block", "'all'", "layer4"])


def workers_not_a_number(inputs: Inputs) -> BadRun:
    return BadRun("train.py", ["--data-dir", inputs.data.root, "--workers", "many"],
                  ["--workers many", "a number or auto"])


def negative_workers(inputs: Inputs) -> BadRun:
    return BadRun("train.py", ["--data-dir", inputs.data.root, "--workers", "-1"], ["--workers -1", "0 or more"])


def train_with_config(inputs: Inputs, text: str, *fragments: str) -> BadRun:
    """train.py given a ``--config`` file holding ``text``: its error must name the file and ``fragments``."""
    config = inputs.tmp / "config.yaml"
    config.write_text(text)
    return BadRun("train.py", ["--config", config, "--data-dir", inputs.data.root], ["--config", config, *fragments])


def config_not_yaml(inputs: Inputs) -> BadRun:
    return train_with_config(inputs, "arch: [resnet18\nepochs: 3\n", "not valid YAML")


def config_with_unknown_key(inputs: Inputs) -> BadRun:
    return train_with_config(inputs, "arch: resnet18\nlearning_rate: 0.001\n",
                             "unknown option(s) learning_rate", "--help")


def config_not_a_mapping(inputs: Inputs) -> BadRun:
    return train_with_config(inputs, "- resnet18\n- 3\n", "option: value")


def config_with_a_list(inputs: Inputs) -> BadRun:
    return train_with_config(inputs, "trainable: [layer4, fc]\n", "trainable", "layer4,fc")


def config_with_an_empty_value(inputs: Inputs) -> BadRun:
    return train_with_config(inputs, "arch: resnet18\nweights:\n", "weights: None is not one value")


def config_switch_not_a_boolean(inputs: Inputs) -> BadRun:
    return train_with_config(inputs, "channels_last: maybe\n", "channels_last: 'maybe' is not true or false")


def config_fraction_for_a_count(inputs: Inputs) -> BadRun:
    return train_with_config(inputs, "epochs: 2.5\n", "epochs: 2.5 is not a whole number", "--epochs")


def config_value_not_a_choice(inputs: Inputs) -> BadRun:
    return train_with_config(inputs, "amp: fast\n", "amp: 'fast' is not one of auto, bf16, fp16, off")


def config_text_for_a_number(inputs: Inputs) -> BadRun:
    return train_with_config(inputs, "lr: small\n", "lr: 'small' is not a number", "--lr")


def class_with_only_unreadable_images(inputs: Inputs) -> BadRun:
    data_dir = inputs.tmp / "data"
    shutil.copytree(inputs.data.root / "train", data_dir / "train")
    for path in (data_dir / "train" / "2").iterdir():
        path.write_bytes(b"")  # e.g. an interrupted copy
    return BadRun("train.py", ["--data-dir", data_dir],
                  [data_dir / "train" / "2", "can be decoded", "remove the folder"], [inputs.tmp / "out" / "best.pt"])


def copy_of_small_data(inputs: Inputs, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """A private copy of the small dataset's ``splits`` under the scratch folder; returns its root."""
    for split in splits:
        shutil.copytree(inputs.data.root / split, inputs.tmp / "data" / split)
    return inputs.tmp / "data"


def loose_images_in_train(inputs: Inputs) -> BadRun:
    data_dir = copy_of_small_data(inputs)
    colour_image((1, 2, 3), np.random.default_rng(0)).save(data_dir / "train" / "stray.jpg")
    return BadRun("train.py", ["--data-dir", data_dir],
                  [data_dir / "train", "1 image(s) lie directly in it (stray.jpg)", "class folder"])


def kaggle_style_nested_train(inputs: Inputs) -> BadRun:
    shutil.copytree(inputs.data.root / "train", inputs.tmp / "data" / "train" / "train")
    train_dir = inputs.tmp / "data" / "train"
    return BadRun("train.py", ["--data-dir", train_dir.parent],
                  [train_dir, "its only folder, train/, holds the class folders", f"--data-dir {train_dir}"])


def a_single_class(inputs: Inputs) -> BadRun:
    shutil.copytree(inputs.data.root / "train" / "0", inputs.tmp / "data" / "train" / "0")
    return BadRun("train.py", ["--data-dir", inputs.tmp / "data"],
                  [inputs.tmp / "data" / "train", "only one class folder with images (0)", "at least two classes"],
                  [inputs.tmp / "out" / "best.pt"])


def output_dir_is_a_file(inputs: Inputs) -> BadRun:
    path = inputs.tmp / "out"
    path.write_text("a file where the run folder should go\n")
    return BadRun("train.py", ["--data-dir", inputs.data.root, "--output-dir", path],
                  ["--output-dir", path, "is a file", "pass a folder"])


def negative_weight_decay(inputs: Inputs) -> BadRun:
    return BadRun("train.py", ["--data-dir", inputs.data.root, "--weight-decay", "-1"],
                  ["--weight-decay -1.0", "0 or more"])


def batch_of_one_with_trained_batchnorm(inputs: Inputs) -> BadRun:
    return BadRun("train.py", ["--data-dir", inputs.data.root, "--batch-size", "1"],
                  ["--batch-size 1", "BatchNorm", "--batch-size 2 or more"], [inputs.tmp / "out" / "last.pt"])


def truncated_last_pt_to_resume(inputs: Inputs) -> BadRun:
    last = inputs.tmp / "run" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(inputs.checkpoint.read_bytes()[:5000])
    return BadRun("train.py", ["--resume", last], ["--resume", last, "truncated or corrupt"])


# --------------------------------------------------------------------------- predict.py cases


def predict_args(inputs: Inputs, checkpoint: Path, test_dir: Path) -> list[str | Path]:
    """predict.py arguments writing into the scratch folder."""
    return ["--checkpoint", checkpoint, "--test-dir", test_dir, "--output", inputs.tmp / "prediction.csv",
            *PREDICT_FLAGS]


def imageless_test_dir(inputs: Inputs) -> BadRun:
    test_dir = inputs.tmp / "test"
    test_dir.mkdir()
    (test_dir / ".DS_Store").write_bytes(b"\0")
    (test_dir / "notes.txt").write_text("hello\n")
    return BadRun("predict.py", predict_args(inputs, inputs.checkpoint, test_dir),
                  ["--test-dir", test_dir, "no image files found", ".jpg"], [inputs.tmp / "prediction.csv"])


def missing_checkpoint(inputs: Inputs) -> BadRun:
    checkpoint = inputs.tmp / "nowhere" / "best.pt"
    return BadRun("predict.py", predict_args(inputs, checkpoint, inputs.data.test_dir),
                  ["--checkpoint", checkpoint, "file not found", "train.py"])


def checkpoint_of_someone_else(inputs: Inputs) -> BadRun:
    checkpoint = inputs.tmp / "other.pt"
    torch.save({"weights": torch.zeros(3), "epoch": 4}, checkpoint)
    return BadRun("predict.py", predict_args(inputs, checkpoint, inputs.data.test_dir),
                  ["--checkpoint", checkpoint, "not a checkpoint written by this project's train.py"],
                  [inputs.tmp / "prediction.csv"])


def checkpoint_that_is_text(inputs: Inputs) -> BadRun:
    checkpoint = inputs.tmp / "best.pt"
    checkpoint.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 94000000\n")
    return BadRun("predict.py", predict_args(inputs, checkpoint, inputs.data.test_dir),
                  ["--checkpoint", checkpoint, "a Git LFS pointer", "git lfs pull"], [inputs.tmp / "prediction.csv"])


def undecodable_test_image(inputs: Inputs) -> BadRun:
    test_dir = inputs.tmp / "test"
    shutil.copytree(inputs.data.test_dir, test_dir)
    (test_dir / "zz-empty.jpg").write_bytes(b"")
    (test_dir / "aa-text.png").write_text("not a PNG\n")
    return BadRun("predict.py", predict_args(inputs, inputs.checkpoint, test_dir),
                  ["2 test image(s) could not be decoded", "no submission was written",
                   test_dir / "zz-empty.jpg", test_dir / "aa-text.png"],
                  [inputs.tmp / "prediction.csv"])


def truncated_checkpoint(inputs: Inputs) -> BadRun:
    checkpoint = inputs.tmp / "best.pt"
    checkpoint.write_bytes(inputs.checkpoint.read_bytes()[:5000])  # a copy cut short
    return BadRun("predict.py", predict_args(inputs, checkpoint, inputs.data.test_dir),
                  ["--checkpoint", checkpoint, "truncated or corrupt", "another copy"], [inputs.tmp / "prediction.csv"])


def run_folder_without_best_pt(inputs: Inputs) -> BadRun:
    folder = inputs.tmp / "run"
    folder.mkdir()
    return BadRun("predict.py", predict_args(inputs, folder, inputs.data.test_dir),
                  ["--checkpoint", folder, "a folder without best.pt"], [inputs.tmp / "prediction.csv"])


def missing_labels_file(inputs: Inputs) -> BadRun:
    test_dir = inputs.tmp / "test"
    shutil.copytree(inputs.data.test_dir, test_dir)
    (test_dir / "broken.jpg").write_bytes(b"")  # inference would fail on it: the labels must be checked first
    labels = inputs.tmp / "labels.csv"
    return BadRun("predict.py", [*predict_args(inputs, inputs.checkpoint, test_dir), "--labels", labels],
                  ["--labels", labels, "file not found"], [inputs.tmp / "prediction.csv"])


def only_one_folder_in_test_dir(inputs: Inputs) -> BadRun:
    test_dir = inputs.tmp / "test"
    shutil.copytree(inputs.data.test_dir, test_dir / "test")
    return BadRun("predict.py", predict_args(inputs, inputs.checkpoint, test_dir),
                  ["--test-dir", test_dir, "holds only the folder test/", f"--test-dir {test_dir / 'test'}"],
                  [inputs.tmp / "prediction.csv"])


def sub_folder_images_sharing_a_name(inputs: Inputs) -> BadRun:
    test_dir = inputs.tmp / "test"
    shutil.copytree(inputs.data.test_dir, test_dir)
    for folder in ("a", "b"):
        (test_dir / folder).mkdir()
        colour_image((9, 9, 9), np.random.default_rng(0)).save(test_dir / folder / "same.jpg")
    return BadRun("predict.py", predict_args(inputs, inputs.checkpoint, test_dir),
                  [test_dir / "a" / "same.jpg", test_dir / "b" / "same.jpg", "image_name 'same'", "rename one"],
                  [inputs.tmp / "prediction.csv"])


def data_dir_is_the_train_folder(inputs: Inputs) -> BadRun:
    return BadRun("train.py", ["--data-dir", inputs.data.root / "train"],
                  [inputs.data.root / "train", "is the train/ folder itself", f"--data-dir {inputs.data.root}"])


def data_folder_as_test_dir(inputs: Inputs) -> BadRun:
    data = copy_of_small_data(inputs)
    shutil.copytree(inputs.data.test_dir, data / "test")
    return BadRun("predict.py", predict_args(inputs, inputs.checkpoint, data),
                  ["--test-dir", data, "holds test/, train/, val/", f"--test-dir {data / 'test'}"],
                  [inputs.tmp / "prediction.csv"])


def labeled_split_as_test_dir(inputs: Inputs) -> BadRun:
    val = inputs.data.root / "val"
    return BadRun("predict.py", predict_args(inputs, inputs.checkpoint, val),
                  ["--test-dir", val, "sub-folders 0, 1, 2 are named like the model's classes", "evaluate.py"],
                  [inputs.tmp / "prediction.csv"])


def run_folder_with_only_last_pt(inputs: Inputs) -> BadRun:
    folder = inputs.tmp / "run"
    folder.mkdir()
    shutil.copy(inputs.checkpoint, folder / "last.pt")
    return BadRun("predict.py", predict_args(inputs, folder, inputs.data.test_dir),
                  ["a folder without best.pt", f"pass {folder / 'last.pt'}"], [inputs.tmp / "prediction.csv"])


CASES: list[Callable[[Inputs], BadRun]] = [
    missing_data_dir,
    data_dir_without_train,
    train_without_class_folders,
    class_folders_without_images,
    val_class_missing_from_train,
    unknown_arch,
    unknown_trainable_block,
    workers_not_a_number,
    negative_workers,
    config_not_yaml,
    config_with_unknown_key,
    config_not_a_mapping,
    config_with_a_list,
    config_with_an_empty_value,
    class_with_only_unreadable_images,
    loose_images_in_train,
    kaggle_style_nested_train,
    a_single_class,
    config_switch_not_a_boolean,
    config_fraction_for_a_count,
    config_value_not_a_choice,
    config_text_for_a_number,
    output_dir_is_a_file,
    negative_weight_decay,
    batch_of_one_with_trained_batchnorm,
    truncated_last_pt_to_resume,
    imageless_test_dir,
    missing_checkpoint,
    checkpoint_of_someone_else,
    checkpoint_that_is_text,
    undecodable_test_image,
    truncated_checkpoint,
    run_folder_without_best_pt,
    missing_labels_file,
    only_one_folder_in_test_dir,
    sub_folder_images_sharing_a_name,
    data_dir_is_the_train_folder,
    data_folder_as_test_dir,
    labeled_split_as_test_dir,
    run_folder_with_only_last_pt,
]
# One per script, run as real subprocesses (each costs seconds of interpreter start-up; every case also runs
# in-process above): train.py's data scan, and predict.py from the checkpoint load through decoding.
SHELL_CASES = [missing_data_dir, undecodable_test_image]


def full_args(case: BadRun, inputs: Inputs) -> list[str | Path]:
    """The case's arguments after flags that keep a failing train.py run small and offline (the last flag wins)."""
    if case.script == "train.py":
        return ["--output-dir", inputs.tmp / "out", *SAFE_TRAIN_FLAGS, *case.args]
    return case.args


@pytest.mark.parametrize("make_case", CASES, ids=lambda make_case: make_case.__name__)
def test_bad_input_is_one_clean_error_line(make_case: Callable[[Inputs], BadRun], inputs: Inputs) -> None:
    case = make_case(inputs)

    result = call_main(MAINS[case.script], *full_args(case, inputs))

    assert_user_error(result, *case.fragments)
    assert not any(path.exists() for path in case.not_written)


@pytest.mark.parametrize("make_case", SHELL_CASES, ids=lambda make_case: make_case.__name__)
def test_bad_input_from_the_shell_exits_2_without_traceback(
    make_case: Callable[[Inputs], BadRun], inputs: Inputs
) -> None:
    case = make_case(inputs)

    result = run_script(case.script, *full_args(case, inputs))

    assert_user_error(result, *case.fragments)
    assert not any(path.exists() for path in case.not_written)


def test_class_folders_without_images_are_named_before_the_error(inputs: Inputs) -> None:
    case = class_folders_without_images(inputs)
    result = call_main(train.main, *full_args(case, inputs))
    assert "left out 2 class folder(s)" in result.stdout and "cats, dogs" in result.stdout


def test_offline_imagenet_download_is_a_clean_error(inputs: Inputs, monkeypatch: pytest.MonkeyPatch) -> None:
    go_offline(monkeypatch, inputs.tmp / "torch")

    # The reference recipe: --arch resnet50 --weights imagenet are the defaults.
    result = call_main(train.main, "--data-dir", inputs.data.root, "--output-dir", inputs.tmp / "out", *FAST_FLAGS)

    assert_user_error(result, "resnet50-11ad3fa6.pth", "hub/checkpoints", "--weights none")
    assert str(inputs.tmp / "torch" / "hub" / "checkpoints") in result.stderr
