"""Probes of the CUDA-only code paths, for the GPU check (benchmarks/gpu_check.sh): each prints one result line.

    python benchmarks/gpu_probes.py --device cuda          # about 30 s on one H100/H200
    python benchmarks/gpu_probes.py --device cpu --small   # the same code on the CPU, to try the script

1. fused-skip: a non-finite step taken by the fused AdamW and SGD kernels (``engine.optimizer_step``) leaves the
   weights unchanged and the optimizer state finite, and the next finite step moves them.
2. decode-race: torchvision's batched nvJPEG decode writes from its own stream into memory allocated on the
   caller's stream (torchvision PR 9606). Memory freed while a kernel still writes it is handed to the decode;
   the probe counts corrupted batches over many trials, for a decode on the compute stream and for
   ``device_decode.DeviceDecoder`` (a private stream): ours must be 0.
3. syncs: waits for the GPU per batch over 10 uncached training batches (the GPU path), 10 with ``--ema``, and
   10 validation batches, counted with torch.profiler (CUDA runtime calls named ``*Synchronize``) and with
   ``torch.cuda.set_sync_debug_mode`` (PyTorch operations that wait for the GPU); the target is 0 per batch
   outside the read-back at the end of each pass. Off CUDA nothing is counted (the code still runs).
4. decoders: the host ms a batch's decode blocks the calling thread while a training step runs on the GPU, for
   each JPEG decoder found (torchvision, TorchCodec, nvImageCodec; the optional ones feature-detected), decoding on
   ``device_decode.DecodeStream`` as the pipeline does. The default decoder is not changed by this: it is measured.
5. augment: the training augmentation and the eval transform on a batch: PyTorch operations and kernel launches
   (profiler), host ms to issue them, GPU ms (CUDA events); beside them the old per-image implementation, kept as
   the tests' oracle (``tests/augment_reference.py``: ``train_augment`` and ``eval_transform``).
6. producer: main-thread CPU ms per training batch (``time.thread_time``; lines ``probe main-thread``) over a pass
   of 10 device-path batches, and the GPU-busy fraction over 10 profiled training steps (union of kernel intervals
   / wall; lines ``probe busy``), each with the producer thread on and off.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import batch_producer
import device_decode
import engine
import loader_items
import pipeline
from accel import Accel, configure_backends, flagged_waits
from common import IMAGENET_MEAN, IMAGENET_STD
from model import build_model, freeze_blocks, parse_trainable
from recipe import train_decode_side

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
        unchanged = all(torch.equal(a, b) for a, b in zip(start, model.parameters(), strict=True))
        state_finite = all(torch.isfinite(value).all().item() for state in optimizer.state.values()
                           for value in state.values() if torch.is_tensor(value) and value.is_floating_point())
        for parameter in model.parameters():
            parameter.grad = torch.ones_like(parameter)
        window.add(torch.tensor(1.0, device=device))
        engine.optimizer_step(optimizer, None, window, engine.StepOptions())
        moved = all(not torch.equal(a, b) and torch.isfinite(b).all().item()
                    for a, b in zip(start, model.parameters(), strict=True))
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
        corrupted += any(not torch.equal(image, expected) for image, expected in zip(images, reference, strict=True))
    return corrupted


def decode_race(device: torch.device, trials: int, folder: Path) -> None:
    """Corrupted batches out of ``trials``: decoding on the compute stream, and with ``device_decode.DeviceDecoder``."""
    paths = photo_jpegs(8, 496, 368, folder)
    items = [loader_items.FileBytes(paths, [0] * len(paths), None, 10**9)[index] for index in range(len(paths))]
    data = [item.data for item in items]
    reference = [image.clone() for image in device_decode.decode_jpeg(data, device)]
    decoder = device_decode.DeviceDecoder(device, None, None)
    plain = corrupted_trials(lambda: device_decode.decode_jpeg(data, device), reference, device, trials)
    ours = corrupted_trials(lambda: [image for _, image in decoder(items)[0]], reference, device, trials)
    say("decode-race", f"{device_decode.jpeg_decoder_name()} on {device.type}: corrupted batches on the compute stream "
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


# --------------------------------------------------------------------------- 4. decoders


def nvimgcodec_decoder(module) -> device_decode.JpegDecoder:
    """nvImageCodec's batched decoder behind the pipeline's decoder interface (RGB, EXIF ignored, ``[3, H, W]``
    tensors on the device, on the current stream)."""
    decoder = module.Decoder()
    params = module.DecodeParams(apply_exif_orientation=False, color_spec=module.ColorSpec.RGB)

    def decode(data, device: torch.device):
        many = isinstance(data, list)
        stream = torch.cuda.current_stream(device).cuda_stream
        decoded = decoder.decode([bytes(one.numpy()) for one in (data if many else [data])], params=params,
                                 cuda_stream=stream)
        if any(image is None for image in decoded):
            raise RuntimeError("nvImageCodec could not decode an image of the batch")
        images = [torch.as_tensor(image, device=device).permute(2, 0, 1) for image in decoded]
        return images if many else images[0]

    return decode


def decoders_found() -> dict[str, device_decode.JpegDecoder]:
    """Every JPEG decoder installed, by name: torchvision's always, TorchCodec's and nvImageCodec's when present."""
    import torchvision

    takes_lists = device_decode.takes_jpeg_lists(torchvision.__version__)
    found = {"torchvision": device_decode.torchvision_jpeg_decoder(takes_lists)}
    try:
        from torchcodec.decoders import decode_jpeg as torchcodec_decode

        found["torchcodec"] = lambda data, device: torchcodec_decode(data, mode="RGB", device=device)
    except Exception:  # absent or built for another torch
        pass
    try:
        found["nvimgcodec"] = nvimgcodec_decoder(importlib.import_module("nvidia.nvimgcodec"))
    except Exception:  # absent, or no GPU for it
        pass
    return found


def queue_training_step(args, model, criterion, optimizer, accel) -> None:
    """A forward and backward pass on a random batch, queued on the compute stream (not waited for)."""
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=accel.device)
    targets = torch.randint(0, 10, (args.batch_size,), device=accel.device)
    with accel.autocast():
        loss = criterion(model(accel.images_to_device(images)), targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def decoders(args: argparse.Namespace, device: torch.device, folder: Path) -> None:
    """Host-blocked ms per batch of each decoder, beside a running step and with the GPU idle."""
    paths, labels, accel, model, criterion, optimizer = training_setup(args, device, folder)
    files = loader_items.FileBytes(paths[:args.batch_size], labels[:args.batch_size], None, 10**9)
    data = [files[index].data for index in range(len(files))]
    stream = device_decode.DecodeStream(device)
    for name, decode in decoders_found().items():
        try:
            stream.run(lambda decode=decode: list(decode(data, device)))  # warm-up: handles, buffers
            idle, busy = [], []
            for _ in range(args.trials):
                synchronize(device)
                started = time.perf_counter()
                stream.run(lambda decode=decode: list(decode(data, device)))
                idle.append(time.perf_counter() - started)
                queue_training_step(args, model, criterion, optimizer, accel)
                started = time.perf_counter()
                stream.run(lambda decode=decode: list(decode(data, device)))
                busy.append(time.perf_counter() - started)
                synchronize(device)
            say("decoders", f"{name} on {device.type}: host blocked {1000 * np.median(busy):.1f} ms per batch of "
                            f"{len(data)} beside a training step ({1000 * np.median(idle):.1f} ms with the GPU "
                            f"idle; median of {args.trials})")
        except Exception as error:  # one decoder failing leaves the others measured
            say("decoders", f"{name}: FAILED with {type(error).__name__}: {error}")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- 5. augmentation


def operation_counts(work, device: torch.device) -> tuple[int, int]:
    """PyTorch operations (CPU-side ``aten::`` events) and kernel launches during ``work()``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        work()
    events = profiler.key_averages()
    operations = sum(event.count for event in events if event.key.startswith("aten::"))
    launches = sum(event.count for event in events if "LaunchKernel" in event.key)
    return operations, launches


def host_and_gpu_ms(work, device: torch.device, trials: int) -> tuple[float, float | None]:
    """Median host ms to issue ``work()`` and median GPU ms it takes (None off CUDA)."""
    host, gpu = [], []
    for _ in range(trials):
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        started = time.perf_counter()
        work()
        host.append(1000 * (time.perf_counter() - started))
        if device.type == "cuda":
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end))
    return float(np.median(host)), float(np.median(gpu)) if gpu else None


def augment(args: argparse.Namespace, device: torch.device, folder: Path) -> None:
    """Operations, host-issue ms and GPU ms of the augmentation (new, and old when found) and the eval transform."""
    import gpu_augment
    sys.path.insert(0, str(ROOT / "tests"))
    import augment_reference

    paths = photo_jpegs(args.batch_size, args.width, args.height, folder)
    decoder = device_decode.DeviceDecoder(device, train_decode_side(args.img_size),
                                     train_decode_side(args.img_size))
    files = loader_items.FileBytes(paths, [0] * len(paths), None, 10**9)
    images = [image for _, image in decoder([files[index] for index in range(len(files))])[0]]
    train = gpu_augment.TrainAugment(args.img_size, IMAGENET_MEAN, IMAGENET_STD).to(device)
    evaluation = gpu_augment.EvalTransform(args.img_size, IMAGENET_MEAN, IMAGENET_STD).to(device)
    works = {"train (current)": lambda: train(images, torch.Generator().manual_seed(0)),
             "eval (current)": lambda: evaluation(images)}
    works["train (old, per image)"] = lambda: augment_reference.train_augment(
        train, images, torch.Generator().manual_seed(0))
    works["eval (old, per image)"] = lambda: augment_reference.eval_transform(evaluation, images)
    for name, work in works.items():
        try:
            work()  # warm-up
            operations, launches = operation_counts(work, device)
            host, gpu = host_and_gpu_ms(work, device, args.trials)
            gpu_text = "-" if gpu is None else f"{gpu:.1f}"
            say("augment", f"{name}, batch of {len(images)}: {operations} operations, {launches} kernel launches, "
                           f"host {host:.1f} ms to issue, GPU {gpu_text} ms")
        except Exception as error:  # the other rows are still measured
            say("augment", f"{name}: FAILED with {type(error).__name__}: {error}")


# --------------------------------------------------------------------------- 6-7. the producer


def producer_settings(args: argparse.Namespace, device: torch.device, folder: Path):
    """A training setup and its device-path batches, with a function to run one pass with the producer on or off."""
    paths, labels, accel, model, criterion, optimizer = training_setup(args, device, folder)
    train = pipeline.train_batches(paths, labels, args.img_size, args.batch_size, args.workers, 0, accel,
                                   on_device=True)

    def one_pass(prefetch: int, epoch: int):
        train.prefetch = prefetch
        train.set_epoch(epoch)
        return engine.train_one_epoch(model, train, criterion, optimizer, accel, show_progress=False)

    one_pass(batch_producer.PREFETCH_BATCHES, 0)  # warm-up: workers, cuDNN autotuning, allocator growth
    return one_pass


def producer(args: argparse.Namespace, device: torch.device, folder: Path) -> None:
    """The main-thread and busy probes on one set of files and one model."""
    one_pass = producer_settings(args, device, folder)
    main_thread(args, device, one_pass)
    busy(args, device, one_pass)


def main_thread(args: argparse.Namespace, device: torch.device, one_pass) -> None:
    """Main-thread CPU ms per training batch, producer on and off."""
    for epoch, prefetch in enumerate((batch_producer.PREFETCH_BATCHES, 0), start=1):
        cpu, wall = time.thread_time(), time.perf_counter()
        one_pass(prefetch, epoch)
        synchronize(device)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        say("main-thread", f"producer {'on' if prefetch else 'off'}: {1000 * cpu / args.batches:.1f} ms of "
                           f"main-thread CPU per batch, {1000 * wall / args.batches:.1f} ms wall per batch "
                           f"({threading.active_count()} threads)")


def busy_fraction(events, wall_us: float) -> float:
    """The share of ``wall_us`` during which at least one kernel ran (overlapping kernels counted once)."""
    intervals = sorted((event.time_range.start, event.time_range.end) for event in events)
    busy, reach = 0.0, float("-inf")
    for start, end in intervals:
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy / wall_us if wall_us else 0.0


def busy(args: argparse.Namespace, device: torch.device, one_pass) -> None:
    """GPU-busy fraction over a profiled pass of ``args.batches`` (10) training steps, producer on and off."""
    if device.type != "cuda":
        say("busy", "off CUDA: no kernels to time (the passes ran)")
        return
    from torch.autograd import DeviceType

    for epoch, prefetch in enumerate((batch_producer.PREFETCH_BATCHES, 0), start=3):
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        synchronize(device)
        with torch.profiler.profile(activities=activities) as profiler:
            started = time.perf_counter()
            one_pass(prefetch, epoch)
            synchronize(device)
            wall_us = 1e6 * (time.perf_counter() - started)
        kernels = [event for event in profiler.events() if event.device_type == DeviceType.CUDA]
        say("busy", f"producer {'on' if prefetch else 'off'}: GPU busy {busy_fraction(kernels, wall_us):.0%} of "
                    f"{wall_us / 1e6:.2f} s over {args.batches} training steps ({len(kernels)} kernels)")


# --------------------------------------------------------------------------- main


PROBES = ("fused-skip", "decode-race", "syncs", "decoders", "augment", "producer")


def get_args_parser() -> argparse.ArgumentParser:
    """The probes' options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny sizes (for trying the script on a CPU)")
    parser.add_argument("--probes", default=",".join(PROBES), help="which probes, comma-separated")
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
    args.trials = 3 if small else 20
    probes = {"fused-skip": lambda folder: fused_skip(device),
              "decode-race": lambda folder: decode_race(device, trials, folder),
              "syncs": lambda folder: syncs(args, device, folder),
              "decoders": lambda folder: decoders(args, device, folder),
              "augment": lambda folder: augment(args, device, folder),
              "producer": lambda folder: producer(args, device, folder)}
    for name in args.probes.split(","):
        with tempfile.TemporaryDirectory(prefix=f"probe-{name}-") as folder:
            try:
                probes[name](Path(folder))
            except Exception as error:  # report and go on to the next probe
                say(name, f"FAILED with {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
