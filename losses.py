"""The training loss, built here alone: cross-entropy with ``--label-smoothing`` and, with ``--class-weights
balanced``, scikit-learn's 'balanced' class weights from the training split's labels; under torchrun the weighted mean
over the whole job's batch (:class:`GlobalCrossEntropy`), not a mean of each process's mean."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import SINGLE_PROCESS, World
from distributed import all_reduce_sum


def make_criterion(train_labels: Sequence[int], num_classes: int, class_weights: str, label_smoothing: float,
                   device: torch.device, world: World = SINGLE_PROCESS) -> nn.Module:
    """train.py's loss: cross-entropy with ``label_smoothing`` and, for ``class_weights`` ``balanced``, weights
    from the counts of ``train_labels`` (``none``: unweighted)."""
    weights = balanced_class_weights(train_labels, num_classes).to(device) if class_weights == "balanced" else None
    return cross_entropy(weights, label_smoothing, world)


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """scikit-learn's 'balanced' weights, ``n_samples / (n_classes * count)``, for class indices
    ``0..num_classes-1``; a class with no samples gets 0."""
    from sklearn.utils.class_weight import compute_class_weight  # here: the import takes a second (metrics.py)

    labels = np.asarray(labels)
    present = np.unique(labels)
    weights = np.zeros(num_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.tensor(weights, dtype=torch.float32)


def cross_entropy(weights: torch.Tensor | None, label_smoothing: float, world: World = SINGLE_PROCESS) -> nn.Module:
    """Cross-entropy with label smoothing and class ``weights`` (None: unweighted); under torchrun the weighted mean
    over every process's images, not a mean of each one's mean."""
    if world.distributed:
        return GlobalCrossEntropy(world, weights, label_smoothing)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)


def global_weighted_share(losses: torch.Tensor, global_weight_sum: torch.Tensor, world_size: int) -> torch.Tensor:
    """This rank's share of the global batch's weighted mean loss, scaled for DDP's averaging.

    ``losses`` are this rank's per-image weighted losses, ``global_weight_sum`` the sum over every rank's images of
    the target-class weight. Returns ``world_size * sum(losses) / global_weight_sum``: DDP divides the summed
    gradient by ``world_size``, which leaves the gradient of ``sum over all images / global_weight_sum``. A rank
    with no images (every one failed to decode) gets 0, and so does every rank when no rank has any.
    """
    return losses.sum() * world_size / global_weight_sum.clamp_min(torch.finfo(global_weight_sum.dtype).tiny)


class GlobalCrossEntropy(nn.Module):
    """``nn.CrossEntropyLoss(weight, label_smoothing)`` over the whole job's batch rather than this rank's part.

    PyTorch's weighted mean divides the summed per-image losses (label smoothing included) by the sum of the
    target classes' weights; here that sum is all-reduced over the ranks and the result scaled by
    :func:`global_weighted_share`. Summed over ranks and divided by ``world_size``, the values are the global
    batch's loss. With one process, or without gradients (evaluation, where ranks may run different numbers of
    batches), it is exactly ``nn.CrossEntropyLoss`` on the local batch and communicates nothing. A rank whose batch
    is empty still takes part in the all-reduce, with a loss of 0.
    """

    def __init__(self, world: World, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.world, self.label_smoothing = world, label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits`` against class indices ``targets``."""
        if not (self.world.distributed and torch.is_grad_enabled()):
            return F.cross_entropy(logits, targets, weight=self.weight, label_smoothing=self.label_smoothing)
        losses = F.cross_entropy(logits, targets, weight=self.weight, reduction="none",
                                 label_smoothing=self.label_smoothing)
        # torch.full fills on the device: no host-to-device copy, so no wait for the GPU at every step.
        weight_sum = (self.weight[targets].sum().to(losses.dtype) if self.weight is not None
                      else torch.full((), targets.numel(), dtype=losses.dtype, device=logits.device))
        return global_weighted_share(losses, all_reduce_sum(weight_sum, self.world), self.world.world_size)
