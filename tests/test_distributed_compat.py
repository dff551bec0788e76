"""distributed.py on the torch versions the project supports (2.4 and newer) and on the GPU's hot path: the DDP
keywords each torch has, a loss that never copies from the host, an empty batch, timm's BatchNormAct2d under
``--sync-bn``, and a DDP wrapper rebuilt when blocks thaw. All run in this process; the DDP tests use a one-process
group (gloo on the CPU, nccl on a GPU) under a :class:`World` that claims two ranks, so :func:`wrap_model` builds a
real wrapper. The last tests need a CUDA GPU and are skipped without one."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distributed
import losses
from common import World
from distributed import describe_sync_bn, release_wrapper, rewrap_model, sync_trainable_batchnorm, wrap_model
from losses import GlobalCrossEntropy, global_weighted_share
from model import freeze_batchnorm, freeze_blocks, thaw_blocks

TWO_RANKS = World(rank=0, local_rank=0, world_size=2)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def process_group_of_one(store_path: Path, device: torch.device) -> Iterator[World]:
    """A process group of this one process (nccl on a GPU, else gloo), left again afterwards; the World it yields
    says two ranks."""
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.FileStore(str(store_path), 1), rank=0,
                            world_size=1, device_id=device if cuda else None)
    try:
        yield World(rank=0, local_rank=0, world_size=2, device=device)
    finally:
        dist.destroy_process_group()


@pytest.fixture
def one_process_group(tmp_path: Path) -> Iterator[World]:
    """A gloo group of this one process on the CPU."""
    with process_group_of_one(tmp_path / "store", torch.device("cpu")) as world:
        yield world


@pytest.fixture
def one_gpu_group(tmp_path: Path) -> Iterator[World]:
    """An nccl group of this one process on GPU 0."""
    with process_group_of_one(tmp_path / "store", torch.device("cuda", 0)) as world:
        yield world


def network() -> nn.Module:
    """A small model with a learning BatchNorm layer (buffers) and a frozen first layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    return model


# --------------------------------------------------------------------------- DDP's keywords across torch versions


class TorchBefore214DDP(nn.Module):
    """Stands in for DistributedDataParallel of torch 2.4-2.13: no ``forward_sync_buffers`` keyword."""

    built: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, module: nn.Module, device_ids: list[int] | None = None, broadcast_buffers: bool = True) -> None:
        super().__init__()
        self.module = module
        TorchBefore214DDP.built.append({"device_ids": device_ids, "broadcast_buffers": broadcast_buffers})


def test_older_ddp_gets_broadcast_buffers_and_buffers_synced_at_build(monkeypatch: pytest.MonkeyPatch) -> None:
    synced = []
    monkeypatch.setattr(distributed, "DistributedDataParallel", TorchBefore214DDP)
    monkeypatch.setattr(distributed, "sync_buffers", lambda model, world: synced.append((model, world)))
    TorchBefore214DDP.built.clear()
    model = network()
    wrapper = wrap_model(model, TWO_RANKS)
    assert isinstance(wrapper, TorchBefore214DDP) and wrapper.module is model
    assert TorchBefore214DDP.built == [{"device_ids": None, "broadcast_buffers": False}]
    assert synced == [(model, TWO_RANKS)]  # what forward_sync_buffers=False still did at construction


def test_installed_ddp_is_built_with_the_keyword_it_has(one_process_group: World) -> None:
    model = network()
    wrapper = wrap_model(model, one_process_group)
    assert isinstance(wrapper, nn.parallel.DistributedDataParallel) and wrapper.module is model
    assert not wrapper.broadcast_buffers  # both keywords end in this attribute


# --------------------------------------------------------------------------- the loss on the hot path


@pytest.mark.parametrize("weight", [None, torch.tensor([0.5, 2.0, 1.5])])
def test_training_loss_copies_nothing_from_the_host(monkeypatch: pytest.MonkeyPatch,
                                                    weight: torch.Tensor | None) -> None:
    # torch.tensor(value, device=cuda) is a host-to-device copy that waits for the GPU at every step.
    logits, targets = torch.randn(6, 3, requires_grad=True), torch.tensor([0, 1, 2, 2, 1, 0])
    expected = nn.CrossEntropyLoss(weight=weight)(logits, targets) * 2  # this rank's share, as if alone
    criterion = GlobalCrossEntropy(TWO_RANKS, weight)
    monkeypatch.setattr(losses, "all_reduce_sum", lambda tensor, world: tensor)  # as if the other rank had 0

    def no_host_tensors(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("torch.tensor in the training loss: a host-to-device copy at every step")

    monkeypatch.setattr(losses.torch, "tensor", no_host_tensors)
    torch.testing.assert_close(criterion(logits, targets), expected)


def test_an_empty_rank_shares_nothing_and_keeps_gradients_finite() -> None:
    head = nn.Linear(4, 3)
    for global_weight_sum in (torch.tensor(5.0), torch.tensor(0.0)):  # other ranks have images; no rank has any
        losses = nn.functional.cross_entropy(head(torch.zeros(0, 4)), torch.zeros(0, dtype=torch.long),
                                             reduction="none")
        share = global_weighted_share(losses, global_weight_sum, world_size=2)
        assert share.item() == 0.0
        gradient = torch.autograd.grad(share, head.weight)[0]
        assert torch.equal(gradient, torch.zeros_like(head.weight))


@pytest.mark.parametrize("weight", [None, torch.tensor([0.5, 2.0, 1.5])])
def test_a_rank_with_an_empty_batch_takes_part_in_the_all_reduce(monkeypatch: pytest.MonkeyPatch,
                                                                 weight: torch.Tensor | None) -> None:
    reduced = []

    def other_rank_has_four(tensor: torch.Tensor, world: World) -> torch.Tensor:
        reduced.append(tensor.item())
        return tensor + 4.0

    monkeypatch.setattr(losses, "all_reduce_sum", other_rank_has_four)
    head = nn.Linear(4, 3)
    loss = GlobalCrossEntropy(TWO_RANKS, weight)(head(torch.zeros(0, 4)), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert reduced == [0.0] and loss.item() == 0.0
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))


# --------------------------------------------------------------------------- --sync-bn


def test_learning_batchnorm_is_synchronised_and_frozen_keeps_its_class() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm1d(4), nn.BatchNorm2d(4))
    freeze_batchnorm(model[3])
    frozen_class, weight = type(model[3]), model[1].weight
    assert sync_trainable_batchnorm(model) == 2
    assert [type(layer) for layer in model[1:]] == [nn.SyncBatchNorm, nn.SyncBatchNorm, frozen_class]
    assert model[1].weight is weight  # the optimizer's parameters stay the model's
    assert describe_sync_bn(model, 2) == "--sync-bn: 2 BatchNorm layers synchronised"


def test_timm_batchnorm_act_is_synchronised_with_its_values_and_activation() -> None:
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    freeze_blocks(model, ["blocks.2", "conv_head", "bn2", "classifier"])
    learning = {name: layer for name, layer in model.named_modules() if type(layer) is BatchNormAct2d}
    frozen = {name: type(layer) for name, layer in model.named_modules()
              if isinstance(layer, BatchNormAct2d) and name not in learning}
    assert learning and frozen
    for layer in learning.values():
        layer.running_mean.uniform_()
    before = {name: (layer.weight, layer.running_mean.clone(), layer.act) for name, layer in learning.items()}
    assert sync_trainable_batchnorm(model) == len(learning)
    for name, (weight, running_mean, act) in before.items():
        layer = model.get_submodule(name)
        assert type(layer) is SyncBatchNormAct and layer.weight is weight and layer.act is act
        assert torch.equal(layer.running_mean, running_mean)
    assert {name: type(model.get_submodule(name)) for name in frozen} == frozen
    assert describe_sync_bn(model, len(learning)) == f"--sync-bn: {len(learning)} BatchNorm layers synchronised"


def test_batchnorm_of_an_unknown_class_is_named_not_silently_skipped() -> None:
    class SplitNorm(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.BatchNorm2d(4), SplitNorm(4))
    assert sync_trainable_batchnorm(model) == 1
    assert describe_sync_bn(model, 1) == ("--sync-bn: 1 BatchNorm layers synchronised; 1 of other classes "
                                          "(SplitNorm) keep per-process statistics, e.g. 1")


# --------------------------------------------------------------------------- rebuilding the wrapper


def test_a_rebuilt_wrapper_lets_go_of_the_old_reducer(one_process_group: World) -> None:
    model = network()
    old = wrap_model(model, one_process_group)
    old_reducer = weakref.ref(old.reducer)
    model[0].requires_grad_(True)  # a block thaws
    new = rewrap_model(old, model, one_process_group)
    assert old_reducer() is None  # although the caller (here: `old`) still holds the old wrapper
    new(torch.randn(5, 3)).sum().backward()
    assert model[0].weight.grad is not None  # the new wrapper reduces the thawed layer


def test_a_compiled_wrapper_is_released_with_dynamo_caches(one_process_group: World,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo

    model = network()
    old = torch.compile(wrap_model(model, one_process_group), backend="eager")
    old(torch.randn(5, 3)).sum().backward()
    old_reducer = weakref.ref(old._orig_mod.reducer)
    resets = []
    reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1) or reset())
    new = rewrap_model(old, model, one_process_group)
    assert old_reducer() is None and resets == [1]
    new(torch.randn(5, 3)).sum().backward()


def test_releasing_a_plain_wrapper_leaves_dynamo_alone(one_process_group: World,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "reset", lambda: pytest.fail("dynamo reset without torch.compile"))
    release_wrapper(wrap_model(network(), one_process_group))
    model = network()
    release_wrapper(model)  # one process: the model is its own wrapper and stays usable
    model(torch.randn(5, 3))


# --------------------------------------------------------------------------- on a CUDA GPU


@needs_cuda
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_training_loss_never_waits_for_the_gpu(one_gpu_group: World, weighted: bool) -> None:
    logits = torch.randn(8, 5, device="cuda", requires_grad=True)
    targets = torch.randint(0, 5, (8,), device="cuda")
    criterion = GlobalCrossEntropy(one_gpu_group, torch.rand(5, device="cuda") if weighted else None, 0.1)
    criterion(logits, targets)  # NCCL's first collective sets up its communicator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any copy or call that waits for the GPU raises
    try:
        criterion(logits, targets).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logits.grad).all()


@needs_cuda
def test_cuda_timm_model_trains_synchronised_and_rebuilt(one_gpu_group: World) -> None:
    timm = pytest.importorskip("timm")
    from timm.layers import SyncBatchNormAct

    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3).cuda()
    freeze_blocks(model, ["blocks.2", "conv_head", "bn2", "classifier"])
    assert sync_trainable_batchnorm(model) > 0
    wrapper = wrap_model(model, one_gpu_group)
    images = torch.randn(4, 3, 32, 32, device="cuda")
    wrapper(images).sum().backward()
    old_reducer = weakref.ref(wrapper.reducer)
    thaw_blocks(model, ["blocks.1"])
    assert sync_trainable_batchnorm(model) > 0
    assert isinstance(model.get_submodule("blocks.1.0.bn1"), SyncBatchNormAct)
    rebuilt = rewrap_model(wrapper, model, one_gpu_group)
    assert old_reducer() is None
    model.zero_grad()
    rebuilt(images).sum().backward()
    assert model.get_submodule("blocks.1.0.bn1").weight.grad is not None


def test_leaving_the_group_collects_garbage_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.4 with gloo hung in destroy_process_group when a DDP reducer was collected during it (4 runs in 6):
    collected before."""
    order = []
    monkeypatch.setattr(distributed.gc, "collect", lambda: order.append("collect"))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: order.append("destroy"))
    distributed.close_world(TWO_RANKS)
    assert order == ["collect", "destroy"]
