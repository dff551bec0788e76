"""options.py: train.py's flags and --config file become one frozen TrainConfig, with every ``auto`` decided once
(run_config.py). The checks' one-line refusals are tested with the commands in test_errors.py; here, what the
configuration holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import options
from run_config import INVOCATION_OPTIONS, TrainConfig, option_names
from utils import UserError

CUDA = torch.device("cuda")


def config_of(tmp_path: Path, *flags: str) -> TrainConfig:
    """train.py's configuration for ``flags`` (a small ResNet-18 run on the CPU unless they say otherwise)."""
    return options.parse_args(["--output-dir", str(tmp_path / "out"), "--arch", "resnet18", "--weights", "none",
                               "--img-size", "32", *flags])


def test_the_configuration_is_frozen(tmp_path: Path) -> None:
    config = config_of(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0  # type: ignore[misc]


def test_every_auto_is_decided_when_the_options_are_read(tmp_path: Path) -> None:
    config = config_of(tmp_path, "--device", "cpu", "--amp", "off", "--workers", "auto")

    assert isinstance(config.workers, int) and config.workers >= 0  # --workers auto as the count it chose
    assert config.chosen.device == torch.device("cpu") and config.chosen.amp_dtype is None
    assert config.chosen.precision == "fp32"
    assert (config.chosen.train_path, config.chosen.eval_path) == ("cpu", "cpu")  # --augment-device auto off CUDA
    assert (config.device, config.amp, config.augment_device) == ("cpu", "off", "auto")  # as asked, as saved


def test_the_options_saved_with_a_run_are_the_parsers_but_this_invocations() -> None:
    parser_options = {action.dest for action in options.get_args_parser()._actions} - {"help", "help_all"}
    assert set(option_names()) == parser_options - set(INVOCATION_OPTIONS)  # no option forgotten in TrainConfig


def test_saved_options_are_plain_values_sorted_by_name(tmp_path: Path) -> None:
    saved = config_of(tmp_path, "--trainable", "layer4").saved_options()

    assert list(saved) == sorted(saved) and "chosen" not in saved and "resume" not in saved
    assert saved["trainable"] == "layer4,fc"  # spelled out: the new head always trains
    assert all(isinstance(value, (str, int, float, bool, type(None))) for value in saved.values())


@pytest.mark.parametrize("policy, train_path", [("none", "gpu"), ("ta_wide", "cpu")])
def test_on_cuda_an_auto_augment_policy_sends_only_the_training_images_to_the_cpu_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], policy: str,
        train_path: str) -> None:
    monkeypatch.setattr(options, "pick_device", lambda name: CUDA)  # a CUDA machine, as far as the choice goes
    monkeypatch.setattr(options, "resolve_amp", lambda amp, device: torch.bfloat16)

    config = config_of(tmp_path, "--auto-augment", policy)

    assert (config.chosen.train_path, config.chosen.eval_path) == (train_path, "gpu")
    notes = capsys.readouterr().out.count("runs in the loader workers: training images take the CPU path")
    assert notes == (policy != "none")  # said once, where it is decided


def test_the_config_yaml_header_says_where_each_split_was_decoded(tmp_path: Path) -> None:
    runtime = {"device": "NVIDIA H100", "device_type": "cuda", "precision": "bf16", "workers": 8, "processes": 1,
               "augment_device": "gpu", "train_data_path": "cpu", "torch": "2.14", "torchvision": "0.29",
               "python": "3.11"}
    text = options.config_yaml(config_of(tmp_path).saved_options(), runtime)

    assert "training images on the cpu (--auto-augment), validation on the gpu" in text.splitlines()[0]
    assert "augment_device: gpu" in text  # what the run asked for, as it came to here: the file repeats the run
    same = options.config_yaml(config_of(tmp_path).saved_options(), {**runtime, "train_data_path": "gpu"})
    assert "augmentation on the gpu" in same.splitlines()[0]


def test_unfreeze_at_is_decided_once_as_the_thaw_schedule(tmp_path: Path) -> None:
    config = config_of(tmp_path, "--epochs", "4", "--trainable", "layer4,fc", "--unfreeze-at", "layer3:2,all:3")

    assert config.thaw_schedule == {2: ["layer3"], 3: ["conv1", "bn1", "layer1", "layer2"]}


def test_a_device_or_precision_this_machine_lacks_is_refused_when_the_options_are_read(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: no CUDA GPU"):
            config_of(tmp_path, "--device", "cuda")
        with pytest.raises(UserError, match="--amp fp16: needs a CUDA GPU"):
            config_of(tmp_path, "--device", "cpu", "--amp", "fp16")


def test_options_of_an_older_run_that_train_py_no_longer_has_are_left_out(tmp_path: Path) -> None:
    args = options.get_args_parser().parse_args(["--output-dir", str(tmp_path), "--arch", "resnet18"])
    args.val_fraction_given, args.an_option_since_removed = False, 1  # as set_defaults from an old checkpoint makes

    config = options.build_config(args)

    assert "an_option_since_removed" not in config.saved_options()


def test_an_old_runs_cache_switch_and_a_yaml_number_are_spelled_out(tmp_path: Path) -> None:
    args = options.get_args_parser().parse_args(["--output-dir", str(tmp_path), "--arch", "resnet18"])
    args.val_fraction_given = False
    args.cache, args.max_params = True, 30000000  # --cache was a switch; YAML reads max_params: 30000000 as a number

    config = options.build_config(args)

    assert (config.cache, config.max_params) == ("auto", "30000000")


def test_the_config_line_names_only_what_differs_from_the_defaults(tmp_path: Path) -> None:
    config = config_of(tmp_path, "--lr", "0.001", "--no-channels-last", "--train-on-all")

    line = options.describe_config(config.saved_options(), tmp_path)

    assert "--lr 0.001" in line and "--no-channels-last" in line and "--train-on-all" in line
    assert "--epochs" not in line and line.endswith(f"(all options in {tmp_path / 'config.yaml'})")


def test_the_given_options_are_told_apart_from_the_defaults() -> None:
    assert options.given_options(["--val-frac", "0.2", "--lr=0.1"]) == {"val_fraction", "lr"}  # abbreviations too
    assert options.flag_text("train_on_all", True) == "--train-on-all"
    assert options.flag_text("channels_last", False) == "--no-channels-last"
    assert options.flag_text("data_dir", "my data") == "--data-dir 'my data'"


def test_fold_text_is_read_as_fold_i_of_k() -> None:
    assert options.parse_fold(" 2 / 5 ") == (2, 5)
    for wrong in ("0/5", "6/5", "1/1", "a/b", "3"):
        with pytest.raises(UserError, match=f"--fold {wrong}: write I/K"):
            options.parse_fold(wrong)


def test_a_config_file_value_is_converted_as_its_flag_would_be(tmp_path: Path) -> None:
    parser = options.get_args_parser()
    actions = {action.dest: action for action in parser._actions}

    assert options.config_value(actions["amp"], False, "c.yaml") == "off"  # YAML's `amp: off` is the boolean false
    assert options.config_value(actions["tensorboard"], "yes", "c.yaml") is True
    assert options.config_value(actions["lr"], "1e-3", "c.yaml") == pytest.approx(1e-3)
    with pytest.raises(UserError, match="--config c.yaml: epochs: 'many' is not a whole number"):
        options.config_value(actions["epochs"], "many", "c.yaml")


def test_no_module_but_the_scripts_and_options_takes_a_namespace() -> None:
    # Every module but the scripts and options.py takes the typed configuration (or its parts), never a Namespace.
    root = Path(options.__file__).parent
    scripts = {"train.py", "predict.py", "evaluate.py", "export.py", "options.py", "utils.py"}  # utils: the parser
    takers = [path.name for path in root.glob("*.py") if path.name not in scripts
              and "argparse.Namespace" in path.read_text(encoding="utf-8")]
    assert takers == []
