"""Classification metrics from predicted probabilities, in plain NumPy (scikit-learn is only a test dependency).

Conventions follow scikit-learn's defaults, so the numbers match what a notebook would print:
a ratio with a zero denominator (precision of a class never predicted, F1 of a class with neither
support nor predictions) is 0, and class-averaged scores skip classes absent from the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Probabilities are clamped here before the log, so a confidently wrong image costs at most ~87 nats
# instead of making the mean loss infinite.
_MIN_PROBABILITY = float(np.finfo(np.float32).tiny)


@dataclass
class ClassScores:
    """Per-class figures, each an array indexed by class."""

    support: np.ndarray  # true images of the class
    predicted: np.ndarray  # images predicted as the class
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Count matrix ``[true, predicted]`` of shape ``(num_classes, num_classes)``."""
    targets = np.asarray(targets, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    flat = np.bincount(targets * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ``numerator / denominator``, 0 where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=np.asarray(denominator) > 0)
    return out


def class_scores(confusion: np.ndarray) -> ClassScores:
    """Support, prediction count, precision, recall and F1 of every class of a confusion matrix."""
    confusion = np.asarray(confusion)
    hits = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = _ratio(hits, predicted)
    recall = _ratio(hits, support)
    f1 = _ratio(2 * hits, support + predicted)  # = 2PR / (P + R), and 0 where both are 0
    return ClassScores(support, predicted, precision, recall, f1)


def accuracy(confusion: np.ndarray) -> float:
    """Share of images whose predicted class is the true one."""
    confusion = np.asarray(confusion)
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else 0.0


def balanced_accuracy(confusion: np.ndarray) -> float:
    """Mean recall over the classes that have images (scikit-learn's ``balanced_accuracy_score``)."""
    scores = class_scores(confusion)
    present = scores.support > 0
    return float(scores.recall[present].mean()) if present.any() else 0.0


def macro_f1(confusion: np.ndarray) -> float:
    """Mean F1 over the classes that are true or predicted at least once (``f1_score(average='macro')``)."""
    scores = class_scores(confusion)
    seen = (scores.support > 0) | (scores.predicted > 0)
    return float(scores.f1[seen].mean()) if seen.any() else 0.0


def top_k_accuracy(probabilities: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the ``k`` most probable ones."""
    probabilities = np.asarray(probabilities)
    targets = np.asarray(targets)
    if len(targets) == 0:
        return 0.0
    k = min(k, probabilities.shape[1])
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return float((top == targets[:, None]).any(axis=1).mean())


def cross_entropy(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-probability of the true class (plain cross-entropy: no weights, no smoothing)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets)
    if len(targets) == 0:
        return 0.0
    true_probability = probabilities[np.arange(len(targets)), targets]
    return float(-np.log(np.maximum(true_probability, _MIN_PROBABILITY)).mean())


def most_confused_with(confusion: np.ndarray) -> list[tuple[int, float] | None]:
    """For each true class, the other class it is most often predicted as and that share of its images.

    ``None`` for a class with no mistakes (or no images). Ties go to the lower class index.
    """
    confusion = np.asarray(confusion)
    off_diagonal = confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    result: list[tuple[int, float] | None] = []
    for row, support in zip(off_diagonal, confusion.sum(axis=1)):
        other = int(row.argmax())
        result.append((other, float(row[other] / support)) if row[other] > 0 else None)
    return result


def top_confusions(confusion: np.ndarray, limit: int) -> list[tuple[int, int, int, float]]:
    """The ``limit`` largest off-diagonal cells as ``(true, predicted, count, share of the true class)``.

    Sorted by count, then by share (a mistake weighs more in a small class), then by class indices.
    """
    confusion = np.asarray(confusion)
    support = confusion.sum(axis=1)
    cells = [
        (true, predicted, int(count), float(count / support[true]))
        for (true, predicted), count in np.ndenumerate(confusion)
        if true != predicted and count > 0
    ]
    cells.sort(key=lambda cell: (-cell[2], -cell[3], cell[0], cell[1]))
    return cells[: max(limit, 0)]


def summary_metrics(probabilities: np.ndarray, targets: np.ndarray, top_k: int = 5) -> dict[str, float | int]:
    """The headline figures of an evaluation, as plain numbers ready for JSON.

    ``top_k`` is capped at the class count, and the value used is returned as ``top_k``.
    """
    probabilities = np.asarray(probabilities)
    targets = np.asarray(targets)
    num_classes = probabilities.shape[1]
    confusion = confusion_matrix(targets, probabilities.argmax(axis=1), num_classes)
    k = min(top_k, num_classes)
    return {
        "images": int(len(targets)),
        "accuracy": accuracy(confusion),
        "balanced_accuracy": balanced_accuracy(confusion),
        "macro_f1": macro_f1(confusion),
        "top_k": k,
        "top_k_accuracy": top_k_accuracy(probabilities, targets, k),
        "loss": cross_entropy(probabilities, targets),
    }
