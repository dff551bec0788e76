"""The workers of test_distributed.py's 2-process gloo jobs, one function a rank: ``run(WORKER)``.

test_distributed.py forks its test process for each rank (torch is imported there already, so a rank starts at
once); ``python tests/distributed_workers.py WORKER`` under torchrun, or with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set, runs one by hand.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from common import World
from distributed import (
    all_reduce_eval,
    all_reduce_sum,
    any_rank,
    broadcast_flag,
    close_world,
    gather_predictions,
    init_world,
    sync_buffers,
    wrap_model,
)
from losses import GlobalCrossEntropy
from samplers import epoch_batches, shard_range, sharded_epoch_batches
from utils import exit_on_user_error

READY_DIR = "WORKER_READY_DIR"  # where each rank says it has started, set by test_distributed.start_ranks


def positions(keys: list) -> list[int]:
    """The dataset positions of a batch of ``(position, sample seed)`` keys."""
    return [position for position, _ in keys]

def check_same_steps_as_one_process(world: World) -> None:
    """Two epochs of DDP with per-rank batches of 3 give the weights of one process with batches of 6 (17 images:
    the last global batch of 5 is split 3 and 2), class weights, label smoothing and a frozen layer included."""
    size, batch_size, seed = 17, 3, 0
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(size, 5, generator=generator), torch.randint(0, 3, (size,), generator=generator)
    class_weights = torch.tensor([0.5, 1.0, 2.5])

    def network() -> nn.Module:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
        model[0].requires_grad_(False)
        return model

    def train(model: nn.Module, criterion: nn.Module, batches) -> None:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for epoch in (0, 1):
            batches.sampler.set_epoch(epoch)
            for keys in batches:
                optimizer.zero_grad()
                criterion(model(images[positions(keys)]), labels[positions(keys)]).backward()
                optimizer.step()

    single = network()
    train(single, nn.CrossEntropyLoss(weight=class_weights, label_smoothing=0.1),
          epoch_batches(size, batch_size * world.world_size, seed))
    ddp = wrap_model(network(), world)
    train(ddp, GlobalCrossEntropy(world, class_weights, 0.1), sharded_epoch_batches(size, batch_size, seed, world))
    for ours, theirs in zip(ddp.module.parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


def check_collectives(world: World) -> None:
    """Predictions gathered in order (rank 1 holding fewer, or none), results reduced, flags shared, buffers synced."""
    import pytest  # here, not above: the other workers need neither

    from engine import EvalResult
    for count in (7, 1):
        part = torch.tensor(shard_range(count, world), dtype=torch.long)
        predictions, targets = gather_predictions(part * 2, part + 100, world)
        assert predictions.tolist() == [2 * position for position in range(count)]
        assert targets.tolist() == [100 + position for position in range(count)]
    part = torch.tensor(shard_range(7, world), dtype=torch.long)  # 4 images on rank 0, 3 on rank 1
    local = EvalResult(float(world.rank + 1), 0.5 if world.rank == 0 else 1.0, len(part), 1.0 + world.rank,
                       part, part)
    combined = all_reduce_eval(local, world)
    assert (combined.images, combined.seconds, combined.predictions.tolist()) == (7, 2.0, list(range(7)))
    assert combined.loss == pytest.approx((1 * 4 + 2 * 3) / 7) and combined.accuracy == pytest.approx(5 / 7)
    assert broadcast_flag(world.rank == 0, world) and not broadcast_flag(world.rank == 1, world)
    assert any_rank(world.rank == 1, world) and not any_rank(False, world)
    norm = nn.BatchNorm1d(2)
    norm.running_mean.fill_(float(world.rank + 3))
    sync_buffers(norm, world)
    assert norm.running_mean.tolist() == [3.0, 3.0]


def worker_checks() -> None:
    """Every check on a real 2-process gloo group."""
    world = init_world("cpu")
    assert world.world_size == 2 and dist.get_backend() == "gloo"
    check_same_steps_as_one_process(world)
    check_collectives(world)
    close_world(world)
    if world.is_main:
        print(f"checks passed on {world.world_size} ranks")
    # Leave without the interpreter's teardown: gloo's worker threads, destroyed with the process group's last
    # references at exit, aborted one rank ("terminate called without an active exception", SIGABRT) once in a CI
    # run on 2026-12-06 after every check had passed; the checks are what this job tests.
    sys.stdout.flush()
    os._exit(0)


def wait_for_the_other_ranks(timeout_s: float = 120.0) -> None:
    """Meet the other ranks before joining the group, so that the short collective timeout of these jobs bounds
    the collectives, not the seconds a rank's start-up may lag behind another's on a loaded machine."""
    folder, world_size = Path(os.environ[READY_DIR]), int(os.environ["WORLD_SIZE"])
    (folder / os.environ["RANK"]).touch()
    deadline = time.monotonic() + timeout_s
    while len(list(folder.iterdir())) < world_size:
        if time.monotonic() > deadline:
            raise SystemExit(f"the other ranks did not start within {timeout_s:g} s")
        time.sleep(0.01)


@exit_on_user_error
def worker_loses_a_peer(how: str) -> None:
    """Rank 1 dies (SIGKILL) or hangs after the first collective; rank 0 waits at the second."""
    wait_for_the_other_ranks()
    world = init_world("cpu")
    all_reduce_sum(torch.ones(1), world)
    if world.rank == 1:
        if how == "dies":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    all_reduce_sum(torch.ones(1), world)


def run(worker: str) -> None:
    """Run the rank's ``worker``: ``checks``, or ``dies`` / ``hangs`` (rank 1 lost after the first collective)."""
    torch.set_num_threads(1)
    if worker == "checks":
        worker_checks()
    else:
        worker_loses_a_peer(worker)


if __name__ == "__main__":
    run(sys.argv[1])
