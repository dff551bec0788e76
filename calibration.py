"""Calibrated confidences: temperature scaling and the expected calibration error (Guo et al., 2017).

A network's softmax is usually over-confident. Temperature scaling divides every logit by one scalar ``T > 0``,
fitted on held-out predictions to minimize their negative log-likelihood; the predicted class never changes, only
how sure the probabilities are. train.py fits it on the validation split at the end of a run and stores it in
best.pt as ``checkpoint.temperature``; readers divide the logits by ``checkpoint.logit_temperature`` (1.0 for
checkpoints written before) before the softmax.

The expected calibration error (ECE) puts the images in ``bins`` equal-width bins of confidence (the top
probability, bin ``m`` holding ``((m-1)/bins, m/bins]``) and averages ``|accuracy - mean confidence|`` over the
bins, each weighted by its share of the images.

Logits are often not kept, only softmax probabilities: ``log p`` differs from the logits by one constant per image,
which the softmax cancels at any temperature (``softmax(log p / T) == softmax(z / T)``), so
:func:`log_probabilities` stands in for them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

ECE_BINS = 15
# Probabilities that underflowed to 0 in float32 are clamped here before the log (as metrics.cross_entropy does).
_MIN_PROBABILITY = float(torch.finfo(torch.float32).tiny)
# A fit that runs to these bounds found no finite optimum (when every held-out prediction is right, the likelihood
# keeps rising as T falls towards 0; when every one is wrong, as T grows): such a split supports no temperature.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
DEFAULT_TEMPERATURE = 1.0
# Below this many images the ECE over 15 bins moves by several points with small changes of T (a handful of
# images a bin), so its before/after comparison is flagged as noisy.
NOISY_ECE_BELOW = 1000


class ReliabilityBins(NamedTuple):
    """The confidence bins of a reliability diagram: ``edges`` (bins + 1 values from 0 to 1), and per bin the image
    count, the accuracy and the mean confidence (NaN where a bin is empty)."""

    edges: np.ndarray
    counts: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray


def log_probabilities(probabilities: np.ndarray | Tensor) -> Tensor:
    """``log p`` in float64, zeros clamped to the smallest float32: logits up to a per-image constant."""
    probabilities = torch.as_tensor(np.asarray(probabilities), dtype=torch.float64)
    return probabilities.clamp_min(_MIN_PROBABILITY).log()


def apply_temperature(probabilities: np.ndarray | Tensor, temperature: float) -> np.ndarray:
    """The probabilities a model would have given with its logits divided by ``temperature``."""
    return torch.softmax(log_probabilities(probabilities) / temperature, dim=1).numpy()


def fit_temperature(logits: np.ndarray | Tensor, targets: np.ndarray | Tensor) -> float:
    """The temperature ``T`` that minimizes the mean negative log-likelihood of ``softmax(logits / T)``, or 1.0
    where the images support none (no images; a fit that runs to a bound, as when every prediction is right)."""
    fitted = supported_temperature(logits, targets)
    return DEFAULT_TEMPERATURE if fitted is None else fitted


def supported_temperature(logits: np.ndarray | Tensor, targets: np.ndarray | Tensor) -> float | None:
    """The NLL-minimizing temperature, or None when there is no finite one inside ``(MIN_TEMPERATURE,
    MAX_TEMPERATURE)`` (no images, every prediction right or every one wrong, non-finite inputs).

    L-BFGS on ``log T`` (so ``T`` stays positive), in float64 on the CPU: the same inputs give the same ``T``.
    ``logits`` may be log-probabilities (see :func:`log_probabilities`).
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    right = (logits.argmax(dim=1) == targets).sum() if len(targets) else 0
    if right in (0, len(targets)):  # all right (or all wrong): the likelihood keeps rising towards T = 0 (or infinity)
        return None
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=1.0, max_iter=200, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_temperature.detach().exp())
    return temperature if MIN_TEMPERATURE < temperature < MAX_TEMPERATURE else None  # NaN fails too


def reliability_bins(probabilities: np.ndarray | Tensor, targets: np.ndarray | Tensor,
                     bins: int = ECE_BINS) -> ReliabilityBins:
    """Accuracy and mean confidence of the images in each of ``bins`` equal-width bins of their top probability."""
    probabilities = torch.as_tensor(np.asarray(probabilities), dtype=torch.float64)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    if len(targets) == 0:
        empty = np.full(bins, np.nan)
        return ReliabilityBins(edges.numpy(), np.zeros(bins, dtype=np.int64), empty, empty.copy())
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == targets).double()
    # bucketize with right=False puts x in bin i when edges[i] < x <= edges[i + 1]: the bins (lo, hi] of Guo et al.
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    counts = torch.bincount(index, minlength=bins).double()
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = (torch.bincount(index, weights=correct, minlength=bins) / counts).numpy()
        mean_confidence = (torch.bincount(index, weights=confidence, minlength=bins) / counts).numpy()
    return ReliabilityBins(edges.numpy(), counts.numpy().astype(np.int64), accuracy, mean_confidence)


def calibration_error(bins: ReliabilityBins) -> float:
    """The ECE of reliability bins: ``sum over bins of count / total * |accuracy - confidence|`` (0 when empty)."""
    total = bins.counts.sum()
    if total == 0:
        return 0.0
    filled = bins.counts > 0
    gaps = np.abs(bins.accuracy[filled] - bins.confidence[filled])
    return float((bins.counts[filled] / total * gaps).sum())


def expected_calibration_error(probabilities: np.ndarray | Tensor, targets: np.ndarray | Tensor,
                               bins: int = ECE_BINS) -> float:
    """The expected calibration error of softmax ``probabilities`` [images, classes] against class ``targets``."""
    return calibration_error(reliability_bins(probabilities, targets, bins))


def calibration_metrics(probabilities: np.ndarray, targets: np.ndarray, temperature: float) -> dict[str, float]:
    """``ece`` of the probabilities as given, ``ece_calibrated`` after ``temperature``, and ``temperature``, for
    metrics.json."""
    calibrated = probabilities if temperature == DEFAULT_TEMPERATURE else apply_temperature(probabilities, temperature)
    return {"ece": expected_calibration_error(probabilities, targets),
            "ece_calibrated": expected_calibration_error(calibrated, targets), "temperature": float(temperature)}
