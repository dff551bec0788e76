"""The loop: one training epoch, one evaluation pass, and batched prediction."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from accel import Accel
from dataset import DecodeFailure

# Turns a staged uint8 batch and the original image sizes into model-ready images on the device (GPU augmentation).
BatchTransform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EpochResult:
    """Mean loss and accuracy (a fraction) over an epoch, with the image count and wall time."""

    loss: float
    accuracy: float
    images: int
    seconds: float
    interrupted: bool = False
    failed: list[DecodeFailure] = field(default_factory=list)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, batch_index: int, value: float) -> None:
        super().__init__(f"loss is {value} at batch {batch_index + 1}")
        self.batch_index = batch_index


@dataclass
class EvalResult:
    """An evaluation pass: mean loss, accuracy, image count, wall time, and every prediction and target in order."""

    loss: float
    accuracy: float
    images: int
    seconds: float
    predictions: torch.Tensor
    targets: torch.Tensor


class RunningMeter:
    """Accumulates summed loss and correct counts over batches."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.correct = 0
        self.count = 0

    def update(self, loss_value: float, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch (``loss_value`` is the batch mean)."""
        batch = targets.numel()
        self.loss_sum += loss_value * batch
        self.correct += int((logits.argmax(dim=1) == targets).sum())
        self.count += batch

    @property
    def loss(self) -> float:
        """Mean loss so far."""
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        """Accuracy so far, as a fraction."""
        return self.correct / max(self.count, 1)


def batch_to_device(
    batch: Any, accel: Accel, transform: BatchTransform | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, targets)`` on the device from a loader batch.

    A CPU-augmented batch is a ``dataset.LabeledBatch``; a staged batch for on-device augmentation is a
    ``gpu_augment.StagedBatch`` (uint8 images and original sizes) and goes through ``transform`` on the device.
    """
    if transform is None:
        return accel.images_to_device(batch.images), batch.targets.to(accel.device, non_blocking=True)
    staged = batch.images.to(accel.device, non_blocking=True)  # the sizes stay on the host: see gpu_augment
    return accel.images_to_device(transform(staged, batch.sizes)), batch.targets.to(accel.device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    accel: Accel,
    scaler: torch.amp.GradScaler | None = None,
    batch_transform: BatchTransform | None = None,
    augment_seed: int = 0,
    description: str = "train",
    show_progress: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
) -> EpochResult:
    """Train ``model`` for one pass over ``loader``; returns mean loss and accuracy.

    Runs under ``accel``'s autocast; ``scaler`` (fp16 only) scales the loss so small gradients survive.
    ``batch_transform`` (on-device augmentation) draws batch ``i``'s randomness from seed ``augment_seed + i``.
    The epoch is abandoned (``interrupted=True``) once ``should_stop()`` is true; a NaN or infinite loss raises
    :class:`NonFiniteLossError` before the optimizer steps, so the weights stay those of the last good batch.
    """
    model.train()
    meter = RunningMeter()
    started = time.perf_counter()
    progress = tqdm(loader, desc=description, leave=False, disable=not show_progress, dynamic_ncols=True)
    failed: list[DecodeFailure] = []
    for batch_index, batch in enumerate(progress):
        failed.extend(batch.failed)
        if batch.targets is None:  # every image of the batch failed to decode
            continue
        images, targets = batch_to_device(batch, accel, seeded(batch_transform, augment_seed + batch_index))
        with accel.autocast():
            logits = model(images)
            loss = criterion(logits.float(), targets)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(batch_index, loss_value)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        meter.update(loss_value, logits.detach(), targets)
        progress.set_postfix(loss=f"{meter.loss:.3f}", acc=f"{meter.accuracy:.1%}", refresh=False)
        if should_stop():
            progress.close()
            return EpochResult(meter.loss, meter.accuracy, meter.count, time.perf_counter() - started, True, failed)
    return EpochResult(meter.loss, meter.accuracy, meter.count, time.perf_counter() - started, False, failed)


def seeded(transform: Any, seed: int) -> BatchTransform | None:
    """``transform`` with its randomness drawn from a CPU generator seeded with ``seed`` (None stays None).

    On the CPU the parameter draw never waits on the GPU (see gpu_augment), and a seed gives the same
    augmentation on every device.
    """
    if transform is None:
        return None
    generator = torch.Generator().manual_seed(seed)
    return lambda images, sizes: transform(images, sizes, generator=generator)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    accel: Accel,
    description: str = "val",
    show_progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` on a labeled loader: mean loss, accuracy, and all predictions with their targets."""
    model.eval()
    meter = RunningMeter()
    predictions, targets_seen = [], []
    started = time.perf_counter()
    for batch in tqdm(loader, desc=description, leave=False, disable=not show_progress, dynamic_ncols=True):
        if batch.targets is None:
            continue
        images, targets = batch_to_device(batch, accel)
        with accel.autocast():
            logits = model(images)
        meter.update(float(criterion(logits.float(), targets)), logits, targets)
        predictions.append(logits.argmax(dim=1).cpu())
        targets_seen.append(targets.cpu())
    return EvalResult(
        loss=meter.loss,
        accuracy=meter.accuracy,
        images=meter.count,
        seconds=time.perf_counter() - started,
        predictions=torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long),
        targets=torch.cat(targets_seen) if targets_seen else torch.empty(0, dtype=torch.long),
    )


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module, loader: Iterable, num_images: int, accel: Accel, show_progress: bool = True
) -> tuple[torch.Tensor, dict[int, str]]:
    """Softmax probabilities ``[num_images, classes]`` in dataset order, and why each position that failed to
    decode did (in position order).

    ``loader`` yields ``dataset.PredictionBatch`` es, as made by ``dataset.collate_with_failures``.
    """
    model.eval()
    probabilities: torch.Tensor | None = None
    failed: dict[int, str] = {}
    for images, positions, failed_positions in tqdm(
        loader, desc="predict", leave=False, disable=not show_progress, dynamic_ncols=True
    ):
        failed.update(failed_positions)
        if images is None:
            continue
        with accel.autocast():
            logits = model(accel.images_to_device(images))
        batch_probabilities = logits.float().softmax(dim=1).cpu()
        if probabilities is None:
            probabilities = torch.zeros(num_images, batch_probabilities.shape[1])
        probabilities[positions] = batch_probabilities
    if probabilities is None:
        probabilities = torch.zeros(num_images, 0)
    return probabilities, dict(sorted(failed.items()))
