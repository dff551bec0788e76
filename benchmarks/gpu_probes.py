"""Probes of the CUDA-only code paths, for the GPU check (benchmarks/gpu_check.sh): each prints one result line.

    python benchmarks/gpu_probes.py --device cuda          # about 30 s on one H100/H200
    python benchmarks/gpu_probes.py --device cpu --small   # the same code on the CPU, to try the script

1. fused-skip: a non-finite step taken by the fused AdamW and SGD kernels (``engine.optimizer_step``) leaves the
   weights unchanged and the optimizer state finite, and the next finite step moves them.
2. decode-race: torchvision's batched nvJPEG decode writes from its own stream into memory allocated on the
   caller's stream (torchvision PR 9606). Memory freed while a kernel still writes it is handed to the decode;
   the probe counts corrupted batches over many trials, for a decode on the compute stream and for
   ``pipeline.DeviceDecoder`` (a private stream): ours must be 0.
3. syncs: waits for the GPU per batch over 10 uncached training batches (the GPU path), 10 with ``--ema``, and
   10 validation batches, counted with torch.profiler (CUDA runtime calls named ``*Synchronize``) and with
   ``torch.cuda.set_sync_debug_mode`` (PyTorch operations that wait for the GPU); the target is 0 per batch
   outside the read-back at the end of each pass. Off CUDA nothing is counted (the code still runs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402
import pipeline  # noqa: E402
from accel import Accel, configure_backends, flagged_waits  # noqa: E402
from common import IMAGENET_MEAN, IMAGENET_STD
from model import build_model, freeze_blocks, parse_trainable  # noqa: E402

SYNC_EVENT_MARK = "Synchronize"  # cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize


def say(name: str, text: str) -> None:
    """One result line, easy to find in the log."""
    print(f"probe {name}: {text}", flush=True)


# --------------------------------------------------------------------------- 1. fused skip


def fused_skip(device: torch.device) -> None:
    """The fused kernels skip a non-finite step on the device and keep finite state."""
    for kind in ("adamw", "sgd"):
        torch.manual_seed(0)
        model = nn.Linear(16, 4).to(device)
        optimizer = engine.make_optimizer(list(model.parameters()), 1e-2, 1e-4, torch.device("cuda"), kind)
        start = [parameter.detach().clone() for parameter in model.parameters()]
        window = engine.AccumulationWindow(device)
        for parameter in model.parameters():
            parameter.grad = torch.full_like(parameter, float("nan"))
        window.add(torch.tensor(float("nan"), device=device))
        engine.optimizer_step(optimizer, None, window, engine.StepOptions())
        unchanged = all(torch.equal(a, b) for a, b in zip(start, model.parameters()))
        state_finite = all(torch.isfinite(value).all().item() for state in optimizer.state.values()
                           for value in state.values() if torch.is_tensor(value) and value.is_floating_point())
        for parameter in model.parameters():
            parameter.grad = torch.ones_like(parameter)
        window.add(torch.tensor(1.0, device=device))
        engine.optimizer_step(optimizer, None, window, engine.StepOptions())
        moved = all(not torch.equal(a, b) and torch.isfinite(b).all().item()
                    for a, b in zip(start, model.parameters()))
        ok = unchanged and state_finite and moved
        say("fused-skip", f"{kind} fused={optimizer.defaults.get('fused')}: non-finite step skipped (weights "
                          f"unchanged) {unchanged}, state finite {state_finite}, next step taken {moved} -> "
                          f"{'OK' if ok else 'FAIL'}")


# --------------------------------------------------------------------------- 2. decode race


def photo_jpegs(count: int, width: int, height: int, folder: Path) -> list[str]:
    """``count`` photo-like JPEGs written to ``folder``."""
    paths = []
    for index in range(count):
        rng = np.random.default_rng(index)
        small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
        paths.append(str(folder / f"{index}.jpg"))
        image.save(paths[-1], quality=90)
    return paths


def pending_writes_to_freed_memory(shapes: list[torch.Size], device: torch.device) -> None:
    """Queue, on the current stream, a long wait then writes into tensors of ``shapes``, and free them at once:
    in stream order the memory is free, so the next allocations on this stream may take it while the writes are
    still to come."""
    blocks = [torch.empty(shape, dtype=torch.uint8, device=device) for shape in shapes]
    if device.type == "cuda":
        torch.cuda._sleep(50_000_000)  # about 25 ms at 2 GHz: longer than decoding the batch
    for block in blocks:
        block.fill_(7)
    del blocks


def corrupted_trials(decode: Callable[[], list[torch.Tensor]], reference: list[torch.Tensor],
                     device: torch.device, trials: int) -> int:
    """How many of ``trials`` decodes, each right after :func:`pending_writes_to_freed_memory`, differ from
    ``reference``."""
    corrupted = 0
    for _ in range(trials):
        pending_writes_to_freed_memory([image.shape for image in reference], device)
        images = decode()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        corrupted += any(not torch.equal(image, expected) for image, expected in zip(images, reference))
    return corrupted


def decode_race(device: torch.device, trials: int, folder: Path) -> None:
    """Corrupted batches out of ``trials``: decoding on the compute stream, and with ``pipeline.DeviceDecoder``."""
    paths = photo_jpegs(8, 496, 368, folder)
    items = [pipeline.FileBytes(paths, [0] * len(paths), None, 10**9)[index] for index in range(len(paths))]
    data = [item.data for item in items]
    reference = [image.clone() for image in pipeline.decode_jpeg(data, device)]
    decoder = pipeline.DeviceDecoder(device, None, None, warn=False)
    plain = corrupted_trials(lambda: pipeline.decode_jpeg(data, device), reference, device, trials)
    ours = corrupted_trials(lambda: [image for _, image in decoder(items)[0]], reference, device, trials)
    say("decode-race", f"{pipeline.JPEG_DECODER_NAME} on {device.type}: corrupted batches on the compute stream "
                       f"{plain}/{trials}; with DeviceDecoder {ours}/{trials} -> {'OK' if ours == 0 else 'FAIL'}")


# --------------------------------------------------------------------------- 3. syncs per batch


def count_waits(work: Callable[[], object]) -> tuple[Counter, Counter]:
    """The CUDA synchronizations the profiler saw during ``work()`` (by runtime call), and the synchronizing PyTorch
    operations on CUDA tensors that ``torch.cuda.set_sync_debug_mode`` flagged (by file:line); empty off CUDA."""
    if not torch.cuda.is_available():
        work()
        return Counter(), Counter()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler, flagged_waits() as places:
        work()
    syncs = Counter({event.key: event.count for event in profiler.key_averages() if SYNC_EVENT_MARK in event.key})
    return syncs, Counter(f"{Path(place).name}" for place in places)


def training_setup(args: argparse.Namespace, device: torch.device, folder: Path):
    """Files for ``args.batches`` training batches, a model training layer4+fc, its loss and fused optimizer."""
    count = args.batches * args.batch_size
    paths = photo_jpegs(count, args.width, args.height, folder)
    labels = [index % 10 for index in range(count)]
    accel = Accel(device, torch.bfloat16 if device.type == "cuda" else None, channels_last=True)
    torch.manual_seed(0)
    model = build_model(args.arch, 10, weights="none")
    freeze_blocks(model, parse_trainable("layer4,fc", model))
    model = accel.prepare_model(model)
    optimizer = engine.make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-4, 1e-4, device)
    return paths, labels, accel, model, nn.CrossEntropyLoss(label_smoothing=0.05).to(device), optimizer


def syncs(args: argparse.Namespace, device: torch.device, folder: Path) -> None:
    """Waits for the GPU per batch in training (with and without an EMA) and validation, uncached."""
    paths, labels, accel, model, criterion, optimizer = training_setup(args, device, folder)
    train = pipeline.train_batches(paths, labels, args.img_size, args.batch_size, args.workers, 0, accel,
                                   on_device=True)
    val = pipeline.eval_batches(paths, labels, args.img_size, IMAGENET_MEAN, IMAGENET_STD, args.batch_size,
                                args.workers, accel, on_device=True)
    average = engine.WeightAverage(model, 0.999)
    runs = {
        "train": lambda: engine.train_one_epoch(model, train, criterion, optimizer, accel, show_progress=False),
        "train --ema": lambda: engine.train_one_epoch(
            model, train, criterion, optimizer, accel, show_progress=False,
            options=engine.StepOptions(after_step=lambda: average.update(model))),
        "val": lambda: engine.evaluate(model, val, criterion, accel, show_progress=False),
    }
    for epoch, (name, work) in enumerate(runs.items(), start=1):
        train.set_epoch(epoch)
        work()  # warm-up pass: workers, cuDNN autotuning, allocator growth
        train.set_epoch(epoch + 10)
        started = time.perf_counter()
        syncs, flagged = count_waits(work)
        waits, operations = sum(syncs.values()), sum(flagged.values())
        say("syncs", f"{name}: {args.batches} batches, {waits} CUDA synchronizations (profiler: {dict(syncs)}) "
                     f"and {operations} synchronizing PyTorch operations (sync debug mode: {dict(flagged)}): "
                     f"{waits / args.batches:.1f} and {operations / args.batches:.1f} per batch, the pass's closing "
                     f"read-back included ({time.perf_counter() - started:.1f} s)")


# --------------------------------------------------------------------------- main


def get_args_parser() -> argparse.ArgumentParser:
    """The probes' options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny sizes (for trying the script on a CPU)")
    parser.add_argument("--probes", default="fused-skip,decode-race,syncs", help="which probes, comma-separated")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the chosen probes in order; a failing probe is reported and the others still run."""
    args = get_args_parser().parse_args(argv)
    small = args.small or args.device == "cpu"
    args.arch, args.img_size = ("resnet18", 32) if small else ("resnet50", 224)
    args.batch_size, args.batches, args.width, args.height = (4, 10, 64, 48) if small else (128, 10, 500, 375)
    args.workers = 0 if small else 8
    device = torch.device(args.device)
    configure_backends(device)
    trials = 10 if small else 200
    probes = {"fused-skip": lambda folder: fused_skip(device),
              "decode-race": lambda folder: decode_race(device, trials, folder),
              "syncs": lambda folder: syncs(args, device, folder)}
    for name in args.probes.split(","):
        with tempfile.TemporaryDirectory(prefix=f"probe-{name}-") as folder:
            try:
                probes[name](Path(folder))
            except Exception as error:  # noqa: BLE001 - report and go on to the next probe
                say(name, f"FAILED with {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
