"""run_folder.py: the run in --output-dir (continued by the same command, refused to any other), what a run says
about itself (complete, best epoch, how to resume), clearing a folder for a new run (only what train.py wrote), and
what a run writes there besides checkpoints. Each function is called directly, on tiny checkpoints of a linear model;
test_resume.py runs the same decisions end to end through ``train.main``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import options
import run_folder
from checkpoint import Checkpoint, load_checkpoint, make_checkpoint, save_checkpoint
from common import IMAGENET_MEAN, IMAGENET_STD, REPORT_FILES, World
from lr_schedule import learning_rate
from resume import Progress, training_state
from run_config import TrainConfig
from utils import UserError

# A run of ResNet-18 from scratch at 32 px: parsing it builds only a model skeleton and checks the output folder.
FLAGS = ("--arch", "resnet18", "--weights", "none", "--epochs", "2", "--device", "cpu", "--img-size", "32")
CLASSES = ("cat", "dog")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data folder whose train/ holds the classes cat and dog (files named like images: the checks here only look
    at names)."""
    for name in CLASSES:
        (tmp_path / "data" / "train" / name).mkdir(parents=True)
        (tmp_path / "data" / "train" / name / "1.jpg").write_bytes(b"")
    return tmp_path / "data"


def train_config(data_dir: Path, output_dir: str | Path, *flags: str | Path) -> TrainConfig:
    """The configuration of ``train.py --data-dir DATA --output-dir OUTPUT`` with :data:`FLAGS` and ``flags``."""
    return options.parse_args(["--data-dir", str(data_dir), "--output-dir", str(output_dir), *FLAGS,
                               *map(str, flags)])


def progress_after(epoch: int, best_epoch: int | None = None, best_val_acc: float = 0.5) -> Progress:
    """Where a run following its val accuracy stands after ``epoch`` epochs, its best at ``best_epoch``."""
    best_epoch = epoch if best_epoch is None else best_epoch
    return Progress(epoch=epoch, best_val_acc=best_val_acc, best_epoch=best_epoch, best_score=best_val_acc,
                    history=[{"epoch": float(number)} for number in range(1, epoch + 1)])


def write_run(config: TrainConfig, progress: Progress, folder: Path | None = None,
              classes: tuple[str, ...] = CLASSES) -> Checkpoint:
    """The last.pt, best.pt and history.csv that ``config``'s run leaves in ``folder`` (its --output-dir) at
    ``progress``; returns the last.pt."""
    folder = Path(config.output_dir) if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    model = nn.Linear(4, len(classes))
    best = make_checkpoint(model, list(classes), config.saved_options(), progress.epoch,
                           {"val_acc": progress.best_val_acc}, IMAGENET_MEAN, IMAGENET_STD)
    last = replace(best, training_state=training_state(progress, torch.optim.SGD(model.parameters(), lr=0.1), None))
    save_checkpoint(best, folder / "best.pt")
    save_checkpoint(last, folder / "last.pt")
    (folder / "history.csv").write_text("epoch\n" + "".join(f"{row['epoch']:g}\n" for row in progress.history))
    return last


def refusal(call: Callable[..., object], *args: object) -> str:
    """The one-line message of the :class:`UserError` that ``call(*args)`` raises."""
    with pytest.raises(UserError) as refused:
        call(*args)
    assert "\n" not in str(refused.value)
    return str(refused.value)


# --------------------------------------------------------------------------- what a run says about itself


@pytest.mark.parametrize(("flags", "progress", "complete"), [
    (["--epochs", "2"], progress_after(2), True),
    (["--epochs", "2"], progress_after(1), False),
    (["--epochs", "2"], progress_after(3), True),  # resumed with fewer --epochs than it ran
    (["--epochs", "10", "--patience", "2"], progress_after(3, best_epoch=1), True),  # early stopping ended it
    (["--epochs", "10", "--patience", "2"], progress_after(3, best_epoch=2), False),
    (["--epochs", "10", "--patience", "0"], progress_after(9, best_epoch=1), False),  # 0: never stop early
])
def test_a_run_is_complete_after_all_its_epochs_or_when_early_stopping_ended_it(
        flags: list[str], progress: Progress, complete: bool, data_dir: Path, tmp_path: Path) -> None:
    assert run_folder.run_is_complete(train_config(data_dir, tmp_path / "out", *flags), progress) is complete


def test_a_complete_run_says_so_with_its_best_epoch_and_how_to_train_longer(
        data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"

    run_folder.say_complete(train_config(data_dir, out), progress_after(2, best_epoch=1, best_val_acc=0.8125))
    run_folder.say_complete(train_config(data_dir, out, "--epochs", "1"), progress_after(1))

    trained_all, trained_one = capsys.readouterr().out.splitlines()
    assert trained_all == (f"the run in {out} is complete (all 2 epochs trained; best val accuracy 81.25% at epoch 1); "
                           f"to train longer: train.main(['--resume', '{out / 'last.pt'}', '--epochs', '12'])")
    assert trained_one.startswith(f"the run in {out} is complete (its 1 epoch trained; ")


def test_a_run_ended_by_early_stopping_says_so_and_that_patience_must_grow(
        data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    run_folder.say_complete(train_config(data_dir, out, "--epochs", "10", "--patience", "2"),
                            progress_after(5, best_epoch=3))

    said = capsys.readouterr().out
    assert f"the run in {out} is complete (early stopping after epoch 5 of 10; best val accuracy 50.00% at epoch 3)" \
        in said
    assert said.endswith(f"train.main(['--resume', '{out / 'last.pt'}', '--epochs', '20']) "
                         "(with a larger --patience)\n")


@pytest.mark.parametrize(("arguments", "said"), [
    ((0.812, 6), "best val accuracy 81.20% at epoch 6"),
    ((0.812, 6, "val_acc", 0.9), "best val accuracy 81.20% at epoch 6"),  # the score is that accuracy
    ((0.812, 6, "val_balanced_acc", 0.755), "best val_balanced_acc 75.50% at epoch 6 (val accuracy 81.20%)"),
    ((0.812, 6, "val_loss", -0.4321), "best val_loss 0.4321 at epoch 6 (val accuracy 81.20%)"),  # stored negated
    ((0.812, 6, "val_loss", -math.inf), "best val accuracy 81.20% at epoch 6"),  # an older run: no score yet
    ((0.812, 6, "val_loss", None), "best val accuracy 81.20% at epoch 6"),
    ((math.nan, 3), "no validation (--train-on-all); best.pt holds epoch 3"),
    ((math.nan, 3, "val_loss", -0.5), "no validation (--train-on-all); best.pt holds epoch 3"),
])
def test_describe_best_names_what_best_pt_was_chosen_by(arguments: tuple, said: str) -> None:
    assert run_folder.describe_best(*arguments) == said


def test_describe_run_says_where_a_last_pt_stands(data_dir: Path, tmp_path: Path) -> None:
    config = train_config(data_dir, tmp_path / "out", "--epochs", "50", "--monitor", "val_loss")
    last = write_run(config, replace(progress_after(7, best_epoch=6, best_val_acc=0.812), best_score=-0.25))

    assert run_folder.describe_run(last) == "epoch 7 of 50, best val_loss 0.2500 at epoch 6 (val accuracy 81.20%)"


def test_run_summary_is_what_train_main_returns(tmp_path: Path) -> None:
    progress = progress_after(3, best_epoch=2, best_val_acc=0.9)

    assert run_folder.run_summary(progress, tmp_path / "out") == {
        "best_epoch": 2, "best_val_acc": 0.9, "output_dir": str(tmp_path / "out"), "epochs_run": 3}


def test_resume_hint_in_one_process_is_the_call_that_continues_the_run(tmp_path: Path) -> None:
    # Under pytest, as in a notebook, the hint is a train.main call; from a shell, the command (test_utils.py).
    assert run_folder.resume_hint(tmp_path) == f"train.main(['--resume', '{tmp_path / 'last.pt'}'])"


@pytest.mark.parametrize(("per_node", "launcher"), [
    ("4", "torchrun --nproc_per_node=4"),
    ("2", "torchrun --nnodes=2 --nproc_per_node=2 (and your --rdzv options)"),
])
def test_resume_hint_under_torchrun_is_the_torchrun_command_with_the_same_process_count(
        per_node: str, launcher: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process count would change the global batch: the hint keeps the run's."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", per_node)
    world = World(rank=1, local_rank=1, world_size=4)

    assert run_folder.resume_hint(tmp_path, world) == f"{launcher} train.py --resume {tmp_path / 'last.pt'}"


# --------------------------------------------------------------------------- the run in --output-dir


@pytest.mark.parametrize("name", run_folder.RUN_FILES)
def test_a_folder_holds_a_run_when_a_checkpoint_or_the_history_is_there(name: str, tmp_path: Path) -> None:
    assert not run_folder.holds_a_run(tmp_path / "not-yet")
    (tmp_path / "config.yaml").write_text("# Ran on cpu\n")  # written first: alone, no epoch has finished
    (tmp_path / "report").mkdir()
    assert not run_folder.holds_a_run(tmp_path)

    (tmp_path / name).write_bytes(b"")

    assert run_folder.holds_a_run(tmp_path)


def test_run_checkpoint_is_the_last_pt_of_the_run_there(data_dir: Path, tmp_path: Path) -> None:
    config = train_config(data_dir, tmp_path / "out")
    write_run(config, progress_after(1))

    checkpoint = run_folder.run_checkpoint(tmp_path / "out")

    assert checkpoint.training_state.run_progress().epoch == 1 and checkpoint.class_names == list(CLASSES)


def test_a_run_without_its_last_pt_cannot_be_continued(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_run(train_config(data_dir, out), progress_after(1))
    (out / "last.pt").unlink()

    assert refusal(run_folder.run_checkpoint, out) == (
        f"--output-dir {out}: holds best.pt, history.csv of an earlier run but no last.pt to continue it; start over "
        "there with --overwrite, or pass another --output-dir")


def test_an_unreadable_last_pt_is_refused_as_the_run_there(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_run(train_config(data_dir, out), progress_after(1))
    (out / "last.pt").write_bytes((out / "last.pt").read_bytes()[:600])  # a copy cut short

    assert refusal(run_folder.run_checkpoint, out) == (
        f"--output-dir {out / 'last.pt'}: truncated or corrupt, or not a checkpoint of this project at all (the "
        "last.pt of the run there); start over there with --overwrite, or pass another --output-dir")


def test_a_last_pt_without_training_state_is_refused(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_run(train_config(data_dir, out), progress_after(1))
    (out / "best.pt").replace(out / "last.pt")  # a best.pt copied over it

    assert refusal(run_folder.run_checkpoint, out) == (
        f"--output-dir {out}: its last.pt holds no training state; start over there with --overwrite, or pass "
        "another --output-dir")


def test_a_last_pt_of_a_newer_format_keeps_the_advice_to_update(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    last = write_run(train_config(data_dir, out), progress_after(1))
    torch.save({**last.to_dict(), "format": "imagefolder-resnet-checkpoint/99"}, out / "last.pt")

    message = refusal(run_folder.run_checkpoint, out)

    assert "update the code" in message and message.count("(") == message.count(")")
    assert "--overwrite" not in message  # starting over would delete a run that newer code can continue


def test_the_same_command_continues_the_run_in_its_folder(data_dir: Path, tmp_path: Path) -> None:
    """A re-run notebook cell or a re-submitted job: the run there is this command's, to continue."""
    config = train_config(data_dir, tmp_path / "out")
    write_run(config, progress_after(1))

    same = run_folder.run_to_continue(config)
    # Options that change how a run goes, not what it computes, and the folder spelled another way.
    also_same = run_folder.run_to_continue(train_config(data_dir, f"{tmp_path}/./out/", "--workers", "1",
                                                        "--no-progress", "--verify-images"))

    assert same is not None and same.training_state.run_progress().epoch == 1
    assert also_same is not None and also_same.epoch == 1


def test_with_no_run_there_or_with_overwrite_there_is_nothing_to_continue(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_folder.run_to_continue(train_config(data_dir, out)) is None  # no folder yet
    out.mkdir()
    (out / "my-notes.txt").write_text("not a run\n")
    assert run_folder.run_to_continue(train_config(data_dir, out)) is None

    write_run(train_config(data_dir, out, "--lr", "0.01"), progress_after(1))

    assert run_folder.run_to_continue(train_config(data_dir, out, "--overwrite")) is None


@pytest.mark.parametrize(("flags", "other", "choices"), [
    (["--lr", "0.01"], "other --lr", "start over with --overwrite, or pass another --output-dir"),
    (["--lr", "0.01", "--batch-size", "8"], "other --batch-size, --lr",
     "start over with --overwrite, or pass another --output-dir"),
    (["--epochs", "5"], "other --epochs",  # an option a resumed run may change
     "continue it with --resume auto, start over with --overwrite, or pass another --output-dir"),
    (["--epochs", "5", "--lr", "0.01"], "other --epochs, --lr",  # one a resumed run may not change
     "start over with --overwrite, or pass another --output-dir"),
])
def test_another_command_into_a_run_folder_is_refused_naming_what_differs(
        flags: list[str], other: str, choices: str, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_run(train_config(data_dir, out), progress_after(1, best_val_acc=0.75))

    message = refusal(run_folder.run_to_continue, train_config(data_dir, out, *flags))

    assert message == (f"--output-dir {out}: holds another run (epoch 1 of 2, best val accuracy 75.00% at epoch 1; "
                       f"{other}); {choices}")


# --------------------------------------------------------------------------- --resume into another --output-dir


@pytest.fixture
def source_run(data_dir: Path, tmp_path: Path) -> Path:
    """The last.pt of a run in tmp_path/source, one epoch into two, to resume."""
    write_run(train_config(data_dir, tmp_path / "source"), progress_after(1))
    return tmp_path / "source" / "last.pt"


def test_resuming_into_an_empty_folder_its_own_folder_or_by_overwriting_another_run_is_allowed(
        source_run: Path, data_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    run_folder.refuse_resume_into_other_run(options.parse_args(["--resume", str(source_run)]))
    run_folder.refuse_resume_into_other_run(options.parse_args(["--resume", str(source_run), "--output-dir",
                                                                str(other)]))
    write_run(train_config(data_dir, other, "--lr", "0.01"), progress_after(2))
    run_folder.refuse_resume_into_other_run(options.parse_args(["--resume", str(source_run), "--output-dir",
                                                                str(other), "--overwrite"]))
    run_folder.refuse_resume_into_other_run(train_config(data_dir, other))  # no --resume: run_to_continue decides


def test_resuming_into_a_folder_holding_another_run_is_refused(source_run: Path, data_dir: Path,
                                                               tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_run(train_config(data_dir, other, "--lr", "0.01"), progress_after(2))

    message = refusal(run_folder.refuse_resume_into_other_run,
                      options.parse_args(["--resume", str(source_run), "--output-dir", str(other)]))

    assert message == (f"--output-dir {other}: holds another run than {source_run}; resume into an empty folder, "
                       f"replace that run with --overwrite, or leave --output-dir out to continue in "
                       f"{source_run.parent}")


@pytest.mark.parametrize("resume", ["auto", "last.pt", "folder"])
def test_overwrite_of_the_run_being_resumed_is_a_contradiction(resume: str, source_run: Path) -> None:
    given = {"auto": "auto", "last.pt": str(source_run), "folder": str(source_run.parent)}[resume]
    config = options.parse_args(["--resume", given, "--output-dir", str(source_run.parent), "--overwrite"])

    assert refusal(run_folder.refuse_resume_into_other_run, config) == (
        "--overwrite with --resume of the run in --output-dir: --resume continues that run, --overwrite replaces it; "
        "pass one of them")


# --------------------------------------------------------------------------- the classes a run keeps


def test_class_folders_now_counts_a_new_folder_only_when_it_holds_images(data_dir: Path) -> None:
    train = data_dir / "train"
    (train / "bird").mkdir()
    (train / "bird" / "2.png").write_bytes(b"")
    (train / "emu").mkdir()  # new and empty: the scan would skip it too
    (train / "emu" / "notes.txt").write_text("todo\n")
    (train / "dog" / "1.jpg").unlink()  # the run's own class, emptied: still there

    assert run_folder.class_folders_now(str(data_dir), ["cat", "dog"]) == ["bird", "cat", "dog"]
    assert run_folder.class_folders_now(str(data_dir.parent / "elsewhere"), ["cat", "dog"]) is None


def test_the_classes_the_run_learned_are_accepted(data_dir: Path, tmp_path: Path) -> None:
    config = train_config(data_dir, tmp_path / "out")
    run_folder.refuse_changed_classes(config, ["cat", "dog"])
    run_folder.refuse_changed_classes(config, ["cat", "dog"], found=["cat", "dog"])
    run_folder.refuse_changed_classes(train_config(tmp_path / "gone", tmp_path / "out"), ["cat", "dog"])  # no train/


def test_a_run_continued_with_other_classes_is_refused_naming_the_new_and_missing_ones(data_dir: Path,
                                                                                       tmp_path: Path) -> None:
    (data_dir / "train" / "bird").mkdir()
    (data_dir / "train" / "bird" / "2.png").write_bytes(b"")
    out = tmp_path / "out"

    message = refusal(run_folder.refuse_changed_classes, train_config(data_dir, out), ["cat", "dog", "fox"])

    assert message == (f"--output-dir {out}: {data_dir / 'train'} has other classes than the 3 the run learned "
                       "(new: bird; missing: fox); a run keeps its classes: start a new run there with --overwrite, "
                       "or pass another --output-dir")


def test_a_resumed_run_with_other_classes_is_refused_naming_resume(source_run: Path, data_dir: Path) -> None:
    config = options.parse_args(["--resume", str(source_run)])

    message = refusal(run_folder.refuse_changed_classes, config, ["cat", "dog"], ["ant", "bee", "cat", "dog", "eel",
                                                                                   "fly", "gnu", "hen"])

    assert message.startswith(f"--resume {source_run}: {data_dir / 'train'} has other classes than the 2 the run "
                              "learned (new: ant, bee, eel, fly, gnu and 1 more); ")
    assert message.endswith("start a new run with --overwrite in place of --resume, or with another --output-dir")


def test_the_same_classes_in_another_order_are_refused_too(data_dir: Path, tmp_path: Path) -> None:
    """The order is the label numbering: a reordered list would relabel every image."""
    message = refusal(run_folder.refuse_changed_classes, train_config(data_dir, tmp_path / "out"), ["dog", "cat"],
                      ["cat", "dog"])

    assert "(in another order)" in message


# --------------------------------------------------------------------------- clearing a folder for a new run


def a_folder_after_a_run(out: Path) -> None:
    """Everything train.py writes into ``out`` (config.yaml with its header), a run's report and TensorBoard logs."""
    for name in run_folder.RUN_OUTPUTS:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"old run")
    (out / "config.yaml").write_text(f"{options.CONFIG_HEADER_START}cpu in fp32, 0 loader workers\nepochs: 2\n")
    (out / "report").mkdir()
    for name in REPORT_FILES:
        (out / "report" / name).write_bytes(b"old report")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"old events")


def test_clear_run_outputs_removes_what_train_py_wrote_and_says_so(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    a_folder_after_a_run(tmp_path)

    run_folder.clear_run_outputs(tmp_path, None)

    assert list(tmp_path.iterdir()) == []  # the emptied report/ and tensorboard/ too
    assert capsys.readouterr().out == (
        f"note: removed the earlier run's {', '.join(run_folder.RUN_OUTPUTS)}, config.yaml, report/, tensorboard/ "
        f"from {tmp_path}\n")


def test_clear_run_outputs_leaves_everything_else_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a_folder_after_a_run(tmp_path)
    kept = {"my-notes.txt": "mine", "report/thesis.tex": "\\documentclass{article}",
            "tensorboard/README": "my logs", "data.yaml": f"{options.CONFIG_HEADER_START}looks like ours"}
    for name, text in kept.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "history.csv").unlink()
    (tmp_path / "history.csv").mkdir()  # a folder by a run file's name is not the run's
    (tmp_path / "outside.pt").write_bytes(b"a checkpoint kept elsewhere")
    (tmp_path / "best.pt").unlink()
    (tmp_path / "best.pt").symlink_to(tmp_path / "outside.pt")  # the link goes, what it points at stays

    run_folder.clear_run_outputs(tmp_path, None)

    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == sorted(
        ["history.csv", "outside.pt", "report", "tensorboard", *kept])
    assert all((tmp_path / name).read_text() == text for name, text in kept.items())
    assert "report/, tensorboard/" in capsys.readouterr().out  # their run files went; the folders stay for the rest


def test_clear_run_outputs_keeps_the_config_file_in_use_and_any_config_yaml_train_py_did_not_write(
        tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    header = f"{options.CONFIG_HEADER_START}cpu in fp32, 0 loader workers\nepochs: 2\n"
    (tmp_path / "run" / "config.yaml").write_text(header)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.yaml").write_text("epochs: 2\n")

    run_folder.clear_run_outputs(tmp_path / "run", str(tmp_path / "mine" / ".." / "run" / "config.yaml"))
    run_folder.clear_run_outputs(tmp_path / "mine", None)

    assert (tmp_path / "run" / "config.yaml").read_text() == header  # the --config of this very command
    assert (tmp_path / "mine" / "config.yaml").read_text() == "epochs: 2\n"


def test_clear_run_outputs_of_a_folder_without_a_run_is_silent(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    run_folder.clear_run_outputs(tmp_path, None)
    run_folder.clear_run_outputs(tmp_path / "not-yet", None)

    assert capsys.readouterr().out == "" and (tmp_path / "notes.txt").is_file()


def test_a_config_yaml_that_train_py_did_not_write_is_not_replaced(tmp_path: Path) -> None:
    run_folder.refuse_foreign_config(tmp_path)  # none there
    (tmp_path / "config.yaml").write_text(f"{options.CONFIG_HEADER_START}cpu in fp32\nepochs: 2\n")
    run_folder.refuse_foreign_config(tmp_path)  # train.py's own, from an earlier run

    (tmp_path / "config.yaml").write_text("epochs: 2\n")

    assert refusal(run_folder.refuse_foreign_config, tmp_path) == (
        f"--output-dir {tmp_path}: holds a config.yaml that train.py did not write, and a run writes its own there; "
        "move that file, or pass another --output-dir")


# --------------------------------------------------------------------------- a resumed run's schedule


def test_more_epochs_for_a_finished_run_restretch_the_schedule_and_the_rate_rises(
        source_run: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = load_checkpoint(source_run)  # a run of --epochs 2
    config = options.parse_args(["--resume", str(source_run), "--epochs", "8"])

    run_folder.note_schedule_change(config, checkpoint, progress_after(2))

    last, following = learning_rate(config.lr, 2, 2), learning_rate(config.lr, 3, 8)
    assert following > last  # a cosine is lowest at its end: stretched over more epochs, the rate climbs back
    assert capsys.readouterr().out == (
        f"note: --epochs 8 (the run had 2): the cosine schedule is re-stretched over 8 epochs, so the learning rate "
        f"goes from {last:.2e} at epoch 2 to {following:.2e} at epoch 3 (it rises)\n")


def test_fewer_epochs_restretch_the_schedule_without_a_rise(data_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    last_pt = write_run(train_config(data_dir, tmp_path / "out", "--epochs", "10"), progress_after(3))

    run_folder.note_schedule_change(train_config(data_dir, tmp_path / "out", "--epochs", "5"), last_pt,
                                    progress_after(3))

    said = capsys.readouterr().out
    assert said.startswith("note: --epochs 5 (the run had 10): the cosine schedule is re-stretched over 5 epochs")
    assert said.endswith("at epoch 4\n")


def test_the_same_epochs_or_a_run_already_past_them_say_nothing(source_run: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    checkpoint = load_checkpoint(source_run)  # a run of --epochs 2
    run_folder.note_schedule_change(options.parse_args(["--resume", str(source_run)]), checkpoint, progress_after(1))
    run_folder.note_schedule_change(options.parse_args(["--resume", str(source_run), "--epochs", "3"]), checkpoint,
                                    progress_after(3))  # complete: nothing more is scheduled

    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- preparing the folder


def test_a_run_resumed_elsewhere_takes_its_best_pt_along(source_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()

    run_folder.carry_over_best_checkpoint(None, target)  # not resumed: nothing to take
    assert list(target.iterdir()) == []
    run_folder.carry_over_best_checkpoint(source_run, target)
    assert (target / "best.pt").read_bytes() == (source_run.parent / "best.pt").read_bytes()

    (target / "best.pt").write_bytes(b"the target's own")
    run_folder.carry_over_best_checkpoint(source_run, target)
    assert (target / "best.pt").read_bytes() == b"the target's own"  # never replaced


def test_a_lone_last_pt_has_no_best_pt_to_take_along(source_run: Path, tmp_path: Path) -> None:
    (source_run.parent / "best.pt").unlink()
    (tmp_path / "target").mkdir()
    run_folder.carry_over_best_checkpoint(source_run, tmp_path / "target")
    assert list((tmp_path / "target").iterdir()) == []


def test_a_fresh_run_clears_the_folder_and_writes_its_config_and_skip_list(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    a_folder_after_a_run(out)
    (out / "my-notes.txt").write_text("mine\n")
    skipped = [(str(data_dir / "train" / "cat" / "bad.jpg"), "cannot identify image file")]

    logger = run_folder.prepare_output_dir(train_config(data_dir, out), None, skipped, "# Ran on cpu\nepochs: 2\n")

    assert logger is None  # no --tensorboard
    assert sorted(path.name for path in out.iterdir()) == ["config.yaml", "my-notes.txt", "skipped_files.txt"]
    assert (out / "config.yaml").read_text() == "# Ran on cpu\nepochs: 2\n"
    assert (out / "skipped_files.txt").read_text() == f"{skipped[0][0]}\tcannot identify image file\n"


def test_a_fresh_run_creates_its_folder_and_writes_no_empty_skip_list(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    run_folder.prepare_output_dir(train_config(data_dir, out), None, [], "# Ran on cpu\n")
    assert [path.name for path in out.iterdir()] == ["config.yaml"]


def test_a_continued_run_keeps_its_files(data_dir: Path, tmp_path: Path) -> None:
    config = train_config(data_dir, tmp_path / "out")
    last = write_run(config, progress_after(1))

    run_folder.prepare_output_dir(config, last, [], "# Ran on cpu\nepochs: 2\n")

    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["best.pt", "config.yaml", "history.csv",
                                                                          "last.pt"]
    assert load_checkpoint(tmp_path / "out" / "last.pt").epoch == 1


def test_a_run_resumed_over_another_replaces_it_and_brings_its_best_pt(source_run: Path, data_dir: Path,
                                                                       tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_run(train_config(data_dir, other, "--lr", "0.01"), progress_after(2))
    config = options.parse_args(["--resume", str(source_run), "--output-dir", str(other), "--overwrite"])

    run_folder.prepare_output_dir(config, load_checkpoint(source_run), [], "# Ran on cpu\n")

    assert sorted(path.name for path in other.iterdir()) == ["best.pt", "config.yaml"]
    assert (other / "best.pt").read_bytes() == (source_run.parent / "best.pt").read_bytes()


@pytest.mark.parametrize("cause", ["a config.yaml of the user's", "--tensorboard without the package"])
def test_a_fresh_run_refused_at_the_folder_changes_nothing_in_it(cause: str, data_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    a_folder_after_a_run(out)
    if cause == "--tensorboard without the package":
        def missing_package() -> type:
            raise UserError("--tensorboard: the tensorboard package is not installed")
        monkeypatch.setattr(run_folder, "summary_writer_class", missing_package)
        config = train_config(data_dir, out, "--tensorboard")
    else:
        (out / "config.yaml").write_text("epochs: 2\n")
        config = train_config(data_dir, out)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}

    with pytest.raises(UserError):
        run_folder.prepare_output_dir(config, None, [("a.jpg", "broken")], "# Ran on cpu\n")

    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_write_skipped_lists_one_image_and_its_reason_a_line(tmp_path: Path) -> None:
    skipped = [("train/cat/empty.jpg", "empty file"), ("val/dog/x y.png", "cannot identify image file")]

    run_folder.write_skipped(skipped, tmp_path)

    assert (tmp_path / "skipped_files.txt").read_text() == (
        "train/cat/empty.jpg\tempty file\nval/dog/x y.png\tcannot identify image file\n")
