"""The learning rate, decided here alone: the schedule over the epochs (:func:`learning_rate`: warmup, then cosine),
and each parameter group's share of it.

The contract between the optimizer's parameter groups and the schedule: every group carries ``lr_mult`` (the new
head 1.0, the pretrained blocks ``--backbone-lr-mult``, blocks thawed by ``--unfreeze-at`` joining at it too), and
:func:`set_learning_rate` gives each group the epoch's rate times its ``lr_mult``. Groups are made only by
:func:`parameter_groups` and :func:`add_group`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from model import classifier_name

LR_MULT = "lr_mult"  # the key of a parameter group's multiplier of the epoch's learning rate


def learning_rate(base_lr: float, epoch: int, epochs: int, warmup_epochs: int = 0) -> float:
    """The learning rate of an epoch: a linear warmup over ``warmup_epochs`` (epoch k gets ``base_lr * k / (W+1)``),
    then cosine annealing from ``base_lr`` towards 0 over the remaining epochs, as CosineAnnealingLR.

    A closed form of the epoch rather than a stateful scheduler, so a resumed run, or one whose --epochs was
    extended, gets exactly the rate a run started with those epochs would have had.
    """
    if epoch <= warmup_epochs:
        return base_lr * epoch / (warmup_epochs + 1)
    return base_lr * (1 + math.cos(math.pi * (epoch - warmup_epochs - 1) / (epochs - warmup_epochs))) / 2


def parameter_groups(model: nn.Module, backbone_lr_mult: float) -> list[dict[str, Any]]:
    """The trainable parameters in parameter groups: the new head's at ``lr_mult`` 1.0 and the pretrained blocks' at
    ``backbone_lr_mult`` (one group when that is 1.0); empty groups are left out."""
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    if backbone_lr_mult == 1.0:
        return [{"params": [parameter for _, parameter in trainable], LR_MULT: 1.0}]
    head = classifier_name(model)
    groups = [{"params": [p for name, p in trainable if name.startswith(head + ".")], LR_MULT: 1.0},
              {"params": [p for name, p in trainable if not name.startswith(head + ".")], LR_MULT: backbone_lr_mult}]
    return [group for group in groups if group["params"]]


def add_group(optimizer: torch.optim.Optimizer, parameters: list[nn.Parameter], lr_mult: float) -> None:
    """Let ``parameters`` (blocks thawed by --unfreeze-at) join ``optimizer`` as a group at ``lr_mult``."""
    if parameters:
        optimizer.add_param_group({"params": parameters, LR_MULT: lr_mult})


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group the epoch's rate ``lr`` times its ``lr_mult``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get(LR_MULT, 1.0)  # absent: a group restored from an older last.pt, at 1.0
