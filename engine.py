"""The loop: one training epoch, one evaluation pass, and batched prediction.

The loops consume ``pipeline.Batch`` es, whose images are already on the device. They never wait for the device
batch by batch: losses, correct counts and predictions are summed and kept on the device, and read back every
:func:`readback_interval` batches (for the progress bar and the check for a non-finite loss) and at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from accel import Accel
from dataset import DecodeFailure

CUDA_READBACK_BATCHES = 25  # how often a CUDA run reads its running sums back (a few times a second)


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
    """The training loss became NaN or infinite in batches ``first``..``last`` (counted from 0)."""

    def __init__(self, first: int, last: int, value: float) -> None:
        where = f"at batch {last + 1}" if first == last else f"in one of batches {first + 1} to {last + 1}"
        super().__init__(f"loss is {value} {where}")
        self.first, self.last = first, last


@dataclass
class EvalResult:
    """An evaluation pass: mean loss, accuracy, image count, wall time, and every prediction and target in order."""

    loss: float
    accuracy: float
    images: int
    seconds: float
    predictions: torch.Tensor
    targets: torch.Tensor


def readback_interval(device: torch.device) -> int:
    """Batches between two reads of the running sums: every batch on the CPU (it costs nothing there, and a
    non-finite loss is then named by its batch), every :data:`CUDA_READBACK_BATCHES` elsewhere."""
    return 1 if device.type == "cpu" else CUDA_READBACK_BATCHES


class RunningMeter:
    """Summed loss, correct predictions and non-finite losses, kept on the device until :meth:`read`."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.nonfinite = torch.zeros((), device=device, dtype=torch.int64)
        self.last_bad = torch.zeros((), device=device, dtype=torch.float32)
        self.count = 0
        self.loss, self.accuracy, self.nonfinite_seen, self.bad_value = 0.0, 0.0, 0, 0.0

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch (``loss`` is the batch mean); a non-finite loss is counted instead of summed."""
        batch = targets.shape[0]
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss.double() * batch, 0.0)
        self.correct += (logits.argmax(dim=1) == targets).sum()
        self.nonfinite += (~finite).long()
        self.last_bad = torch.where(finite, self.last_bad, loss.float())
        self.count += batch

    def read(self) -> None:
        """Copy the sums to the host (one wait for the device): sets ``loss``, ``accuracy``, ``nonfinite_seen``."""
        loss_sum, correct, nonfinite, bad = torch.stack(
            [self.loss_sum, self.correct.double(), self.nonfinite.double(), self.last_bad.double()]).tolist()
        self.loss = loss_sum / max(self.count, 1)
        self.accuracy = correct / max(self.count, 1)
        self.nonfinite_seen, self.bad_value = int(nonfinite), bad


def make_optimizer(parameters: list[nn.Parameter], lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW; on CUDA fused into one kernel, which is faster and can skip a step on the device when the loss is not
    finite (see :func:`train_step`). Elsewhere PyTorch's default implementation: a CPU run waits for nothing by
    checking the loss on the host, and keeps the results it always had (the fused kernel rounds differently)."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def train_one_epoch(
    model: nn.Module,
    batches: Iterable,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    accel: Accel,
    scaler: torch.amp.GradScaler | None = None,
    description: str = "train",
    show_progress: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
) -> EpochResult:
    """Train ``model`` for one pass over ``batches`` (``pipeline.Batch`` es); returns mean loss and accuracy.

    Runs under ``accel``'s autocast; ``scaler`` (fp16 only) scales the loss so small gradients survive. A batch
    whose loss is NaN or infinite takes no optimizer step; the next readback raises :class:`NonFiniteLossError`
    naming the batches. The epoch is abandoned (``interrupted=True``) once ``should_stop()`` is true.
    """
    model.train()
    meter = RunningMeter(accel.device)
    interval = readback_interval(accel.device)
    started = time.perf_counter()
    progress = tqdm(batches, desc=description, leave=False, disable=not show_progress, dynamic_ncols=True)
    failed: list[DecodeFailure] = []
    last_read = batch_index = -1
    for batch_index, batch in enumerate(progress):
        failed.extend(batch.failed)
        if batch.targets is None:  # every image of the batch failed to decode
            continue
        train_step(model, batch.images, batch.targets, criterion, optimizer, accel, scaler, meter)
        if (batch_index + 1) % interval == 0:
            check_readback(meter, last_read + 1, batch_index)
            last_read = batch_index
            progress.set_postfix(loss=f"{meter.loss:.3f}", acc=f"{meter.accuracy:.1%}", refresh=False)
        if should_stop():
            progress.close()
            check_readback(meter, last_read + 1, batch_index)
            return EpochResult(meter.loss, meter.accuracy, meter.count, time.perf_counter() - started, True, failed)
    check_readback(meter, last_read + 1, batch_index)
    return EpochResult(meter.loss, meter.accuracy, meter.count, time.perf_counter() - started, False, failed)


def train_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion: nn.Module,
               optimizer: torch.optim.Optimizer, accel: Accel, scaler: torch.amp.GradScaler | None,
               meter: RunningMeter) -> None:
    """Forward, backward and (unless the loss is not finite) an optimizer step on one batch."""
    with accel.autocast():
        logits = model(images)
        loss = criterion(logits.float(), targets)
    meter.update(loss.detach(), logits.detach(), targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # GradScaler skips steps whose gradients are not finite, on the device
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return
    loss.backward()
    if optimizer.defaults.get("fused"):
        # The fused kernel reads this flag on the device, as GradScaler uses it: no waiting for the loss.
        optimizer.found_inf = (~torch.isfinite(loss.detach())).float()
        optimizer.step()
        del optimizer.found_inf
    elif torch.isfinite(loss.detach()):  # waits for the device
        optimizer.step()


def check_readback(meter: RunningMeter, first: int, last: int) -> None:
    """Read the running sums; raise :class:`NonFiniteLossError` for batches ``first``..``last`` when a loss
    among them was not finite."""
    seen = meter.nonfinite_seen
    meter.read()
    if meter.nonfinite_seen > seen:
        raise NonFiniteLossError(first, last, meter.bad_value)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    criterion: nn.Module,
    accel: Accel,
    description: str = "val",
    show_progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` on labeled ``batches``: mean loss, accuracy, and all predictions with their targets."""
    model.eval()
    meter = RunningMeter(accel.device)
    predictions, targets_seen = [], []
    started = time.perf_counter()
    for batch in tqdm(batches, desc=description, leave=False, disable=not show_progress, dynamic_ncols=True):
        if batch.targets is None:
            continue
        with accel.autocast():
            logits = model(batch.images)
        meter.update(criterion(logits.float(), batch.targets), logits, batch.targets)
        predictions.append(logits.argmax(dim=1))
        targets_seen.append(batch.targets)
    meter.read()
    empty = torch.empty(0, dtype=torch.long)
    return EvalResult(
        loss=meter.loss,
        accuracy=meter.accuracy,
        images=meter.count,
        seconds=time.perf_counter() - started,
        predictions=torch.cat(predictions).cpu() if predictions else empty,
        targets=torch.cat(targets_seen).cpu() if targets_seen else empty,
    )


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module, batches: Iterable, num_images: int, accel: Accel, show_progress: bool = True
) -> tuple[torch.Tensor, dict[int, str]]:
    """Softmax probabilities ``[num_images, classes]`` in dataset order (zero rows for images that failed to
    decode), and why each position that failed to decode did (in position order)."""
    model.eval()
    parts: list[tuple[list[int], torch.Tensor]] = []
    failed: dict[int, str] = {}
    for batch in tqdm(batches, desc="predict", leave=False, disable=not show_progress, dynamic_ncols=True):
        failed.update((failure.position, failure.reason) for failure in batch.failed)
        if batch.images is None:
            continue
        with accel.autocast():
            logits = model(batch.images)
        parts.append((batch.positions, logits.float().softmax(dim=1)))
    if not parts:
        return torch.zeros(num_images, 0), dict(sorted(failed.items()))
    positions = [position for batch_positions, _ in parts for position in batch_positions]
    values = torch.cat([probabilities for _, probabilities in parts]).cpu()
    probabilities = torch.zeros(num_images, values.shape[1])
    probabilities[positions] = values
    return probabilities, dict(sorted(failed.items()))
