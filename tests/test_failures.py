"""Failures during a run and untrusted files: checkpoints that would run code when unpickled, a loss that turns
NaN, CUDA running out of memory. Each ends in one clean ``error: ...`` line, exit code 2, and keeps what was good.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import evaluate
import options
import predict
import train
from accel import Accel
from checkpoint import load_checkpoint, make_checkpoint
from common import IMAGENET_MEAN, IMAGENET_STD, Batch
from conftest import PREDICT_FLAGS, TINY_TRAIN_FLAGS, CliResult, ColourData, assert_user_error, call_main, read_csv_rows
from engine import NonFiniteLossError, make_optimizer, train_one_epoch
from model import build_model, freeze_blocks, parse_trainable

# --------------------------------------------------------------------------- checkpoints that would run code


class WritesMarker:
    """Unpickling this object runs code: it writes ``marker``. What a hostile checkpoint would hide."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('code ran')",)


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint in train.py's format (training state included) with a code-running object inside."""
    args = options.parse_args(["--arch", "resnet18", "--weights", "none", *TINY_TRAIN_FLAGS])
    model = build_model("resnet18", num_classes=3, weights="none")
    freeze_blocks(model, parse_trainable(args.trainable))
    checkpoint = make_checkpoint(model, ["0", "1", "2"], args.saved_options(), 1, {}, IMAGENET_MEAN,
                                 IMAGENET_STD).to_dict()
    checkpoint["training_state"] = {"progress": {"epoch": 1}, "hook": WritesMarker(marker)}
    torch.save(checkpoint, path)  # the default pickle protocol
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(hostile last.pt, the marker file its payload would write); the payload is checked to be live."""
    folder = tmp_path_factory.mktemp("hostile")
    probe_marker = folder / "probe-ran"
    torch.load(hostile_checkpoint(folder / "probe.pt", probe_marker), weights_only=False)
    assert probe_marker.read_text() == "code ran"  # an unsafe load really runs the payload
    marker = folder / "payload-ran"
    return hostile_checkpoint(folder / "last.pt", marker), marker


def refuses(result, marker: Path, *fragments: str | Path) -> None:
    assert_user_error(result, *fragments)
    assert not marker.exists(), "loading the checkpoint ran the code inside it"


def test_predict_refuses_a_checkpoint_that_would_run_code(hostile, small_data: ColourData, tmp_path: Path) -> None:
    path, marker = hostile
    output = tmp_path / "prediction.csv"
    result = call_main(predict.main, "--checkpoint", path, "--test-dir", small_data.test_dir, "--output", output,
                       *PREDICT_FLAGS)
    refuses(result, marker, "--checkpoint", path, "unsafe to load")
    assert not output.exists()


def test_evaluate_refuses_a_checkpoint_that_would_run_code(hostile, small_data: ColourData, tmp_path: Path) -> None:
    path, marker = hostile
    result = call_main(evaluate.main, "--checkpoint", path, "--data-dir", small_data.root, "--report-dir",
                       tmp_path / "report", *PREDICT_FLAGS)
    refuses(result, marker, "--checkpoint", path, "unsafe to load")
    assert not (tmp_path / "report").exists()


def test_resume_refuses_a_checkpoint_that_would_run_code(hostile) -> None:
    path, marker = hostile
    refuses(call_main(train.main, "--resume", path), marker, path, "unsafe to load")


def test_weights_refuse_a_file_that_would_run_code(hostile, small_data: ColourData, tmp_path: Path) -> None:
    path, marker = hostile
    result = call_main(train.main, "--data-dir", small_data.root, "--output-dir", tmp_path / "out", "--epochs", "1",
                       *TINY_TRAIN_FLAGS, "--weights", path)
    refuses(result, marker, "--weights", path, "not a readable PyTorch weights file")
    assert not (tmp_path / "out" / "best.pt").exists()


# --------------------------------------------------------------------------- a loss that is not finite


class NaNFromCall(nn.Module):
    """A loss that turns NaN from the ``start``-th training batch on (evaluation calls, without grad, stay real)."""

    def __init__(self, criterion: nn.Module, start: int) -> None:
        super().__init__()
        self.criterion, self.start, self.calls = criterion, start, 0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(logits, targets)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls >= self.start:
                return loss * float("nan")
        return loss


def train_with_nan_loss(monkeypatch: pytest.MonkeyPatch, data: ColourData, output: Path, from_call: int,
                        epochs: int) -> CliResult:
    """train.py on ``data`` whose loss turns NaN from its ``from_call``-th training batch on."""
    make_criterion = train.make_criterion
    monkeypatch.setattr(train, "make_criterion", lambda *args: NaNFromCall(make_criterion(*args), start=from_call))
    return call_main(train.main, "--data-dir", data.root, "--output-dir", output, "--epochs", str(epochs),
                     *TINY_TRAIN_FLAGS)


def test_nan_loss_stops_with_the_epoch_and_batch_and_keeps_earlier_checkpoints(
    small_data: ColourData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "out"
    # 12 images in batches of 4: three batches an epoch, so the 5th training batch is epoch 2, batch 2
    result = train_with_nan_loss(monkeypatch, small_data, output, from_call=5, epochs=3)

    line = assert_user_error(result, "diverged in epoch 2", "nan at batch 2", output, "--lr")
    assert f"{output / 'last.pt'} keeps epoch 1, the last good one" in line
    assert "--amp off" not in line  # the run already used fp32
    last = load_checkpoint(output / "last.pt")
    assert last.epoch == load_checkpoint(output / "best.pt").epoch == 1
    assert all(torch.isfinite(value).all() for value in last.model.values() if value.is_floating_point())
    assert [row["epoch"] for row in read_csv_rows(output / "history.csv")] == ["1"]


def test_nan_loss_in_the_first_batch_writes_no_checkpoint(
    small_data: ColourData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "out"
    result = train_with_nan_loss(monkeypatch, small_data, output, from_call=1, epochs=2)

    line = assert_user_error(result, "diverged in epoch 1", "nan at batch 1")
    assert "nothing was saved" in line and "keeps" not in line
    assert not (output / "best.pt").exists() and not (output / "last.pt").exists()


def test_a_nan_loss_leaves_the_weights_of_the_last_good_step(small_data: ColourData) -> None:
    """The check comes before optimizer.step(): a NaN loss must not reach the weights."""
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, weights="none")
    criterion = NaNFromCall(nn.CrossEntropyLoss(), start=2)
    optimizer = make_optimizer(list(model.parameters()), 1e-3, 1e-4, torch.device("cpu"))
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    batches = [Batch(images, targets, [0, 1, 2, 3], []), Batch(images, targets, [0, 1, 2, 3], [])]
    after_first_step: dict[str, torch.Tensor] = {}

    def remember_first_step() -> bool:
        after_first_step.update({name: value.clone() for name, value in model.named_parameters()})
        return False

    with pytest.raises(NonFiniteLossError):
        train_one_epoch(model, batches, criterion, optimizer, Accel(torch.device("cpu")), show_progress=False,
                        should_stop=remember_first_step)

    for name, value in model.named_parameters():  # no step was taken with the NaN loss
        assert torch.equal(value, after_first_step[name]), name
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


# --------------------------------------------------------------------------- out of GPU memory


def test_cuda_out_of_memory_is_one_line_suggesting_a_smaller_batch(
    small_data: ColourData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB total)")

    monkeypatch.setattr(train, "train_one_epoch", out_of_memory)

    result = call_main(train.main, "--data-dir", small_data.root, "--output-dir", tmp_path / "out", "--epochs", "1",
                       *TINY_TRAIN_FLAGS)

    assert_user_error(result, "out of GPU memory", "--batch-size 4", "epoch 1", "--batch-size 2")
    assert "Tried to allocate" not in result.stderr


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_file(
        small_data: ColourData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(obj: Any, path: Any) -> None:
        Path(path).write_bytes(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6447232 vs 6447128")

    monkeypatch.setattr(torch, "save", full_disk)
    output = tmp_path / "out"

    result = call_main(train.main, "--data-dir", small_data.root, "--output-dir", output, *TINY_TRAIN_FLAGS,
                       "--epochs", "1")

    assert_user_error(result, f"cannot write {output / 'best.pt'} ([enforce fail at inline_container.cc:672]",
                      "MiB free there, and the new file needs about", "make room, or use another output folder")
    assert not list(output.glob("*.pt*"))  # neither best.pt nor its temporary sibling
