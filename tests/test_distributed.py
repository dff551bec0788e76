"""Multi-process training helpers: each rank's share of the epoch, the global batch's loss, the collectives, and
a rank that dies or hangs. The last three tests run real 2-process gloo jobs: each rank a fork of this process
running a worker of distributed_workers.py (tests/test_torchrun.py starts train.py itself under torchrun)."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import distributed_workers
import pytest
import torch
import torch.distributed as dist
from torch import nn

import distributed
from common import World
from conftest import redirect_output
from distributed import (
    PeerLostError,
    all_reduce_eval,
    all_reduce_sum,
    any_rank,
    broadcast_flag,
    close_world,
    gather_predictions,
    init_world,
    peer_failures,
    rank_device,
    sync_buffers,
    wrap_model,
)
from engine import EvalResult
from losses import GlobalCrossEntropy, global_weighted_share
from samplers import EpochSampler, ShardedBatches, epoch_batches, shard_range, shard_slice
from utils import UserError

GLOO_GLITCH = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.2]:4021."


# --------------------------------------------------------------------------- each rank's share of an epoch


def positions(keys: list) -> list[int]:
    """The dataset positions of a batch of ``(position, sample seed)`` keys."""
    return [position for position, _ in keys]


def rank_batches(size: int, batch_size: int, seed: int, world_size: int, epoch: int = 0,
                 weights: list[float] | None = None) -> list[list[list]]:
    """Every rank's batches of one epoch, by rank."""
    per_rank = []
    for rank in range(world_size):
        batches = ShardedBatches(EpochSampler(size, seed, weights=weights), batch_size, rank, world_size)
        batches.set_epoch(epoch)
        per_rank.append(list(batches))
    return per_rank


def single_process_batches(size: int, batch_size: int, seed: int, epoch: int = 0,
                           weights: list[float] | None = None) -> list[list]:
    """The batches one process trains on."""
    batches = epoch_batches(size, batch_size, seed, weights)
    batches.sampler.set_epoch(epoch)
    return list(batches)


def test_shard_slice_splits_evenly_in_order() -> None:
    assert [shard_slice(7, rank, 3) for rank in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert [shard_slice(8, rank, 2) for rank in range(2)] == [slice(0, 4), slice(4, 8)]
    assert [shard_slice(1, rank, 2) for rank in range(2)] == [slice(0, 1), slice(1, 1)]


@pytest.mark.parametrize("size, batch_size", [(23, 4), (21, 4), (20, 5), (9, 1)])
def test_one_process_gets_the_batches_of_epoch_batches(size: int, batch_size: int) -> None:
    for epoch in (1, 2):
        for weights in (None, [1.0 + position % 3 for position in range(size)]):
            (only,) = rank_batches(size, batch_size, 7, 1, epoch, weights)
            assert only == single_process_batches(size, batch_size, 7, epoch, weights)


@pytest.mark.parametrize("size, batch_size, world_size", [(24, 3, 2), (23, 3, 2), (31, 2, 3), (40, 4, 4)])
def test_each_step_splits_the_single_process_batch(size: int, batch_size: int, world_size: int) -> None:
    per_rank = rank_batches(size, batch_size, 3, world_size, epoch=5)
    single = single_process_batches(size, batch_size * world_size, 3, epoch=5)
    assert all(len(batches) == len(single) for batches in per_rank)
    for step, global_batch in enumerate(single):
        assert [key for batches in per_rank for key in batches[step]] == global_batch
        assert all(len(batches[step]) >= 2 for batches in per_rank)


def test_a_last_batch_too_small_to_share_is_dropped_on_every_rank() -> None:
    # 19 images, 2 ranks of 4: batches of 8, 8 and a last 3, which would leave one rank a single image.
    per_rank = rank_batches(19, 4, 0, 2)
    single = single_process_batches(19, 8, 0)
    assert [len(batches) for batches in per_rank] == [2, 2]
    assert [key for step in range(2) for batches in per_rank for key in batches[step]] == single[0] + single[1]
    # 21 images: a last 5, split 3 and 2, is kept; the loss normalisation below makes the uneven split exact.
    assert [[len(batch) for batch in batches] for batches in rank_batches(21, 4, 0, 2)] == [[4, 4, 3], [4, 4, 2]]


def test_too_few_images_for_the_processes_is_a_user_error() -> None:
    with pytest.raises(UserError, match="3 training images cannot be shared by 2 processes"):
        ShardedBatches(EpochSampler(3, 0), 4, 0, 2)


def test_evaluation_shards_cover_the_set_in_order() -> None:
    for count, world_size in ((10, 3), (2, 3), (0, 2)):
        ranges = [shard_range(count, World(rank, rank, world_size)) for rank in range(world_size)]
        assert [position for part in ranges for position in part] == list(range(count))


# --------------------------------------------------------------------------- the global batch's loss


def test_rank_shares_give_the_gradient_of_the_global_weighted_mean() -> None:
    torch.manual_seed(0)
    head = nn.Linear(6, 4)
    images, targets = torch.randn(11, 6), torch.tensor([0, 1, 2, 3, 3, 3, 0, 1, 1, 2, 3])
    weight, smoothing = torch.tensor([0.2, 1.0, 3.0, 0.7]), 0.1
    reference = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)(head(images), targets)
    expected = torch.autograd.grad(reference, head.weight)[0]
    world_size = 3  # uneven parts, 4, 4 and 3 images, as a last batch of 11 would be split
    weight_sum = weight[targets].sum()
    gradient, value = torch.zeros_like(head.weight), 0.0
    for rank in range(world_size):
        part = shard_slice(len(targets), rank, world_size)
        losses = nn.functional.cross_entropy(head(images[part]), targets[part], weight=weight, reduction="none",
                                             label_smoothing=smoothing)
        share = global_weighted_share(losses, weight_sum, world_size)
        gradient += torch.autograd.grad(share, head.weight)[0] / world_size  # what DDP's averaging does
        value += share.item() / world_size
    torch.testing.assert_close(gradient, expected)
    assert value == pytest.approx(reference.item(), rel=1e-6)


def test_pytorch_weighted_mean_with_smoothing_divides_by_the_target_weights() -> None:
    torch.manual_seed(1)
    logits, targets = torch.randn(5, 3), torch.tensor([0, 2, 2, 1, 0])
    weight, smoothing = torch.tensor([0.5, 2.0, 1.5]), 0.2
    log_p = logits.log_softmax(dim=1)
    per_image = ((1 - smoothing) * -weight[targets] * log_p[torch.arange(5), targets]
                 - smoothing / 3 * (weight * log_p).sum(dim=1))
    mean = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)(logits, targets)
    torch.testing.assert_close(mean, per_image.sum() / weight[targets].sum())


@pytest.mark.parametrize("weight", [None, torch.tensor([0.5, 2.0, 1.5])])
def test_one_process_loss_is_cross_entropy(weight: torch.Tensor | None) -> None:
    torch.manual_seed(2)
    logits, targets = torch.randn(8, 3), torch.randint(0, 3, (8,))
    expected = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.05)(logits, targets)
    assert torch.equal(GlobalCrossEntropy(World(), weight, 0.05)(logits, targets), expected)  # bit for bit


def test_loss_without_gradients_communicates_nothing() -> None:
    # Two ranks but no process group: any collective would raise. Evaluation runs under inference_mode.
    lonely = World(rank=0, local_rank=0, world_size=2)
    logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 2])
    with torch.inference_mode():
        loss = GlobalCrossEntropy(lonely, torch.tensor([1.0, 2.0, 3.0]))(logits, targets)
    torch.testing.assert_close(loss, nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]))(logits, targets))


# --------------------------------------------------------------------------- one process, and setting up


def test_collectives_are_no_ops_in_one_process() -> None:
    world = World()
    assert world.is_main and not world.distributed
    assert all_reduce_sum(torch.tensor([2.0]), world).item() == 2.0
    assert any_rank(True, world) and not any_rank(False, world)
    assert broadcast_flag(True, world) and not broadcast_flag(False, world)
    predictions, targets = torch.tensor([1, 0]), torch.tensor([1, 1])
    assert gather_predictions(predictions, targets, world) == (predictions, targets)
    result = EvalResult(0.5, 0.5, 2, 1.0, predictions, targets)
    assert all_reduce_eval(result, world) is result
    model = nn.Linear(2, 2)
    assert wrap_model(model, world) is model
    sync_buffers(model, world)
    close_world(world)


def test_without_torchrun_there_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    world = init_world("cpu")
    assert (world.rank, world.world_size, world.device) == (0, 1, torch.device("cpu"))
    assert not dist.is_initialized()


def test_launch_mistakes_are_user_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="RANK.*torchrun --nproc_per_node=2"):
        init_world("cpu")
    with pytest.raises(UserError, match="backend nccl needs CUDA"):
        distributed.choose_backend("nccl", torch.device("cpu"))
    monkeypatch.setenv("TRAIN_DIST_TIMEOUT", "soon")
    with pytest.raises(UserError, match="TRAIN_DIST_TIMEOUT=soon"):
        distributed.collective_timeout_s()


def test_a_rank_without_its_own_gpu_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert rank_device("cuda", 0) == torch.device("cuda", 0)
    with pytest.raises(UserError, match="local rank 1 needs GPU 1 but this node shows 1"):
        rank_device("cuda", 1)


def test_peer_failures_name_the_silent_rank_and_pass_other_errors() -> None:
    store = dist.HashStore()
    world = World(rank=0, local_rank=0, world_size=3, timeout_s=0.3, store=store)
    store.set("alive/2", "1")  # rank 2's collective failed too; rank 1 never reports in
    with pytest.raises(PeerLostError) as raised:
        with peer_failures(world, "validation"):
            raise RuntimeError(GLOO_GLITCH)
    assert str(raised.value) == ("rank 0 of 3: rank 1 stopped answering (crashed, hung or was stopped; see its own "
                                 "output) during validation (Connection closed by peer [10.0.0.2]:4021)")
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes"):
        with peer_failures(world, "training"):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


# --------------------------------------------------------------------------- real 2-process gloo jobs


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_body(worker: str, environment: dict[str, str], stdout_path: str, stderr_path: str) -> None:
    """A forked rank: the environment a launcher gives it, its output (file descriptors 1 and 2, so that what gloo's
    C++ side writes counts too) in files, then the worker."""
    os.environ.update(environment)
    redirect_output(stdout_path, stderr_path)
    distributed_workers.run(worker)


@dataclass
class Rank:
    """One forked rank of a job, and the files its output goes to."""

    process: multiprocessing.process.BaseProcess
    stdout_path: Path
    stderr_path: Path

    def finish(self, timeout_s: float) -> int:
        """Wait for the rank to end; its exit code."""
        self.process.join(timeout_s)
        assert not self.process.is_alive(), f"the rank did not end within {timeout_s:g} s:\n{self.output()}"
        return self.process.exitcode

    def kill(self) -> None:
        """Kill the rank if it still runs, and reap it."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join()

    def stdout(self) -> str:
        """What the rank wrote to standard output."""
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        """What the rank wrote to standard error (gloo's C++ messages included)."""
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        """The end of both, for a failure's message."""
        return (self.stdout() + self.stderr())[-3000:]


def start_ranks(worker: str, timeout_s: int, folder: Path) -> list[Rank]:
    """Two ranks running ``worker``, forked from this process (torch imported, so no interpreter start) and set up as
    a scheduler would, without torchrun (rank 0 hosts the store); they meet in ``folder/ready`` before joining the
    group, and write their output to ``folder``."""
    ready_dir = folder / "ready"
    ready_dir.mkdir()
    common = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                  TRAIN_DIST_TIMEOUT=str(timeout_s), WORKER_READY_DIR=str(ready_dir))
    ranks = []
    for rank in range(2):
        environment = dict(common, RANK=str(rank), LOCAL_RANK=str(rank))
        stdout_path, stderr_path = folder / f"rank{rank}.out", folder / f"rank{rank}.err"
        process = multiprocessing.get_context("fork").Process(
            target=_rank_body, args=(worker, environment, str(stdout_path), str(stderr_path)))
        process.start()
        ranks.append(Rank(process, stdout_path, stderr_path))
    return ranks


def test_two_processes_train_like_one_with_the_double_batch(tmp_path: Path, processes: list[Rank]) -> None:
    ranks = start_ranks("checks", timeout_s=30, folder=tmp_path)
    processes.extend(ranks)  # killed at the end if still running
    codes = [rank.finish(120) for rank in ranks]
    assert codes == [0, 0], ranks[0].output() + ranks[1].output()
    assert "checks passed on 2 ranks" in ranks[0].stdout()


@pytest.mark.parametrize("worker, reason", [("dies", "by peer"), ("hangs", "Timed out")])
def test_a_lost_rank_ends_the_job_naming_it(worker: str, reason: str, tmp_path: Path, processes: list[Rank]) -> None:
    started = time.monotonic()
    ranks = start_ranks(worker, timeout_s=2, folder=tmp_path)
    processes.extend(ranks)  # the hanging rank 1 is killed at the end
    code = ranks[0].finish(60)
    stderr = ranks[0].stderr()
    assert time.monotonic() - started < 30
    assert code == 2, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 0 of 2: rank 1 stopped answering") and reason in last, stderr
