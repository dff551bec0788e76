"""train.py under torchrun: two CPU processes (gloo) on tiny data, as a user starts them.

Each job is ``python -m torch.distributed.run --standalone --nproc_per_node=2 train.py ...``. The runs freeze every
BatchNorm layer (``--trainable fc``), so two processes at ``--batch-size B`` must take the very steps one process
takes at ``2B``, up to the order of float additions. Three jobs in all: one uninterrupted, one whose rank 1 is
killed after its first epoch, and the resumption of that one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from checkpoint import load_checkpoint
from conftest import (
    REPO_ROOT,
    TINY_TRAIN_FLAGS,
    CliResult,
    ColourData,
    assert_same_training,
    assert_user_error,
    call_main,
    read_csv_rows,
)

# What makes the two-process run comparable with the one-process run: BatchNorm frozen, no dropout.
COMPARABLE_FLAGS = (*TINY_TRAIN_FLAGS, "--trainable", "fc", "--dropout", "0")
EPOCHS = 4  # the killed job has three left after its first, about two seconds: time enough for the kill to land
JOB_TIMEOUT_S = 240


def torchrun_command(*args: str | Path, processes: int = 2) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N train.py ARGS``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            str(REPO_ROOT / "train.py"), *map(str, args)]


def job_environment() -> dict[str, str]:
    """One thread per process (two processes share the CI's two cores) and a short collective timeout."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TRAIN_DIST_TIMEOUT": "30", "PYTHONUNBUFFERED": "1"}


def torchrun(*args: str | Path) -> CliResult:
    """Run a two-process job to its end."""
    completed = subprocess.run(torchrun_command(*args), cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=JOB_TIMEOUT_S, env=job_environment())
    return CliResult(completed.returncode, completed.stdout, completed.stderr)


def succeeded(result: CliResult) -> CliResult:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def uneven_data(small_data: ColourData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small_data with classes of 2, 2 and 4 training images: 8 images, two global batches of 4, and class weights
    that differ, so the ranks of a step hold differently weighted images."""
    root = tmp_path_factory.mktemp("uneven") / "data"
    shutil.copytree(small_data.root, root)
    for label in ("0", "1"):
        for path in sorted((root / "train" / label).iterdir())[:2]:
            path.unlink()
    return root


@pytest.fixture(scope="module")
def two_process_run(uneven_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[CliResult, Path]:
    """EPOCHS epochs in two processes at --batch-size 2."""
    output = tmp_path_factory.mktemp("torchrun") / "out"
    result = succeeded(torchrun("--data-dir", uneven_data, "--output-dir", output, *COMPARABLE_FLAGS,
                                "--batch-size", "2", "--epochs", str(EPOCHS)))
    return result, output


def test_two_processes_take_the_steps_of_one_with_twice_the_batch(two_process_run: tuple[CliResult, Path],
                                                                  uneven_data: Path, tmp_path: Path,
                                                                  no_final_outputs: None) -> None:
    _, output = two_process_run
    single = tmp_path / "single"
    succeeded(call_main(train.main, "--data-dir", uneven_data, "--output-dir", single, *COMPARABLE_FLAGS,
                        "--batch-size", "4", "--epochs", str(EPOCHS)))

    together, alone = load_checkpoint(output / "last.pt"), load_checkpoint(single / "last.pt")
    for key, value in alone.model.items():
        torch.testing.assert_close(together.model[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert [row["val_acc"] for row in read_csv_rows(output / "history.csv")] == \
        [row["val_acc"] for row in read_csv_rows(single / "history.csv")]  # validation sharded, then summed


def test_only_rank_0_prints_and_writes(two_process_run: tuple[CliResult, Path]) -> None:
    result, output = two_process_run
    assert "global batch: 2 a process x 2 processes = 4 images a step" in result.stdout
    assert len(re.findall(rf"^epoch +1/{EPOCHS} ", result.stdout, flags=re.MULTILINE)) == 1
    assert len(read_csv_rows(output / "history.csv")) == EPOCHS
    assert len(re.findall(r"; wrote .*best\.pt", result.stdout)) == 1  # the closing line
    assert {path.name for path in output.iterdir()} >= {"best.pt", "last.pt", "history.csv", "config.yaml",
                                                         "confusion_matrix.png", "report"}
    assert load_checkpoint(output / "last.pt").runtime["processes"] == 2
    header = (output / "config.yaml").read_text(encoding="utf-8")
    assert ", 2 processes (torchrun);" in header
    assert "`torchrun --nproc_per_node=2 train.py --config THIS_FILE --output-dir NEW_FOLDER` repeats the run" in header


def rank_process(job: subprocess.Popen, rank: int) -> int:
    """The pid of the job's worker with ``RANK=rank`` (torchrun's child processes)."""
    for _ in range(600):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environment = (entry / "environ").read_bytes().split(b"\0")
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == job.pid and f"RANK={rank}".encode() in environment:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"no worker process with RANK={rank}")


def kill_rank_after_the_first_epoch(output: Path, data: Path, rank: int) -> str:
    """Start a job of EPOCHS epochs, SIGKILL its worker ``rank`` once epoch 1 is printed, and wait for the job to
    end (within a minute of the kill); its whole output."""
    job = subprocess.Popen(torchrun_command("--data-dir", data, "--output-dir", output, *COMPARABLE_FLAGS,
                                            "--batch-size", "2", "--epochs", str(EPOCHS)),
                           cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=job_environment())
    victim = rank_process(job, rank)  # found first, so that the kill follows the epoch line at once
    lines = []
    for line in job.stdout:  # wait until training runs
        lines.append(line)
        if line.startswith(f"epoch   1/{EPOCHS}"):
            break
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    lines += job.stdout.readlines()
    job.wait(timeout=JOB_TIMEOUT_S)
    output_text = "".join(lines)
    assert job.returncode != 0, f"the job ended well before rank {rank} was killed:\n{output_text[-3000:]}"
    assert time.monotonic() - killed < 60
    return output_text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_a_killed_rank_ends_the_job_naming_it_and_its_resumption_equals_an_uninterrupted_run(
        two_process_run: tuple[CliResult, Path], uneven_data: Path, tmp_path: Path, no_final_outputs: None) -> None:
    _, straight = two_process_run
    killed = tmp_path / "killed"
    output = kill_rank_after_the_first_epoch(killed, uneven_data, rank=1)
    assert re.search(r"rank\s*:?\s*1\b", output), output[-3000:]

    assert 1 <= load_checkpoint(killed / "last.pt").epoch < EPOCHS
    succeeded(torchrun("--resume", killed / "last.pt"))
    assert_same_training(killed / "last.pt", straight / "last.pt")
    alone = succeeded(call_main(train.main, "--resume", killed / "last.pt", "--epochs", str(EPOCHS + 1)))
    assert "this run trained with 2 process(es), a global batch of 4; it continues with 1, a global batch of 2" in \
        alone.stdout


def test_sync_bn_needs_cuda(small_data: ColourData, tmp_path: Path) -> None:
    result = call_main(train.main, "--data-dir", small_data.root, "--output-dir", tmp_path / "out", *TINY_TRAIN_FLAGS,
                       "--sync-bn", "--device", "cpu")  # a CPU run also where a GPU is present
    assert_user_error(result, "--sync-bn: SyncBatchNorm needs CUDA GPUs")


def test_a_process_whose_peers_never_come_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    """Rank 0 of a job whose other rank never starts, in this process: what torchrun would have set, by hand.
    capfd reads file descriptor 2, so what torch's C++ side writes there counts too."""
    environment = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "29573", "TRAIN_DIST_TIMEOUT": "1"}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(SystemExit) as exited:
        train.main(["--output-dir", str(tmp_path / "out")])

    stderr = capfd.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.startswith("error: rank 0 of 2: could not join the other processes at 127.0.0.1:29573 within 1 s")
    assert not (tmp_path / "out").exists()
