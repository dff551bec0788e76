"""lr_schedule.py: the learning rate of each epoch and each parameter group's share of it (``lr_mult``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lr_schedule
from model import build_model, freeze_blocks, thaw_blocks


def test_warmup_rises_linearly_then_the_cosine_spans_the_other_epochs() -> None:
    rates = [lr_schedule.learning_rate(1.0, epoch, 10, warmup_epochs=3) for epoch in range(1, 11)]
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # epoch k of 3 gets k/4, then the cosine starts at 1
    assert rates[4:] == pytest.approx([(1 + math.cos(math.pi * k / 7)) / 2 for k in range(1, 7)])
    assert [lr_schedule.learning_rate(1.0, epoch, 10) for epoch in range(1, 11)] == \
        pytest.approx([(1 + math.cos(math.pi * k / 10)) / 2 for k in range(10)])  # no warmup: as before


def test_an_extended_run_gets_the_rate_a_run_started_with_those_epochs_would_have() -> None:
    # A closed form of the epoch, not a stateful scheduler: resuming with --epochs raised re-stretches the cosine.
    assert lr_schedule.learning_rate(1.0, 5, 20) == pytest.approx((1 + math.cos(math.pi * 4 / 20)) / 2)
    assert lr_schedule.learning_rate(1.0, 1, 20, warmup_epochs=0) == 1.0


def small_resnet(trainable: list[str]) -> nn.Module:
    model = build_model("resnet18", num_classes=3, weights="none")
    freeze_blocks(model, trainable)
    return model


def test_every_group_carries_its_multiplier_of_the_epochs_rate() -> None:
    model = small_resnet(["layer4", "fc"])

    together = lr_schedule.parameter_groups(model, 1.0)
    apart = lr_schedule.parameter_groups(model, 0.1)

    assert [group[lr_schedule.LR_MULT] for group in together] == [1.0]
    assert [group[lr_schedule.LR_MULT] for group in apart] == [1.0, 0.1]  # the new head, then the pretrained blocks
    head = {id(parameter) for parameter in model.fc.parameters()}
    assert {id(parameter) for parameter in apart[0]["params"]} == head
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    assert sum(len(group["params"]) for group in apart) == len(trainable)  # every trainable parameter, once


def test_a_group_with_nothing_in_it_is_left_out() -> None:
    model = small_resnet(["fc"])  # only the head trains: no backbone group
    assert [group[lr_schedule.LR_MULT] for group in lr_schedule.parameter_groups(model, 0.1)] == [1.0]


def test_the_epochs_rate_reaches_each_group_times_its_multiplier_thawed_blocks_included() -> None:
    model = small_resnet(["layer4", "fc"])
    optimizer = torch.optim.SGD(lr_schedule.parameter_groups(model, 0.1), lr=1.0)
    lr_schedule.add_group(optimizer, thaw_blocks(model, ["layer3"]), 0.1)  # --unfreeze-at: they join at the mult

    lr_schedule.set_learning_rate(optimizer, 0.02)

    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.02, 0.002, 0.002])


def test_nothing_left_to_thaw_adds_no_group() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    lr_schedule.add_group(optimizer, [], 0.1)
    assert len(optimizer.param_groups) == 1


def test_a_group_restored_from_an_older_last_pt_without_a_multiplier_gets_the_whole_rate() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)  # a group without lr_mult, as old runs had
    lr_schedule.set_learning_rate(optimizer, 0.5)
    assert optimizer.param_groups[0]["lr"] == 0.5
