"""Throughput benchmark: our training, validation and prediction against a faithful reference loop.

    python benchmarks/bench.py --device cpu     # about 1.5 minutes on 2 cores
    python benchmarks/bench.py --device cuda    # about 2-3 minutes on one H100, data generation included

In one process and on the same generated JPEG dataset it measures, in images per second:
  baseline  the reference notebook's loop: fp32, NCHW, PIL augmentation in 2 workers, layer4+fc trained by
            requires_grad alone, so every BatchNorm runs in training mode; its evaluation loop (the notebook has
            one) gives both the val and the predict figure;
  ours      what train.py and predict.py run (pipeline.load_data with train.py's own options, so --cache auto
            applies; engine.train_one_epoch, evaluate, predict_probabilities): the first epoch and, apart from
            it, the steady state of the later ones (after the cache is built);
  ceiling   our model step on tensors already on the device: the speed with free data loading.
On the GPU path ours' later epochs run again with the producer thread off (``--no-producer-off-row`` skips
them): the batches then are made in the loop's thread, as before the producer.
With --cpus the baseline, ours and the ceiling run again with every thread of the process (and the loader
workers it starts) pinned to the first N cores, to emulate a small machine such as Colab's 2 vCPUs.

It also times each stage of ours alone, per training batch (reading files, decoding, augmenting, host-to-device,
the model step), so the table shows which stage limits it; and the CPU cost of one loader worker (one thread) per
training image, which says how many images/s each worker feeds. Tables are printed and appended, with the
machine and the setup, to benchmarks/results.md.

The default --device cuda run (3,072 JPEGs of 500x375, ResNet-50 at 224, batch 128) measures all cores and
--cpus 2, two epochs each, and a --trainable all row. Estimated for an H100 from earlier H200 figures (ceiling
~7,330 img/s training and ~14,000 evaluating, reference loop 176-310 img/s): generation ~5 s on 16 cores, the
reference loop ~30 s with all cores and ~40 s with 2, ours with its ceiling 20-50 s per core setting (50 s if
first epochs ran as slowly as the old data path's 155 img/s): 2-3 minutes in all, start-up included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import batch_producer
import common
import device_decode
import gpu_augment
import loader_items
import pipeline
from accel import Accel, choose_data_path, configure_backends, make_grad_scaler
from common import IMAGENET_MEAN, IMAGENET_STD
from dataset import TrainValData
from engine import evaluate, make_optimizer, predict_probabilities, train_one_epoch
from images import DEFAULT_MAX_IMAGE_PIXELS, check_images, plain_jpeg_sizes
from loader_items import ImageFiles
from losses import balanced_class_weights, cross_entropy
from model import DEFAULT_TRAINABLE, input_normalization, make_model, spelled_out_trainable, trainable_parameters
from options import parse_args as parse_train_args
from recipe import build_eval_transform, build_train_transform, train_decode_side
from run_config import TrainConfig
from utils import cpu_model, resolve_workers

RESULTS = Path(__file__).resolve().parent / "results.md"
DEFAULTS = {
    "cpu": dict(classes=8, images=192, batch_size=32, cpus="all", trainable_all_row=False),
    "cuda": dict(classes=100, images=3072, batch_size=128, cpus="all,2", trainable_all_row=True),
}
BREAKDOWN_BATCHES = 3  # batches timed per stage in the breakdown, after one untimed


def elapsed_note(started: float, what: str) -> None:
    """A progress line with the seconds since the benchmark started (so a GPU log shows where time goes)."""
    print(f"[{time.perf_counter() - started:6.1f} s] {what}", flush=True)


# --------------------------------------------------------------------------- data


def photo_pixels(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like ``uint8 [height, width, 3]`` picture: a smooth colour field, a disc, sensor noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height)[..., None]
    pixels = base + 80 * ramp * rng.uniform(-1, 1, size=3)
    cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, height / 2)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < r * r)[..., None]
    pixels = np.where(disc, rng.uniform(0, 255, size=3), pixels) + rng.normal(0, 6, size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_photo(job: tuple[str, int, int, int, int]) -> None:
    """Write image ``index`` of the dataset (``(path, index, width, height, seed)``) as a JPEG."""
    path, index, width, height, seed = job
    rng = np.random.default_rng((seed, index))  # per image: the same files whichever process writes them
    Image.fromarray(photo_pixels(rng, width, height)).save(path, quality=90)


def make_dataset(root: Path, classes: int, images: int, width: int, height: int,
                 seed: int = 0) -> list[tuple[str, int]]:
    """Write photo-like JPEGs in ``root/<class>/``, in parallel on every core; return ``(path, class)`` samples."""
    samples = [(str(root / str(index % classes) / f"{index:05d}.jpg"), index % classes) for index in range(images)]
    for label in range(min(classes, images)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    jobs = [(path, index, width, height, seed) for index, (path, _) in enumerate(samples)]
    with multiprocessing.Pool(min(os.cpu_count() or 1, len(jobs))) as pool:
        pool.map(write_photo, jobs, chunksize=max(1, len(jobs) // (8 * (os.cpu_count() or 1))))
    return samples


# --------------------------------------------------------------------------- the reference loop


class ReferenceImages(torch.utils.data.Dataset):
    """ImageFolder as the notebook uses it: PIL decode to RGB, then the transform."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def reference_model(arch: str, num_classes: int) -> nn.Module:
    """The notebook's network: torchvision ResNet, new Dropout+Linear head, only layer4 and fc trainable."""
    model = torchvision.models.get_model(arch, weights=None)
    model.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(model.fc.in_features, num_classes))
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith(("layer4", "fc"))
    return model


def reference_train_epoch(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer,
                          criterion: nn.Module, device: torch.device) -> None:
    """The notebook's training loop: fp32, NCHW, model.train() (every BatchNorm in training mode)."""
    model.train()
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        loss = criterion(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def reference_predict(model: nn.Module, loader: Any, device: torch.device) -> None:
    """The notebook's evaluation loop: fp32, NCHW, no_grad."""
    model.eval()
    for images, _ in loader:
        model(images.to(device)).argmax(dim=1).cpu()


# --------------------------------------------------------------------------- timing


@dataclass
class Measure:
    """Images per second of one stage."""

    images: int
    seconds: float

    @property
    def rate(self) -> float:
        """Images per second."""
        return self.images / self.seconds

    def __add__(self, other: Measure) -> Measure:
        """Both measures as one: their images and their seconds summed."""
        return Measure(self.images + other.images, self.seconds + other.seconds)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_seconds(device: torch.device, work: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``work`` once; its wall-clock seconds (queued GPU work included) and its value."""
    synchronize(device)
    started = time.perf_counter()
    value = work()
    synchronize(device)
    return time.perf_counter() - started, value


def timed(device: torch.device, images: int, work: Callable[[], Any]) -> Measure:
    """Run ``work`` (which handles ``images`` images) once and time it."""
    return Measure(images, timed_seconds(device, work)[0])


def release_memory(device: torch.device) -> None:
    """Free what finished measurements left behind: loader workers, and GPU memory held by PyTorch's allocator
    (which --cache auto would otherwise count as used)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_batch(batch_size: int, img_size: int, num_classes: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Normalized-looking random images (NCHW, on ``device``) and class indices: model input with free loading."""
    images = torch.randn(batch_size, 3, img_size, img_size).to(device)
    return images, torch.randint(0, num_classes, (batch_size,)).to(device)


# --------------------------------------------------------------------------- cores


def available_cores() -> list[int]:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def pin_every_thread(cores: set[int]) -> None:
    """Pin every thread of this process (torch's thread pools included) to ``cores``; threads and worker
    processes started later inherit it."""
    tasks = Path("/proc/self/task")
    # sched_setaffinity(0) would pin the calling thread alone: torch's OpenMP threads would still use every core.
    thread_ids = [int(task.name) for task in tasks.iterdir()] if tasks.is_dir() else [0]
    for thread_id in thread_ids:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(thread_id, cores)


def cores_label(cores: int | None, total: int) -> str:
    """How a core setting is named in the tables: ``all 16`` or ``2 of 16``."""
    return f"all {total}" if cores is None else f"{cores} of {total}"


@contextlib.contextmanager
def restricted_to(cores: int | None) -> Iterator[str]:
    """Run the block on the first ``cores`` cores (None: all), with torch's intra-op threads cut to match; yields
    the setting's label. Where ``os.sched_setaffinity`` does not exist (macOS, Windows) it says so and uses all."""
    every_core = available_cores()
    if cores is None:
        yield cores_label(None, len(every_core))
        return
    if not hasattr(os, "sched_setaffinity"):
        print(f"note: --cpus {cores}: this platform has no os.sched_setaffinity (Linux only), so it cannot restrict "
              f"the process to {cores} cores; measuring with all of them")
        yield cores_label(None, len(every_core))
        return
    threads = torch.get_num_threads()
    pin_every_thread(set(every_core[:cores]))
    torch.set_num_threads(cores)
    try:
        yield cores_label(cores, len(every_core))
    finally:
        pin_every_thread(set(every_core))
        torch.set_num_threads(threads)


def workers_for(cores: int | None, requested: str) -> int:
    """Loader workers for a core setting: ``--workers auto`` picks what train.py's auto would on that many cores."""
    if cores is not None and requested == "auto":
        return min(8, cores)
    return resolve_workers(requested)


# --------------------------------------------------------------------------- one loader worker's cost


class ItemCost(Dataset):
    """Loads an item of ``items`` and yields only the CPU seconds that took in this thread (a loader worker's)."""

    def __init__(self, items: Dataset) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> float:
        started = time.thread_time()
        self.items[index]
        return time.thread_time() - started


def worker_ms_per_image(items: Dataset, count: int) -> float:
    """CPU milliseconds one loader worker (one process, one torch thread) spends per item of ``items``, over
    ``count`` items after an untimed first one. In the main process ``process_time`` would also count torch's
    intra-op threads, which on a many-core host inflates the figure several times."""
    indices = [index % len(items) for index in range(count + 1)]
    loader = DataLoader(ItemCost(items), batch_size=None, sampler=indices, num_workers=1)
    costs = list(loader)[1:] or [0.0]
    return 1000 * sum(costs) / len(costs)


def our_worker_items(samples: list, img_size: int, on_device: bool) -> Dataset:
    """What our loader's workers do per training image: read the file's bytes (GPU path; the header scan found the
    plain JPEGs), or decode and augment it with PIL (CPU path)."""
    paths, labels = [path for path, _ in samples], [label for _, label in samples]
    side = train_decode_side(img_size)
    if on_device:
        return loader_items.FileBytes(paths, labels, side, DEFAULT_MAX_IMAGE_PIXELS,
                                  plain_jpeg_sizes(check_images(paths).sizes))
    return ImageFiles(paths, labels, build_train_transform(img_size), side, DEFAULT_MAX_IMAGE_PIXELS)


def worker_costs(samples: list, args: argparse.Namespace, on_device: bool) -> dict[str, float]:
    """CPU ms per training image in one loader worker, for the baseline and for ours."""
    return {
        "baseline": worker_ms_per_image(ReferenceImages(samples, build_train_transform(args.img_size)),
                                        args.worker_images),
        "ours": worker_ms_per_image(our_worker_items(samples, args.img_size, on_device), args.worker_images),
    }


# --------------------------------------------------------------------------- baseline


def run_baseline(samples: list, args: argparse.Namespace, device: torch.device) -> dict[str, Measure]:
    """One training epoch and one evaluation pass of the reference loop (which serves as val and predict)."""
    torch.manual_seed(0)
    model = reference_model(args.arch, args.classes).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-5, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.05)
    train_loader = DataLoader(ReferenceImages(samples, build_train_transform(args.img_size)),
                              batch_size=args.batch_size, shuffle=True, num_workers=2)
    eval_loader = DataLoader(ReferenceImages(samples, build_eval_transform(args.img_size)),
                             batch_size=args.batch_size, shuffle=False, num_workers=2)
    warm_up = [random_batch(args.batch_size, args.img_size, args.classes, device)]
    reference_train_epoch(model, warm_up, optimizer, criterion, device)
    reference_predict(model, warm_up, device)
    return {
        "train": timed(device, len(samples), lambda: reference_train_epoch(model, train_loader, optimizer,
                                                                           criterion, device)),
        "eval": timed(device, len(samples), lambda: reference_predict(model, eval_loader, device)),
    }


# --------------------------------------------------------------------------- ours


@dataclass
class OurRun:
    """What train.py sets up for a run: options, device settings, data, batches, model, loss, optimizer."""

    options: TrainConfig
    accel: Accel
    data: TrainValData
    loaders: pipeline.Loaders
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    on_device: bool  # the GPU path (decode and augment on the device), else the CPU path (PIL in the workers)
    classes: int


def our_options(args: argparse.Namespace, workers: int, trainable: str) -> TrainConfig:
    """train.py's options at their defaults (--cache auto included), but for this benchmark's arch, size, batch,
    device, path and workers."""
    return parse_train_args([
        "--data-dir", args.data_dir, "--arch", args.arch, "--weights", "none", "--img-size", str(args.img_size),
        "--batch-size", str(args.batch_size), "--device", args.device, "--no-progress", "--workers", str(workers),
        "--augment-device", args.path, "--trainable", trainable,
    ])


def benchmark_data(samples: list, args: argparse.Namespace) -> TrainValData:
    """The generated images as both training and validation split, with their header scan as train.py has it
    (sizes for the cache's estimate, the plain JPEGs the workers need not open)."""
    sizes = check_images([path for path, _ in samples]).sizes
    return TrainValData([str(label) for label in range(args.classes)], samples, samples, "benchmark", sizes=sizes)


def our_model(options: TrainConfig, accel: Accel, classes: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model train.py builds for ``options`` and its optimizer."""
    torch.manual_seed(0)
    model = make_model(options, classes, accel)
    return model, make_optimizer(trainable_parameters(model), options.lr, options.weight_decay, accel.device)


def start_our_run(options: TrainConfig, data: TrainValData) -> OurRun:
    """Everything train.py's set_up makes that the loop needs (no output folder, no checkpoints)."""
    accel = Accel(options.chosen.device, options.chosen.amp_dtype, options.channels_last)
    classes = len(data.class_names)
    model, optimizer = our_model(options, accel, classes)
    labels = [label for _, label in data.train_samples]
    weights = balanced_class_weights(labels, classes).to(accel.device)
    criterion = cross_entropy(weights, options.label_smoothing)
    return OurRun(options, accel, data, pipeline.load_data(data, options, accel, *input_normalization(options.arch)),
                  model, criterion, optimizer, make_grad_scaler(accel),
                  options.chosen.train_path == "gpu", classes)


def synthetic_batches(run: OurRun, count: int) -> list[common.Batch]:
    """``count`` batches of one random batch already on the device, as the pipeline would yield them."""
    images, targets = random_batch(run.options.batch_size, run.options.img_size, run.classes,
                                   run.accel.device)
    batch = common.Batch(run.accel.images_to_device(images), targets, list(range(len(targets))), [])
    return [batch] * count


def warm_up_model(run: OurRun, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One untimed training step and one evaluation on a random batch (cuDNN autotuning, allocator growth)."""
    batches = synthetic_batches(run, 1)
    train_one_epoch(model, batches, run.criterion, optimizer, run.accel, run.scaler, show_progress=False)
    evaluate(model, batches, run.criterion, run.accel, show_progress=False)


def our_epoch(run: OurRun, epoch: int) -> tuple[Measure, Measure]:
    """One epoch as train.py runs it: training, then validation; their measures."""
    run.loaders.train.set_epoch(epoch)
    seconds, trained = timed_seconds(run.accel.device, lambda: train_one_epoch(
        run.model, run.loaders.train, run.criterion, run.optimizer, run.accel, run.scaler, show_progress=False))
    val_seconds, evaluated = timed_seconds(run.accel.device, lambda: evaluate(
        run.model, run.loaders.val, run.criterion, run.accel, show_progress=False))
    return Measure(trained.images, seconds), Measure(evaluated.images, val_seconds)


def our_epochs(run: OurRun, epochs: int) -> dict[str, Measure]:
    """Training and validation of the first epoch, and of the later ones together (the steady state)."""
    warm_up_model(run, run.model, run.optimizer)
    trained, validated = zip(*(our_epoch(run, epoch) for epoch in range(1, epochs + 1)), strict=True)
    return {**first_and_steady("train", trained), **first_and_steady("val", validated)}


def first_and_steady(stage: str, measures: Sequence[Measure]) -> dict[str, Measure]:
    """The first epoch's measure and, when there are later epochs, theirs summed into one (the steady state),
    named for the table."""
    named = {f"{stage}, first epoch": measures[0]}
    if len(measures) > 1:
        later = "epoch 2" if len(measures) == 2 else f"epochs 2-{len(measures)}"
        named[f"{stage}, steady state ({later})"] = sum(measures[2:], measures[1])
    return named


def our_predict(run: OurRun) -> Measure:
    """predict.py's batches (no cache) through predict_probabilities: the second of two passes, so that starting
    the loader's workers and the decoder's first call are not counted (predict.py pays them once per run)."""
    paths = [path for path, _ in run.data.train_samples]
    options = run.options
    batches = pipeline.eval_batches(paths, None, options.img_size, IMAGENET_MEAN, IMAGENET_STD, options.batch_size,
                                    options.workers, run.accel, run.on_device)
    passes = [timed(run.accel.device, len(paths),
                    lambda: predict_probabilities(run.model, batches, len(paths), run.accel, show_progress=False))
              for _ in range(2)]
    return passes[-1]


# --------------------------------------------------------------------------- ceiling


def ceiling_train(run: OurRun, model: nn.Module, optimizer: torch.optim.Optimizer, count: int) -> Measure:
    """``model``'s training steps on batches already on the device."""
    batches = synthetic_batches(run, count)
    warm_up_model(run, model, optimizer)
    images = count * run.options.batch_size
    return timed(run.accel.device, images, lambda: train_one_epoch(model, batches, run.criterion, optimizer, run.accel,
                                                                   run.scaler, show_progress=False))


def ceiling_eval(run: OurRun, count: int) -> Measure:
    """Our prediction step (eval mode, autocast, softmax) on batches already on the device."""
    batches = synthetic_batches(run, count)

    def predict_only(batches: list[common.Batch]) -> None:
        run.model.eval()
        with torch.inference_mode(), run.accel.autocast():
            for batch in batches:
                run.model(batch.images).float().softmax(dim=1)

    predict_only(batches[:1])  # warm-up
    return timed(run.accel.device, count * run.options.batch_size, lambda: predict_only(batches))


def other_trainable(run: OurRun, trainable: str, epoch: int, count: int) -> tuple[Measure, Measure]:
    """A steady-state epoch and the ceiling of a model training ``trainable``, on the run's batches (their cache
    already built)."""
    options = dataclasses.replace(run.options, trainable=spelled_out_trainable(trainable))
    model, optimizer = our_model(options, run.accel, run.classes)
    warm_up_model(run, model, optimizer)
    run.loaders.train.set_epoch(epoch)
    seconds, trained = timed_seconds(run.accel.device, lambda: train_one_epoch(
        model, run.loaders.train, run.criterion, optimizer, run.accel, run.scaler, show_progress=False))
    return Measure(trained.images, seconds), ceiling_train(run, model, optimizer, count)


# --------------------------------------------------------------------------- per-stage breakdown


@dataclass
class StageCost:
    """One stage of ours, timed alone: what was timed and its milliseconds per training batch (None: not on this
    device)."""

    stage: str
    what: str
    ms_per_batch: float | None


def batch_items(run: OurRun, number: int) -> list[loader_items.Encoded]:
    """The GPU path's worker items (file bytes) of training batch ``number`` (in file order), read here."""
    files = our_worker_items(run.data.train_samples, run.options.img_size, on_device=True)
    size = run.options.batch_size
    return [files[index % len(files)] for index in range(number * size, (number + 1) * size)]


def mean_ms(device: torch.device, work: Callable[[int], Any], count: int) -> float:
    """Mean milliseconds of ``work(n)`` for n in 1..count, after an untimed ``work(0)``."""
    work(0)
    return 1000 * sum(timed_seconds(device, lambda n=n: work(n))[0] for n in range(1, count + 1)) / count


def host_to_device_ms(tensors: list[Tensor], device: torch.device) -> float | None:
    """Milliseconds to copy ``tensors`` as one pinned buffer (as the loader and the ram cache do) to a CUDA
    ``device``; None when the device is the host."""
    if device.type != "cuda":
        return None
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors]).pin_memory()
    return mean_ms(device, lambda n: flat.to(device, non_blocking=True), BREAKDOWN_BATCHES)


def device_path_stages(run: OurRun, worker_ms: float) -> list[StageCost]:
    """Read, decode, augment and host-to-device of the GPU path, each per training batch."""
    options, device = run.options, run.accel.device
    side = train_decode_side(options.img_size)
    batches = [batch_items(run, number) for number in range(BREAKDOWN_BATCHES + 1)]
    decoder = device_decode.DeviceDecoder(device, side, side, options.max_image_pixels)
    decoded = [[image for _, image in decoder(items)[0]] for items in batches]
    augment = gpu_augment.TrainAugment(options.img_size, IMAGENET_MEAN, IMAGENET_STD).to(device)
    with torch.inference_mode():
        decode_ms = mean_ms(device, lambda n: decoder(batches[n]), BREAKDOWN_BATCHES)
        augment_ms = mean_ms(device, lambda n: augment(decoded[n], torch.Generator().manual_seed(n)),
                             BREAKDOWN_BATCHES)
    stages = [
        StageCost("read", f"one loader worker, one thread, reading the batch's files (the loader runs "
                          f"{options.workers}; first epoch only when there is a cache)",
                  worker_ms * options.batch_size),
        StageCost("decode", f"DeviceDecoder on the batch ({device_decode.jpeg_decoder_name()}; first epoch only when "
                            "there is a cache)", decode_ms),
        StageCost("augment", "TrainAugment on the batch's decoded images", augment_ms),
        StageCost("host-to-device", "the batch's file bytes (first epoch)",
                  host_to_device_ms([item.data for item in batches[0]], device)),
    ]
    if run.loaders.cache.place == "ram":
        stages.append(StageCost("host-to-device, ram cache", "the batch's decoded images (later epochs)",
                                host_to_device_ms([image.cpu() for image in decoded[0]], device)))
    return stages


def host_path_stages(run: OurRun, worker_ms: float) -> list[StageCost]:
    """Decode + augment and host-to-device of the CPU path, each per training batch."""
    options = run.options
    batch = torch.zeros(options.batch_size, 3, options.img_size, options.img_size)
    return [
        StageCost("decode + augment", f"one loader worker, one thread, PIL (the loader runs {options.workers})",
                  worker_ms * options.batch_size),
        StageCost("host-to-device", "the batch's float32 images", host_to_device_ms([batch], run.accel.device)),
    ]


def stage_breakdown(run: OurRun, worker_ms: float, ceiling: Measure, ours: tuple[str, Measure]) -> list[StageCost]:
    """Every stage of our training batch timed alone, then the model step and the measured whole (``ours``: its
    stage name and measure), per batch."""
    stages = device_path_stages(run, worker_ms) if run.on_device else host_path_stages(run, worker_ms)
    batch = run.options.batch_size
    return stages + [
        StageCost("model step", "the ceiling's training step", 1000 * batch / ceiling.rate),
        StageCost("ours, whole", f"the measured {ours[0]}, per batch", 1000 * batch / ours[1].rate),
    ]


# --------------------------------------------------------------------------- one core setting


@dataclass
class Row:
    """One line of the throughput table (baseline None: the reference loop has no such stage)."""

    stage: str
    cores: str
    baseline: Measure | None
    ours: Measure
    ceiling: Measure


@dataclass
class Setting:
    """What one core setting measured, and how ours ran there."""

    rows: list[Row]
    cores: str
    workers: int
    cache: str
    precision: str
    breakdown: list[StageCost]


def contender_kind(stage: str) -> str:
    """Which baseline and ceiling measure a stage of ours compares with: ``train`` or ``eval``."""
    return "train" if stage.startswith("train") else "eval"


def comparison_rows(ours: dict[str, Measure], baseline: dict[str, Measure], ceiling: dict[str, Measure],
                    cores: str) -> list[Row]:
    """Each stage of ours beside the baseline and ceiling measures of its kind."""
    return [Row(stage, cores, baseline[contender_kind(stage)], measure, ceiling[contender_kind(stage)])
            for stage, measure in ours.items()]


def trainable_all_row(run: OurRun, args: argparse.Namespace, cores: str) -> Row:
    """The steady-state epoch of a model training every block, against its own ceiling (no reference loop)."""
    ours, ceiling = other_trainable(run, "all", args.epochs + 1, ceiling_batches(args))
    return Row("train --trainable all, steady state", cores, None, ours, ceiling)


def producer_off_rows(run: OurRun, args: argparse.Namespace, cores: str, baseline: dict[str, Measure],
                      ceiling: dict[str, Measure]) -> list[Row]:
    """Ours' training and validation again, later epochs (the cache built), with the device path's producer thread
    off (``prefetch = 0``: each batch made in the loop's thread when it is taken), to compare with the steady
    state above."""
    loaders = [loader for loader in (run.loaders.train, run.loaders.val) if hasattr(loader, "prefetch")]
    for loader in loaders:
        loader.prefetch = 0
    epochs = range(args.epochs + 2, args.epochs + 2 + max(1, args.epochs - 1))
    trained, validated = zip(*(our_epoch(run, epoch) for epoch in epochs), strict=True)
    for loader in loaders:
        loader.prefetch = batch_producer.PREFETCH_BATCHES
    return [Row("train, producer off", cores, baseline["train"], sum(trained[1:], trained[0]), ceiling["train"]),
            Row("val, producer off", cores, baseline["eval"], sum(validated[1:], validated[0]), ceiling["eval"])]


def ceiling_batches(args: argparse.Namespace) -> int:
    """Batches the ceiling times: about an epoch's worth."""
    return max(1, args.images // args.batch_size)


def ours_and_ceiling(run: OurRun, args: argparse.Namespace) -> tuple[dict[str, Measure], dict[str, Measure]]:
    """Our epochs and prediction by stage, and the ceiling's training and evaluation steps."""
    ours = our_epochs(run, args.epochs)
    ours["predict"] = our_predict(run)
    count = ceiling_batches(args)
    return ours, {"train": ceiling_train(run, run.model, run.optimizer, count), "eval": ceiling_eval(run, count)}


def breakdown_of(run: OurRun, ours: dict[str, Measure], ceiling: dict[str, Measure],
                 worker_ms: float) -> list[StageCost]:
    """Ours' stages timed alone, beside its last training measure (the steady state when there is one)."""
    last_train = [stage for stage in ours if stage.startswith("train")][-1]
    return stage_breakdown(run, worker_ms, ceiling["train"], (last_train, ours[last_train]))


def measure_setting(cores: int | None, samples: list, args: argparse.Namespace, started: float,
                    worker_ms: float | None) -> Setting:
    """Baseline, ours and ceiling with the process restricted to ``cores`` (None: all); with ``worker_ms`` (one
    worker's ms per image) also ours' stages timed alone."""
    device = torch.device(args.device)
    with restricted_to(cores) as label:
        workers = workers_for(cores, args.workers)
        elapsed_note(started, f"baseline (reference loop), {label} cores ...")
        baseline = run_baseline(samples, args, device)
        release_memory(device)
        elapsed_note(started, f"ours ({workers} workers) and ceiling, {label} cores ...")
        run = start_our_run(our_options(args, workers, args.trainable), benchmark_data(samples, args))
        ours, ceiling = ours_and_ceiling(run, args)
        rows = comparison_rows(ours, baseline, ceiling, label)
        print_rows(rows)
        breakdown = [] if worker_ms is None else breakdown_of(run, ours, ceiling, worker_ms)
        if args.producer_off_row and run.on_device:
            elapsed_note(started, f"ours with the producer thread off, {label} cores ...")
            rows += producer_off_rows(run, args, label, baseline, ceiling)
            print_rows(rows[-2:])
        if args.trainable_all_row and run.options.trainable != "all":
            elapsed_note(started, f"ours with --trainable all, {label} cores ...")
            rows.append(trainable_all_row(run, args, label))
            print_rows(rows[-1:])
        setting = Setting(rows, label, workers, run.loaders.cache.place, precision_of(run.accel), breakdown)
        del run
        release_memory(device)
    return setting


def precision_of(accel: Accel) -> str:
    """``bf16, channels_last`` and the like: how ours computes."""
    return accel.precision_name + (", channels_last" if accel.channels_last else "")


# --------------------------------------------------------------------------- report


def machine_description(device: torch.device) -> str:
    """CPU model and core count, GPU name, torch version."""
    parts = [f"CPU {cpu_model()} ({len(available_cores())} cores)"]
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    parts.append(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    return "; ".join(parts)


def setup_description(args: argparse.Namespace, settings: list[Setting], seconds: float) -> str:
    """Arch, size, batch, images, precision, path, cache, workers and cores of the run, in one line."""
    cores = ", ".join(f"{setting.cores} (workers {setting.workers}, cache {setting.cache})" for setting in settings)
    pinned = any(not setting.cores.startswith("all") for setting in settings)
    return (f"{args.arch} at {args.img_size} px, batch {args.batch_size}, {args.images} images of "
            f"{args.width}x{args.height} in {args.classes} classes, {args.epochs} epochs; ours: "
            f"{settings[0].precision}, {'gpu' if args.on_device else 'cpu'} path, trains "
            f"{spelled_out_trainable(args.trainable)}; cores: {cores}"
            f"{' (fewer cores: os.sched_setaffinity on every thread, torch threads to match)' if pinned else ''}; "
            f"the benchmark took {seconds:.0f} s")


def format_rate(measure: Measure | None) -> str:
    """Images/s with one decimal under 100, none above; ``-`` for no measure."""
    if measure is None:
        return "-"
    return f"{measure.rate:.1f}" if measure.rate < 100 else f"{measure.rate:.0f}"


def throughput_table(rows: list[Row]) -> str:
    """Markdown table of images/s, speed-ups and efficiency, one line per stage and core setting."""
    lines = ["| stage | cores | baseline img/s | ours img/s | ceiling img/s | ours / baseline | "
             "efficiency (ours / ceiling) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        speedup = "-" if row.baseline is None else f"{row.ours.rate / row.baseline.rate:.2f}x"
        lines.append(f"| {row.stage} | {row.cores} | {format_rate(row.baseline)} | {format_rate(row.ours)} | "
                     f"{format_rate(row.ceiling)} | {speedup} | {row.ours.rate / row.ceiling.rate:.2f} |")
    return "\n".join(lines)


def print_rows(rows: list[Row]) -> None:
    """Print table rows as soon as they are measured, so that a run stopped later keeps them in its log."""
    print("\n".join(throughput_table(rows).splitlines()[2:]), flush=True)


def breakdown_table(stages: list[StageCost], batch_size: int) -> str:
    """Markdown table of ours' stages timed alone: ms per batch and the images/s each allows."""
    lines = ["| stage of ours | what is timed | ms per batch | img/s it allows |", "|---|---|---:|---:|"]
    for stage in stages:
        if stage.ms_per_batch is None:
            lines.append(f"| {stage.stage} | {stage.what} | - | - |")
            continue
        rate = 1000 * batch_size / stage.ms_per_batch if stage.ms_per_batch > 0 else float("inf")
        lines.append(f"| {stage.stage} | {stage.what} | {stage.ms_per_batch:.1f} | {rate:.0f} |")
    return "\n".join(lines)


def worker_table(costs: dict[str, float]) -> str:
    """Markdown table of one loader worker's CPU cost per training image and the images/s workers feed."""
    baseline, ours = costs["baseline"], costs["ours"]
    return "\n".join([
        "| loader worker (one process, one thread) | baseline | ours |",
        "|---|---:|---:|",
        f"| CPU ms per training image | {baseline:.2f} | {ours:.2f} |",
        f"| img/s one worker feeds | {1000 / baseline:.0f} | {1000 / ours:.0f} |",
        # A Colab T4 comes with 2 vCPUs: its loader cannot feed more images per second than 2 workers prepare.
        f"| img/s 2 workers feed (Colab's 2 vCPUs) | {2000 / baseline:.0f} | {2000 / ours:.0f} |",
    ])


def report(args: argparse.Namespace, settings: list[Setting], costs: dict[str, float], seconds: float) -> str:
    """The results section: heading, machine, setup and the three tables."""
    rows = [row for setting in settings for row in setting.rows]
    worker_job = "reading file bytes" if args.on_device else "decoding and augmenting with PIL"
    return (f"## {datetime.date.today().isoformat()} - {args.device} (benchmarks/bench.py)\n\n"
            f"{machine_description(torch.device(args.device))}  \n{setup_description(args, settings, seconds)}\n\n"
            f"{throughput_table(rows)}\n\n"
            f"Ours per training batch of {args.batch_size}, each stage timed alone ({settings[0].cores} cores):\n\n"
            f"{breakdown_table(settings[0].breakdown, args.batch_size)}\n\n"
            f"One loader worker's CPU time per training image (baseline: PIL decode and augmentation; ours: "
            f"{worker_job}):\n\n{worker_table(costs)}\n")


def append_results(text: str) -> None:
    """Append a section to benchmarks/results.md."""
    header = "" if RESULTS.exists() else "# Benchmark results\n\nAppended by the scripts in benchmarks/.\n"
    with RESULTS.open("a", encoding="utf-8") as handle:
        handle.write(header + "\n" + text + "\n")


def publish(text: str, save: bool) -> None:
    """Print a results section and, when ``save``, append it to benchmarks/results.md."""
    print("\n" + text)
    if save:
        append_results(text)
        print(f"appended to {RESULTS}")


# --------------------------------------------------------------------------- options


def get_args_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu; the defaults of "
                        "--classes, --images, --batch-size, --cpus and --trainable-all-row depend on it")
    parser.add_argument("--arch", default="resnet50", help="default: resnet50")
    parser.add_argument("--img-size", type=int, default=224, help="default: 224")
    parser.add_argument("--trainable", default=DEFAULT_TRAINABLE, help="blocks ours trains (train.py's "
                        f"--trainable; default {DEFAULT_TRAINABLE}); the reference loop always trains layer4,fc")
    parser.add_argument("--trainable-all-row", action=argparse.BooleanOptionalAction, default=None,
                        help="also time a steady-state epoch training every block, against its own ceiling "
                        "(default: on for cuda, off for cpu)")
    parser.add_argument("--epochs", type=int, default=2, help="ours' epochs (default 2): the first is reported "
                        "apart from the later ones (the steady state, after the cache is built)")
    parser.add_argument("--cpus", help="core settings to measure, comma-separated: all, or N to pin the process "
                        "and its workers to the first N cores (default: all on cpu, all,2 on cuda: Colab's 2 vCPUs)")
    parser.add_argument("--path", choices=("auto", "cpu", "gpu"), default="auto", help="ours' data path "
                        "(train.py's --augment-device): auto = gpu on cuda, cpu elsewhere; gpu on --device cpu "
                        "runs the GPU path's code on the CPU (slow; for testing it); default auto")
    parser.add_argument("--classes", type=int, help="default: 8 on cpu, 100 on cuda")
    parser.add_argument("--images", type=int, help="images in the generated dataset (one epoch); default 192 on "
                        "cpu, 3072 on cuda")
    parser.add_argument("--batch-size", type=int, help="default 32 on cpu, 128 on cuda")
    parser.add_argument("--width", type=int, default=500, help="of the generated JPEGs; default 500")
    parser.add_argument("--height", type=int, default=375, help="of the generated JPEGs; default 375")
    parser.add_argument("--workers", default="auto", help="our loader workers (default auto: train.py's auto for "
                        "the cores of each setting); the reference loop always uses 2")
    parser.add_argument("--worker-images", type=int, default=32, help="images timed in one loader worker for "
                        "its CPU cost per image; default 32")
    parser.add_argument("--producer-off-row", action=argparse.BooleanOptionalAction, default=True,
                        help="on the device path, ours' later epochs again with the producer thread off (default: "
                             "on)")
    parser.add_argument("--no-save", action="store_true", help="print the tables without appending to results.md")
    return parser


def parse_cpus(value: str, parser: argparse.ArgumentParser) -> list[int | None]:
    """``--cpus all,2`` -> ``[None, 2]`` (None: all cores); a count above the cores available is an error."""
    available = len(available_cores())
    settings: list[int | None] = []
    for part in (part.strip() for part in value.split(",")):
        if part == "all":
            settings.append(None)
        elif part.isdigit() and 1 <= int(part) <= available:
            settings.append(int(part))
        else:
            parser.error(f"--cpus {value}: {part!r} is not 'all' or a core count from 1 to {available} "
                         "(the cores this process may use)")
    return settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, with the per-device defaults filled in and --cpus parsed into ``args.core_settings``."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.cpus == DEFAULTS[args.device]["cpus"]:  # a default count this machine lacks is left out, not refused
        args.cpus = ",".join(part for part in args.cpus.split(",")
                             if part == "all" or int(part) < len(available_cores()))
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: must be at least 1")
    args.core_settings = parse_cpus(args.cpus, parser)
    return args


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    """Generate the data, time each core setting's baseline, ours and ceiling, print and save the tables."""
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA GPU is visible; run with --device cpu")
    args.on_device = choose_data_path(args.path, device) == "gpu"
    with tempfile.TemporaryDirectory(prefix="bench-data-") as data_dir:
        args.data_dir = data_dir
        elapsed_note(started, f"generating {args.images} JPEGs of {args.width}x{args.height} in {args.classes} "
                              f"classes on {os.cpu_count()} processes ...")
        samples = make_dataset(Path(data_dir) / "train", args.classes, args.images, args.width, args.height)
        configure_backends(device)
        elapsed_note(started, "one loader worker's CPU cost per training image ...")
        costs = worker_costs(samples, args, args.on_device)
        settings = [measure_setting(cores, samples, args, started, costs["ours"] if number == 0 else None)
                    for number, cores in enumerate(args.core_settings)]
    text = report(args, settings, costs, time.perf_counter() - started)
    publish(text, save=not args.no_save)


if __name__ == "__main__":
    main()
