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


def make_checkpoint(
    model: nn.Module,
    class_names: list[str],
    config: dict[str, Any],
    epoch: int,
    metrics: dict[str, float],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, Any]:
    """Everything prediction needs, as tensors and plain Python values only (loadable with ``weights_only=True``)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "arch": config["arch"],
        "class_names": list(class_names),
        "img_size": int(config["img_size"]),
        "mean": [float(value) for value in mean],
        "std": [float(value) for value in std],
        "config": dict(config),
        "epoch": int(epoch),
        "metrics": {key: float(value) for key, value in metrics.items()},
    }


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write a checkpoint atomically: a crash mid-write leaves the previous file intact."""
    atomic_torch_save(checkpoint, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read one of our checkpoints safely (``weights_only=True``); anything else is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--checkpoint {path}: file not found; train first (python train.py) or pass the right path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every failure means the file is not a checkpoint we can trust
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(
            f"--checkpoint {path}: not a checkpoint of this project, or it holds objects that are unsafe to load "
            f"({first_line[:160]})"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"--checkpoint {path}: not a checkpoint written by this project's train.py")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise UserError(f"--checkpoint {path}: incomplete checkpoint, missing {', '.join(missing)}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the network a checkpoint was saved from and load its weights (on the CPU, in eval mode)."""
    model = model_from_config(checkpoint["config"], num_classes=len(checkpoint["class_names"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval()
