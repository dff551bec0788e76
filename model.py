"""The network: a torchvision ResNet-family backbone with a ``Dropout + Linear`` head, pretrained weights, freezing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torchvision import models
from torchvision.ops.misc import FrozenBatchNorm2d

from utils import UserError

SUPPORTED_ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
BLOCK_NAMES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")
DEFAULT_TRAINABLE = "layer4,fc"


def build_model(arch: str, num_classes: int, weights: str = "imagenet", dropout: float = 0.2) -> nn.Module:
    """A ResNet-family network with pretrained trunk weights (``imagenet``, ``none`` or a file) and a new head."""
    if arch not in SUPPORTED_ARCHS:
        raise UserError(f"--arch {arch}: unknown architecture; choose one of {', '.join(SUPPORTED_ARCHS)}")
    if not 0 <= dropout < 1:
        raise UserError(f"--dropout {dropout}: must be in [0, 1)")
    model = models.get_model(arch, weights=None)
    if weights == "imagenet":
        model.load_state_dict(download_imagenet_weights(arch))
    model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_classes))
    if weights not in ("imagenet", "none"):
        load_weights_file(model, weights)
    return model


def download_imagenet_weights(arch: str) -> dict[str, torch.Tensor]:
    """The best torchvision ImageNet state dict for ``arch``, from the torch hub cache or downloaded into it."""
    weights = models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except OSError as error:  # urllib's URLError is an OSError: no network, DNS failure, HTTP error
        raise UserError(offline_weights_message(weights.url, error)) from None


def offline_weights_message(url: str, error: Exception) -> str:
    """The one-line explanation for a failed weights download: which file, where it goes, the alternatives."""
    file_name = os.path.basename(url)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (
        f"--weights imagenet: could not download {url} ({reason}); "
        f"copy {file_name} to {cache} ($TORCH_HOME/hub/checkpoints/), "
        "or use --weights none or --weights PATH"
    )


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a state dict or checkpoint file into ``model``; head weights that do not fit are dropped with a note."""
    state = read_state_dict(path)
    own = model.state_dict()
    unfit = [key for key, value in state.items() if key in own and own[key].shape != value.shape]
    head_aliases = [key for key in state if key.startswith("fc.") and key not in own]
    if unfit or head_aliases:
        dropped = sorted(set(unfit) | set(head_aliases))
        print(f"note: {path}: dropped {len(dropped)} head weight(s) that do not fit this model: {', '.join(dropped)}")
        state = {key: value for key, value in state.items() if key not in dropped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith("fc.") and not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"--weights {path}: does not match this architecture ({detail}); check --arch")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict inside a weights file: a plain state dict, or a checkpoint holding one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path}: file not found; use imagenet, none, or the path of a weights file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure here means "not a weights file we can read"
        raise UserError(f"--weights {path}: not a readable PyTorch weights file ({_first_line(error)})") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
            break
    if not isinstance(content, dict) or not all(isinstance(value, torch.Tensor) for value in content.values()):
        raise UserError(f"--weights {path}: holds no state dict of tensors")
    return {_strip_prefixes(key): value for key, value in content.items()}


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def parse_trainable(spec: str) -> list[str]:
    """Blocks named by ``--trainable`` (comma list, or ``all``), validated against :data:`BLOCK_NAMES`."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if names == ["all"]:
        return list(BLOCK_NAMES)
    unknown = [name for name in names if name not in BLOCK_NAMES]
    if unknown or not names:
        raise UserError(
            f"--trainable {spec}: {', '.join(unknown) or 'empty'} is not a block; "
            f"use 'all' or a comma list of {', '.join(BLOCK_NAMES)}"
        )
    return [name for name in BLOCK_NAMES if name in names]


def freeze_blocks(model: nn.Module, trainable: Iterable[str]) -> None:
    """Freeze every block not in ``trainable``: no gradients, and BatchNorm layers fixed to their running statistics.

    Frozen BatchNorm layers become ``FrozenBatchNorm2d``, so ``model.train()`` cannot move their statistics.
    """
    trainable = set(trainable)
    for name in BLOCK_NAMES:
        if name in trainable:
            continue
        block = getattr(model, name)
        if isinstance(block, nn.BatchNorm2d):
            setattr(model, name, _frozen_copy(block))
        else:
            _freeze_batchnorms(block)
        for parameter in getattr(model, name).parameters():
            parameter.requires_grad_(False)


def _freeze_batchnorms(module: nn.Module) -> None:
    for child_name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, child_name, _frozen_copy(child))
        else:
            _freeze_batchnorms(child)


def _frozen_copy(batchnorm: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    frozen = FrozenBatchNorm2d(batchnorm.num_features, eps=batchnorm.eps)
    frozen.weight.copy_(batchnorm.weight.detach())
    frozen.bias.copy_(batchnorm.bias.detach())
    frozen.running_mean.copy_(batchnorm.running_mean)
    frozen.running_var.copy_(batchnorm.running_var)
    return frozen.to(batchnorm.weight.device)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer should update."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def parameter_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(parameter.numel() for parameter in model.parameters())
    return sum(parameter.numel() for parameter in trainable_parameters(model)), total


def model_from_config(config: dict[str, Any], num_classes: int) -> nn.Module:
    """Rebuild the exact module structure a checkpoint was saved from (no pretrained download)."""
    model = build_model(config["arch"], num_classes, weights="none", dropout=config.get("dropout", 0.0))
    freeze_blocks(model, parse_trainable(config.get("trainable", DEFAULT_TRAINABLE)))
    return model
