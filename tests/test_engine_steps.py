"""engine.py's optimizer steps as a GPU takes them: fused SGD after a skipped first step, and a process whose whole
batch failed to decode still taking part in every step. Run on the CPU with the CUDA code paths' settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import common
import engine
from accel import Accel
from model import build_model

CPU = Accel(torch.device("cpu"), channels_last=False)


def fused_sgd(model: nn.Module) -> torch.optim.SGD:
    """The optimizer ``make_optimizer`` builds for a CUDA run, on CPU tensors (fused SGD runs on the CPU too)."""
    return engine.make_optimizer(list(model.parameters()), 0.1, 0.0, torch.device("cuda"), kind="sgd")


def linear_batches(first_loss_nan: bool) -> list[common.Batch]:
    images = torch.randn(4, 3)
    first = images * float("nan") if first_loss_nan else images
    return [common.Batch(first, torch.tensor([0, 1, 0, 1]), [0, 1, 2, 3], []),
            common.Batch(images, torch.tensor([0, 1, 0, 1]), [0, 1, 2, 3], [])]


def test_fused_sgd_keeps_finite_momentum_after_a_skipped_first_step() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = fused_sgd(model)
    assert optimizer.defaults["fused"]
    window = engine.AccumulationWindow(CPU.device)
    for parameter in model.parameters():  # the first step's gradients are not finite: the step is skipped
        parameter.grad = torch.full_like(parameter, float("nan"))
    window.add(torch.tensor(float("nan")))
    engine.optimizer_step(optimizer, None, window, engine.StepOptions())

    for parameter in model.parameters():
        assert torch.equal(optimizer.state[parameter]["momentum_buffer"], torch.zeros_like(parameter))
        parameter.grad = torch.ones_like(parameter)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    window.add(torch.tensor(1.0))
    engine.optimizer_step(optimizer, None, window, engine.StepOptions())
    # Nesterov's first step from a zero buffer: buffer = g, update = lr * (g + 0.9 * g).
    for parameter, start in zip(model.parameters(), before, strict=True):
        assert torch.allclose(parameter, start - 0.1 * 1.9, atol=1e-6)


def test_fused_sgd_from_zero_buffers_takes_the_steps_plain_sgd_takes() -> None:
    results = []
    for device in (torch.device("cuda"), torch.device("cpu")):  # fused (CUDA's settings), then PyTorch's default
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        optimizer = engine.make_optimizer(list(model.parameters()), 0.1, 1e-4, device, kind="sgd")
        engine.train_one_epoch(model, linear_batches(first_loss_nan=False) * 3, nn.CrossEntropyLoss(), optimizer,
                               CPU, show_progress=False)
        results.append([parameter.detach() for parameter in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*results, strict=True))


def test_a_process_whose_batch_failed_still_takes_every_step() -> None:
    """Under torchrun a batch whose images all failed to decode runs an empty forward and backward, so the process
    reaches the gradient all-reduce and the step's all-finite collective like the others; it adds nothing."""
    torch.manual_seed(0)
    model = build_model("resnet18", 3, weights="none")
    optimizer = engine.make_optimizer(list(model.parameters()), 1e-3, 0.0, CPU.device)
    images = torch.randn(2, 3, 32, 32)
    empty = common.Batch(None, None, [], [])
    batches = [common.Batch(images, torch.tensor([0, 1]), [0, 1], []), empty, empty]
    collectives, forwards = [], []
    model.register_forward_hook(lambda module, inputs, output: forwards.append(inputs[0].shape[0]))
    options = engine.StepOptions(all_finite=lambda finite: collectives.append(finite) or finite,
                                 empty_images=lambda: torch.empty(0, 3, 32, 32))
    result = engine.train_one_epoch(model, batches, nn.CrossEntropyLoss(reduction="sum"), optimizer, CPU,
                                    show_progress=False, options=options)
    assert forwards == [2, 0, 0] and len(collectives) == 3
    assert result.images == 2 and all(bool(flag) for flag in collectives)
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


def test_a_single_process_skips_a_batch_that_failed_entirely() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    optimizer = engine.make_optimizer(list(model.parameters()), 1e-3, 0.0, CPU.device)
    steps = []
    batches = [common.Batch(None, None, [], [])]
    result = engine.train_one_epoch(model, batches, nn.CrossEntropyLoss(), optimizer, CPU, show_progress=False,
                                    options=engine.StepOptions(after_step=lambda: steps.append(1)))
    assert result.images == 0 and steps == []


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_cuda_runs_use_the_fused_kernels(kind: str) -> None:
    optimizer = engine.make_optimizer([nn.Parameter(torch.zeros(2))], 1e-3, 0.0, torch.device("cuda"), kind)
    assert optimizer.defaults["fused"]


def host_reads(work) -> int:
    """How many times ``work()`` reads a tensor's value back to the host (each one a wait for a GPU)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        work()
    return sum(event.count for event in profiler.key_averages() if event.key in ("aten::_local_scalar_dense",
                                                                                  "aten::item", "aten::is_nonzero"))


def warmed_up_ema(decay: float):
    """torch's EMA update with the warm-up ``WeightAverage`` applies: decay ``min(decay, (1 + n) / (10 + n))`` after
    ``n`` updates."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        n = int(updates)
        torch.optim.swa_utils.get_ema_multi_avg_fn(min(decay, (1 + n) / (10 + n)))(averaged, current, updates)

    return update


def test_the_weight_average_matches_torchs_and_never_reads_back() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    ours = engine.WeightAverage(model, 0.9)
    theirs = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=warmed_up_ema(0.9), use_buffers=True)
    reads = 0
    for _ in range(3):
        model(torch.randn(5, 3, 8, 8)).sum().backward()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter -= 0.1 * parameter.grad
        reads += host_reads(lambda: ours.update(model))
        theirs.update_parameters(model)
    assert reads == 0 and ours.updates == 3
    theirs_state = theirs.module.state_dict()
    for key, value in ours.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, theirs_state[key], rtol=1e-5, atol=1e-6)
    assert host_reads(lambda: theirs.update_parameters(model)) > 0  # what the average replaced
    assert not any(parameter.requires_grad for parameter in ours.module.parameters())
