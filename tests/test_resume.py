"""Resuming and stopping: exact resume, --epochs-this-run, --resume auto, what may change on resume, kills at any
instant (SIGKILL), and a polite stop (SIGINT, exit code 130).

The runs are tiny (small_data: 12 training images, 3 batches of 4, the head alone trained) and mostly in-process. The
signal tests need real processes: forked copies of this process running ``train.main`` (a real process to signal or
kill, without the seconds a fresh interpreter spends importing torch). :class:`TrainingProcess` also starts
``python train.py`` as a user does: test_new_user_round3.py's double Ctrl-C, whose last line names the script.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import lr_schedule
import train
from checkpoint import load_checkpoint
from conftest import (
    REPO_ROOT,
    TINY_TRAIN_FLAGS,
    CliResult,
    ColourData,
    assert_same,
    assert_same_training,
    assert_user_error,
    call_main,
    history_without_seconds,
    read_csv_rows,
    redirect_output,
    tiny_train,
)

EPOCHS = 4
# Resuming does not depend on which blocks train: these runs train the head alone, in about two thirds of the time of
# the default layer4,fc (no Adam state for 8.4M parameters, a last.pt of 45 MB instead of 112 MB). test_recipes.py's
# exact resume with every option on trains layer4 and thaws two more blocks.
HEAD_ONLY = ("--trainable", "fc")
RUN_FLAGS = (*TINY_TRAIN_FLAGS, *HEAD_ONLY)


def train_head(data: ColourData, output: Path, *flags: str | Path) -> CliResult:
    """:func:`conftest.tiny_train` with only the head trained."""
    return tiny_train(data, output, *HEAD_ONLY, *flags)


@dataclass(frozen=True)
class Straight:
    """An uninterrupted EPOCHS-epoch run (started with --resume auto in an empty folder)."""

    output: Path
    result: CliResult


@pytest.fixture(scope="module")
def straight(small_data: ColourData, tmp_path_factory: pytest.TempPathFactory) -> Straight:
    output = tmp_path_factory.mktemp("straight") / "out"
    return Straight(output, train_head(small_data, output, "--epochs", str(EPOCHS), "--resume", "auto"))


# --------------------------------------------------------------------------- exact resume


def test_resume_auto_without_last_pt_starts_a_new_run(straight: Straight) -> None:
    assert f"note: --resume auto: no {straight.output / 'last.pt'} yet, starting a new run" in straight.result.stdout
    assert "resuming from" not in straight.result.stdout
    assert [row["epoch"] for row in read_csv_rows(straight.output / "history.csv")] == ["1", "2", "3", "4"]


def test_stopped_and_resumed_run_is_bitwise_identical(straight: Straight, small_data: ColourData, tmp_path: Path,
                                                      no_final_outputs: None) -> None:
    output = tmp_path / "out"
    first = train_head(small_data, output, "--epochs", str(EPOCHS), "--epochs-this-run", "2")
    assert f"stopped after epoch 2 of {EPOCHS}" in first.stdout
    assert f"continue with: train.main(['--resume', '{output / 'last.pt'}'])" in first.stdout  # called in-process
    assert load_checkpoint(output / "last.pt").epoch == 2

    second = call_main(train.main, "--resume", output / "last.pt")  # the options come from the checkpoint

    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming from {output / 'last.pt'}" in second.stdout
    assert "resumed after epoch 2" in second.stdout
    assert_same_training(output / "last.pt", straight.output / "last.pt")
    assert history_without_seconds(output / "history.csv") == history_without_seconds(straight.output / "history.csv")
    assert_same(load_checkpoint(output / "best.pt").model, load_checkpoint(straight.output / "best.pt").model)


def test_worker_count_does_not_change_the_weights(small_data: ColourData, tmp_path: Path,
                                                   no_final_outputs: None) -> None:
    """Augmentation randomness comes from (seed, epoch, sample), not from the worker processes."""
    train_head(small_data, tmp_path / "w0", "--epochs", "1")
    train_head(small_data, tmp_path / "w2", "--epochs", "1", "--workers", "2")

    first, second = load_checkpoint(tmp_path / "w0" / "last.pt"), load_checkpoint(tmp_path / "w2" / "last.pt")
    assert_same(first.model, second.model, "model")
    assert_same(first.training_state.optimizer, second.training_state.optimizer, "optimizer")


def test_resume_auto_with_more_epochs_extends_the_run(straight: Straight, tmp_path: Path,
                                                      no_final_outputs: None) -> None:
    output = tmp_path / "copy"
    shutil.copytree(straight.output, output)

    result = call_main(train.main, "--resume", "auto", "--output-dir", output, "--epochs", "6")

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming from {output / 'last.pt'}" in result.stdout
    history = history_without_seconds(output / "history.csv")
    assert [row["epoch"] for row in history] == ["1", "2", "3", "4", "5", "6"]
    assert history[:EPOCHS] == history_without_seconds(straight.output / "history.csv")
    assert float(history[4]["lr"]) == pytest.approx(lr_schedule.learning_rate(5e-4, 5, 6))
    assert load_checkpoint(output / "last.pt").config["epochs"] == 6
    assert ("note: --epochs 6 (the run had 4): the cosine schedule is re-stretched over 6 epochs, so the learning "
            "rate goes from 7.32e-05 at epoch 4 to 1.25e-04 at epoch 5 (it rises)") in result.stdout


def test_resume_into_another_output_dir_takes_best_pt_along(straight: Straight, tmp_path: Path) -> None:
    output = tmp_path / "elsewhere"

    result = call_main(train.main, "--resume", straight.output / "last.pt", "--output-dir", output, "--epochs", "5")

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same(load_checkpoint(output / "best.pt").model, load_checkpoint(straight.output / "best.pt").model)
    assert (output / "report" / "metrics.json").is_file()
    assert [row["epoch"] for row in read_csv_rows(output / "history.csv")] == ["1", "2", "3", "4", "5"]
    assert (straight.output / "last.pt").is_file() and load_checkpoint(straight.output / "last.pt").epoch == EPOCHS


def test_resume_of_a_lone_last_pt_finishes_with_a_note(straight: Straight, tmp_path: Path,
                                                       no_final_outputs: None) -> None:
    """Only last.pt was kept (e.g. copied to Drive): the run continues; the report of a best.pt it lacks is skipped."""
    output = tmp_path / "lone"
    output.mkdir()
    shutil.copy(straight.output / "last.pt", output / "last.pt")

    result = call_main(train.main, "--resume", "auto", "--output-dir", output, "--epochs", "5")

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert load_checkpoint(output / "last.pt").epoch == 5
    if not (output / "best.pt").exists():  # no epoch beat the best one, whose weights were not kept
        assert f"note: no best.pt in {output}" in result.stdout


def test_resume_of_best_pt_is_a_clean_error(straight: Straight) -> None:
    best = straight.output / "best.pt"
    assert_user_error(call_main(train.main, "--resume", best), "--resume", best, "no training state", "last.pt")


@pytest.mark.parametrize("flags, named", [
    (["--lr", "0.1"], ["--lr"]),
    (["--batch-size", "8", "--seed", "3"], ["--batch-size", "--seed"]),
    (["--arch", "resnet34"], ["--arch"]),
])
def test_resume_with_a_changed_recipe_is_a_clean_error(straight: Straight, flags: list[str],
                                                       named: list[str]) -> None:
    before = (straight.output / "last.pt").stat().st_mtime_ns
    result = call_main(train.main, "--resume", straight.output / "last.pt", *flags)
    assert_user_error(result, "--resume", *named, "--epochs")
    assert (straight.output / "last.pt").stat().st_mtime_ns == before


def test_resume_of_a_missing_file_is_a_clean_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "last.pt"
    assert_user_error(call_main(train.main, "--resume", missing), "--resume", missing, "file not found", "auto")


def test_resume_with_a_conflicting_config_file_is_a_clean_error(straight: Straight, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.5\n")
    result = call_main(train.main, "--resume", straight.output / "last.pt", "--config", config,
                       "--output-dir", tmp_path / "out")
    assert_user_error(result, "--resume", "--lr")


def test_resume_accepts_the_config_file_the_run_started_with(straight: Straight, tmp_path: Path,
                                                             no_final_outputs: None) -> None:
    """A re-run Colab cell passes the same --config again: that must resume, not fail."""
    config = tmp_path / "run.yaml"
    config.write_text(f"epochs: {EPOCHS}\n")
    result = call_main(train.main, "--resume", straight.output / "last.pt", "--config", config,
                       "--output-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed after epoch" in result.stdout


# --------------------------------------------------------------------------- the output folder of a run


def copy_of_run(straight: Straight, tmp_path: Path) -> Path:
    """A private copy of the straight run's folder, and the modification time of each file in it."""
    output = tmp_path / "run"
    shutil.copytree(straight.output, output)
    return output


def file_times(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def test_another_command_into_a_run_folder_is_refused_and_changes_nothing(straight: Straight,
                                                                            small_data: ColourData,
                                                                            tmp_path: Path) -> None:
    output = copy_of_run(straight, tmp_path)
    before = file_times(output)

    result = call_main(train.main, "--data-dir", small_data.root, "--output-dir", output, *RUN_FLAGS,
                       "--epochs", str(EPOCHS), "--lr", "0.01")

    line = assert_user_error(result, f"--output-dir {output}: holds another run (epoch {EPOCHS} of {EPOCHS}, best val "
                             "accuracy", "other --lr", "--overwrite", "another --output-dir")
    assert "--resume" not in line  # a resumed run cannot change --lr
    assert file_times(output) == before
    more_epochs = call_main(train.main, "--data-dir", small_data.root, "--output-dir", output, *RUN_FLAGS,
                            "--epochs", str(EPOCHS + 2))
    assert_user_error(more_epochs, "other --epochs", "continue it with --resume auto", "--overwrite")
    assert file_times(output) == before


@pytest.mark.parametrize("how", ["same command", "--resume"])
def test_a_complete_run_run_again_says_so_and_returns_its_summary(straight: Straight, small_data: ColourData,
                                                                  tmp_path: Path, how: str) -> None:
    output = copy_of_run(straight, tmp_path)
    before = file_times(output)
    flags = ["--epochs", str(EPOCHS)] if how == "same command" else ["--resume", output / "last.pt"]

    result = train_head(small_data, output, *flags)

    assert f"the run in {output} is complete (all {EPOCHS} epochs trained; best val accuracy" in result.stdout
    assert f"to train longer: train.main(['--resume', '{output / 'last.pt'}', '--epochs', '{EPOCHS + 10}'])" \
        in result.stdout
    assert result.value == {**straight.result.value, "output_dir": str(output)}
    assert file_times(output) == before  # nothing retrained, re-evaluated or rewritten
    assert not re.search(r"epoch +\d+/\d+ +train loss", result.stdout) and "continuing" not in result.stdout


def test_a_complete_run_whose_history_is_an_epoch_behind_writes_it_again(straight: Straight, small_data: ColourData,
                                                                         tmp_path: Path) -> None:
    """A kill between writing last.pt and history.csv at the last epoch: the same command finds a complete run."""
    output = copy_of_run(straight, tmp_path)
    history = (output / "history.csv").read_text().splitlines(keepends=True)
    (output / "history.csv").write_text("".join(history[:-1]))

    result = train_head(small_data, output, "--epochs", str(EPOCHS))

    assert f"note: {output / 'history.csv'} was behind last.pt" in result.stdout
    assert (output / "history.csv").read_text() == (straight.output / "history.csv").read_text()
    (output / "history.csv").write_text("epoch,note\n1,the user's own edit\n")  # not an epoch behind: left alone
    assert "was behind" not in train_head(small_data, output, "--epochs", str(EPOCHS)).stdout
    assert (output / "history.csv").read_text() == "epoch,note\n1,the user's own edit\n"


def test_a_complete_run_resumed_into_another_folder_writes_no_history_there(straight: Straight,
                                                                            tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"

    result = call_main(train.main, "--resume", straight.output / "last.pt", "--output-dir", elsewhere)

    assert result.returncode == 0 and "was behind" not in result.stdout
    assert not (elsewhere / "history.csv").exists()


def test_the_same_command_continues_an_interrupted_run(straight: Straight, small_data: ColourData, tmp_path: Path,
                                                       no_final_outputs: None) -> None:
    """A re-run notebook cell or re-submitted job: continues where the run stopped, as --resume auto would."""
    output = tmp_path / "out"
    train_head(small_data, output, "--epochs", str(EPOCHS), "--epochs-this-run", "2")

    again = train_head(small_data, output, "--epochs", str(EPOCHS), "--epochs-this-run", "2", "--workers", "2")

    assert f"note: {output} holds this run (epoch 2 of {EPOCHS}" in again.stdout and "continuing it" in again.stdout
    assert_same_training(output / "last.pt", straight.output / "last.pt")
    assert history_without_seconds(output / "history.csv") == history_without_seconds(straight.output / "history.csv")


def test_overwrite_starts_over_and_keeps_nothing_of_the_old_run(straight: Straight, small_data: ColourData,
                                                               tmp_path: Path) -> None:
    output = copy_of_run(straight, tmp_path)
    (output / "skipped_files.txt").write_text("/gone/a.jpg\tcannot identify image file\n")
    (output / "report" / "my-notes.md").write_text("the user's own file: stays\n")
    old_report = (output / "report" / "metrics.json").read_text()

    result = train_head(small_data, output, "--epochs", "1", "--lr", "0.01", "--overwrite")

    assert "note: removed the earlier run's last.pt, best.pt, history.csv" in result.stdout
    assert [row["epoch"] for row in read_csv_rows(output / "history.csv")] == ["1"]
    assert load_checkpoint(output / "last.pt").config["lr"] == 0.01
    assert not (output / "skipped_files.txt").exists()
    assert (output / "report" / "metrics.json").read_text() != old_report  # the new run's
    assert (output / "report" / "my-notes.md").is_file()


def test_overwrite_deletes_nothing_when_the_command_is_wrong(straight: Straight, small_data: ColourData,
                                                            tmp_path: Path) -> None:
    output = copy_of_run(straight, tmp_path)
    before = file_times(output)

    result = call_main(train.main, "--data-dir", tmp_path / "typo", "--output-dir", output, *RUN_FLAGS,
                       "--overwrite")

    assert_user_error(result, "--data-dir", "folder not found")
    assert file_times(output) == before


def test_overwrite_contradicts_resuming_the_same_run(straight: Straight, tmp_path: Path) -> None:
    output = copy_of_run(straight, tmp_path)
    result = call_main(train.main, "--resume", "auto", "--output-dir", output, "--overwrite")
    assert_user_error(result, "--overwrite with --resume", "pass one of them")


def test_resuming_into_a_folder_holding_another_run_is_refused(straight: Straight, small_data: ColourData,
                                                              tmp_path: Path, no_final_outputs: None) -> None:
    other = tmp_path / "other"
    train_head(small_data, other, "--epochs", "1", "--lr", "0.01")
    before = file_times(other)

    result = call_main(train.main, "--resume", straight.output / "last.pt", "--output-dir", other, "--epochs", "5")

    assert_user_error(result, f"--output-dir {other}: holds another run", "--overwrite", "empty folder")
    assert file_times(other) == before


def test_a_fresh_run_leaves_the_users_own_files_alone(small_data: ColourData, tmp_path: Path,
                                                      no_final_outputs: None) -> None:
    """--output-dir . in a project folder: its report/ and config.yaml are the user's, not an old run's."""
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "thesis.tex").write_text("\\documentclass{article}\n")
    (tmp_path / "config.yaml").write_text("epochs: 1\n")

    refused = call_main(train.main, "--data-dir", small_data.root, "--output-dir", tmp_path, *RUN_FLAGS,
                        "--config", tmp_path / "config.yaml")
    assert_user_error(refused, "holds a config.yaml that train.py did not write", "another --output-dir")
    (tmp_path / "config.yaml").rename(tmp_path / "my-run.yaml")
    result = train_head(small_data, tmp_path, "--config", tmp_path / "my-run.yaml")

    assert "removed" not in result.stdout
    assert (tmp_path / "report" / "thesis.tex").is_file() and (tmp_path / "my-run.yaml").read_text() == "epochs: 1\n"


def test_a_fresh_run_clears_the_leftovers_of_an_older_one(small_data: ColourData, tmp_path: Path,
                                                          no_final_outputs: None) -> None:
    output = tmp_path / "out"
    (output / "report").mkdir(parents=True)
    (output / "report" / "metrics.json").write_text("{}\n")
    (output / "skipped_files.txt").write_text("/gone/a.jpg\tcannot identify image file\n")
    (output / "my-notes.txt").write_text("not train.py's: stays\n")

    train_head(small_data, output, "--epochs", "1")

    assert not (output / "skipped_files.txt").exists() and not (output / "report").exists()
    assert (output / "my-notes.txt").is_file() and (output / "last.pt").is_file()


def test_a_best_pt_without_its_last_pt_is_not_replaced(straight: Straight, small_data: ColourData,
                                                       tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    shutil.copy(straight.output / "best.pt", output / "best.pt")

    result = call_main(train.main, "--data-dir", small_data.root, "--output-dir", output, *RUN_FLAGS)

    assert_user_error(result, "holds best.pt of an earlier run but no last.pt", "--overwrite")


# --------------------------------------------------------------------------- processes to stop and kill


def _train_in_child(argv: list[str], log_path: str, stderr_path: str) -> None:
    """Body of a forked training process, in a process group of its own (as ``python train.py`` is started
    below): stdout goes to ``log_path``, stderr to ``stderr_path``."""
    os.setsid()
    redirect_output(log_path, stderr_path)
    train.main(argv)


class TrainingProcess:
    """A training run in its own process and process group, with its console output in files that can be watched
    (stderr apart, to check what goes where).

    ``fork=False`` starts ``python train.py`` as a user does (seconds of interpreter start-up); ``fork=True`` forks
    this process, which has torch imported already, to run ``train.main`` (a real process to signal or kill)."""

    def __init__(self, argv: list[str | Path], log_path: Path, fork: bool = False) -> None:
        self.log_path = log_path
        argv = [str(arg) for arg in argv]
        log_path.touch()
        self.stderr_path.touch()
        if fork:
            self.process: Any = multiprocessing.get_context("fork").Process(
                target=_train_in_child, args=(argv, str(log_path), str(self.stderr_path)))
            self.process.start()
            self.pid = self.process.pid
        else:
            with log_path.open("w") as log, self.stderr_path.open("w") as errors:
                self.process = subprocess.Popen([sys.executable, "-u", str(REPO_ROOT / "train.py"), *argv],
                                                cwd=REPO_ROOT, stdout=log, stderr=errors,
                                                start_new_session=True)  # its own process group, to signal whole
            self.pid = self.process.pid

    def running(self) -> bool:
        if isinstance(self.process, subprocess.Popen):
            return self.process.poll() is None
        return self.process.is_alive()

    @property
    def stderr_path(self) -> Path:
        return self.log_path.with_suffix(".stderr")

    def output(self) -> str:
        """Everything written so far: stdout, then stderr."""
        return self.log_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
        """Poll ``condition`` until it holds; fail if the process ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.running(), f"the process ended before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.output()[-3000:]}"
            time.sleep(0.002)

    def wait_for_line(self, pattern: str, timeout: float = 120.0) -> None:
        self.wait_for(lambda: re.search(pattern, self.output(), re.MULTILINE) is not None, repr(pattern), timeout)

    def send(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 120.0) -> int:
        if isinstance(self.process, subprocess.Popen):
            return self.process.wait(timeout)
        self.process.join(timeout)
        assert not self.process.is_alive(), "the process did not end"
        return self.process.exitcode

    def kill(self) -> None:
        if self.running():
            self.send(signal.SIGKILL)
            self.wait(30)


EPOCH_LINE = r"^epoch +\d+/\d+ "


def assert_checkpoints_load(output: Path) -> int:
    """best.pt and last.pt are complete checkpoints; returns last.pt's epoch."""
    best, last = load_checkpoint(output / "best.pt"), load_checkpoint(output / "last.pt")
    assert last.training_state is not None and best.epoch <= last.epoch + 1
    return last.epoch


def test_sigkill_at_any_moment_leaves_loadable_checkpoints_and_a_resumable_run(
    straight: Straight, small_data: ColourData, tmp_path: Path, processes: list[TrainingProcess],
    no_final_outputs: None,
) -> None:
    """Kill a run three times (after an epoch line, in the middle of writing a checkpoint, at a random moment
    of a resumed run); the files always load, and --resume auto then finishes with the weights of a run that
    was never killed."""
    rng = random.Random(1234)
    output = tmp_path / "out"
    kill_within_s = 0.15  # the head-only epochs take 0.13-0.34 s here: the run must not end before its kill
    argv = ["--data-dir", small_data.root, "--output-dir", output, "--epochs", str(EPOCHS), *RUN_FLAGS]
    kills: list[str] = []

    # 1. a run killed a random moment after its first epoch line
    first = TrainingProcess(argv, tmp_path / "run1.log", fork=True)
    processes.append(first)
    first.wait_for_line(EPOCH_LINE)
    time.sleep(rng.uniform(0.0, kill_within_s))
    first.kill()
    kills.append(f"after epoch line, last.pt epoch {assert_checkpoints_load(output)}")

    # 2. a resumed run killed as soon as a checkpoint is being written (its temporary file exists)
    second = TrainingProcess(["--resume", "auto", *argv], tmp_path / "run2.log", fork=True)
    processes.append(second)
    leftovers = set(output.glob(".*.tmp"))  # the first kill may have left one
    second.wait_for(lambda: bool(set(output.glob(".*.pt.*.tmp")) - leftovers), "a checkpoint write")
    second.kill()
    kills.append(f"mid-write of {[path.name for path in output.glob('.*.tmp')]}, "
                 f"last.pt epoch {assert_checkpoints_load(output)}")

    # 3. a resumed run killed a random moment after it announced the resume (set-up or training)
    third = TrainingProcess(["--resume", "auto", *argv], tmp_path / "run3.log", fork=True)
    processes.append(third)
    third.wait_for_line(r"^resumed after epoch")
    time.sleep(rng.uniform(0.0, kill_within_s))
    third.kill()
    kills.append(f"random, last.pt epoch {assert_checkpoints_load(output)}")

    final = call_main(train.main, "--resume", "auto", "--output-dir", output)

    assert final.returncode == 0, (kills, final.stdout[-3000:], final.stderr[-3000:])
    assert [row["epoch"] for row in read_csv_rows(output / "history.csv")] == ["1", "2", "3", "4"], kills
    assert_same_training(output / "last.pt", straight.output / "last.pt")


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_sigterm_to_the_whole_process_group_stops_as_sigint_does(
    small_data: ColourData, tmp_path: Path, processes: list[TrainingProcess]
) -> None:
    """SLURM and torchrun signal every process, the loader workers too: the run must still stop after its batch."""
    output = tmp_path / "out"
    run = TrainingProcess(["--data-dir", small_data.root, "--output-dir", output, "--epochs", "20",
                           *RUN_FLAGS, "--workers", "1"], tmp_path / "run.log", fork=True)
    processes.append(run)
    run.wait_for_line(EPOCH_LINE)

    os.killpg(run.pid, signal.SIGTERM)
    code = run.wait(60)

    stderr = run.stderr_path.read_text()
    assert code == 130, run.output()[-3000:]
    assert "Traceback" not in stderr and "SIGTERM: stopping after this batch" in stderr, stderr[-3000:]
    assert f"interrupted: {output / 'last.pt'} holds epoch" in stderr
    # that a run with a loader worker which finishes ends, its worker with it: conftest.trained_run


def test_sigint_stops_after_the_batch_keeps_last_pt_and_exits_130(
    small_data: ColourData, tmp_path: Path, processes: list[TrainingProcess]
) -> None:
    output = tmp_path / "out"
    run = TrainingProcess(["--data-dir", small_data.root, "--output-dir", output, "--epochs", "20",
                           *RUN_FLAGS], tmp_path / "run.log", fork=True)
    processes.append(run)
    run.wait_for_line(EPOCH_LINE)

    run.send(signal.SIGINT)
    code = run.wait(60)

    stderr = run.stderr_path.read_text()
    assert code == 130, run.output()[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "SIGINT: stopping after this batch" in stderr
    epoch = load_checkpoint(output / "last.pt").epoch
    assert 1 <= epoch < 20
    # the hint as the run was started: a main() call here; `python train.py` in test_new_user_round3's Ctrl-C test
    assert f"interrupted: {output / 'last.pt'} holds epoch {epoch}; continue with: " \
           f"train.main(['--resume', '{output / 'last.pt'}'])" in stderr
    assert len(read_csv_rows(output / "history.csv")) == epoch
