"""Runs tried as a new user would (issue 17, round two): a short --ema run, an --output-dir inside a file, a class
added before resuming, a clean stop under torchrun, an undecodable val image, a resume past a thaw, the progress
bars (under torchrun, in a log file, in a notebook), the config line and the wording of a few messages."""

from __future__ import annotations

import io
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

import common
import distributed
import engine
import options
import pipeline
import train
import utils
from accel import Accel
from checkpoint import load_checkpoint, model_from_checkpoint
from conftest import TINY_TRAIN_FLAGS, ColourData, assert_user_error, call_main, read_csv_rows

CPU = torch.device("cpu")
GLOO_GLITCH = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.2]:4021."


def tiny_run(data_root: Path, output: Path, *flags: str | Path):
    """``train.main`` on tiny data, in this process."""
    return call_main(train.main, "--data-dir", data_root, "--output-dir", output, *TINY_TRAIN_FLAGS, *flags)


def succeeded(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture
def own_data(small_data: ColourData, tmp_path: Path) -> Path:
    """A copy of small_data that a test may change."""
    root = tmp_path / "data"
    shutil.copytree(small_data.root, root)
    return root


# --------------------------------------------------------------------------- 3: a short --ema run


def training_accuracy(checkpoint_path: Path, data_root: Path) -> float:
    """The checkpoint's accuracy on every image of train/ and val/ (what --train-on-all trained on)."""
    checkpoint = load_checkpoint(checkpoint_path)
    names = checkpoint.class_names
    samples = [(str(path), names.index(path.parent.name)) for split in ("train", "val")
               for path in sorted((data_root / split).glob("*/*.jpg"))]
    accel = Accel(CPU, channels_last=False)
    batches = pipeline.inference_batches([path for path, _ in samples], *checkpoint.preprocessing, accel,
                                        on_device=False)
    predictions = engine.predict_samples(model_from_checkpoint(checkpoint), batches, samples, accel,
                                         show_progress=False)
    return float((predictions.probabilities.argmax(axis=1) == predictions.targets).mean())


def test_a_short_final_fit_with_ema_warns_and_keeps_a_trained_average(small_data: ColourData,
                                                                       tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = succeeded(tiny_run(small_data.root, output, "--epochs", "2", "--train-on-all", "--ema", "0.99"))

    assert ("warning: --ema 0.99 averages over about 100 optimizer steps, but this run takes 8 (4 an epoch x 2 "
            "epochs)") in result.stdout
    assert "--ema 0.625 or lower fits this run" in result.stdout
    best, last = training_accuracy(output / "best.pt", small_data.root), training_accuracy(output / "last.pt",
                                                                                              small_data.root)
    assert load_checkpoint(output / "best.pt").weights == "ema"
    assert last >= 0.9 and best >= last - 0.1, (best, last)  # not an average of the untrained weights
    assert "no val (--train-on-all: train/ and val/ both train)" in result.stdout  # 23: not "val 0 images from"


def test_the_average_warms_up_on_the_host() -> None:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.zero_()
    average = engine.WeightAverage(model, 0.99)
    average.update(model)  # the first update copies the weights
    with torch.no_grad():
        model.weight.fill_(1.0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(5):
            average.update(model)
    reads = sum(event.count for event in profiler.key_averages()
                if event.key in ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero"))

    assert reads == 0 and average.updates == 6
    assert average.module.weight.min() > 0.99  # 1 - (2*3*4*5*6)/(11*12*13*14*15); without a warm-up: 0.049
    assert average.current_decay() == pytest.approx(7 / 16)


# --------------------------------------------------------------------------- 8: --output-dir inside a file


def test_an_output_dir_inside_a_file_is_refused_before_the_data_scan(small_data: ColourData, tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("a file, not a folder\n")
    result = tiny_run(small_data.root, tmp_path / "notes" / "run", "--epochs", "1")

    assert_user_error(result, f"--output-dir {tmp_path / 'notes' / 'run'}: {tmp_path / 'notes'} is a file, not a "
                              "folder; pass another --output-dir")
    assert "data:" not in result.stdout and "model:" not in result.stdout


# --------------------------------------------------------------------------- 12: a class added before resuming


def test_continuing_after_a_class_was_added_names_it_before_any_note(own_data: Path, tmp_path: Path,
                                                                     no_final_outputs: None) -> None:
    output = tmp_path / "out"
    succeeded(tiny_run(own_data, output, "--epochs", "2", "--epochs-this-run", "1"))
    shutil.copytree(own_data / "train" / "2", own_data / "train" / "zebra")

    again = tiny_run(own_data, output, "--epochs", "2", "--epochs-this-run", "1")
    assert_user_error(again, f"--output-dir {output}: {own_data / 'train'} has other classes than the 3 the run "
                             "learned (new: zebra); a run keeps its classes: start a new run there with --overwrite, "
                             "or pass another --output-dir")
    assert again.stdout == ""  # no "holds this run ...; continuing it" first
    resumed = call_main(train.main, "--resume", output / "last.pt")
    assert_user_error(resumed, f"--resume {output / 'last.pt'}: ", "(new: zebra)", "--overwrite in place of --resume")
    assert "resuming from" not in resumed.stdout

    shutil.rmtree(own_data / "train" / "zebra")
    shutil.rmtree(own_data / "train" / "1")
    assert_user_error(call_main(train.main, "--resume", output / "last.pt"), "(missing: 1)")


# --------------------------------------------------------------------------- 13: a clean stop under torchrun


def test_a_peer_that_stopped_on_request_is_not_blamed_as_a_crash() -> None:
    store = dist.HashStore()
    rank0 = common.World(rank=0, local_rank=0, world_size=2, timeout_s=0.3, store=store)
    rank1 = common.World(rank=1, local_rank=1, world_size=2, timeout_s=0.3, store=store)
    distributed.announce_stop(rank0)  # rank 0 leaves after a Ctrl-C

    with pytest.raises(distributed.PeerStoppedError) as raised:
        with distributed.peer_failures(rank1, "epoch 3"):
            raise RuntimeError(GLOO_GLITCH)
    assert str(raised.value) == ("rank 1 of 2: rank 0 stopped on request (Ctrl-C or SIGTERM) during epoch 3; this "
                                 "process stops too")
    assert "crashed" not in str(raised.value)


def test_a_peer_that_did_not_announce_a_stop_is_still_named_as_silent() -> None:
    world = common.World(rank=1, local_rank=1, world_size=2, timeout_s=0.3, store=dist.HashStore())
    with pytest.raises(distributed.PeerLostError) as raised:
        with distributed.peer_failures(world, "epoch 3"):
            raise RuntimeError(GLOO_GLITCH)
    assert not isinstance(raised.value, distributed.PeerStoppedError)
    assert "rank 0 stopped answering (crashed, hung or was stopped" in str(raised.value)


# --------------------------------------------------------------------------- 15: an undecodable val image


def test_an_undecodable_val_image_is_listed_in_skipped_files(own_data: Path, tmp_path: Path,
                                                             no_final_outputs: None) -> None:
    broken = own_data / "val" / "1" / "truncated.jpg"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    broken.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 6 // 10])  # the header reads, the data does not

    result = succeeded(tiny_run(own_data, tmp_path / "out", "--epochs", "1"))

    assert f"warning: skipping {broken}: cannot decode" in result.stderr
    listed = dict(line.split("\t") for line in (tmp_path / "out" / "skipped_files.txt").read_text().splitlines())
    assert listed[str(broken)].startswith("image file is truncated")


# --------------------------------------------------------------------------- 16: a resume past a thaw


def test_a_resume_past_a_thaw_counts_the_thawed_parameters(small_data: ColourData, tmp_path: Path,
                                                            no_final_outputs: None) -> None:
    output = tmp_path / "out"
    first = succeeded(tiny_run(small_data.root, output, "--epochs", "3", "--epochs-this-run", "2",
                               "--unfreeze-at", "layer3:2"))
    thawed_count = first.stdout.split("epoch 2: layer3 start(s) training (--unfreeze-at); now ")[1].split(" ")[0]

    resumed = succeeded(call_main(train.main, "--resume", output / "last.pt"))

    assert (f"training layer4,fc and, since --unfreeze-at, layer3: {thawed_count} of 11.2M parameters"
            in resumed.stdout), resumed.stdout


# --------------------------------------------------------------------------- 18, 21, 22: progress bars


def test_under_torchrun_the_bar_says_whose_figures_it_shows() -> None:
    assert distributed.bar_label("epoch 3/10", common.World(world_size=2)) == "epoch 3/10 (rank 0's images)"
    assert distributed.bar_label("epoch 3/10", common.World()) == "epoch 3/10"


def test_no_progress_bars_in_a_redirected_log(small_data: ColourData, tmp_path: Path) -> None:
    flags = [flag for flag in TINY_TRAIN_FLAGS if flag != "--no-progress"]
    result = call_main(train.main, "--data-dir", small_data.root, "--output-dir", tmp_path / "out", *flags,
                       "--epochs", "1")  # standard error is not a terminal here

    assert result.returncode == 0 and "\r" not in result.stderr and "it/s" not in result.stderr, result.stderr[-500:]


@pytest.fixture
def notebook(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in Jupyter: IPython is loaded and a shell runs."""
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: object()))


def test_in_a_notebook_a_refused_call_raises_the_one_line_error(notebook: None, small_data: ColourData,
                                                                tmp_path: Path) -> None:
    with pytest.raises(utils.UserError) as raised:
        train.main(["--data-dir", small_data.root / "missing", "--output-dir", tmp_path / "out", *TINY_TRAIN_FLAGS])
    assert str(raised.value).startswith(f"--data-dir {small_data.root / 'missing'}: folder not found")
    assert raised.value._render_traceback_() == [f"error: {raised.value}"]  # what Jupyter shows instead of a trace
    with pytest.raises(utils.UserError, match="^train.py: argument --amp: invalid choice: 'fast'"):
        train.main(["--amp", "fast"])


def test_in_a_notebook_progress_bars_still_show(notebook: None) -> None:
    bar = utils.progress_bar(range(3), "val", enabled=True)
    assert not bar.disable
    bar.close()


# --------------------------------------------------------------------------- 20: the config line


def test_the_config_is_one_line_of_what_differs_printed_after_the_checks(small_data: ColourData, tmp_path: Path,
                                                                          no_final_outputs: None) -> None:
    output = tmp_path / "out"
    result = succeeded(tiny_run(small_data.root, output, "--epochs", "1", "--label-smoothing", "0.1"))

    [line] = [line for line in result.stdout.splitlines() if line.startswith("config")]
    assert " --epochs 1 " in line and " --label-smoothing 0.1 " in line and " --no-progress " in line
    assert "--patience" not in line and "--optimizer" not in line  # at their defaults
    assert line.endswith(f"(all options in {output / 'config.yaml'})")
    assert "patience: 10" in (output / "config.yaml").read_text()
    refused = tiny_run(small_data.root / "missing", tmp_path / "other", "--epochs", "1")
    assert_user_error(refused, "folder not found")
    assert "config" not in refused.stdout


# --------------------------------------------------------------------------- 23: wording


def test_messages_read_as_english(small_data: ColourData, tmp_path: Path) -> None:
    output = tmp_path / "out"
    first = succeeded(tiny_run(small_data.root, output, "--epochs", "1"))
    assert "device: cpu (1 thread)," in first.stdout  # the tests run torch on one thread

    complete = succeeded(tiny_run(small_data.root, output, "--epochs", "1"))
    assert f"the run in {output} is complete (its 1 epoch trained; best val" in complete.stdout
    changed = call_main(train.main, "--resume", output / "last.pt", "--img-size", "48")
    assert_user_error(changed, "--resume: --img-size differs from the checkpoint's")
    assert len(read_csv_rows(output / "history.csv")) == 1


@pytest.mark.parametrize("argv, config, given", [
    (["--val-fraction", "0.2"], None, True),
    (["--val-frac=0.2"], None, True),  # argparse's abbreviation and = spelling
    ([], "val_fraction: 0.2\n", True),
    ([], None, False),
])
def test_train_knows_whether_val_fraction_was_given(tmp_path: Path, argv: list[str], config: str | None,
                                                    given: bool) -> None:
    if config is not None:
        (tmp_path / "run.yaml").write_text(config)
        argv = [*argv, "--config", str(tmp_path / "run.yaml")]
    args = options.parse_args([*argv, "--output-dir", str(tmp_path / "out")])
    assert args.val_fraction_given is given
    assert "val_fraction_given" not in args.saved_options()
