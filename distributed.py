"""Multi-process training (``torchrun --nproc_per_node=N train.py ...``): the process group, each rank's share of
the data, the loss over the whole job's batch, and the few collectives the loop needs.

One process per GPU (``nccl``) or several on the CPU (``gloo``). With ``world_size`` W and ``--batch-size`` B (per
process), an optimizer step sees a global batch of W*B images, and it is exactly the single-process run's batch of
W*B for the same seed (:class:`ShardedBatches`); :class:`GlobalCrossEntropy` scales each rank's loss so that
DistributedDataParallel's averaged gradient is the gradient of that global batch's weighted mean. So two processes at
``--batch-size B`` take the same steps as one at ``2B``, up to float rounding, when nothing else depends on how the
batch is split: BatchNorm frozen (or synchronised), no dropout, augmentation drawn per image.

Without torchrun's variables (or with ``WORLD_SIZE=1``) every function here is a no-op on a one-process
:class:`World`, so the single-process run is unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gc
import inspect
import itertools
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from accel import maybe_compile
from common import DEFAULT_TIMEOUT_S, World
from utils import UserError, first_line, pick_device

if TYPE_CHECKING:
    from resume import StopRequest

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_VARIABLE = "TRAIN_DIST_TIMEOUT"
PEER_GRACE_S = 5.0  # how long a rank whose collective failed waits for the others to report in
STORE_PREFIX = "train_dist/"
# Errors that mean a peer is gone or silent: gloo raises plain RuntimeErrors, NCCL and the store DistErrors.
PEER_ERROR_MARKERS = ("gloo/transport", "Connection closed by peer", "Connection reset by peer", "Timed out waiting")

Result = TypeVar("Result")


class PeerLostError(UserError):
    """A collective failed because another rank crashed, hung or was stopped."""


class PeerStoppedError(PeerLostError):
    """A collective failed because another rank stopped cleanly on request (Ctrl-C, SIGTERM): see
    :func:`announce_stop`. This rank should stop too, as quietly."""


# --------------------------------------------------------------------------- the process group


def init_world(device_request: str = "auto", backend: str = "auto") -> World:
    """Join the job torchrun started (``RANK``, ``WORLD_SIZE``... in the environment), or a one-process World.

    ``device_request`` is ``--device``; a CUDA rank takes GPU ``LOCAL_RANK``. ``backend``: ``auto`` (nccl on CUDA,
    gloo on the CPU), ``nccl`` or ``gloo``. Collectives give up after ``TRAIN_DIST_TIMEOUT`` seconds (default
    :data:`DEFAULT_TIMEOUT_S`), so a rank that hangs ends the job instead of stalling it.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World(device=pick_device(device_request))
    check_launch_environment(world_size)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = rank_device(device_request, local_rank)
    backend = choose_backend(backend, device)
    timeout_s = collective_timeout_s()
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    except (dist.DistError, RuntimeError, TimeoutError) as error:
        address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise UserError(f"rank {rank} of {world_size}: could not join the other processes at {address} within "
                        f"{timeout_s:g} s ({short_reason(error)}); start all {world_size} (torchrun does), or raise "
                        f"{TIMEOUT_VARIABLE}") from None
    return World(rank, local_rank, world_size, device, timeout_s, dist.PrefixStore(STORE_PREFIX, store))


def check_launch_environment(world_size: int) -> None:
    """Refuse a ``WORLD_SIZE`` set by hand without the rest of what torchrun sets (it would wait for peers)."""
    missing = [name for name in LAUNCH_VARIABLES if not os.environ.get(name)]
    if missing:
        raise UserError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start several processes with "
                        f"torchrun --nproc_per_node={world_size} train.py ..., or unset WORLD_SIZE")


def rank_device(device_request: str, local_rank: int) -> torch.device:
    """The device of the rank with ``local_rank`` on its node: GPU ``local_rank`` on CUDA, else the CPU."""
    device = pick_device(device_request)
    if device.type == "mps":
        raise UserError("--device mps: several processes need CUDA (nccl) or the CPU (gloo); use --device cpu")
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UserError(f"--device cuda: local rank {local_rank} needs GPU {local_rank} but this node shows {count}; "
                        f"start at most {count} processes a node (torchrun --nproc_per_node={count})")
    return torch.device("cuda", local_rank)


def choose_backend(request: str, device: torch.device) -> str:
    """The process group's backend: nccl for CUDA, gloo for the CPU, unless ``request`` names one that fits."""
    if request == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if request == "nccl" and device.type != "cuda":
        raise UserError(f"backend nccl needs CUDA GPUs but this run uses the {device.type}; use gloo")
    if request not in ("nccl", "gloo"):
        raise UserError(f"backend {request}: expected auto, nccl or gloo")
    return request


def collective_timeout_s() -> float:
    """Seconds a collective may wait for the other ranks: ``TRAIN_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S`."""
    value = os.environ.get(TIMEOUT_VARIABLE, "")
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise UserError(f"{TIMEOUT_VARIABLE}={value}: expected a number of seconds above 0")
    return seconds


def is_first_process() -> bool:
    """True in rank 0 of a torchrun job, or in the only process (from the environment: no group need be joined)."""
    return int(os.environ.get("RANK", "0")) == 0


def silence_other_ranks() -> None:
    """Send this process's standard output nowhere unless it is rank 0 (or the only process): one copy of the
    progress reaches the user. Errors still go to standard error from every rank."""
    if not is_first_process():
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # for the rest of the process


@contextlib.contextmanager
def errors_on_rank_0() -> Iterator[None]:
    """Around the checks every process makes alike (the command line, the output folder): only rank 0 reports a
    mistake, argparse's usage line or a :class:`UserError`; the others exit with the same code in silence, so the
    user reads it once, not once a process."""
    if is_first_process():
        yield
        return
    saved, sys.stderr = sys.stderr, open(os.devnull, "w", encoding="utf-8")
    try:
        yield
    except UserError:
        raise SystemExit(2) from None
    finally:
        sys.stderr.close()
        sys.stderr = saved


def close_world(world: World) -> None:
    """Leave the process group (nothing to do in a single process)."""
    if world.distributed and dist.is_initialized():
        gc.collect()  # torch 2.4 with gloo: a DDP reducer collected during destroy_process_group hung it 4 runs in 6
        dist.destroy_process_group()


def wrap_model(model: nn.Module, world: World) -> nn.Module:
    """``model`` under DistributedDataParallel (unchanged in a single process).

    Frozen parameters (``requires_grad=False``) are left out of the gradient all-reduce by DDP itself, so
    ``find_unused_parameters`` stays off. Rank 0's parameters and buffers reach every rank when it is built; after
    that buffers are not broadcast at every step, so call :func:`sync_buffers` before evaluating. Build the wrapper
    after freezing: DDP fixes the set of parameters it reduces when it is built (rebuild it with
    :func:`rewrap_model`).
    """
    if not world.distributed:
        return model
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    if "forward_sync_buffers" in ddp_keywords(DistributedDataParallel):
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    # Before forward_sync_buffers, broadcast_buffers=False also skipped the buffers' broadcast at construction.
    sync_buffers(model, world)
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


@functools.cache
def ddp_keywords(ddp_class: type) -> frozenset[str]:
    """The keyword arguments ``ddp_class`` (DistributedDataParallel) accepts in this torch version."""
    return frozenset(inspect.signature(ddp_class.__init__).parameters)


def rewrap_model(old_wrapper: nn.Module, model: nn.Module, world: World, sync_bn: bool = False,
                 compile: bool = False) -> nn.Module:
    """A new :func:`model_for_training` of ``model`` once ``old_wrapper`` (its previous one) is released: its
    reducer and hooks go now, not when (or if) the garbage collector finds them."""
    release_wrapper(old_wrapper)
    return model_for_training(model, world, sync_bn, compile)


def release_wrapper(wrapper: nn.Module) -> None:
    """Let go of a DistributedDataParallel ``wrapper``, compiled or not, before another is built around its model.

    Its reducer's autograd hooks come off the shared parameters and the reducer (with its gradient buckets) is
    dropped even while the caller still holds ``wrapper``, which is unusable afterwards; torch.compile's caches are
    cleared when it was compiled. A plain model (one process) is left as it is.
    """
    compiled = hasattr(wrapper, "_orig_mod")  # what torch.compile returns
    ddp = wrapper._orig_mod if compiled else wrapper
    if isinstance(ddp, DistributedDataParallel):
        _drop_reducer(ddp)
    if compiled:
        _drop_compiled_forward(wrapper)
        import torch._dynamo

        torch._dynamo.reset()
    gc.collect()


def _drop_compiled_forward(compiled: nn.Module) -> None:
    # torch.compile's forward wraps the DDP module with functools.wraps, which copies its attributes, the reducer
    # among them, into the wrapping functions: drop those functions (``_forward`` is there for lazy modules).
    for name in ("forward", "_forward"):
        compiled.__dict__.pop(name, None)


def _drop_reducer(ddp: DistributedDataParallel) -> None:
    if "reducer" in ddp.__dict__ and hasattr(ddp, "_remove_autograd_hooks"):  # the method is not in every torch
        ddp._remove_autograd_hooks()
    for handle in ddp.__dict__.get("_accum_grad_hooks", ()):  # the Python reducer's hooks (compiled autograd)
        handle.remove()
    for name in ("reducer", "logger"):  # the logger holds the reducer too
        ddp.__dict__.pop(name, None)


def sync_trainable_batchnorm(model: nn.Module) -> int:
    """Replace every BatchNorm layer that learns (exactly ``nn.BatchNorm1d/2d/3d`` or timm's ``BatchNormAct2d``, not
    a frozen one) with its synchronised twin (``nn.SyncBatchNorm``, timm's ``SyncBatchNormAct``) holding the same
    parameters, statistics and activation, so its batch statistics span every rank's images; returns how many were
    replaced. Frozen layers keep their class (a whole-model ``convert_sync_batchnorm`` would turn them into learning
    ones)."""
    converters = sync_converters()
    replaced = 0
    for name, module in list(model.named_modules()):
        convert = converters.get(type(module))
        if convert is not None:
            parent_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attribute, convert(module))
            replaced += 1
    return replaced


def sync_converters() -> dict[type, Callable[[nn.Module], nn.Module]]:
    """The BatchNorm classes :func:`sync_trainable_batchnorm` replaces, each with the function that builds its
    synchronised twin: torch's, and timm's ``BatchNormAct2d`` when timm is loaded (no timm model exists otherwise)."""
    converters: dict[type, Callable[[nn.Module], nn.Module]] = dict.fromkeys(
        (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), nn.SyncBatchNorm.convert_sync_batchnorm)
    if "timm" in sys.modules:
        try:
            from timm.layers import BatchNormAct2d, convert_sync_batchnorm
        except ImportError:  # a timm without these names has no BatchNormAct2d to convert
            return converters
        converters[BatchNormAct2d] = convert_sync_batchnorm
    return converters


def unsynced_batchnorm(model: nn.Module) -> list[str]:
    """The names of the BatchNorm layers that learn but are not synchronised (classes :func:`sync_converters`
    does not know); frozen layers (``model.freeze_batchnorm``'s classes, marked by ``thawed_class``) are left out."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm)
            and getattr(module, "thawed_class", None) is None]


def describe_sync_bn(model: nn.Module, replaced: int) -> str:
    """What ``--sync-bn`` did: ``replaced`` layers synchronised, and any learning BatchNorm layer left per-process."""
    message = f"--sync-bn: {replaced} BatchNorm layers synchronised"
    left = unsynced_batchnorm(model)
    if left:
        classes = sorted({type(model.get_submodule(name)).__name__ for name in left})
        message += (f"; {len(left)} of other classes ({', '.join(classes)}) keep per-process statistics, "
                    f"e.g. {left[0]}")
    return message


def sync_buffers(model: nn.Module, world: World) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), so all ranks evaluate the same model."""
    if not world.distributed:
        return
    with peer_failures(world, "syncing buffers"):
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# --------------------------------------------------------------------------- collectives


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (returned as is in a single process)."""
    return _all_reduce(tensor, world, dist.ReduceOp.SUM)


def _all_reduce(tensor: torch.Tensor, world: World, op: dist.ReduceOp) -> torch.Tensor:
    if world.distributed:
        with peer_failures(world, "an all-reduce"):
            dist.all_reduce(tensor, op=op)
    return tensor


def any_rank(value: bool, world: World) -> bool:
    """True on every rank when ``value`` is true on any (a stop requested by a signal on one rank)."""
    flag = torch.tensor([int(value)], device=world.device)
    return bool(_all_reduce(flag, world, dist.ReduceOp.MAX).item())


def broadcast_flag(value: bool, world: World) -> bool:
    """Rank 0's ``value`` on every rank (a decision only rank 0 takes, such as early stopping)."""
    if not world.distributed:
        return value
    flag = torch.tensor([int(value)], device=world.device)
    with peer_failures(world, "a broadcast"):
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def all_ranks_true(flag: torch.Tensor, world: World) -> torch.Tensor:
    """A boolean tensor on the device that is true only where it is true on every rank (the all-finite check of an
    optimizer step: gradients are averaged, so a NaN on one rank reaches all). Waits for nothing on the host."""
    if not world.distributed:
        return flag
    values = flag.to(torch.int32)
    return _all_reduce(values, world, dist.ReduceOp.MIN).bool()


def gather_objects(value: Any, world: World) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.world_size
    with peer_failures(world, "gathering"):
        dist.all_gather_object(values, value)
    return values


def gather_predictions(predictions: torch.Tensor, targets: torch.Tensor,
                       world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's predictions and targets (1-d, same length), joined in rank order on every rank (on the CPU).

    With the evaluation images shared by :func:`shard_range` that is the original order. Ranks may hold different
    counts (a smaller last part, images that failed to decode): each part is padded for the collective and cut back.
    """
    if not world.distributed:
        return predictions, targets
    local = torch.stack([predictions.long(), targets.long()]).to(world.device)
    counts = [int(count) for count in _all_gather(torch.tensor([local.shape[1]], device=world.device), world)]
    padded = local.new_zeros(2, max(counts))
    padded[:, :local.shape[1]] = local
    parts = _all_gather(padded, world)
    joined = torch.cat([part[:, :count] for part, count in zip(parts, counts, strict=True)], dim=1).cpu()
    return joined[0], joined[1]


def _all_gather(tensor: torch.Tensor, world: World) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(world.world_size)]
    with peer_failures(world, "gathering predictions"):
        dist.all_gather(parts, tensor)
    return parts


def all_reduce_epoch(result: Result, world: World) -> Result:
    """The whole job's ``loss`` and ``accuracy`` (means over all images), ``images`` and ``seconds`` (the slowest
    rank's), from every rank's ``result`` (an ``engine.EpochResult`` or ``EvalResult``)."""
    if not world.distributed:
        return result
    sums = torch.tensor([result.loss * result.images, result.accuracy * result.images, result.images],
                        dtype=torch.float64, device=world.device)
    loss_sum, correct, images = all_reduce_sum(sums, world).tolist()
    seconds = _all_reduce(torch.tensor([result.seconds], dtype=torch.float64, device=world.device), world,
                          dist.ReduceOp.MAX).item()
    return dataclasses.replace(result, loss=loss_sum / max(images, 1), accuracy=correct / max(images, 1),
                               images=round(images), seconds=seconds)


def all_reduce_eval(result: Result, world: World) -> Result:
    """An ``engine.EvalResult`` of the whole evaluation set from every rank's part: :func:`all_reduce_epoch` and
    every prediction and target in order (:func:`gather_predictions`)."""
    if not world.distributed:
        return result
    predictions, targets = gather_predictions(result.predictions, result.targets, world)
    return dataclasses.replace(all_reduce_epoch(result, world), predictions=predictions, targets=targets)


# --------------------------------------------------------------------------- a lost rank


@contextlib.contextmanager
def peer_failures(world: World, doing: str) -> Iterator[None]:
    """Turn a collective that fails because a peer crashed or stopped answering into a one-line
    :class:`PeerLostError` naming that rank when the others can tell; other errors pass through unchanged.

    Wrap whatever runs collectives outside this module too, such as DDP's backward pass: ``doing`` names it.
    A peer that announced a clean stop (:func:`announce_stop`) is not blamed: a :class:`PeerStoppedError` says it
    stopped on request.
    """
    try:
        yield
    except (RuntimeError, dist.DistError) as error:
        if not (world.distributed and is_peer_error(error)):
            raise
        silent = silent_ranks(world, min(PEER_GRACE_S, world.timeout_s))
        stopped = stopped_ranks(world) if silent == [] else []
        where = f"rank {world.rank} of {world.world_size}"
        if stopped:
            raise PeerStoppedError(f"{where}: {describe_ranks(stopped)} stopped on request (Ctrl-C or SIGTERM) "
                                   f"during {doing}; this process stops too") from None
        raise PeerLostError(f"{where}: {describe_silent(silent)} during {doing} ({short_reason(error)})") from None


def announce_stop(world: World) -> None:
    """Tell the other ranks, through the store, that this one leaves because a stop was requested, so that a
    collective of theirs that fails now does not read as a crash of this rank. Call it before leaving."""
    if not world.distributed:
        return
    with contextlib.suppress(RuntimeError, dist.DistError):  # no store left: the others blame no one in particular
        world.store.set(f"stopped/{world.rank}", "1")


def stopped_ranks(world: World) -> list[int]:
    """The ranks that announced a clean stop (:func:`announce_stop`)."""
    try:
        return [rank for rank in range(world.world_size) if world.store.check([f"stopped/{rank}"])]
    except (RuntimeError, dist.DistError):
        return []


def is_peer_error(error: BaseException) -> bool:
    """True for an error that says another rank is gone or silent (not a mistake of this rank's own)."""
    return isinstance(error, dist.DistError) or any(marker in str(error) for marker in PEER_ERROR_MARKERS)


def silent_ranks(world: World, grace_s: float) -> list[int] | None:
    """The ranks that did not report in through the store within ``grace_s`` seconds of this one, after a
    collective failed (a rank reports in when its own collective fails, or announced a clean stop before it left);
    None when the store is gone too."""
    try:
        world.store.set(f"alive/{world.rank}", "1")
        deadline = time.monotonic() + grace_s
        while True:
            silent = [rank for rank in range(world.world_size)
                      if not world.store.check([f"alive/{rank}"]) and not world.store.check([f"stopped/{rank}"])]
            if not silent or time.monotonic() >= deadline:
                return silent
            time.sleep(0.1)
    except (RuntimeError, dist.DistError):  # the store lived in a process that is gone
        return None


def describe_silent(silent: list[int] | None) -> str:
    """What a failed collective says about the other ranks."""
    if silent is None:
        return "lost contact with another rank (the launcher's report names the one that failed)"
    if not silent:
        return "a collective failed although every rank is still running"
    return f"{describe_ranks(silent)} stopped answering (crashed, hung or was stopped; see its own output)"


def describe_ranks(ranks: Sequence[int]) -> str:
    """'rank 1', or 'ranks 1, 3'."""
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(rank) for rank in ranks)


def short_reason(error: BaseException) -> str:
    """The first sentence of a collective's error, without the ``[file.cc:123]`` prefix gloo puts on it."""
    reason = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error))
    return reason.split(". ")[0].rstrip(".")


def note_process_count_change(before: int, batch: int, world: World) -> None:
    """Say so when a run continues with another number of processes (``before``) than it ran with: its global batch
    (``batch`` images a process and step) changes."""
    if before != world.world_size:
        print(f"note: this run trained with {before} process(es), a global batch of {batch * before}; it continues "
              f"with {world.world_size}, a global batch of {batch * world.world_size} (start it as before to keep "
              "the steps it took)")


def describe_batch(batch_size: int, accum_steps: int, world: World) -> None:
    """Say how many images an optimizer step sees, when that is more than --batch-size."""
    if world.distributed:
        accumulated = f" x {accum_steps} accumulated" if accum_steps > 1 else ""
        print(f"global batch: {batch_size} a process x {world.world_size} processes{accumulated} = "
              f"{batch_size * world.world_size * accum_steps} images a step (--lr is not scaled for you: "
              "see the README's linear scaling rule)")
    elif accum_steps > 1:
        print(f"effective batch: {batch_size} x {accum_steps} accumulated = {batch_size * accum_steps} images a step")


def model_for_training(model: nn.Module, world: World, sync_bn: bool = False, compile: bool = False) -> nn.Module:
    """What training calls: ``model`` under DistributedDataParallel when several processes train (its learning
    BatchNorm layers synchronised with --sync-bn), compiled with --compile."""
    if world.distributed and sync_bn:
        print(describe_sync_bn(model, sync_trainable_batchnorm(model)))
    return maybe_compile(wrap_model(model, world), compile)


def bar_label(description: str, world: World) -> str:
    """A progress bar's label: under torchrun the bar (rank 0's) counts and scores only rank 0's images, while the
    epoch line reports the whole job's, so it says so."""
    return f"{description} (rank 0's images)" if world.distributed else description


def stop_agreed(stop: StopRequest, world: World) -> bool:
    """Whether to stop now. Under torchrun the processes agree (a stop requested on any one stops all, which then
    count it as their own), so none of them is left waiting for another that has left."""
    if world.distributed and any_rank(stop.requested, world):
        stop.requested = True
    return stop.requested


def launch_command(processes: int, per_node: int) -> str:
    """How a run of ``processes`` processes (``per_node`` on each machine) is started: python, or torchrun."""
    if processes == 1:
        return "python"
    if processes == per_node:
        return f"torchrun --nproc_per_node={processes}"
    return f"torchrun --nnodes={processes // per_node} --nproc_per_node={per_node} (and your --rdzv options)"


@contextlib.contextmanager
def joined_world(device_request: str = "auto") -> Iterator[World]:
    """The job torchrun started (this process one of its ranks), or a one-process world; left at the end."""
    world = init_world(device_request)
    try:
        yield world
    finally:
        close_world(world)


def stop_check(stop: StopRequest, world: World) -> Callable[[], bool]:
    """Whether to stop after this batch. Under torchrun the processes agree on it (a stop on any one stops all at
    the same batch), asking each other every batch on the CPU and every 25 batches on a GPU."""
    if not world.distributed:
        return stop
    interval, calls = (1 if world.device.type == "cpu" else 25), itertools.count(1)
    return lambda: next(calls) % interval == 0 and stop_agreed(stop, world)
