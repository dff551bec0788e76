"""The loop: one training epoch, one evaluation pass, and batched prediction.

The loops consume ``common.Batch`` es, whose images are already on the device. They never wait for the device
batch by batch: losses, correct counts and predictions are summed and kept on the device, and read back every
:func:`readback_interval` batches (for the progress bar and the check for a non-finite loss) and at the end.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import metrics
from accel import Accel
from common import Batch, DecodeFailure, Mixed
from utils import progress_bar

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
    """An evaluation pass: mean loss, accuracy, image count, wall time, every prediction and target in order, and
    the images that failed to decode (left out)."""

    loss: float
    accuracy: float
    images: int
    seconds: float
    predictions: torch.Tensor
    targets: torch.Tensor
    failed: list[DecodeFailure] = field(default_factory=list)


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


def make_optimizer(parameters: list[nn.Parameter] | list[dict[str, Any]], lr: float, weight_decay: float,
                   device: torch.device, kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (or SGD with Nesterov momentum 0.9, as torchvision's reference scripts use) over ``parameters`` (a list,
    or param groups). On CUDA fused into one kernel, which is faster and can skip a step on the device when the loss
    is not finite (see :func:`optimizer_step`). Elsewhere PyTorch's default implementation: a CPU run waits for
    nothing by checking the loss on the host, and keeps the results it always had (the fused kernel rounds
    differently)."""
    fused = device.type == "cuda"
    if kind == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay, fused=fused)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused)


@dataclass
class StepOptions:
    """How training batches become optimizer steps: gradients accumulated over ``accum_steps`` batches, batches
    mixed by ``mix`` (``(images, targets, batch number) -> Mixed``, or None), ``after_step`` called after each
    optimizer step (the weight average's update), and ``all_finite`` turning this process's all-finite flag into
    the job's, so that every process skips the same steps."""

    accum_steps: int = 1
    mix: Callable[[torch.Tensor, torch.Tensor, int], Mixed] | None = None
    after_step: Callable[[], None] | None = None
    all_finite: Callable[[torch.Tensor], torch.Tensor] | None = None  # under torchrun: finite on every process
    # Under torchrun, the images a process trains on when every image of its batch failed to decode (an empty
    # batch of the input's shape): it still takes part in the step's collectives, or the others would wait for it.
    empty_images: Callable[[], torch.Tensor] | None = None


def train_one_epoch(  # noqa: PLR0913
    model: nn.Module,
    batches: Iterable,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    accel: Accel,
    scaler: torch.amp.GradScaler | None = None,
    description: str = "train",
    show_progress: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    options: StepOptions | None = None,
) -> EpochResult:
    """Train ``model`` for one pass over ``batches`` (``common.Batch`` es); returns mean loss and accuracy.

    Runs under ``accel``'s autocast; ``scaler`` (fp16 only) scales the loss so small gradients survive. ``options``:
    gradient accumulation, batch mixing, a hook after each step. An accumulation window with a NaN or infinite loss
    takes no optimizer step; the next readback raises :class:`NonFiniteLossError` naming the batches. The epoch is
    abandoned (``interrupted=True``) once ``should_stop()`` is true. Accuracy on mixed batches counts the label
    that dominates each image.
    """
    options = options or StepOptions()
    model.train()
    meter = RunningMeter(accel.device)
    interval = readback_interval(accel.device)
    started = time.perf_counter()
    total = len(batches) if hasattr(batches, "__len__") else None
    progress = progress_bar(batches, description, show_progress)
    failed: list[DecodeFailure] = []
    window = AccumulationWindow(accel.device)
    optimizer.zero_grad(set_to_none=True)
    last_read = batch_index = -1
    for batch_index, batch in enumerate(progress):
        failed.extend(batch.failed)
        if batch.targets is None and options.empty_images is not None:
            batch = empty_batch(options.empty_images(), accel.device)
        if batch.targets is not None:  # else every image of the batch failed to decode
            train_step(model, batch, batch_index, criterion, accel, scaler, meter, window, options)
        if window.batches and ((batch_index + 1) % options.accum_steps == 0 or batch_index + 1 == total):
            optimizer_step(optimizer, scaler, window, options)
        if (batch_index + 1) % interval == 0:
            check_readback(meter, last_read + 1, batch_index)
            last_read = batch_index
            progress.set_postfix(loss=f"{meter.loss:.3f}", acc=f"{meter.accuracy:.1%}", refresh=False)
        if should_stop():
            progress.close()
            check_readback(meter, last_read + 1, batch_index)
            return EpochResult(meter.loss, meter.accuracy, meter.count, time.perf_counter() - started, True, failed)
    if window.batches:  # an iterable without a length: the last window
        optimizer_step(optimizer, scaler, window, options)
    check_readback(meter, last_read + 1, batch_index)
    return EpochResult(meter.loss, meter.accuracy, meter.count, time.perf_counter() - started, False, failed)


def empty_batch(images: torch.Tensor, device: torch.device) -> Batch:
    """No image and no target: its forward and backward run every collective of a step and add nothing."""
    return Batch(images, torch.empty(0, dtype=torch.int64, device=device), [], [])


class AccumulationWindow:
    """The batches whose gradients the next optimizer step takes, and whether all their losses were finite (kept
    on the device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.batches = 0
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)

    def add(self, loss: torch.Tensor) -> None:
        """Count one batch of the window, with its loss."""
        self.batches += 1
        self.finite = self.finite & torch.isfinite(loss)


def train_step(model: nn.Module, batch: Any, batch_index: int, criterion: nn.Module, accel: Accel,  # noqa: PLR0913
               scaler: torch.amp.GradScaler | None, meter: RunningMeter, window: AccumulationWindow,
               options: StepOptions) -> None:
    """Forward and backward of one batch (mixed when ``options.mix``); the gradients add up until the step."""
    images, targets = batch.images, batch.targets
    mixed = options.mix(images, targets, batch_index) if options.mix is not None and len(targets) else None
    with accel.autocast():
        logits = model(mixed.images if mixed is not None else images)
        if mixed is None:
            loss = criterion(logits.float(), targets)
        else:  # each label set through the same weighted, smoothed loss: class weights apply as without mixing
            loss = mixed.lam * criterion(logits.float(), mixed.targets_a) + \
                (1 - mixed.lam) * criterion(logits.float(), mixed.targets_b)
    dominant = targets if mixed is None else (mixed.targets_a if mixed.lam >= 0.5 else mixed.targets_b)
    meter.update(loss.detach(), logits.detach(), dominant)
    window.add(loss.detach())
    scaled = loss / options.accum_steps
    (scaler.scale(scaled) if scaler is not None else scaled).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   window: AccumulationWindow, options: StepOptions) -> None:
    """Step with the window's gradients unless one of its losses was not finite; then clear them."""
    if options.all_finite is not None:
        window.finite = options.all_finite(window.finite)
    zero_missing_momentum(optimizer)  # fused SGD only
    if scaler is not None:  # GradScaler skips steps whose gradients are not finite, on the device
        scaler.step(optimizer)
        scaler.update()
    elif optimizer.defaults.get("fused"):
        # The fused kernel reads this flag on the device, as GradScaler uses it: no waiting for the loss.
        optimizer.found_inf = (~window.finite).float()
        optimizer.step()
        del optimizer.found_inf
    elif bool(window.finite):  # waits for the device (free on a CPU)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    window.reset()
    if options.after_step is not None:
        options.after_step()


def zero_missing_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give fused SGD a zero momentum buffer for each parameter that has none yet.

    Fused SGD's first step allocates its momentum buffers uninitialized and lets the kernel write them; when that
    step is skipped on the device (a non-finite loss, or an fp16 overflow, routine in the first steps) the
    buffers keep whatever the memory held, and the weights diverge from the next step on. A zero buffer gives the
    same first step (0 * momentum + gradient) and stays zero when the step is skipped.
    """
    if not isinstance(optimizer, torch.optim.SGD) or not optimizer.defaults.get("fused"):
        return
    for group in optimizer.param_groups:
        if not group["momentum"]:
            continue
        for parameter in group["params"]:
            state = optimizer.state[parameter]
            if parameter.grad is not None and state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)


class WeightAverage:
    """An exponential moving average of a model's weights and floating-point buffers (``--ema``), kept on the
    model's device: each update is one fused ``lerp`` with no copy to or from the host (torch's AveragedModel keeps
    its update count on the CPU, which costs two waits for the GPU a step). The first update copies the model;
    integer buffers (BatchNorm's batch counts) are copied, not averaged. ``module`` is the averaged network.

    The decay warms up (:meth:`current_decay`), so that early on the average follows the recent weights rather than
    the initial ones; it is computed on the host from ``updates``, which a resumed run restores."""

    def __init__(self, model: nn.Module, decay: float, updates: int = 0) -> None:
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.decay, self.updates = decay, updates
        self.averaged = self._tensors(self.module)  # load_state_dict copies in place: these stay the module's
        self.is_floating = [tensor.is_floating_point() for tensor in self.averaged]

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return [tensor.detach() for tensor in itertools.chain(model.parameters(), model.buffers())]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (the first update copies them)."""
        current = self._tensors(model)
        if self.updates == 0:
            torch._foreach_copy_(self.averaged, current)
        else:
            pairs = list(zip(self.averaged, current, self.is_floating, strict=True))
            torch._foreach_lerp_([kept for kept, _, floating in pairs if floating],
                                 [new for _, new, floating in pairs if floating], 1 - self.current_decay())
            for kept, new, floating in pairs:
                if not floating:
                    kept.copy_(new)
        self.updates += 1

    def current_decay(self) -> float:
        """The decay of the next update: ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the warm-up of
        TensorFlow's ExponentialMovingAverage and timm's ModelEma), a plain number: no wait for the device."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))


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
    failed: list[DecodeFailure] = []
    started = time.perf_counter()
    for batch in progress_bar(batches, description, show_progress):
        failed.extend(batch.failed)
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
        failed=failed,
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
    for batch in progress_bar(batches, "predict", show_progress):
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


def optimizer_steps(batches: int, accum_steps: int) -> int:
    """Optimizer steps in an epoch of ``batches`` batches, ``accum_steps`` to a step (a last partial window steps)."""
    return math.ceil(batches / accum_steps)


# An average with decay D spans about 1/(1-D) steps; fewer steps than a few spans, and it says little.
EMA_SPANS_NEEDED = 3


def warn_short_average(decay: float, steps_per_epoch: int, epochs: int) -> None:
    """Warn when --ema's average spans more optimizer steps than the run has to fill it a few times over."""
    steps, span = steps_per_epoch * epochs, 1 / (1 - decay)
    if steps >= EMA_SPANS_NEEDED * span:
        return
    fitting = math.floor((1 - EMA_SPANS_NEEDED / steps) * 1000) / 1000 if steps > EMA_SPANS_NEEDED else 0.0
    advice = f"--ema {fitting:g} or lower fits this run" if fitting >= 0.5 else "leave --ema off for this run"
    print(f"warning: --ema {decay:g} averages over about {span:,.0f} optimizer steps, but this run takes {steps} "
          f"({steps_per_epoch} an epoch x {epochs} epochs); its decay warms up, so the average stays close to the "
          f"latest weights and adds little: {advice}, or train longer")


def empty_input(img_size: int, accel: Accel) -> torch.Tensor:
    """A batch of no training image, for a process whose whole batch failed to decode (see ``StepOptions``)."""
    return accel.images_to_device(torch.empty(0, 3, img_size, img_size))


def make_ema(model: nn.Module, decay: float, saved: dict[str, torch.Tensor] | None = None,
             updates: int = 0) -> WeightAverage | None:
    """The exponential moving average of ``model``'s weights and buffers (None when ``decay`` is 0), restored from
    a resumed run's ``saved`` average after its ``updates``."""
    if not decay:
        return None
    ema = WeightAverage(model, decay)
    if saved is not None:
        ema.module.load_state_dict(saved)
        ema.updates = updates
    return ema


def balanced_accuracy(evaluated: EvalResult, num_classes: int) -> float:
    """Mean recall over the classes with validation images."""
    if not evaluated.images:
        return 0.0
    return metrics.balanced_accuracy(metrics.confusion_matrix(evaluated.targets.numpy(),
                                                              evaluated.predictions.numpy(), num_classes))


def monitored(evaluated: EvalResult, monitor: str, num_classes: int) -> float:
    """The value --monitor follows, higher is better (the loss negated)."""
    if monitor == "val_loss":
        return -evaluated.loss
    if monitor == "val_balanced_acc":
        return balanced_accuracy(evaluated, num_classes)
    return evaluated.accuracy


@dataclass
class Predictions:
    """What the model said about each decoded image of a labeled split, in sample order."""

    paths: list[str]
    targets: np.ndarray  # [n] true class indices
    probabilities: np.ndarray  # [n, classes] softmax probabilities
    failed: list[tuple[str, str]]  # (path, reason) of each file that could not be decoded, left out of the above

    @property
    def predicted(self) -> np.ndarray:
        """The most probable class of each image."""
        return self.probabilities.argmax(axis=1)


def predict_samples(model: nn.Module, batches: Iterable[Any], samples: Sequence[tuple[str, int]], accel: Accel,
                    show_progress: bool = True) -> Predictions:
    """``model`` over labeled ``samples`` (``batches``: theirs, in order, unlabeled); undecodable files set aside."""
    paths = [path for path, _ in samples]
    probabilities, reasons = predict_probabilities(model, batches, len(paths), accel, show_progress)
    keep = np.ones(len(paths), dtype=bool)
    keep[list(reasons)] = False
    return Predictions(
        paths=[path for path, kept in zip(paths, keep, strict=True) if kept],
        targets=np.asarray([label for _, label in samples], dtype=np.int64)[keep],
        probabilities=probabilities.numpy()[keep],
        failed=[(paths[position], reasons[position]) for position in sorted(reasons)],
    )
