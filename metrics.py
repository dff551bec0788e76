"""Classification metrics from predicted probabilities, computed with scikit-learn.

Conventions, so the numbers match what a notebook would print: a ratio with a zero denominator (precision
of a class never predicted) is 0, and the class-averaged scores - balanced accuracy and macro-F1 - both
average over the classes that have images in the evaluated split (see :func:`classes_with_images`), so a
class absent from the split counts in neither. Functions that take a confusion matrix hand it to
scikit-learn as weighted (true, predicted) pairs, one per non-empty cell, so they need at least one image.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

# Probabilities are clamped here before the log, so a confidently wrong image costs at most ~87 nats
# instead of making the mean loss infinite.
_MIN_PROBABILITY = float(np.finfo(np.float32).tiny)


def sklearn_metrics() -> ModuleType:
    """``sklearn.metrics``, imported on first use: importing scikit-learn takes about a second, which predict.py
    without labels, and a command refused at its first check, need not wait for."""
    from sklearn import metrics

    return metrics


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
    if len(targets) == 0 or num_classes == 1:
        # scikit-learn rejects empty input, and warns about any 1 x 1 matrix (predict.py may score a single label)
        return np.full((num_classes, num_classes), len(targets), dtype=np.int64)
    return sklearn_metrics().confusion_matrix(targets, predictions, labels=np.arange(num_classes))


def _weighted_labels(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The confusion matrix as ``(true, predicted, count)`` vectors, one entry per non-empty cell."""
    confusion = np.asarray(confusion)
    true, predicted = np.nonzero(confusion)
    return true, predicted, confusion[true, predicted]


def classes_with_images(confusion: np.ndarray) -> list[int]:
    """The classes with at least one true image: the ones balanced accuracy and macro-F1 average over."""
    return np.flatnonzero(np.asarray(confusion).sum(axis=1)).tolist()


def class_scores(confusion: np.ndarray) -> ClassScores:
    """Support, prediction count, precision, recall and F1 of every class of a confusion matrix."""
    confusion = np.asarray(confusion)
    true, predicted, count = _weighted_labels(confusion)
    precision, recall, f1, _ = sklearn_metrics().precision_recall_fscore_support(
        true, predicted, labels=np.arange(len(confusion)), sample_weight=count, zero_division=0)
    return ClassScores(confusion.sum(axis=1), confusion.sum(axis=0), precision, recall, f1)


def accuracy(confusion: np.ndarray) -> float:
    """Share of images whose predicted class is the true one."""
    true, predicted, count = _weighted_labels(confusion)
    return float(sklearn_metrics().accuracy_score(true, predicted, sample_weight=count))


def balanced_accuracy(confusion: np.ndarray) -> float:
    """Mean recall over the classes with images (scikit-learn's ``balanced_accuracy_score``)."""
    true, predicted, count = _weighted_labels(confusion)
    # recall_score with explicit labels, not balanced_accuracy_score: the same number, but the averaged classes
    # are spelled out as in macro_f1, and there is no warning when a class is predicted but never true.
    return float(sklearn_metrics().recall_score(true, predicted, labels=classes_with_images(confusion),
                                                average="macro", sample_weight=count))


def macro_f1(confusion: np.ndarray) -> float:
    """Mean F1 over the classes with images (not scikit-learn's default, which adds classes only predicted)."""
    true, predicted, count = _weighted_labels(confusion)
    return float(sklearn_metrics().f1_score(true, predicted, labels=classes_with_images(confusion), average="macro",
                                            sample_weight=count, zero_division=0))


def top_k_accuracy(probabilities: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the ``k`` most probable ones.

    Among equal probabilities, top-1 ranks the lower class index first (as the predicted class, the argmax, does);
    for larger ``k`` the figure is scikit-learn's, which ranks the higher index first.
    """
    probabilities = np.asarray(probabilities)
    num_classes = probabilities.shape[1]
    if k >= num_classes:
        return 1.0  # every class is in the top k (scikit-learn warns that such a score is meaningless)
    if k == 1:  # top-1 is plain accuracy; top_k_accuracy_score rejects the two-column scores of 2 classes
        return float(sklearn_metrics().accuracy_score(targets, probabilities.argmax(axis=1)))
    return float(sklearn_metrics().top_k_accuracy_score(targets, probabilities, k=k, labels=np.arange(num_classes)))


def cross_entropy(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-probability of the true class (plain cross-entropy: no weights, no smoothing).

    Not ``sklearn.metrics.log_loss``: it clips probabilities at the machine epsilon of their dtype, so with
    float32 softmax outputs a confidently wrong image costs at most ~16 nats, understating the loss that
    training logs from the logits. The clamp here, at the smallest float32, only acts where the softmax
    itself underflowed to 0.
    """
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
    for row, support in zip(off_diagonal, confusion.sum(axis=1), strict=True):
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
    """The headline figures of an evaluation of at least one image, as plain numbers ready for JSON.

    Top-``top_k`` accuracy (``top_k`` and ``top_k_accuracy``) is there only when ``top_k`` is below the class count:
    with that many guesses every class is among them, and the figure is always 100%.
    """
    probabilities = np.asarray(probabilities)
    targets = np.asarray(targets)
    num_classes = probabilities.shape[1]
    confusion = confusion_matrix(targets, probabilities.argmax(axis=1), num_classes)
    top = {"top_k": top_k, "top_k_accuracy": top_k_accuracy(probabilities, targets, top_k)} if top_k < num_classes \
        else {}
    return {
        "images": int(len(targets)),
        "accuracy": accuracy(confusion),
        "balanced_accuracy": balanced_accuracy(confusion),
        "macro_f1": macro_f1(confusion),
        **top,
        "loss": cross_entropy(probabilities, targets),
    }
