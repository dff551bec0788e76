"""End to end: ``train.py`` then ``predict.py`` as a user runs them, plus the in-process (notebook) use of ``main``."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

import evaluate
import options
import pipeline
import predict
import train
from accel import Accel
from checkpoint import Checkpoint, load_checkpoint
from common import IMAGENET_MEAN, IMAGENET_STD
from conftest import (
    FAST_FLAGS,
    FROZEN_BY_DEFAULT,
    PREDICT_FLAGS,
    TINY_TRAIN_FLAGS,
    CliResult,
    ColourData,
    TrainedRun,
    assert_user_error,
    block_of,
    call_main,
    read_csv_rows,
    run_script,
    torchvision_state_dict,
    write_labels_csv,
)
from dataset import load_train_val
from images import load_rgb
from model import build_model, freeze_blocks, parse_trainable
from recipe import build_eval_transform

OUTPUT_FILES = ("best.pt", "last.pt", "history.csv", "loss_curve.png", "accuracy_curve.png",
                "confusion_matrix.png", "config.yaml")


def load_checkpoint_file(path: Path) -> Checkpoint:
    """A checkpoint written by train.py, read the safe way predict.py reads it (``weights_only=True``)."""
    return load_checkpoint(path)


def accuracy(rows: list[dict[str, str]], truth: dict[str, str]) -> float:
    """Share of submission rows whose ``pred_label`` is the true label of ``image_name``."""
    return sum(row["pred_label"] == truth[row["image_name"]] for row in rows) / len(rows)


# --------------------------------------------------------------------------- train.py (the shared run)


def test_training_writes_checkpoints_history_plots_and_config(trained_run: TrainedRun) -> None:
    output = trained_run.output_dir
    assert all((output / name).is_file() for name in OUTPUT_FILES)
    for name in ("loss_curve.png", "accuracy_curve.png", "confusion_matrix.png"):
        with Image.open(output / name) as image:
            assert image.format == "PNG"
    assert not list(output.glob(".*.tmp"))  # atomic writes left no temporary files


def test_history_has_one_row_per_epoch(trained_run: TrainedRun) -> None:
    history = trained_run.output_dir / "history.csv"
    assert history.read_text().splitlines()[0] == \
        "epoch,train_loss,train_acc,val_loss,val_acc,val_balanced_acc,lr,seconds"
    rows = read_csv_rows(history)
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert all(0 <= float(row["val_acc"]) <= 1 and float(row["train_loss"]) > 0 for row in rows)
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])  # the cosine schedule decays


def test_saved_config_holds_the_effective_options(trained_run: TrainedRun) -> None:
    config = yaml.safe_load((trained_run.output_dir / "config.yaml").read_text())
    assert config["arch"] == "resnet18" and config["weights"] == "none"
    assert config["epochs"] == 2 and config["lr"] == 5e-4 and config["batch_size"] == 6
    assert config["trainable"] == "layer4,fc" and config["workers"] == 1
    assert config["data_dir"] == str(trained_run.data.root)


def test_class_order_is_numeric_not_string_order(trained_run: TrainedRun) -> None:
    for name in ("best.pt", "last.pt"):
        checkpoint = load_checkpoint_file(trained_run.output_dir / name)
        assert checkpoint.class_names == [str(index) for index in range(12)]
        assert checkpoint.arch == "resnet18" and checkpoint.img_size == 32


def test_undecodable_train_images_are_listed_up_front_and_skipped(trained_run: TrainedRun) -> None:
    stdout = trained_run.result.stdout
    bad_folder = trained_run.data.root / "train" / "3"
    assert "skipped 2 image file(s) that cannot be read or are too large" in stdout
    assert str(bad_folder / "empty.jpg") in stdout and str(bad_folder / "not-really.jpg") in stdout
    assert stdout.index("not-really.jpg") < stdout.index("epoch   1/2")
    assert "train 72 images" in stdout  # 12 classes x 6 decodable images
    assert "Traceback" not in trained_run.result.stderr


# --------------------------------------------------------------------------- predict.py on another machine


@dataclass(frozen=True)
class Submission:
    """A predict.py run in a folder holding only the test images and the checkpoint."""

    folder: Path
    csv_path: Path
    result: CliResult
    truth: dict[str, str]


@pytest.fixture(scope="module")
def submission(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> Submission:
    """Copy test/ and best.pt to a fresh folder (no train/ or val/ anywhere) and run predict.py there."""
    folder = tmp_path_factory.mktemp("deploy")
    shutil.copytree(trained_run.data.test_dir, folder / "test")
    shutil.copy2(trained_run.output_dir / "best.pt", folder / "model.pt")
    write_labels_csv(folder / "answers.csv", trained_run.data.test_labels)
    csv_path = folder / "out" / "prediction.csv"

    result = run_script("predict.py", "--checkpoint", "model.pt", "--test-dir", "test", "--output", csv_path,
                        "--zip", "--labels", "answers.csv", *PREDICT_FLAGS, cwd=folder)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return Submission(folder, csv_path, result, trained_run.data.test_labels)


def test_submission_has_one_row_per_test_image(submission: Submission) -> None:
    lines = submission.csv_path.read_text().splitlines()
    assert lines[0] == "image_name,pred_label"
    rows = read_csv_rows(submission.csv_path)
    assert [row["image_name"] for row in rows] == sorted(submission.truth)  # names without .jpg, in name order
    assert len(rows) == 24  # .DS_Store and notes.txt are not images
    assert "ignored 2 non-image entries" in submission.result.stdout


def test_submission_labels_are_class_folder_names_and_mostly_right(submission: Submission) -> None:
    rows = read_csv_rows(submission.csv_path)
    predicted = {row["pred_label"] for row in rows}
    assert predicted <= {str(index) for index in range(12)}
    assert {"2", "10"} <= predicted
    assert accuracy(rows, submission.truth) >= 0.9


def test_zip_holds_the_same_prediction_csv(submission: Submission) -> None:
    with zipfile.ZipFile(submission.csv_path.with_suffix(".zip")) as archive:
        assert archive.namelist() == ["prediction.csv"]
        assert archive.read("prediction.csv").decode() == submission.csv_path.read_text()


def test_labels_flag_prints_the_accuracy(submission: Submission) -> None:
    match = re.search(r"score on (\d+) labeled images: accuracy ([\d.]+)%", submission.result.stdout)
    assert match, submission.result.stdout
    assert int(match[1]) == 24
    expected = accuracy(read_csv_rows(submission.csv_path), submission.truth)
    assert float(match[2]) == pytest.approx(100 * expected, abs=0.01)


def test_keep_ext_keeps_the_file_extension(submission: Submission, tmp_path: Path) -> None:
    output = tmp_path / "with_ext.csv"

    result = call_main(predict.main, "--checkpoint", submission.folder / "model.pt",
                       "--test-dir", submission.folder / "test", "--output", output, "--keep-ext", *PREDICT_FLAGS)

    assert result.returncode == 0, result.stderr
    assert result.value["rows"] == 24
    names = [row["image_name"] for row in read_csv_rows(output)]
    assert names == sorted(f"{name}.jpg" for name in submission.truth)


# --------------------------------------------------------------------------- train.main in a notebook, --config


@pytest.fixture(scope="module")
def config_run(small_data: ColourData, tmp_path_factory: pytest.TempPathFactory) -> tuple[CliResult, Path, Path]:
    """``train.main`` in-process with a YAML config, some of it overridden by flags, on data without val/."""
    root = tmp_path_factory.mktemp("config_run")
    shutil.copytree(small_data.root / "train", root / "data" / "train")
    config = root / "tiny.yaml"
    config.write_text(
        "# a config file as a user writes it\n"
        "arch: resnet18\n"
        "weights: none\n"
        "epochs: 3          # overridden by --epochs 1\n"
        "lr: 0.01           # overridden by --lr 5e-4\n"
        "batch-size: 6      # dashes work too\n"
        "img_size: 32\n"
        "val_fraction: 0.25\n"
        "workers: 0\n"
    )
    output_dir = root / "out"
    result = call_main(train.main, "--config", config, "--data-dir", root / "data", "--output-dir", output_dir,
                       "--epochs", "1", "--lr", "5e-4", "--no-progress", "--amp", "off")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, output_dir, root / "data"


def test_train_main_returns_a_summary(config_run: tuple[CliResult, Path, Path]) -> None:
    result, output_dir, _ = config_run
    summary = result.value
    assert summary["output_dir"] == str(output_dir)
    assert summary["epochs_run"] == 1 and summary["best_epoch"] == 1
    assert 0.0 <= summary["best_val_acc"] <= 1.0
    assert all((output_dir / name).is_file() for name in OUTPUT_FILES)


def test_flags_override_the_config_file(config_run: tuple[CliResult, Path, Path]) -> None:
    _, output_dir, data_dir = config_run
    saved = yaml.safe_load((output_dir / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["lr"] == 5e-4  # from the command line
    assert saved["arch"] == "resnet18" and saved["batch_size"] == 6 and saved["img_size"] == 32  # from the file
    assert saved["val_fraction"] == 0.25 and saved["workers"] == 0
    assert saved["data_dir"] == str(data_dir) and "config" not in saved
    assert len(read_csv_rows(output_dir / "history.csv")) == 1


def test_saved_config_reproduces_the_run(config_run: tuple[CliResult, Path, Path]) -> None:
    _, output_dir, _ = config_run
    saved = yaml.safe_load((output_dir / "config.yaml").read_text())
    reread = options.parse_args(["--config", str(output_dir / "config.yaml")]).saved_options()
    assert {key: value for key, value in reread.items() if value is not None} == saved  # unset options are left out
    assert reread["fold"] is None and "fold" not in saved


def test_without_val_folder_a_stratified_share_of_train_is_held_out(config_run: tuple[CliResult, Path, Path]) -> None:
    result, _, data_dir = config_run
    assert "train 9 images (3 to 3 a class); val 3 images" in result.stdout
    assert f"25% of {data_dir / 'train'} (stratified, seed 0)" in result.stdout


def test_held_out_val_images_use_the_eval_transform(small_data: ColourData, tmp_path: Path) -> None:
    shutil.copytree(small_data.root / "train", tmp_path / "train")
    args = options.parse_args(["--data-dir", str(tmp_path), "--val-fraction", "0.25", *FAST_FLAGS])
    data = load_train_val(args.data_dir, args.val_fraction, args.seed)

    loaders = pipeline.load_data(data, args, Accel(torch.device("cpu")), IMAGENET_MEAN, IMAGENET_STD)

    val_images, train_images = loaders.val.loader.dataset, loaders.train.loader.dataset
    expected = build_eval_transform(32)(load_rgb(val_images.paths[0]))
    for seed in (1, 2):  # the same tensor whatever the random state: no augmentation
        torch.manual_seed(seed)
        image, label, _ = val_images[0]
        assert label == data.val_samples[0][1] and torch.equal(image, expected)
    first, _, _ = train_images[(0, 1)]
    second, _, _ = train_images[(0, 2)]
    assert first.shape == expected.shape and not torch.equal(first, second)  # training images are augmented


# --------------------------------------------------------------------------- frozen means frozen


def test_frozen_blocks_are_unchanged_after_training(
    small_data: ColourData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_final_outputs: None
) -> None:
    weights = tmp_path / "start.pth"
    start = torchvision_state_dict("resnet18", seed=3)
    torch.save(start, weights)
    built: dict[str, torch.Tensor] = {}
    make_model = train.make_model

    def recording_make_model(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = make_model(*args, **kwargs)
        built.update({key: value.detach().clone() for key, value in model.state_dict().items()})
        return model

    monkeypatch.setattr(train, "make_model", recording_make_model)

    result = call_main(train.main, "--data-dir", small_data.root, "--output-dir", tmp_path / "out",
                       "--arch", "resnet18", "--weights", weights, "--epochs", "2", "--lr", "1e-3", *FAST_FLAGS)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "its classification head (fc.bias, fc.weight) does not fit" in result.stdout  # the file's 1000-class fc
    for name in ("best.pt", "last.pt"):
        trained = load_checkpoint_file(tmp_path / "out" / name).model
        frozen = [key for key in start if block_of(key) in FROZEN_BY_DEFAULT]
        assert any(key.endswith("running_var") for key in frozen)
        for key in frozen:  # weights and BatchNorm statistics, bit for bit
            assert torch.equal(trained[key], start[key]), key
        for key in ("layer4.1.conv2.weight", "layer4.1.bn2.weight", "layer4.1.bn2.running_mean"):
            assert not torch.equal(trained[key], start[key]), key
        for key in ("fc.1.weight", "fc.1.bias"):
            assert not torch.equal(trained[key], built[key]), key


# --------------------------------------------------------------------------- the default architecture


def test_default_architecture_trains_and_predicts(small_data: ColourData, tmp_path: Path) -> None:
    trained = call_main(train.main, "--data-dir", small_data.root, "--output-dir", tmp_path / "out",
                        "--weights", "none", "--epochs", "1", *FAST_FLAGS)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    checkpoint = load_checkpoint_file(tmp_path / "out" / "best.pt")
    assert checkpoint.arch == "resnet50" and checkpoint.config["trainable"] == "layer4,fc"

    predicted = call_main(predict.main, "--checkpoint", tmp_path / "out" / "best.pt", "--test-dir",
                          small_data.test_dir, "--output", tmp_path / "prediction.csv", *PREDICT_FLAGS)

    assert predicted.returncode == 0, predicted.stderr
    rows = read_csv_rows(tmp_path / "prediction.csv")
    assert sorted(row["image_name"] for row in rows) == sorted(small_data.test_labels)
    assert {row["pred_label"] for row in rows} <= {"0", "1", "2"}


# --------------------------------------------------------------------------- what a run records, and says


def test_config_yaml_records_what_ran(trained_run: TrainedRun) -> None:
    text = (trained_run.output_dir / "config.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["device"] == "cpu" and config["amp"] == "off" and config["augment_device"] == "cpu"  # not auto
    assert config["workers"] == 1
    assert text.startswith("# Ran on cpu (") and "in fp32, 1 loader worker, augmentation on the cpu" in text
    runtime = load_checkpoint_file(trained_run.output_dir / "best.pt").runtime
    assert runtime["precision"] == "fp32" and runtime["device_type"] == "cpu" and runtime["torch"] == torch.__version__


def test_the_sample_config_pins_fp32_on_every_cpu() -> None:
    args = options.parse_args(["--config", str(Path(train.__file__).parent / "configs" / "sample.yaml")])
    assert args.amp == "off"


def test_config_switches_written_as_text_are_read_as_booleans(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text('channels_last: "false"\ntensorboard: "no"\ncompile: "True"\namp: off\nclass_weights: none\n')
    args = options.parse_args(["--config", str(config)])
    assert args.channels_last is False and args.tensorboard is False and args.compile is True
    assert args.amp == "off" and args.class_weights == "none"


def test_weights_none_with_a_frozen_trunk_is_warned_about(trained_run: TrainedRun) -> None:
    assert ("warning: --weights none with --trainable layer4,fc: the frozen blocks keep their random initial "
            "weights") in trained_run.result.stdout


def test_the_new_head_always_trains(capsys: pytest.CaptureFixture) -> None:
    args = options.parse_args(["--trainable", "layer4", *FAST_FLAGS])

    assert args.trainable == "layer4,fc"
    assert "the new head (fc) starts from random weights, so it always trains; training layer4,fc" in \
        capsys.readouterr().out
    model = build_model("resnet18", num_classes=3, weights="none")
    freeze_blocks(model, parse_trainable("layer4"))
    assert all(parameter.requires_grad for parameter in model.fc.parameters())


def test_the_held_out_validation_list_is_stored_and_evaluate_uses_it(
    config_run: tuple[CliResult, Path, Path], tmp_path: Path
) -> None:
    _, output_dir, data_dir = config_run
    checkpoint = load_checkpoint_file(output_dir / "best.pt")
    held_out = checkpoint.held_out_val_files
    assert len(held_out) == 3 and all((data_dir / "train" / name).is_file() for name in held_out)
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    for label in ("0", "1", "2"):  # new images change what a fresh stratified split would pick
        shutil.copy(data / "train" / held_out[0], data / "train" / label / "000-new.jpg")

    result = call_main(evaluate.main, "--checkpoint", output_dir / "best.pt", "--data-dir", data,
                       "--report-dir", tmp_path / "report", *PREDICT_FLAGS)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"3 images from the 3 images of {data / 'train'} the run held out as val" in result.stdout
    assert "rebuilt" not in result.stdout


# --------------------------------------------------------------------------- from Python, and --help


def test_main_takes_its_arguments_as_one_string(small_data: ColourData, tmp_path: Path, no_final_outputs: None) -> None:
    output = tmp_path / "with space"
    command = f"--data-dir {small_data.root} --output-dir '{output}' --epochs 1 {' '.join(TINY_TRAIN_FLAGS)}"

    with contextlib.redirect_stdout(io.StringIO()):
        summary = train.main(command)  # as typed in a notebook cell

    assert summary["epochs_run"] == 1 and (output / "best.pt").is_file()


def test_in_a_notebook_the_kernels_own_arguments_are_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/usr/lib/python3/ipykernel_launcher.py", "-f", "/root/kernel-1.json"])
    assert options.parse_args(None).epochs == 50  # the defaults, not "unrecognized arguments: -f"


PARSERS = {"train.py": options.get_args_parser, "predict.py": predict.get_args_parser,
           "evaluate.py": evaluate.get_args_parser}


@pytest.mark.parametrize("script", PARSERS)
def test_errors_and_help_name_the_script_and_every_flag_has_help(script: str) -> None:
    parser = PARSERS[script]()
    assert parser.prog == script  # not the notebook kernel's name
    assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter  # it shows each default after the help
    undocumented = [action.option_strings for action in parser._actions if not action.help]
    assert undocumented == []
    assert "(default: 128)" in re.sub(r"\s+", " ", parser.format_help())


def test_predict_takes_a_run_folder_and_test_images_in_sub_folders(trained_run: TrainedRun, tmp_path: Path) -> None:
    test_dir = tmp_path / "test"
    shutil.copytree(trained_run.data.test_dir, test_dir)
    extra = sorted(test_dir.glob("*.jpg"))[:3]
    (test_dir / "extra").mkdir()
    for path in extra:
        path.rename(test_dir / "extra" / path.name)

    result = call_main(predict.main, "--checkpoint", trained_run.output_dir, "--test-dir", test_dir,
                       "--output", tmp_path / "prediction.csv", *PREDICT_FLAGS)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"--checkpoint: using {trained_run.output_dir / 'best.pt'}" in result.stdout
    assert sorted(row["image_name"] for row in read_csv_rows(tmp_path / "prediction.csv")) == \
        sorted(trained_run.data.test_labels)


def test_an_output_path_that_is_a_folder_is_refused_before_any_work(trained_run: TrainedRun, tmp_path: Path) -> None:
    folder = tmp_path / "submissions"
    folder.mkdir()

    result = call_main(predict.main, "--checkpoint", trained_run.output_dir / "best.pt", "--test-dir",
                       trained_run.data.test_dir, "--output", folder, *PREDICT_FLAGS)

    assert_user_error(result, f"--output: {folder} is a folder", folder / "prediction.csv")
    assert list(folder.iterdir()) == []  # no temporary file left behind


def test_labels_for_other_classes_and_unlabeled_images_are_named(submission: Submission, tmp_path: Path) -> None:
    truth = dict(list(submission.truth.items())[:-1])  # the last test image has no label
    first = next(iter(truth))
    truth[first] = "purple"
    write_labels_csv(tmp_path / "answers.csv", truth)

    result = call_main(predict.main, "--checkpoint", submission.folder / "model.pt", "--test-dir",
                       submission.folder / "test", "--output", tmp_path / "p.csv", "--labels", tmp_path / "answers.csv",
                       *PREDICT_FLAGS)

    assert result.returncode == 0, result.stderr
    assert "1 test image(s) have no label and are not scored" in result.stdout
    assert "label(s) purple are not classes of the model" in result.stdout
    assert "score on 23 labeled images" in result.stdout


def test_the_report_says_what_ran_and_how_classes_are_averaged(trained_run: TrainedRun) -> None:
    report = (trained_run.output_dir / "report" / "report.md").read_text()
    assert "Trained on cpu (" in report and "in fp32, 1 loader worker, augmentation on the cpu" in report
    metrics_file = (trained_run.output_dir / "report" / "metrics.json").read_text()
    assert '"class_averages_over": "the classes with images in this split' in metrics_file
