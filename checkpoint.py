"""Checkpoints: one self-sufficient file (weights, class names, preprocessing, config) written and read safely."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import model_from_config
from utils import UserError, atomic_torch_save

CHECKPOINT_FORMAT = "imagefolder-resnet-checkpoint/1"
REQUIRED_KEYS = ("format", "model", "arch", "class_names", "img_size", "mean", "std", "config")


def make_checkpoint(  # noqa: PLR0913
    model: nn.Module,
    class_names: list[str],
    config: dict[str, Any],
    epoch: int,
    metrics: dict[str, float],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    held_out: list[str] | None = None,
    runtime: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything prediction needs, as tensors and plain Python values only (loadable with ``weights_only=True``).

    ``held_out`` is the list of validation images split off train/ (see ``dataset.TrainValData``); ``runtime``
    records what the options resolved to on the machine that trained (device, precision, workers, versions).
    The ``temperature`` comes later, from :func:`store_temperature` at the end of training.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "arch": config["arch"],
        "class_names": list(class_names),
        "img_size": int(config["img_size"]),
        "test_size": int(config.get("test_size") or config["img_size"]),
        "mean": [float(value) for value in mean],
        "std": [float(value) for value in std],
        "config": dict(config),
        "epoch": int(epoch),
        "metrics": {key: float(value) for key, value in metrics.items()},
        "held_out_val_files": None if held_out is None else list(held_out),
        "runtime": dict(runtime or {}),
    }


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write a checkpoint atomically: a crash mid-write leaves the previous file intact."""
    atomic_torch_save(checkpoint, path)


def store_temperature(checkpoint: dict[str, Any], path: str | Path, temperature: float) -> dict[str, Any]:
    """Write ``checkpoint`` to ``path`` (atomically) with its ``temperature``: a float that readers divide its
    logits by before the softmax (``calibration.temperature_of``: 1.0 when absent). Returns the checkpoint written."""
    calibrated = {**checkpoint, "temperature": float(temperature)}
    save_checkpoint(calibrated, path)
    return calibrated


def load_checkpoint(path: str | Path, flag: str = "--checkpoint", file_in_folder: str = "best.pt") -> dict[str, Any]:
    """Read one of our checkpoints safely (``weights_only=True``); anything else is a :class:`UserError`.

    A run folder stands for its ``file_in_folder``. ``flag`` is the option errors name.
    """
    path = Path(path)
    if path.is_dir():
        path = path / file_in_folder
        if not path.is_file():
            others = sorted(other.name for other in path.parent.glob("*.pt"))
            hint = f" (it holds {', '.join(others)}: pass {path.parent / others[0]})" if others else ""
            raise UserError(f"{flag} {path.parent}: a folder without {file_in_folder}{hint}; pass a run's output "
                            "folder or a checkpoint file written by train.py")
        print(f"{flag}: using {path}")
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found; train first (python train.py) or pass the right path")
    checkpoint = _read_safely(path, flag)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{flag} {path}: not a checkpoint written by this project's train.py")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise UserError(f"{flag} {path}: incomplete checkpoint, missing {', '.join(missing)}")
    return checkpoint


def _read_safely(path: Path, flag: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # every failure means the file is not a checkpoint we can trust
        raise UserError(f"{flag} {path}: {_why_unreadable(path, error, flag)}") from None


def _why_unreadable(path: Path, error: Exception, flag: str) -> str:
    if "GLOBAL" in str(error):  # the weights-only unpickler met an object it refuses to build
        return ("holds Python objects that are unsafe to load (a checkpoint of this project holds only tensors and "
                "plain values); refusing to read it")
    with path.open("rb") as handle:
        if handle.read(64).startswith(b"version https://git-lfs"):
            return "a Git LFS pointer, not the file itself; fetch it with git lfs pull"
    instead = "another copy of it" if flag == "--resume" else "another copy, or the run's last.pt or best.pt"
    return f"truncated or corrupt, or not a checkpoint of this project at all; use {instead}"


def eval_size(checkpoint: dict[str, Any]) -> int:
    """The size evaluation and prediction use for a checkpoint: its ``--test-size`` (older ones: the training size)."""
    return int(checkpoint.get("test_size") or checkpoint["img_size"])


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the network a checkpoint was saved from and load its weights (on the CPU, in eval mode)."""
    model = model_from_config(checkpoint["config"], num_classes=len(checkpoint["class_names"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval()
