"""The loop: one training epoch, one evaluation pass, and batched prediction."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class EpochResult:
    """Mean loss and accuracy (a fraction) over an epoch, with the image count and wall time."""

    loss: float
    accuracy: float
    images: int
    seconds: float


@dataclass
class EvalResult(EpochResult):
    """An evaluation pass: the epoch figures plus every prediction and target, in loader order."""

    predictions: torch.Tensor
    targets: torch.Tensor


class RunningMeter:
    """Accumulates summed loss and correct counts over batches."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.correct = 0
        self.count = 0

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch: ``loss`` is the batch mean."""
        batch = targets.numel()
        self.loss_sum += float(loss) * batch
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


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    description: str = "train",
    show_progress: bool = True,
) -> EpochResult:
    """Train ``model`` for one pass over ``loader``; returns mean loss and accuracy."""
    model.train()
    meter = RunningMeter()
    started = time.perf_counter()
    progress = tqdm(loader, desc=description, leave=False, disable=not show_progress, dynamic_ncols=True)
    for batch in progress:
        if batch is None:  # every image of the batch failed to decode
            continue
        images, targets = (tensor.to(device, non_blocking=True) for tensor in batch)
        logits = model(images)
        loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.update(loss.detach(), logits.detach(), targets)
        progress.set_postfix(loss=f"{meter.loss:.3f}", acc=f"{meter.accuracy:.1%}", refresh=False)
    return EpochResult(meter.loss, meter.accuracy, meter.count, time.perf_counter() - started)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    device: torch.device,
    description: str = "val",
    show_progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` on a labeled loader: mean loss, accuracy, and all predictions with their targets."""
    model.eval()
    meter = RunningMeter()
    predictions, targets_seen = [], []
    started = time.perf_counter()
    for batch in tqdm(loader, desc=description, leave=False, disable=not show_progress, dynamic_ncols=True):
        if batch is None:
            continue
        images, targets = (tensor.to(device, non_blocking=True) for tensor in batch)
        logits = model(images)
        meter.update(criterion(logits.float(), targets), logits, targets)
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
    model: nn.Module, loader: Iterable, num_images: int, device: torch.device, show_progress: bool = True
) -> tuple[torch.Tensor, list[int]]:
    """Softmax probabilities ``[num_images, classes]`` in dataset order, and the positions that failed to decode.

    ``loader`` yields ``(images, positions, failed_positions)`` as made by ``dataset.collate_with_failures``.
    """
    model.eval()
    probabilities: torch.Tensor | None = None
    failed: list[int] = []
    for images, positions, failed_positions in tqdm(
        loader, desc="predict", leave=False, disable=not show_progress, dynamic_ncols=True
    ):
        failed.extend(failed_positions)
        if images is None:
            continue
        batch_probabilities = model(images.to(device, non_blocking=True)).float().softmax(dim=1).cpu()
        if probabilities is None:
            probabilities = torch.zeros(num_images, batch_probabilities.shape[1])
        probabilities[positions] = batch_probabilities
    if probabilities is None:
        probabilities = torch.zeros(num_images, 0)
    return probabilities, sorted(failed)


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Count matrix ``[true, predicted]``."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
