"""losses.py: train.py's loss, built in one place; the job-wide version under torchrun is tested with the other
collectives in test_distributed.py and test_distributed_compat.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from common import World
from losses import GlobalCrossEntropy, balanced_class_weights, make_criterion

CPU = torch.device("cpu")


def test_balanced_class_weights_match_sklearn() -> None:
    counts = [60, 30, 12, 5, 1]
    labels = np.repeat(np.arange(len(counts)), counts)
    expected = compute_class_weight("balanced", classes=np.arange(len(counts)), y=labels)

    weights = balanced_class_weights(labels.tolist(), len(counts))

    assert weights.dtype == torch.float32
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)


def test_balanced_class_weights_give_empty_classes_zero() -> None:
    labels = np.repeat([0, 2], [10, 5])
    expected = compute_class_weight("balanced", classes=np.array([0, 2]), y=labels)

    weights = balanced_class_weights(labels, 3)

    assert weights[1] == 0
    np.testing.assert_allclose(weights[[0, 2]].numpy(), expected, rtol=1e-6)


def test_the_criterion_is_cross_entropy_with_balanced_weights_and_label_smoothing() -> None:
    labels = [0, 0, 0, 1]  # class 1 is rare: its images weigh 3 times class 0's
    logits, targets = torch.randn(6, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 1, 1, 0])

    criterion = make_criterion(labels, 2, "balanced", 0.05, CPU)

    expected = nn.CrossEntropyLoss(weight=torch.tensor([2 / 3, 2.0]), label_smoothing=0.05)(logits, targets)
    assert torch.allclose(criterion(logits, targets), expected)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_class_weights_none_is_plain_cross_entropy(label_smoothing: float) -> None:
    logits, targets = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 2, 1])

    criterion = make_criterion([0, 0, 0, 1, 2], 3, "none", label_smoothing, CPU)

    assert criterion.weight is None
    assert torch.equal(criterion(logits, targets), nn.functional.cross_entropy(logits, targets,
                                                                               label_smoothing=label_smoothing))


def test_one_process_gets_pytorchs_own_loss_and_torchrun_the_job_wide_one() -> None:
    assert type(make_criterion([0, 1], 2, "none", 0.0, CPU)) is nn.CrossEntropyLoss
    two_ranks = World(rank=0, local_rank=0, world_size=2, device=CPU)
    assert isinstance(make_criterion([0, 1], 2, "balanced", 0.0, CPU, two_ranks), GlobalCrossEntropy)
