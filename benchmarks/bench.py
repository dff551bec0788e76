"""Throughput benchmark: our training, validation and prediction against a faithful reference loop.

    python benchmarks/bench.py --device cpu          # about 2 minutes on 2 cores
    python benchmarks/bench.py --device cuda         # defaults sized for a datacentre GPU

In one process and on the same generated JPEG dataset it measures, in images per second:
  baseline  the reference notebook's loop: fp32, NCHW, PIL augmentation in 2 workers, layer4+fc trained by
            requires_grad alone, so every BatchNorm runs in training mode;
  ours      this project's code with its defaults (train.make_loaders, engine.train_one_epoch, ...);
  ceiling   our model step on tensors already on the device: the speed with free data loading.
It also measures the host CPU time per training image spent decoding and augmenting. The table is printed
and appended, with the machine, to benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gpu_augment  # noqa: E402
import train  # noqa: E402
from accel import Accel, configure_backends, make_grad_scaler, resolve_amp  # noqa: E402
from dataset import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    LabeledBatch,
    LabeledImages,
    TrainValData,
    build_eval_transform,
    build_train_transform,
    eval_resize_size,
    prediction_loader,
)
from engine import evaluate, predict_probabilities, train_one_epoch  # noqa: E402
from model import trainable_parameters  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results.md"
DEFAULTS = {
    "cpu": dict(classes=8, images=96, batch_size=32),
    "cuda": dict(classes=100, images=3072, batch_size=128),
}


# --------------------------------------------------------------------------- data


def make_dataset(root: Path, classes: int, images: int, width: int, height: int, seed: int = 0) -> list[tuple[str, int]]:
    """Write photo-like JPEGs (smooth colour fields, shapes, sensor noise) and return ``(path, class)`` samples."""
    rng = np.random.default_rng(seed)
    samples = []
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for index in range(images):
        label = index % classes
        base = rng.uniform(0, 255, size=3)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height)[..., None]
        pixels = base + 80 * ramp * rng.uniform(-1, 1, size=3)
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, height / 2)
        disc = ((x - cx) ** 2 + (y - cy) ** 2 < r * r)[..., None]
        pixels = np.where(disc, rng.uniform(0, 255, size=3), pixels) + rng.normal(0, 6, size=pixels.shape)
        path = root / str(label) / f"{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        samples.append((str(path), label))
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


def reference_train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
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
def reference_predict(model: nn.Module, loader: DataLoader, device: torch.device) -> None:
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


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, images: int, work: Callable[[], Any]) -> Measure:
    """Run ``work`` once and time it."""
    synchronize(device)
    started = time.perf_counter()
    work()
    synchronize(device)
    return Measure(images, time.perf_counter() - started)


def host_cpu_ms_per_image(dataset: torch.utils.data.Dataset, count: int, repeats: int = 2) -> float:
    """CPU milliseconds one process spends to load and augment one item: the best of ``repeats`` runs of ``count``."""
    dataset[0]
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for index in range(count):
            dataset[index % len(dataset)]
        best = min(best, (time.process_time() - started) / count * 1000)
    return best


def host_costs(samples: list, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """Host CPU ms per training image of the baseline's data path and of ours, measured before any model runs."""
    baseline_set = ReferenceImages(samples, build_train_transform(args.img_size))
    if train.resolve_augment_device("auto", device) == "gpu":
        ours_set = gpu_augment.StagedImages(samples, gpu_augment.staging_size(args.img_size))
    else:
        ours_set = LabeledImages(samples, build_train_transform(args.img_size), eval_resize_size(args.img_size))
    with torch.inference_mode():
        return host_cpu_ms_per_image(baseline_set, args.host_images), host_cpu_ms_per_image(ours_set, args.host_images)


# --------------------------------------------------------------------------- the three contenders


def run_baseline(samples: list, args: argparse.Namespace, device: torch.device, num_classes: int) -> dict[str, Any]:
    """Train one epoch, validate and predict with the reference loop."""
    torch.manual_seed(0)
    model = reference_model(args.arch, num_classes).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-5, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.05)
    train_set = ReferenceImages(samples, build_train_transform(args.img_size))
    eval_set = ReferenceImages(samples, build_eval_transform(args.img_size))
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=2)
    eval_loader = DataLoader(eval_set, batch_size=args.batch_size, shuffle=False, num_workers=2)
    warm_up(lambda: reference_train_epoch(model, first_batch(train_loader), optimizer, criterion, device))
    return {
        "train": timed(device, len(samples), lambda: reference_train_epoch(model, train_loader, optimizer, criterion, device)),
        "val": timed(device, len(samples), lambda: reference_predict(model, eval_loader, device)),
        "predict": timed(device, len(samples), lambda: reference_predict(model, eval_loader, device)),
    }


def our_args(args: argparse.Namespace, data_dir: str) -> argparse.Namespace:
    """train.py's options at their defaults, but for this benchmark's arch, size and batch."""
    return train.parse_args([
        "--data-dir", data_dir, "--arch", args.arch, "--weights", "none", "--img-size", str(args.img_size),
        "--batch-size", str(args.batch_size), "--device", args.device, "--no-progress", "--workers", args.workers,
    ])


def run_ours(samples: list, args: argparse.Namespace, device: torch.device, num_classes: int) -> tuple[dict, Any]:
    """Train one epoch, validate and predict with this project's code and defaults."""
    options = our_args(args, args.data_dir)
    accel = Accel(device, resolve_amp(options.amp, device), options.channels_last)
    data = TrainValData([str(i) for i in range(num_classes)], samples, samples, "benchmark")
    torch.manual_seed(0)
    model = train.make_model(options, num_classes, accel)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=3e-5, weight_decay=1e-4)
    criterion = train.make_criterion(data, options, device)
    scaler = make_grad_scaler(accel)
    loaders = train.make_loaders(data, options, accel)
    predict_loader = prediction_loader([path for path, _ in samples], args.img_size, IMAGENET_MEAN, IMAGENET_STD,
                                       args.batch_size, options.workers, pin_memory=device.type == "cuda")

    def train_epoch(loader: Iterable) -> None:
        train_one_epoch(model, loader, criterion, optimizer, accel, scaler, loaders.train_transform, show_progress=False)

    warm_up(lambda: train_epoch(first_batch(loaders.train)))
    results = {
        "train": timed(device, len(samples), lambda: train_epoch(loaders.train)),
        "val": timed(device, len(samples), lambda: evaluate(model, loaders.val, criterion, accel, show_progress=False)),
        "predict": timed(device, len(samples),
                         lambda: predict_probabilities(model, predict_loader, len(samples), accel, show_progress=False)),
    }
    return results, (model, optimizer, criterion, scaler, accel, loaders.train_transform)


def run_ceiling(ours: tuple, args: argparse.Namespace, device: torch.device, num_classes: int, count: int) -> dict:
    """Our model step alone, on batches already on the device: the speed with free data loading."""
    model, optimizer, criterion, scaler, accel, _ = ours
    batches = max(1, count // args.batch_size)
    images = accel.images_to_device(torch.randn(args.batch_size, 3, args.img_size, args.img_size))
    targets = torch.randint(0, num_classes, (args.batch_size,), device=device)
    loader = [LabeledBatch(images, targets, [])] * batches

    def predict_only() -> None:
        model.eval()  # train_one_epoch left it in training mode
        with torch.inference_mode(), accel.autocast():
            for batch in loader:
                model(accel.images_to_device(batch.images)).float().softmax(dim=1)

    warm_up(lambda: train_one_epoch(model, loader[:1], criterion, optimizer, accel, scaler, show_progress=False))
    return {
        "train": timed(device, batches * args.batch_size,
                       lambda: train_one_epoch(model, loader, criterion, optimizer, accel, scaler, show_progress=False)),
        "val": timed(device, batches * args.batch_size, predict_only),
        "predict": timed(device, batches * args.batch_size, predict_only),
    }


def first_batch(loader: DataLoader) -> list:
    """A one-batch list taken from ``loader``, for warming up kernels and allocators."""
    return [next(iter(loader))]


def warm_up(step: Callable[[], Any]) -> None:
    """Run one step untimed (cuDNN autotuning, allocator growth, lazy initialisation)."""
    step()


# --------------------------------------------------------------------------- report


def machine_description(device: torch.device) -> str:
    """CPU model and core count, GPU name, torch version."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="ignore").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    parts = [f"CPU {cpu} ({os.cpu_count()} cores)"]
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    parts.append(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    return "; ".join(parts)


def results_table(baseline: dict, ours: dict, ceiling: dict) -> str:
    """Markdown table of images/s, speed-ups and efficiency."""
    lines = ["| stage | baseline img/s | ours img/s | ceiling img/s | ours / baseline | efficiency (ours / ceiling) |",
             "|---|---:|---:|---:|---:|---:|"]
    for stage in ("train", "val", "predict"):
        b, o, c = baseline[stage].rate, ours[stage].rate, ceiling[stage].rate
        lines.append(f"| {stage} | {b:.1f} | {o:.1f} | {c:.1f} | {o / b:.2f}x | {o / c:.2f} |")
    lines.append(f"| host CPU ms per training image (load + augment) | {baseline['host_ms']:.1f} | "
                 f"{ours['host_ms']:.1f} | | | |")
    # A Colab T4 comes with 2 vCPUs: its loader cannot feed more images per second than 2 cores can prepare.
    lines.append(f"| loader bound with 2 vCPUs, img/s (2000 / host ms) | {2000 / baseline['host_ms']:.0f} | "
                 f"{2000 / ours['host_ms']:.0f} | | | |")
    return "\n".join(lines)


def append_results(text: str) -> None:
    """Append a section to benchmarks/results.md."""
    header = "" if RESULTS.exists() else "# Benchmark results\n\nAppended by the scripts in benchmarks/.\n"
    with RESULTS.open("a", encoding="utf-8") as handle:
        handle.write(header + "\n" + text + "\n")


def get_args_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--classes", type=int, help="default: 8 on cpu, 100 on cuda")
    parser.add_argument("--images", type=int, help="images in the generated dataset (one epoch); default 96 on cpu, 3072 on cuda")
    parser.add_argument("--batch-size", type=int, help="default 32 on cpu, 128 on cuda")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--workers", default="auto", help="our loader workers (the baseline always uses 2)")
    parser.add_argument("--host-images", type=int, default=32, help="images timed for the host CPU cost")
    parser.add_argument("--no-save", action="store_true", help="print the table without appending to results.md")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Generate the data, run baseline, ours and ceiling, print and save the table."""
    args = get_args_parser().parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA GPU is visible; run with --device cpu")
    configure_backends(device)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as data_dir:
        args.data_dir = data_dir
        print(f"generating {args.images} JPEGs of {args.width}x{args.height} in {args.classes} classes ...")
        samples = make_dataset(Path(data_dir) / "train", args.classes, args.images, args.width, args.height)
        print("host cost of loading and augmentation ...", flush=True)
        host_baseline, host_ours = host_costs(samples, args, device)
        print("baseline (reference loop) ...", flush=True)
        baseline = run_baseline(samples, args, device, args.classes)
        print("ours ...", flush=True)
        ours, state = run_ours(samples, args, device, args.classes)
        print("ceiling (model step on device-resident tensors) ...", flush=True)
        ceiling = run_ceiling(state, args, device, args.classes, args.images)
    accel = state[4]
    setup = (f"{args.arch} at {args.img_size} px, batch {args.batch_size}, {args.images} images of "
             f"{args.width}x{args.height}; ours: {accel.precision_name}"
             f"{', channels_last' if accel.channels_last else ''}, workers {train.resolve_workers(args.workers)}, "
             f"augmentation on {train.resolve_augment_device('auto', device)}")
    baseline["host_ms"], ours["host_ms"] = host_baseline, host_ours
    text = (f"## {datetime.date.today().isoformat()} - {args.device}\n\n{machine_description(device)}  \n"
            f"{setup}\n\n{results_table(baseline, ours, ceiling)}\n")
    print("\n" + text)
    if not args.no_save:
        append_results(text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
