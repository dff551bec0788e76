"""Speed settings for the machine at hand: mixed precision, memory format, torch.compile, memory figures."""

from __future__ import annotations

import contextlib
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from utils import UserError, cpu_info, pick_device

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class Accel:
    """How tensors meet the model: on which device, in which precision, in which memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = True

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to ``amp_dtype`` on this device, or a no-op in full precision."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        """Move a batch of images to the device, in the model's memory format."""
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device in the chosen memory format."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    @property
    def precision_name(self) -> str:
        """``bf16``, ``fp16`` or ``fp32``, for logs."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    flags = _cpu_flags()
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    with contextlib.suppress(Exception):  # no /proc/cpuinfo (macOS, Windows): ask oneDNN
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def cuda_has_native_bf16(device: torch.device) -> bool:
    """True when the GPU computes bfloat16 natively: compute capability 8.0 (Ampere) or newer. Not
    ``torch.cuda.is_bf16_supported()``, which also says yes where bf16 is only emulated (a T4 or a V100), where
    fp16 with a gradient scaler is several times faster."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def _cpu_flags() -> set[str]:
    return set(cpu_info().get("flags", "").split())


def resolve_amp(request: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp``: ``auto`` picks bf16 where the hardware has it, fp16 on older GPUs, else
    fp32."""
    if request not in AMP_CHOICES:
        raise UserError(f"--amp {request}: expected one of {', '.join(AMP_CHOICES)}")
    if request == "off":
        return None
    bf16_ok = _bf16_supported(device)
    if request == "auto":
        if bf16_ok:
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else None
    if request == "bf16":
        if bf16_ok:
            return torch.bfloat16
        if device.type == "cpu":  # oneDNN emulates it: same rounding as native bf16, so it checks bf16 numerics
            print("warning: --amp bf16: this CPU has no native bfloat16, so it is emulated and several times slower "
                  "than fp32 (--amp auto picks fp32 here)", file=sys.stderr)
            return torch.bfloat16
        raise UserError(f"--amp bf16: this {device.type} has no native bfloat16; use --amp auto, fp16 or off")
    if device.type != "cuda":
        raise UserError(f"--amp fp16: needs a CUDA GPU (this run uses {device.type}); use --amp auto or off")
    return torch.float16


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return cuda_has_native_bf16(device)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def set_up_accel(device_name: str, amp: str, channels_last: bool = True) -> Accel:
    """The device for ``--device``, its precision for ``--amp``, and that device's backends configured."""
    device = pick_device(device_name)
    return configured(Accel(device, resolve_amp(amp, device), channels_last))


def configured(accel: Accel) -> Accel:
    """``accel``, with its device's backends configured (TF32 on CUDA, cuDNN's autotuner); returned."""
    configure_backends(accel.device)
    return accel


def choose_data_path(request: str, device: torch.device) -> str:
    """Which path decodes and augments (``gpu`` or ``cpu``), for train.py, predict.py and evaluate.py alike:
    ``auto`` decodes and augments on the GPU when training on CUDA, else on the CPU in the
    loader workers. ``gpu`` on another device runs that path there (batched in the main process: slower than the
    workers on a CPU, but the same code as on a GPU), with a note."""
    if request == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    if request == "gpu" and device.type != "cuda":
        print(f"note: --augment-device gpu on a {device.type} run: images are decoded and augmented batched on the "
              f"{device.type} by the GPU path's code (slower than --augment-device cpu here)")
    return request


def make_grad_scaler(accel: Accel) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 training (bf16 and fp32 need none)."""
    if accel.amp_dtype is torch.float16:
        return torch.amp.GradScaler(accel.device.type)
    return None


def configure_backends(device: torch.device) -> None:
    """Let cuDNN pick the fastest kernels for our fixed input size, and allow TF32 matmuls on CUDA."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile`` the model when asked and possible; otherwise say why and return it unchanged."""
    if not enabled:
        return model
    reason = _compile_blocker()
    if reason:
        print(f"note: --compile ignored: {reason}")
        return model
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly instead of crashing
    print("compiling the model with torch.compile (the first batches are slow)")
    return torch.compile(model)


def _compile_blocker() -> str | None:
    if sys.platform == "win32":
        return "torch.compile is not supported on Windows here"
    if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return "no C++ compiler found (torch.compile's code generator needs one)"
    return None


def host_peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (DataLoader workers are forked copies and are not counted)."""
    try:
        import resource  # Unix only
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


@contextlib.contextmanager
def flagged_waits() -> Iterator[list[str]]:
    """Collect, as ``file:line``, each PyTorch operation on CUDA tensors that waits for the GPU inside the block
    (``torch.cuda.set_sync_debug_mode``); on a machine without CUDA the list stays empty."""
    places: list[str] = []
    if not torch.cuda.is_available():
        yield places
        return
    with warnings.catch_warnings(record=True) as flagged:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield places
        finally:
            torch.cuda.set_sync_debug_mode("default")
    places.extend(f"{warning.filename}:{warning.lineno}" for warning in flagged
                  if "synchronizing" in str(warning.message))


def device_peak_memory_mb(device: torch.device) -> float | None:
    """Peak GPU memory allocated by PyTorch on ``device`` (MiB), or None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1024 / 1024
