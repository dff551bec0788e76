"""checkpoint.py: the typed :class:`Checkpoint`, its stored form (format 2: tensors and plain values only), the round
trip through a file, files of format 1 (keys missing that later versions write), the atomic writes, and each file
``load_checkpoint`` refuses, in one line naming the flag and the file. How the scripts show those refusals (exit
code 2, no traceback) is in test_errors.py and test_failures.py; a temperature's effect on evaluation, in
test_calibration.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import FrozenInstanceError, dataclass, fields, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from checkpoint import (
    CHECKPOINT_FORMAT,
    FORMAT_NAME,
    FORMAT_VERSION,
    Checkpoint,
    format_version,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    store_temperature,
)
from conftest import assert_same, save_as_version_1
from model import build_model, freeze_blocks, parse_trainable
from resume import Progress, TrainingState, training_state
from utils import UserError

CLASSES = ["cat", "dog", "fox"]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
# The options a run saves, as far as checkpoint.py reads them (run_config.TrainConfig.saved_options has them all).
CONFIG = {"arch": "resnet18", "img_size": 32, "test_size": 40, "trainable": "layer4,fc", "dropout": 0.0,
          "epochs": 5, "lr": 1e-3}


def tiny_checkpoint(**options: Any) -> Checkpoint:
    """The checkpoint of a tiny linear model after epoch 2, for a run with :data:`CONFIG` (``options`` override)."""
    torch.manual_seed(0)
    return make_checkpoint(nn.Linear(4, len(CLASSES)), CLASSES, {**CONFIG, **options}, epoch=2,
                           metrics={"val_acc": 0.75, "val_loss": 0.5}, mean=MEAN, std=STD)


def last_pt_checkpoint() -> Checkpoint:
    """A last.pt with every field set, none at its default: a trained step's optimizer state, a scaler, the random
    states, a moving average and a fitted temperature."""
    torch.manual_seed(0)
    model = nn.Linear(4, len(CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()  # the optimizer now holds tensors (exp_avg, step) to round-trip
    progress = Progress(epoch=2, best_val_acc=0.75, best_epoch=1, best_score=0.75, best_weights="ema",
                        history=[{"epoch": 1.0, "val_acc": 0.75}, {"epoch": 2.0, "val_acc": 0.5}],
                        best_predictions=[0, 2, 1], best_targets=[0, 1, 1])
    checkpoint = make_checkpoint(model, CLASSES, CONFIG, 2, {"val_acc": 0.5}, MEAN, STD,
                                 held_out=["train/cat/a.jpg", "train/dog/b.jpg"],
                                 runtime={"device": "cpu", "processes": 1})
    return replace(checkpoint, temperature=1.5, weights="ema",
                   training_state=training_state(progress, optimizer, torch.amp.GradScaler("cpu"), ema_updates=7),
                   ema_model={key: value + 1 for key, value in checkpoint.model.items()})


def assert_same_checkpoint(first: Checkpoint, second: Checkpoint) -> None:
    """Every field equal; tensors bitwise, the training state field by field."""
    for name in (field.name for field in fields(Checkpoint)):
        value, other = getattr(first, name), getattr(second, name)
        if isinstance(value, TrainingState):
            assert_same(vars(value), vars(other), name)
        else:
            assert_same(value, other, name)
            assert type(value) is type(other), name  # mean and std come back as tuples, not lists


# --------------------------------------------------------------------------- the stored form and the round trip


@pytest.mark.parametrize("save", [save_checkpoint, save_as_version_1], ids=["format 2", "format 1"])
def test_every_field_survives_a_round_trip_through_a_file(save: Callable[[Checkpoint, Path], Any],
                                                        tmp_path: Path) -> None:
    original = last_pt_checkpoint()
    for field in fields(Checkpoint):  # none at what a reader fills in for a missing key, or the round trip proves less
        if field.name != "split_recorded":  # True: the file says whether a split was held out, as current ones do
            assert getattr(original, field.name) not in ({}, [], None, 0, 1.0, field.default), field.name
    assert original.test_size != original.img_size

    save(original, tmp_path / "last.pt")

    assert_same_checkpoint(load_checkpoint(tmp_path / "last.pt"), original)


def test_a_stored_checkpoint_holds_only_tensors_and_plain_values(tmp_path: Path) -> None:
    save_checkpoint(last_pt_checkpoint(), tmp_path / "last.pt")

    stored = torch.load(tmp_path / "last.pt", weights_only=True)  # refuses any other object

    assert stored["format"] == CHECKPOINT_FORMAT == f"{FORMAT_NAME}/{FORMAT_VERSION}"
    plain = (torch.Tensor, str, int, float, bool, type(None))
    pending: list[Any] = [stored]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            assert all(isinstance(key, (str, int)) for key in value), value.keys()
            pending.extend(value.values())
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
        else:
            assert isinstance(value, plain), type(value)


def test_format_2_writes_every_key_even_when_unset(tmp_path: Path) -> None:
    """A fresh best.pt has no temperature and no held-out list yet: the keys are there, as None."""
    save_checkpoint(tiny_checkpoint(), tmp_path / "best.pt")

    stored = torch.load(tmp_path / "best.pt", weights_only=True)

    assert stored["temperature"] is None and stored["held_out_val_files"] is None and stored["runtime"] == {}
    assert {"model", "arch", "class_names", "img_size", "test_size", "mean", "std", "config", "epoch", "metrics",
            "weights"} <= stored.keys()
    assert "training_state" not in stored and "ema_model" not in stored  # last.pt only
    assert "split_recorded" not in stored  # what a reader learns from the file, not part of it


def test_make_checkpoint_takes_the_evaluation_size_from_the_options() -> None:
    assert tiny_checkpoint(test_size=48).eval_size == 48
    assert tiny_checkpoint(test_size=None).eval_size == 32  # no --test-size: the --img-size


def test_make_checkpoint_stores_plain_values_it_does_not_share_with_the_caller() -> None:
    config, metrics = dict(CONFIG), {"val_acc": torch.tensor(0.75).item(), "top5": 1}
    checkpoint = make_checkpoint(nn.Linear(4, 3), CLASSES, config, 1, metrics, MEAN, STD)
    config["lr"] = 0.5  # the caller's dict changes afterwards

    assert checkpoint.config["lr"] == 1e-3
    assert checkpoint.metrics == {"val_acc": 0.75, "top5": 1.0} and type(checkpoint.metrics["top5"]) is float
    assert checkpoint.held_out_val_files is None and checkpoint.runtime == {} and checkpoint.temperature is None
    assert all(not tensor.requires_grad and tensor.device.type == "cpu" for tensor in checkpoint.model.values())


def test_what_prediction_reads_comes_from_the_evaluation_size_and_normalization() -> None:
    checkpoint = tiny_checkpoint()

    assert checkpoint.eval_size == 40 and checkpoint.img_size == 32
    assert checkpoint.preprocessing == (40, MEAN, STD)
    assert checkpoint.logit_temperature == 1.0  # none fitted yet


def test_a_checkpoint_is_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        tiny_checkpoint().temperature = 2.0  # type: ignore[misc]


# --------------------------------------------------------------------------- the temperature, written atomically


def test_store_temperature_writes_it_and_returns_the_checkpoint_written(tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint()
    save_checkpoint(checkpoint, tmp_path / "best.pt")

    written = store_temperature(checkpoint, tmp_path / "best.pt", 2)

    assert written.temperature == 2.0 and type(written.temperature) is float
    assert checkpoint.temperature is None  # a new checkpoint: the one passed in is unchanged
    assert_same_checkpoint(load_checkpoint(tmp_path / "best.pt"), written)
    assert load_checkpoint(tmp_path / "best.pt").logit_temperature == 2.0


def test_store_temperature_interrupted_mid_write_leaves_the_old_file(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "best.pt"
    checkpoint = tiny_checkpoint()
    save_checkpoint(checkpoint, path)

    def interrupted_save(obj: object, file: str | Path) -> None:
        Path(file).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        store_temperature(checkpoint, path, 1.5)
    monkeypatch.undo()

    assert_same_checkpoint(load_checkpoint(path), checkpoint)  # the old file, whole, without a temperature
    assert [file.name for file in tmp_path.iterdir()] == ["best.pt"]  # no half-written temporary file left


# --------------------------------------------------------------------------- files of format 1


# What format-1 files could lack: train.py added these keys one by one.
KEYS_ADDED_AFTER_VERSION_1 = ("test_size", "temperature", "held_out_val_files", "runtime", "epoch", "metrics")


def test_a_version_1_file_without_the_later_keys_loads_with_their_defaults(tmp_path: Path) -> None:
    newer = last_pt_checkpoint()
    progress_before_monitor = {key: value for key, value in newer.training_state.progress.items()
                               if key != "best_score"}  # before --monitor, best.pt followed the val accuracy
    older = replace(newer, training_state=replace(newer.training_state, progress=progress_before_monitor))
    path = save_as_version_1(older, tmp_path / "last.pt", leave_out=KEYS_ADDED_AFTER_VERSION_1)
    assert format_version(torch.load(path, weights_only=True)) == 1

    loaded = load_checkpoint(path)

    assert loaded.test_size == loaded.eval_size == loaded.img_size == 32  # evaluated at the training size
    assert loaded.preprocessing == (32, MEAN, STD)
    assert loaded.temperature is None and loaded.logit_temperature == 1.0
    assert loaded.held_out_val_files is None and loaded.split_recorded is False  # the split must be rebuilt
    assert (loaded.runtime, loaded.epoch, loaded.metrics) == ({}, 0, {})
    assert loaded.training_state.run_progress().best_score == 0.75  # its best val accuracy
    assert_same(loaded.model, newer.model, "model")
    assert_same(loaded.ema_model, newer.ema_model, "ema_model")


def test_a_version_1_file_with_unset_test_size_and_runtime_loads(tmp_path: Path) -> None:
    """Some format-1 files stored the unset options as None rather than leaving the keys out."""
    path = save_as_version_1(replace(tiny_checkpoint(), runtime=None, test_size=None), tmp_path / "best.pt")

    loaded = load_checkpoint(path)

    assert loaded.eval_size == 32 and loaded.runtime == {}


def test_split_recorded_tells_no_list_apart_from_a_file_older_than_the_lists(tmp_path: Path) -> None:
    """None in a current file: the run held nothing out of train/ (a val/ folder, --train-on-all). A file from
    before the lists were stored cannot say: its split has to be rebuilt."""
    save_checkpoint(tiny_checkpoint(), tmp_path / "current.pt")
    save_as_version_1(tiny_checkpoint(), tmp_path / "with-list-key.pt")
    save_as_version_1(tiny_checkpoint(), tmp_path / "older.pt", leave_out=["held_out_val_files"])

    assert load_checkpoint(tmp_path / "current.pt").split_recorded is True
    assert load_checkpoint(tmp_path / "with-list-key.pt").split_recorded is True
    assert load_checkpoint(tmp_path / "older.pt").split_recorded is False


@pytest.mark.parametrize(("stored", "version"), [
    ({"format": CHECKPOINT_FORMAT}, FORMAT_VERSION),
    ({"format": f"{FORMAT_NAME}/1"}, 1),
    ({"format": f"{FORMAT_NAME}/12"}, 12),
    ({"format": "someone-elses-checkpoint/2"}, None),
    ({"format": f"{FORMAT_NAME}/2b"}, None),
    ({"format": FORMAT_NAME}, None),
    ({"format": 2}, None),
    ({"state_dict": {}}, None),
    ([CHECKPOINT_FORMAT], None),
])
def test_format_version_reads_ours_and_nothing_else(stored: Any, version: int | None) -> None:
    assert format_version(stored) == version


# --------------------------------------------------------------------------- files refused, in one line


@dataclass(frozen=True)
class Refusal:
    """A file ``load_checkpoint`` must refuse, and what its message must say after the flag and the path."""

    path: Path
    fragments: tuple[str, ...]


def missing_file(tmp_path: Path) -> Refusal:
    return Refusal(tmp_path / "run" / "last.pt", ("file not found", "train first"))


def someone_elses_file(tmp_path: Path) -> Refusal:
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 4)}, "epoch": 3}, tmp_path / "other.pt")
    return Refusal(tmp_path / "other.pt", ("not a checkpoint written by this project's train.py",))


def someone_elses_format(tmp_path: Path) -> Refusal:
    torch.save({**tiny_checkpoint().to_dict(), "format": "someone-elses-checkpoint/2"}, tmp_path / "other.pt")
    return Refusal(tmp_path / "other.pt", ("not a checkpoint written by this project's train.py",))


def newer_format(tmp_path: Path) -> Refusal:
    torch.save({**tiny_checkpoint().to_dict(), "format": f"{FORMAT_NAME}/{FORMAT_VERSION + 1}"}, tmp_path / "new.pt")
    return Refusal(tmp_path / "new.pt", ("written by a newer version of this project",
                                         f"(checkpoint format {FORMAT_VERSION + 1}, this one reads up to "
                                         f"{FORMAT_VERSION})", "update the code (git pull)"))


def incomplete_file(tmp_path: Path) -> Refusal:
    stored = {key: value for key, value in tiny_checkpoint().to_dict().items() if key not in ("class_names", "std")}
    torch.save(stored, tmp_path / "part.pt")
    return Refusal(tmp_path / "part.pt", ("incomplete checkpoint, missing class_names, std",))


def git_lfs_pointer(tmp_path: Path) -> Refusal:
    (tmp_path / "best.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 94000000\n")
    return Refusal(tmp_path / "best.pt", ("a Git LFS pointer, not the file itself", "git lfs pull"))


def truncated_file(tmp_path: Path) -> Refusal:
    save_checkpoint(tiny_checkpoint(), tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:600])
    return Refusal(tmp_path / "cut.pt", ("truncated or corrupt",))


def empty_file(tmp_path: Path) -> Refusal:
    (tmp_path / "empty.pt").write_bytes(b"")
    return Refusal(tmp_path / "empty.pt", ("truncated or corrupt",))


@pytest.mark.parametrize("flag", ["--checkpoint", "--resume"])
@pytest.mark.parametrize("make_refusal", [missing_file, someone_elses_file, someone_elses_format, newer_format,
                                          incomplete_file, git_lfs_pointer, truncated_file, empty_file],
                         ids=lambda make_refusal: make_refusal.__name__)
def test_a_file_that_is_not_a_checkpoint_to_load_is_refused_naming_the_flag_and_the_file(
        make_refusal: Callable[[Path], Refusal], flag: str, tmp_path: Path) -> None:
    refusal = make_refusal(tmp_path)

    with pytest.raises(UserError) as refused:
        load_checkpoint(refusal.path, flag=flag)

    message = str(refused.value)
    assert message.startswith(f"{flag} {refusal.path}: ") and "\n" not in message
    for fragment in refusal.fragments:
        assert fragment in message, (fragment, message)


def test_a_corrupt_file_is_told_where_to_find_another_copy_for_the_flag_at_hand(tmp_path: Path) -> None:
    path = truncated_file(tmp_path).path
    with pytest.raises(UserError, match=r"use another copy, or the run's last\.pt or best\.pt$"):
        load_checkpoint(path)
    with pytest.raises(UserError, match=r"use another copy of it$"):  # a run resumes only from its own last.pt
        load_checkpoint(path, flag="--resume")


class WritesMarker:
    """Unpickling this object runs code: it writes ``marker``. What a hostile checkpoint would hide."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('code ran')",)


def test_a_file_that_would_run_code_when_loaded_is_refused_unread(tmp_path: Path) -> None:
    def hostile(path: Path, marker: Path) -> Path:
        torch.save({**tiny_checkpoint().to_dict(), "hook": WritesMarker(marker)}, path)
        return path

    torch.load(hostile(tmp_path / "probe.pt", tmp_path / "probe-ran"), weights_only=False)
    assert (tmp_path / "probe-ran").read_text() == "code ran"  # the payload is live: an unsafe load runs it
    path = hostile(tmp_path / "best.pt", tmp_path / "payload-ran")

    with pytest.raises(UserError) as refused:
        load_checkpoint(path, flag="--checkpoint")

    assert str(refused.value).startswith(f"--checkpoint {path}: holds Python objects that are unsafe to load")
    assert str(refused.value).endswith("refusing to read it")
    assert not (tmp_path / "payload-ran").exists()


# --------------------------------------------------------------------------- a run folder for its file


def test_a_run_folder_stands_for_its_best_pt_or_the_file_asked_for(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    save_checkpoint(tiny_checkpoint(), tmp_path / "best.pt")
    save_checkpoint(last_pt_checkpoint(), tmp_path / "last.pt")

    best = load_checkpoint(tmp_path)
    assert capsys.readouterr().out == f"--checkpoint: using {tmp_path / 'best.pt'}\n"
    last = load_checkpoint(tmp_path, flag="--resume", file_in_folder="last.pt")
    assert capsys.readouterr().out == f"--resume: using {tmp_path / 'last.pt'}\n"

    assert best.training_state is None and last.training_state is not None


def test_a_folder_without_the_file_is_refused_naming_what_it_holds(tmp_path: Path) -> None:
    with pytest.raises(UserError) as empty:
        load_checkpoint(tmp_path, flag="--resume", file_in_folder="last.pt")
    save_checkpoint(last_pt_checkpoint(), tmp_path / "last.pt")
    with pytest.raises(UserError) as others:
        load_checkpoint(tmp_path)

    assert str(empty.value) == (f"--resume {tmp_path}: a folder without last.pt; pass a run's output folder or a "
                                "checkpoint file written by train.py")
    assert str(others.value).startswith(f"--checkpoint {tmp_path}: a folder without best.pt (it holds last.pt: pass "
                                        f"{tmp_path / 'last.pt'}); ")


# --------------------------------------------------------------------------- the network back


def test_model_from_checkpoint_rebuilds_the_network_with_its_weights_frozen_as_trained(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = build_model("resnet18", len(CLASSES), weights="none", dropout=0.0)
    freeze_blocks(trained, parse_trainable(CONFIG["trainable"], trained))
    save_checkpoint(make_checkpoint(trained, CLASSES, CONFIG, 1, {}, MEAN, STD), tmp_path / "best.pt")

    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "best.pt"))

    assert not rebuilt.training
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt(images), trained.eval()(images))
    assert {name for name, parameter in rebuilt.named_parameters() if parameter.requires_grad} == \
        {name for name, parameter in trained.named_parameters() if parameter.requires_grad}
    assert any(parameter.requires_grad for parameter in rebuilt.parameters())
    assert not all(parameter.requires_grad for parameter in rebuilt.parameters())


def test_a_text_file_starting_with_c_is_corrupt_not_unsafe(tmp_path: Path) -> None:
    # "c" is pickle's GLOBAL opcode: the weights-only unpickler's complaint must not make a CSV look like a threat.
    path = tmp_path / "labels.pt"
    path.write_bytes(b"class,label\n1,2\n")

    with pytest.raises(UserError, match="truncated or corrupt, or not a checkpoint of this project at all"):
        load_checkpoint(path)


def test_a_folder_without_the_file_asked_for_suggests_its_last_pt_first(tmp_path: Path) -> None:
    for name in ("a_copy.pt", "last.pt"):
        (tmp_path / name).write_bytes(b"")

    with pytest.raises(UserError, match=f"it holds a_copy.pt, last.pt: pass {tmp_path / 'last.pt'}"):
        load_checkpoint(tmp_path)
