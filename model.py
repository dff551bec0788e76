"""The network: a torchvision ResNet-family backbone with a ``Dropout + Linear`` head, pretrained weights, freezing."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from utils import UserError, first_line

# torchvision's constructor arguments for each architecture (block, layers, groups, width per group).
ARCH_SPECS: dict[str, tuple[type[nn.Module], list[int], int, int]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], 1, 64),
    "resnet34": (BasicBlock, [3, 4, 6, 3], 1, 64),
    "resnet50": (Bottleneck, [3, 4, 6, 3], 1, 64),
    "resnet101": (Bottleneck, [3, 4, 23, 3], 1, 64),
    "resnet152": (Bottleneck, [3, 8, 36, 3], 1, 64),
    "resnext50_32x4d": (Bottleneck, [3, 4, 6, 3], 32, 4),
    "resnext101_32x8d": (Bottleneck, [3, 4, 23, 3], 32, 8),
    "resnext101_64x4d": (Bottleneck, [3, 4, 23, 3], 64, 4),
    "wide_resnet50_2": (Bottleneck, [3, 4, 6, 3], 1, 128),
    "wide_resnet101_2": (Bottleneck, [3, 4, 23, 3], 1, 128),
}
SUPPORTED_ARCHS = tuple(ARCH_SPECS)
BLOCK_NAMES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")
STAGE_NAMES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
DEFAULT_TRAINABLE = "layer4,fc"


class FineTuneResNet(ResNet):
    """A torchvision ResNet (same layers, same state-dict keys) that runs its frozen leading stages without autograd.

    ``frozen_stages`` counts the stages of :data:`STAGE_NAMES` at the front that hold no trainable parameter; they
    run under ``torch.no_grad()``, so autograd records only the trainable tail and keeps none of the trunk's
    activations. The outputs and the gradients of the trainable parameters are unchanged.
    """

    frozen_stages: int = 0

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        frozen = STAGE_NAMES[: self.frozen_stages]
        with torch.no_grad() if frozen else contextlib.nullcontext():
            for name in frozen:
                x = getattr(self, name)(x)
        for name in STAGE_NAMES[self.frozen_stages :]:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class FrozenBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d that always normalizes with its running statistics: ``model.train()`` cannot move them.

    It keeps BatchNorm2d's state-dict keys, so checkpoints stay loadable by plain torchvision models.
    """

    def train(self, mode: bool = True) -> "FrozenBatchNorm":
        return super().train(False)


def _new_network(arch: str) -> FineTuneResNet:
    block, layers, groups, width = ARCH_SPECS[arch]
    return FineTuneResNet(block, layers, groups=groups, width_per_group=width)


def build_model(arch: str, num_classes: int, weights: str = "imagenet", dropout: float = 0.2) -> nn.Module:
    """A ResNet-family network with pretrained trunk weights (``imagenet``, ``none`` or a file) and a new head."""
    if arch not in SUPPORTED_ARCHS:
        raise UserError(f"--arch {arch}: unknown architecture; choose one of {', '.join(SUPPORTED_ARCHS)}")
    if not 0 <= dropout < 1:
        raise UserError(f"--dropout {dropout}: must be in [0, 1)")
    model = _new_network(arch)
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
    reason = first_line(error)
    return (
        f"--weights imagenet: could not download {url} ({reason}); "
        f"copy {file_name} to {cache} ($TORCH_HOME/hub/checkpoints/), "
        "or use --weights none or --weights PATH"
    )


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a state dict or checkpoint file into ``model``; a head (``fc``) that does not fit is dropped with a note.

    Weights of another architecture (a resnet18 file for a resnet50, say) are refused, naming the architecture
    they fit when it is one of :data:`SUPPORTED_ARCHS`.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    body = {key: value for key, value in state.items() if not key.startswith("fc.")}
    body_own = {key: value for key, value in own.items() if not key.startswith("fc.")}
    if _shapes(body, ignore_counters=True) != _shapes(body_own, ignore_counters=True):
        raise UserError(f"--weights {path}: these weights are for another architecture than this model "
                        f"({_architecture_hint(body)}); pass the --arch they were trained with")
    head = {key: value for key, value in state.items() if key.startswith("fc.")}
    if _shapes(head) != _shapes({key: value for key, value in own.items() if key.startswith("fc.")}):
        if head:
            print(f"note: {path}: its classification head ({', '.join(sorted(head))}) does not fit this model's "
                  f"{len(own['fc.1.bias'])} classes; the new head starts from scratch")
        state = body
    model.load_state_dict(state, strict=False)


def _shapes(state: dict[str, torch.Tensor], ignore_counters: bool = False) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()
            if not (ignore_counters and key.endswith("num_batches_tracked"))}


def _architecture_hint(body: dict[str, torch.Tensor]) -> str:
    """'they fit resnet18' when the trunk weights match one of the supported architectures, else a key that differs."""
    wanted = _shapes(body, ignore_counters=True)
    for arch in SUPPORTED_ARCHS:
        with torch.device("meta"):
            candidate = _new_network(arch).state_dict()
        if _shapes({key: value for key, value in candidate.items() if not key.startswith("fc.")},
                   ignore_counters=True) == wanted:
            return f"they fit {arch}"
    return "they fit none of " + ", ".join(SUPPORTED_ARCHS)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict inside a weights file: a plain state dict, or a checkpoint holding one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path}: file not found; use imagenet, none, or the path of a weights file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure here means "not a weights file we can read"
        raise UserError(f"--weights {path}: not a readable PyTorch weights file ({first_line(error)})") from None
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


def parse_trainable(spec: str) -> list[str]:
    """Blocks named by ``--trainable`` (comma list, or ``all``), validated against :data:`BLOCK_NAMES`.

    The new, randomly initialised head ``fc`` is always among them: frozen, it could not learn at all.
    """
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if names == ["all"]:
        return list(BLOCK_NAMES)
    unknown = [name for name in names if name not in BLOCK_NAMES]
    if unknown or not names:
        raise UserError(
            f"--trainable {spec}: {', '.join(unknown) or 'empty'} is not a block; "
            f"use 'all' or a comma list of {', '.join(BLOCK_NAMES)}"
        )
    return [name for name in BLOCK_NAMES if name in names or name == "fc"]  # the new head always trains


def has_trainable_batchnorm(trainable: Iterable[str]) -> bool:
    """True when a block in ``trainable`` holds BatchNorm layers that learn (all but ``conv1`` and ``fc`` do)."""
    return bool(set(trainable) - {"conv1", "fc"})


def freeze_blocks(model: FineTuneResNet, trainable: Iterable[str]) -> None:
    """Freeze every block not in ``trainable``: no gradients, and BatchNorm layers fixed to their running statistics.

    Frozen BatchNorm layers become :class:`FrozenBatchNorm`, so ``model.train()`` cannot move their statistics,
    and the frozen stages at the front of the network run without autograd.
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
    model.frozen_stages = count_frozen_stages(trainable)


def count_frozen_stages(trainable: Iterable[str]) -> int:
    """How many stages of :data:`STAGE_NAMES` at the front hold no trainable block (``relu``/``maxpool`` follow)."""
    trainable = set(trainable)
    count = 0
    for name in STAGE_NAMES:
        if name in trainable:
            break
        count += 1
    return count


def _freeze_batchnorms(module: nn.Module) -> None:
    for child_name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, child_name, _frozen_copy(child))
        else:
            _freeze_batchnorms(child)


def _frozen_copy(batchnorm: nn.BatchNorm2d) -> FrozenBatchNorm:
    frozen = FrozenBatchNorm(batchnorm.num_features, eps=batchnorm.eps, momentum=batchnorm.momentum)
    frozen.load_state_dict(batchnorm.state_dict())
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
