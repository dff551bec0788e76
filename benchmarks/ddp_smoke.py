"""DistributedDataParallel as train.py builds it, in a real process group of one (nccl on a GPU, gloo on the CPU):
for the GPU check (benchmarks/gpu_check.sh). Each stage prints a ``ddp ...`` line ending in OK or FAIL.

    python benchmarks/ddp_smoke.py --device cuda
    python benchmarks/ddp_smoke.py --device cpu

The process group has one process, but the ``World`` handed to our functions says two, so that they wrap, convert
and communicate as under ``torchrun --nproc_per_node=2``: DDP is built (with the keyword this torch has), the
learning BatchNorm layers become SyncBatchNorm, 3 steps train, a block thaws and the wrapper is rebuilt (the old
one released: one reducer stays alive), 3 more steps train the thawed block, and a step whose batch failed to
decode entirely still runs every collective. With timm installed, its BatchNormAct2d layers are converted too.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common
import distributed
import engine
import losses
from accel import Accel
from model import build_model, freeze_blocks, parse_trainable, thaw_blocks


def say(stage: str, ok: bool, detail: str) -> None:
    """One result line."""
    print(f"ddp {stage}: {detail} -> {'OK' if ok else 'FAIL'}", flush=True)




def train_steps(model: nn.Module, accel: Accel, optimizer: torch.optim.Optimizer, world: common.World,
                batches: list[common.Batch]) -> engine.EpochResult:
    """``batches`` through engine.train_one_epoch with the step options train.py uses under torchrun."""
    options = engine.StepOptions(all_finite=lambda finite: distributed.all_ranks_true(finite, world),
                                 empty_images=lambda: accel.images_to_device(torch.empty(0, 3, 64, 64)))
    criterion = losses.GlobalCrossEntropy(world, label_smoothing=0.05)
    return engine.train_one_epoch(model, batches, criterion, optimizer, accel, show_progress=False, options=options)


def random_batches(accel: Accel, count: int) -> list[common.Batch]:
    """``count`` batches of 8 random images (64 px) on the device."""
    return [common.Batch(accel.images_to_device(torch.randn(8, 3, 64, 64)),
                           torch.randint(0, 5, (8,), device=accel.device), list(range(8)), [])
            for _ in range(count)]


def sync_bn(model: nn.Module, device: torch.device) -> int:
    """Convert ``model``'s learning BatchNorm layers to SyncBatchNorm (on the CPU, where DDP refuses SyncBatchNorm
    as train.py's --sync-bn does, a copy is converted and only counted)."""
    if device.type == "cuda":
        return distributed.sync_trainable_batchnorm(model)
    return distributed.sync_trainable_batchnorm(copy.deepcopy(model))


def smoke(device: torch.device, world: common.World) -> None:
    """Wrap, convert, train, thaw, rebuild, train: each stage checked."""
    accel = Accel(device, torch.bfloat16 if device.type == "cuda" else None, channels_last=True)
    torch.manual_seed(0)
    model = build_model("resnet18", 5, weights="none")
    freeze_blocks(model, parse_trainable("layer4,fc", model))
    model = accel.prepare_model(model)
    converted = sync_bn(model, device)
    say("sync-bn", converted == 5, distributed.describe_sync_bn(model, converted) + " (layer4 has 5)")
    optimizer = engine.make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-3, 1e-4, device)
    wrapper = distributed.wrap_model(model, world)
    before = model.layer4[0].conv1.weight.detach().clone()
    result = train_steps(wrapper, accel, optimizer, world, random_batches(accel, 3))
    moved = not torch.equal(before, model.layer4[0].conv1.weight)
    say("wrap+train", isinstance(wrapper, nn.parallel.DistributedDataParallel) and moved,
        f"{type(wrapper).__name__}, 3 steps, loss {result.loss:.3f}, layer4 moved {moved}")

    thawed = thaw_blocks(model, ["layer3"])
    optimizer.add_param_group({"params": thawed})
    converted = sync_bn(model, device)
    old_reducer = weakref.ref(wrapper.reducer)
    distributed.release_wrapper(wrapper)
    wrapper = distributed.wrap_model(model, world)
    gc.collect()
    reducers = 1 + (old_reducer() is not None)
    before = model.layer3[0].conv1.weight.detach().clone()
    train_steps(wrapper, accel, optimizer, world, random_batches(accel, 3))
    moved = not torch.equal(before, model.layer3[0].conv1.weight)
    expected = 5 if device.type == "cuda" else 10  # on the CPU the count comes from a copy with layer4 unconverted
    say("thaw+rebuild", reducers == 1 and moved and converted == expected,
        f"layer3 thawed ({converted} BatchNorm converted), {reducers} reducer(s) alive after the rebuild, 3 steps, "
        f"layer3 moved {moved}")

    empty = common.Batch(None, None, [], [])
    result = train_steps(wrapper, accel, optimizer, world, [random_batches(accel, 1)[0], empty])
    finite = all(torch.isfinite(parameter).all().item() for parameter in model.parameters())
    say("empty batch", result.images == 8 and finite, "a batch with every image failed still steps; weights finite "
        f"{finite}")
    timm_smoke(accel)


def timm_smoke(accel: Accel) -> None:
    """timm's BatchNormAct2d converted to SyncBatchNormAct, and the model still runs forward."""
    try:
        import timm
    except ImportError:
        print("ddp timm: timm is not installed; skipped", flush=True)
        return
    model = accel.prepare_model(timm.create_model("test_efficientnet", pretrained=False, num_classes=3)).eval()
    converted = distributed.sync_trainable_batchnorm(model)
    left = distributed.unsynced_batchnorm(model)
    with accel.autocast():
        output = model(accel.images_to_device(torch.randn(2, 3, 64, 64)))
    say("timm", converted > 0 and not left and output.shape == (2, 3),
        f"{converted} BatchNormAct2d/BatchNorm layers converted, {len(left)} left unsynced, "
        f"forward {tuple(output.shape)}")


def main(argv: list[str] | None = None) -> None:
    """Join a process group of one, run the smoke test, leave."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    args = parser.parse_args(argv)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="ddp-smoke-") as folder:
        dist.init_process_group(backend, store=dist.FileStore(str(Path(folder) / "store"), 1), rank=0, world_size=1)
        try:
            print(f"ddp backend: {backend}, torch {torch.__version__}, DDP keywords: forward_sync_buffers "
                  f"{'forward_sync_buffers' in distributed.ddp_keywords(nn.parallel.DistributedDataParallel)}",
                  flush=True)
            smoke(device, common.World(rank=0, local_rank=0, world_size=2, device=device))
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
