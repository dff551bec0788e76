"""Speed settings (accel.py) and the speed-related model changes: mixed precision choice, the loss scaler, the
frozen trunk run without autograd, FrozenBatchNorm, the architecture table, GPU augmentation and --compile.

No test needs a GPU: device types and hardware answers are monkeypatched, and the staged (GPU augmentation)
training path runs on the CPU.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import accel
import device_decode
import train
from accel import Accel, make_grad_scaler, maybe_compile, resolve_amp
from checkpoint import load_checkpoint
from conftest import TINY_TRAIN_FLAGS, ColourData, call_main, read_csv_rows
from model import SUPPORTED_ARCHS, FrozenBatchNorm, build_model, freeze_blocks, parse_trainable
from utils import UserError

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


# --------------------------------------------------------------------------- --amp


@pytest.fixture
def hardware(monkeypatch: pytest.MonkeyPatch):
    """Set what the GPU and the CPU answer about bfloat16: ``hardware(cuda_bf16=..., cpu_bf16=...)``. The GPU is
    an A100 (compute capability 8.0) with ``cuda_bf16``, else a T4 (7.5); both say yes to
    ``torch.cuda.is_bf16_supported()``, as a T4 does by counting emulation."""

    def set_hardware(cuda_bf16: bool = False, cpu_bf16: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda *args, **kwargs: (8, 0) if cuda_bf16 else (7, 5))
        monkeypatch.setattr(accel, "cpu_has_native_bf16", lambda: cpu_bf16)

    return set_hardware


def test_auto_picks_bf16_on_a_bf16_gpu(hardware) -> None:
    hardware(cuda_bf16=True)
    assert resolve_amp("auto", CUDA) is torch.bfloat16


def test_auto_picks_fp16_on_an_older_gpu(hardware) -> None:
    hardware(cuda_bf16=False)
    assert resolve_amp("auto", CUDA) is torch.float16


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
@pytest.mark.parametrize("capability, dtype, scaled", [
    ((7, 5), torch.float16, True),   # T4 (Colab's free GPU): bf16 only emulated
    ((7, 0), torch.float16, True),   # V100
    ((8, 0), torch.bfloat16, False),  # A100
    ((8, 9), torch.bfloat16, False),  # L4
    ((9, 0), torch.bfloat16, False),  # H100
])
def test_auto_takes_bf16_only_where_the_gpu_computes_it(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int],
                                                        dtype: torch.dtype, scaled: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # emulation counted
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: capability)
    chosen = resolve_amp("auto", CUDA)
    assert chosen is dtype
    assert (accel.make_grad_scaler(accel.Accel(CUDA, chosen)) is not None) is scaled


def test_auto_on_a_cpu_is_bf16_only_where_it_is_native(hardware) -> None:
    hardware(cpu_bf16=True)
    assert resolve_amp("auto", CPU) is torch.bfloat16
    hardware(cpu_bf16=False)
    assert resolve_amp("auto", CPU) is None


def test_auto_on_mps_is_full_precision(hardware) -> None:
    hardware(cuda_bf16=True, cpu_bf16=True)
    assert resolve_amp("auto", MPS) is None


@pytest.mark.parametrize("device", [CPU, CUDA, MPS])
def test_off_is_full_precision_everywhere(hardware, device: torch.device) -> None:
    hardware(cuda_bf16=True, cpu_bf16=True)
    assert resolve_amp("off", device) is None


def test_explicit_choices_where_the_hardware_has_them(hardware) -> None:
    hardware(cuda_bf16=True, cpu_bf16=True)
    assert resolve_amp("bf16", CUDA) is torch.bfloat16
    assert resolve_amp("fp16", CUDA) is torch.float16
    assert resolve_amp("bf16", CPU) is torch.bfloat16


def test_explicit_bf16_on_a_cpu_without_it_runs_emulated_with_a_warning(hardware, capsys) -> None:
    hardware(cpu_bf16=False)
    assert resolve_amp("bf16", CPU) is torch.bfloat16
    assert "--amp bf16: this CPU has no native bfloat16, so it is emulated" in capsys.readouterr().err
    assert resolve_amp("auto", CPU) is None


@pytest.mark.parametrize("request_, device, fragment", [
    ("bf16", CUDA, "no native bfloat16"),
    ("bf16", MPS, "no native bfloat16"),
    ("fp16", CPU, "needs a CUDA GPU"),
    ("fp16", MPS, "needs a CUDA GPU"),
    ("fp8", CPU, "expected one of"),
])
def test_impossible_precisions_are_user_errors(hardware, request_: str, device: torch.device, fragment: str) -> None:
    hardware(cuda_bf16=False, cpu_bf16=False)
    with pytest.raises(UserError, match=f"--amp {request_}") as error:
        resolve_amp(request_, device)
    assert fragment in str(error.value)


@pytest.mark.parametrize("flags, native", [
    ({"fpu", "avx2", "avx512f", "avx512_bf16"}, True),
    ({"fpu", "avx2", "amx_bf16", "amx_tile"}, True),
    ({"fpu", "avx2", "avx512f", "avx512_vnni"}, False),  # AVX-512 alone emulates bf16: slower than fp32
])
def test_cpu_bf16_is_read_from_the_cpuinfo_flags(monkeypatch: pytest.MonkeyPatch, flags: set[str],
                                                 native: bool) -> None:
    monkeypatch.setattr(accel, "_cpu_flags", lambda: set(flags))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: not native, raising=False)
    assert accel.cpu_has_native_bf16() is native


@pytest.mark.parametrize("onednn_answer", [True, False])
def test_without_cpuinfo_flags_onednn_is_asked(monkeypatch: pytest.MonkeyPatch, onednn_answer: bool) -> None:
    monkeypatch.setattr(accel, "_cpu_flags", lambda: set())
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_answer, raising=False)
    assert accel.cpu_has_native_bf16() is onednn_answer


def test_without_cpuinfo_flags_a_failing_onednn_query_means_no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> bool:
        raise RuntimeError("no such operator")

    monkeypatch.setattr(accel, "_cpu_flags", lambda: set())
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", broken, raising=False)
    assert accel.cpu_has_native_bf16() is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"),
                    reason="x86 Linux /proc/cpuinfo has a flags line")
def test_cpu_flags_come_from_proc_cpuinfo() -> None:
    flags = accel._cpu_flags()
    assert flags and all(isinstance(flag, str) and " " not in flag for flag in flags)
    assert "fpu" in flags


# --------------------------------------------------------------------------- loss scaler


def test_grad_scaler_only_for_fp16() -> None:
    assert isinstance(make_grad_scaler(Accel(CPU, torch.float16)), torch.amp.GradScaler)
    assert make_grad_scaler(Accel(CPU, torch.bfloat16)) is None
    assert make_grad_scaler(Accel(CPU, None)) is None


def test_precision_names() -> None:
    assert [Accel(CPU, dtype).precision_name for dtype in (torch.bfloat16, torch.float16, None)] == [
        "bf16", "fp16", "fp32"]


# --------------------------------------------------------------------------- the frozen trunk without autograd


@pytest.mark.parametrize("trainable, first_trained", [("layer4,fc", "layer4"), ("layer3,layer4,fc", "layer3"),
                                                      ("fc", "fc")])
def test_autograd_records_only_the_trainable_tail(trainable: str, first_trained: str) -> None:
    """Frozen parameters and an input without grad record no graph: the trunk keeps no activations for backward,
    with no forward of our own (the model is torchvision's ResNet)."""
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=5, weights="none", dropout=0.0)
    freeze_blocks(model, parse_trainable(trainable))
    seen: list[bool] = []
    model.get_submodule(first_trained).register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].requires_grad))

    logits = model.train()(torch.randn(2, 3, 32, 32))

    assert seen == [False]  # what reaches the first trained block carries no graph
    assert logits.requires_grad  # the tail is recorded


# --------------------------------------------------------------------------- FrozenBatchNorm


def trained_frozen_model() -> nn.Module:
    """A resnet18 frozen as --trainable layer4,fc and trained for one step, so its state is not the initial one."""
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, weights="none", dropout=0.2)
    freeze_blocks(model, parse_trainable("layer4,fc"))
    model.train()
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-3)
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    return model


def test_frozen_batchnorm_stays_in_eval_mode_after_train() -> None:
    model = trained_frozen_model()
    model.train()

    frozen = [module for module in model.modules() if isinstance(module, FrozenBatchNorm)]
    trainable = [module for module in model.modules()
                 if isinstance(module, nn.BatchNorm2d) and not isinstance(module, FrozenBatchNorm)]
    assert frozen and trainable
    assert not any(module.training for module in frozen)
    assert all(module.training for module in trainable)
    assert all(isinstance(module, FrozenBatchNorm) for module in model.layer3.modules()
               if isinstance(module, nn.BatchNorm2d))
    assert not any(isinstance(module, FrozenBatchNorm) for module in model.layer4.modules())


def test_frozen_model_state_dict_loads_strictly_into_plain_torchvision() -> None:
    model = trained_frozen_model()
    state = model.state_dict()
    reference = torchvision.models.resnet18(weights=None)
    reference.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(reference.fc.in_features, 3))

    assert list(state) == list(reference.state_dict())  # same keys, same order (num_batches_tracked included)
    reference.load_state_dict(state, strict=True)

    model.eval(), reference.eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), reference(images))


# --------------------------------------------------------------------------- the architecture table


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_supported_archs_are_torchvisions_networks_with_our_head(arch: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        ours = build_model(arch, num_classes=3, weights="none").state_dict()
        theirs = torchvision.models.get_model(arch, weights=None, num_classes=3).state_dict()
    renamed = {key.replace("fc.1.", "fc.") if key.startswith("fc.1.") else key: value for key, value in ours.items()}
    assert [(key, value.shape) for key, value in renamed.items()] == \
        [(key, value.shape) for key, value in theirs.items()]


# --------------------------------------------------------------------------- --augment-device


def test_resolve_augment_device() -> None:
    assert accel.choose_data_path("auto", CUDA) == "gpu"
    assert accel.choose_data_path("auto", CPU) == "cpu"
    assert accel.choose_data_path("cpu", CUDA) == "cpu"
    assert accel.choose_data_path("gpu", CUDA) == "gpu"


def test_device_path_trains_on_the_cpu_and_decodes_only_in_the_first_epoch(
        small_data: ColourData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path (bytes read by the workers, decoded and augmented on the device) trains end to end on a CPU;
    with the decoded images cached (in RAM here: no GPU), the second epoch decodes nothing."""
    decoded: list[int] = []
    decode = device_decode.DeviceDecoder.__call__

    def counting_decode(self, items):
        result = decode(self, items)
        decoded.append(len(result[0]))
        return result

    monkeypatch.setattr(device_decode.DeviceDecoder, "__call__", counting_decode)
    output = tmp_path / "out"

    result = call_main(train.main, "--data-dir", small_data.root, "--output-dir", output, "--epochs", "2",
                       "--augment-device", "gpu", *TINY_TRAIN_FLAGS)

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "note: --augment-device gpu on a cpu run" in result.stdout
    assert "cache: ram (" in result.stdout
    # epoch 1: the 12 training and 3 validation images; epoch 2: none; then the final report of best.pt decodes the 3
    # validation images once more, on the path its validation took (the cache belongs to the training run)
    assert sum(decoded) == 12 + 3 + 3
    checkpoint = load_checkpoint(output / "best.pt")
    assert checkpoint.epoch in (1, 2) and len(read_csv_rows(output / "history.csv")) == 2
    assert all(torch.isfinite(value).all() for value in checkpoint.model.values() if value.is_floating_point())


# --------------------------------------------------------------------------- --compile


def test_compile_disabled_returns_the_model_itself() -> None:
    model = nn.Linear(2, 2)
    assert maybe_compile(model, False) is model


def test_compile_blocked_prints_a_note_and_returns_the_model(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(accel, "_compile_blocker", lambda: "no C++ compiler found")

    def must_not_compile(*args, **kwargs):
        raise AssertionError("torch.compile was called although a blocker was reported")

    monkeypatch.setattr(torch, "compile", must_not_compile)
    model = nn.Linear(2, 2)

    assert maybe_compile(model, True) is model
    assert "note: --compile ignored: no C++ compiler found" in capsys.readouterr().out


def test_compile_blocker_names_a_missing_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel.sys, "platform", "linux")
    monkeypatch.setattr(accel.shutil, "which", lambda name: None)
    assert "C++ compiler" in accel._compile_blocker()
    monkeypatch.setattr(accel.shutil, "which", lambda name: "/usr/bin/" + name)
    assert accel._compile_blocker() is None
