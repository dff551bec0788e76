"""The CUDA-only code paths on a real GPU (skipped without one; the GPU check, benchmarks/gpu_check.sh, runs them
with ``pytest -k cuda``): nvJPEG decoding, the loop's steps without waiting for the GPU, fp16 with a gradient
scaler and fused SGD, the decoded-image cache, and the precision ``--amp auto`` picks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import common
import device_decode
import engine
import loader_items
import pipeline
from accel import Accel, flagged_waits, make_grad_scaler, resolve_amp
from model import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


@pytest.fixture
def jpegs(tmp_path: Path) -> list[str]:
    paths = []
    for index, (width, height) in enumerate([(120, 80), (64, 96), (200, 150), (48, 48)]):
        paths.append(str(tmp_path / f"{index}.jpg"))
        photo(width, height, index).save(paths[-1], quality=90)
    return paths


def flagged_syncs(work) -> list[str]:
    """Where our code waited for the GPU during ``work()`` (file:line of each). Only our files: a wait flagged in a
    thread without Python frames (measured on an H200: one, in the first pass only) is attributed to the line that
    set the debug mode, in torch/cuda/__init__.py."""
    with flagged_waits() as places:
        work()
    return [place for place in places if Path(place.rsplit(":", 1)[0]).is_relative_to(REPO_ROOT)]


def test_cuda_decoder_matches_the_cpu_decode(jpegs: list[str]) -> None:
    files = loader_items.FileBytes(jpegs, [0] * len(jpegs), None, 10**9)
    items = [files[index] for index in range(len(jpegs))]
    on_cuda, failed = device_decode.DeviceDecoder(CUDA, None, None)(items)
    on_cpu, _ = device_decode.DeviceDecoder(torch.device("cpu"), None, None)(items)
    assert not failed and len(on_cuda) == len(jpegs)
    for (_, gpu_image), (_, cpu_image) in zip(on_cuda, on_cpu, strict=True):
        assert gpu_image.device.type == "cuda" and gpu_image.shape == cpu_image.shape
        # nvJPEG and libjpeg-turbo upsample chroma differently: measured 4.8 levels on average on an H200 for
        # this noise (the paths' accuracy agrees: benchmarks/results.md)
        assert (gpu_image.cpu().float() - cpu_image.float()).abs().mean() < 8


def test_cuda_training_steps_wait_only_for_the_closing_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "readback_interval", lambda device: 100)
    accel = Accel(CUDA, torch.bfloat16, channels_last=True)
    model = accel.prepare_model(build_model("resnet18", 4, weights="none"))
    optimizer = engine.make_optimizer(list(model.parameters()), 1e-3, 1e-4, CUDA)
    average = engine.WeightAverage(model, 0.99)
    images = accel.images_to_device(torch.randn(8, 3, 64, 64))
    batches = [common.Batch(images, torch.randint(0, 4, (8,), device=CUDA), list(range(8)), [])] * 6
    options = engine.StepOptions(after_step=lambda: average.update(model))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.05)
    engine.train_one_epoch(model, batches, criterion, optimizer, accel, show_progress=False, options=options)
    syncs = flagged_syncs(lambda: engine.train_one_epoch(model, batches, criterion, optimizer, accel,
                                                         show_progress=False, options=options))
    assert len(syncs) <= 1 and average.updates == 12, syncs  # the closing read-back only


def test_cuda_fp16_overflow_skips_keep_fused_sgd_momentum_finite() -> None:
    accel = Accel(CUDA, resolve_amp("fp16", CUDA), channels_last=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).to(CUDA)
    optimizer = engine.make_optimizer(list(model.parameters()), 0.1, 0.0, CUDA, kind="sgd")
    scaler = make_grad_scaler(accel)
    scaler._init_scale = 2.0 ** 127  # the first steps overflow in fp16 and are skipped, as on a T4
    batches = [common.Batch(torch.randn(4, 3, 2, 2, device=CUDA) * 100, torch.tensor([0, 1, 2, 0], device=CUDA),
                              [0, 1, 2, 3], [])] * 8
    engine.train_one_epoch(model, batches, nn.CrossEntropyLoss(), optimizer, accel, scaler, show_progress=False)
    assert scaler.get_scale() < 2.0 ** 127  # some steps were skipped
    for state in optimizer.state.values():
        assert torch.isfinite(state["momentum_buffer"]).all()
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


def test_cuda_epoch_from_the_cache_equals_one_from_the_files(jpegs: list[str]) -> None:
    import cache

    accel = Accel(CUDA, None, channels_last=False)
    labels = [0, 1, 0, 1]
    store = pipeline.train_batches(jpegs, labels, 32, 2, 0, 0, accel, on_device=True,
                                   cache=cache.DecodedImages(len(jpegs), torch.device("cpu")))
    plain = pipeline.train_batches(jpegs, labels, 32, 2, 0, 0, accel, on_device=True)
    for batches in (store, plain):
        batches.set_epoch(1)
        list(batches)
    store.set_epoch(2)
    plain.set_epoch(2)
    for cached, fresh in zip(store, plain, strict=True):
        torch.testing.assert_close(cached.images, fresh.images)


def test_cuda_amp_auto_follows_the_compute_capability() -> None:
    major, _ = torch.cuda.get_device_capability(CUDA)
    assert resolve_amp("auto", CUDA) is (torch.bfloat16 if major >= 8 else torch.float16)


def test_cuda_empty_batch_runs_forward_and_backward_in_bf16() -> None:
    """Under torchrun a process whose whole batch failed to decode trains on an empty batch (engine.StepOptions):
    cuDNN's BatchNorm, channels_last and bf16 autocast take it, and nothing changes but the step count."""
    accel = Accel(CUDA, torch.bfloat16, channels_last=True)
    model = accel.prepare_model(build_model("resnet18", 4, weights="none"))
    optimizer = engine.make_optimizer(list(model.parameters()), 1e-3, 0.0, CUDA)
    running_mean = model.bn1.running_mean.clone()
    options = engine.StepOptions(empty_images=lambda: accel.images_to_device(torch.empty(0, 3, 64, 64)))
    result = engine.train_one_epoch(model, [common.Batch(None, None, [], [])], nn.CrossEntropyLoss(reduction="sum"),
                                    optimizer,
                                    accel, show_progress=False, options=options)
    assert result.images == 0 and torch.equal(model.bn1.running_mean, running_mean)
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
