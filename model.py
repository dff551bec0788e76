"""The network: a torchvision ResNet-family backbone, or any timm model (``timm:NAME``), with a ``Dropout + Linear``
head; pretrained weights, freezing by block, parameter counts."""

from __future__ import annotations

import difflib
import functools
import importlib
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torchvision import models

from accel import Accel
from common import IMAGENET_MEAN, IMAGENET_STD
from run_config import TrainConfig
from utils import UserError, first_line, format_count

SUPPORTED_ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
)
TIMM_PREFIX = "timm:"
BLOCK_NAMES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")  # a torchvision ResNet's blocks
DEFAULT_TRAINABLE = "layer4,fc"
COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}


class FrozenBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d that always normalizes with its running statistics: ``model.train()`` cannot move them.

    It keeps BatchNorm2d's state-dict keys, so checkpoints stay loadable by plain torchvision models.
    """

    thawed_class: type[_BatchNorm] = nn.BatchNorm2d  # the class it had before it was frozen

    def train(self, mode: bool = True) -> FrozenBatchNorm:
        return super().train(False)


class _FrozenStatistics:
    """Mixin for BatchNorm classes that are not 2-d (BatchNorm1d, ...): always in eval mode, like FrozenBatchNorm."""

    def train(self, mode: bool = True) -> Any:
        return super().train(False)  # type: ignore[misc]


# --------------------------------------------------------------------------- building


def is_timm_arch(arch: str) -> bool:
    """True for ``timm:NAME`` architectures, built by the timm package."""
    return arch.startswith(TIMM_PREFIX)


def build_model(arch: str, num_classes: int, weights: str = "imagenet", dropout: float = 0.2) -> nn.Module:
    """A network with pretrained trunk weights (``imagenet``, ``none`` or a file) and a new ``Dropout + Linear`` head.

    ``arch`` is one of :data:`SUPPORTED_ARCHS` (torchvision) or ``timm:NAME`` (any timm model; timm's own
    pretrained weights for ``imagenet``).
    """
    check_arch(arch)
    if not 0 <= dropout < 1:
        raise UserError(f"--dropout {dropout}: must be in [0, 1)")
    model = _pretrained_network(arch) if weights == "imagenet" else _new_network(arch)
    replace_head(model, num_classes, dropout)
    if weights not in ("imagenet", "none"):
        load_weights_file(model, weights)
    return model


def check_arch(arch: str) -> None:
    """Raise a one-line :class:`UserError` unless ``arch`` can be built (timm installed, the name known)."""
    if not is_timm_arch(arch):
        if arch not in SUPPORTED_ARCHS:
            raise UserError(f"--arch {arch}: unknown architecture; choose one of {', '.join(SUPPORTED_ARCHS)}, "
                            f"or {TIMM_PREFIX}NAME for a timm model")
        return
    timm = _import_timm(arch)
    name = _timm_name(arch)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4)
        hint = f"did you mean {', '.join(TIMM_PREFIX + match for match in close)}?" if close else \
            "timm.list_models() lists them"
        raise UserError(f"--arch {arch}: timm has no model named {name}; {hint}")


def input_normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the pretrained weights expect their input normalized with: those of timm's pretrained config for
    ``timm:NAME`` (a ViT trained on ImageNet-21k uses 0.5, say), ImageNet's for torchvision models."""
    if not is_timm_arch(arch):
        return IMAGENET_MEAN, IMAGENET_STD
    config = _import_timm(arch).get_pretrained_cfg(_timm_name(arch))
    if config is None or not config.mean or not config.std:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(config.mean), tuple(config.std)


def fixed_input_size(arch: str) -> int | None:
    """The only image size a timm model takes (a ViT's patch grid, say), or None when any size works."""
    if not is_timm_arch(arch):
        return None
    config = _import_timm(arch).get_pretrained_cfg(_timm_name(arch))
    return int(config.input_size[-1]) if config is not None and config.fixed_input_size else None


def _timm_name(arch: str) -> str:
    return arch[len(TIMM_PREFIX):]


def _import_timm(arch: str) -> ModuleType:
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise UserError(f"--arch {arch}: needs the timm package: pip install timm") from None


def _new_network(arch: str) -> nn.Module:
    """The network with its original head and random weights."""
    if is_timm_arch(arch):
        return _import_timm(arch).create_model(_timm_name(arch), pretrained=False)
    return models.get_model(arch, weights=None)


def _pretrained_network(arch: str) -> nn.Module:
    """The network with its ImageNet weights (and ImageNet head), from the cache or downloaded."""
    if is_timm_arch(arch):
        return _pretrained_timm_network(arch)
    model = models.get_model(arch, weights=None)
    model.load_state_dict(download_imagenet_weights(arch))
    return model


def _pretrained_timm_network(arch: str) -> nn.Module:
    timm = _import_timm(arch)
    name = _timm_name(arch)
    if not timm.models.is_model_pretrained(name):
        raise UserError(f"--weights imagenet: timm has no pretrained weights for {name}; "
                        "use --weights none or --weights PATH")
    try:
        return timm.create_model(name, pretrained=True)
    except OSError as error:  # Hugging Face hub and urllib failures (no network, not in the cache) are OSErrors
        raise UserError(f"--weights imagenet: could not download timm's pretrained weights for {name} "
                        f"({first_line(error)}); use --weights none or --weights PATH (a weights file)") from None


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


# --------------------------------------------------------------------------- the head


def classifier_name(model: nn.Module) -> str:
    """The qualified name of the model's final classification layer: ``fc`` for a torchvision ResNet, timm's
    ``get_classifier()`` for a timm model (``fc``, ``head.fc``, ``classifier``, ...)."""
    if not hasattr(model, "get_classifier"):
        return "fc"
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier:
            return name
    raise UserError(f"--arch: the timm model {type(model).__name__} has no single classification layer (a "
                    "distilled model with two heads?); choose another model")


def head_block(model: nn.Module) -> str:
    """The top-level block that holds the classifier (``fc``, ``head``, ``classifier``, ...): it always trains."""
    return classifier_name(model).split(".")[0]


def replace_head(model: nn.Module, num_classes: int, dropout: float) -> None:
    """Put a new, randomly initialised ``Dropout(dropout) + Linear`` for ``num_classes`` at the classifier's place.

    Its state-dict keys are ``<classifier>.1.weight`` and ``.1.bias`` (``fc.1.weight`` for a ResNet).
    """
    name = classifier_name(model)
    if hasattr(model, "reset_classifier"):  # timm: the model knows its classifier's type and input width
        model.reset_classifier(num_classes)
        classifier = model.get_submodule(name)
    else:
        classifier = nn.Linear(model.get_submodule(name).in_features, num_classes)
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attribute, nn.Sequential(nn.Dropout(dropout), classifier))


# --------------------------------------------------------------------------- weight files


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a state dict or checkpoint file into ``model``; a head (classifier) that does not fit is dropped with a
    note.

    Weights of another architecture (a resnet18 file for a resnet50, say) are refused, naming the architecture
    they fit when it is one of :data:`SUPPORTED_ARCHS`.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    head = classifier_name(model) + "."
    body = {key: value for key, value in state.items() if not key.startswith(head)}
    body_own = {key: value for key, value in own.items() if not key.startswith(head)}
    if _shapes(body, ignore_counters=True) != _shapes(body_own, ignore_counters=True):
        raise UserError(f"--weights {path}: these weights are for another architecture than this model "
                        f"({_architecture_hint(body)}); pass the --arch they were trained with")
    head_state = {key: value for key, value in state.items() if key.startswith(head)}
    if _shapes(head_state) != _shapes({key: value for key, value in own.items() if key.startswith(head)}):
        if head_state:
            print(f"note: {path}: its classification head ({', '.join(sorted(head_state))}) does not fit this "
                  f"model's {own[head + '1.weight'].shape[0]} classes; the new head starts from scratch")
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
            candidate = models.get_model(arch, weights=None).state_dict()
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
    except Exception as error:  # any failure here means "not a weights file we can read"
        raise UserError(f"--weights {path}: not a readable PyTorch weights file: {_why_unreadable(path, error)}"
                        ) from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
            break
    if not isinstance(content, dict) or not all(isinstance(value, torch.Tensor) for value in content.values()):
        raise UserError(f"--weights {path}: holds no state dict of tensors")
    state = dict(content)
    for prefix in ("module.", "_orig_mod."):  # saved from under DistributedDataParallel, or torch.compile
        consume_prefix_in_state_dict_if_present(state, prefix)
    return state


def _why_unreadable(path: Path, error: Exception) -> str:
    """Why ``torch.load`` refused a --weights file, in words (its own message is an unpickler's: 'Unsupported
    operand 101', or advice to load unsafely)."""
    if "GLOBAL" in str(error):  # the weights-only unpickler met an object it refuses to build
        return "it holds Python objects that are unsafe to load (weights are only tensors); refusing to read it"
    with path.open("rb") as handle:
        if handle.read(64).startswith(b"version https://git-lfs"):
            return "a Git LFS pointer, not the file itself; fetch it with git lfs pull"
    return ("truncated or corrupt, or not saved with torch.save at all; pass a state dict saved with torch.save "
            "(.pt, .pth), or imagenet, or none")


# --------------------------------------------------------------------------- blocks and freezing


def block_names(model: nn.Module) -> list[str]:
    """The model's blocks, in order: its top-level children (and top-level parameters) that hold parameters.

    For a torchvision or timm ResNet these are :data:`BLOCK_NAMES`; for a ConvNeXt ``stem, stages, head``.
    """
    return list(dict.fromkeys(name.split(".")[0] for name, _ in model.named_parameters()))


def parse_trainable(spec: str, model: nn.Module | None = None) -> list[str]:
    """Blocks named by ``--trainable`` (comma list, or ``all``), validated against ``model``'s :func:`block_names`
    (without a model: a torchvision ResNet's, :data:`BLOCK_NAMES`).

    The new, randomly initialised head (:func:`head_block`: ``fc`` for a ResNet) is always among them: frozen,
    it could not learn at all.
    """
    blocks, head = (BLOCK_NAMES, "fc") if model is None else (block_names(model), head_block(model))
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if names == ["all"]:
        return list(blocks)
    unknown = [name for name in names if name not in blocks]
    if unknown or not names:
        default = f" (the default, {DEFAULT_TRAINABLE}, names a ResNet's blocks)" if spec == DEFAULT_TRAINABLE else ""
        raise UserError(
            f"--trainable {spec}: {', '.join(unknown) or 'empty'} is not a block{default}; "
            f"use 'all' or a comma list of {', '.join(blocks)}"
        )
    return [name for name in blocks if name in names or name == head]  # the new head always trains


def spelled_out_trainable(spec: str, model: nn.Module | None = None) -> str:
    """``--trainable`` as the blocks of ``model`` (default: a torchvision ResNet) that will train; the head (``fc``
    for a ResNet) is added, with a note, when it was left out."""
    if spec.strip() == "all":
        return "all"
    blocks, head = parse_trainable(spec, model), "fc" if model is None else head_block(model)
    if head not in [name.strip() for name in spec.split(",")]:
        print(f"note: --trainable {spec}: the new head ({head}) starts from random weights, so it always trains; "
              f"training {','.join(blocks)}")
    return ",".join(blocks)


def has_trainable_batchnorm(trainable: Iterable[str], model: nn.Module | None = None) -> bool:
    """True when a block in ``trainable`` holds BatchNorm layers that learn (which need 2 or more images a batch).

    Without a model, the blocks are a torchvision ResNet's: all but ``conv1`` and ``fc`` hold BatchNorm.
    """
    if model is None:
        return bool(set(trainable) - {"conv1", "fc"})
    trainable = list(trainable)
    return any(isinstance(module, _BatchNorm) and _in_blocks(name, trainable) for name, module in model.named_modules())


def freeze_blocks(model: nn.Module, trainable: Iterable[str]) -> None:
    """Freeze every block not in ``trainable``: no gradients, and BatchNorm layers fixed to their running statistics.

    A block is a name prefix (``layer4`` covers ``layer4.0.conv1.weight``). Frozen BatchNorm layers become
    :class:`FrozenBatchNorm` (or a frozen subclass of their own class), so ``model.train()`` cannot move their
    statistics. Frozen parameters record no autograd graph, so the frozen front of the network keeps no activations.
    """
    trainable = list(trainable)
    for name, parameter in model.named_parameters():
        if not _in_blocks(name, trainable):
            parameter.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and not _in_blocks(name, trainable):
            freeze_batchnorm(module)


def _in_blocks(name: str, blocks: list[str]) -> bool:
    return any(name == block or name.startswith(block + ".") for block in blocks)


def freeze_batchnorm(batchnorm: _BatchNorm) -> None:
    """Fix ``batchnorm`` to its running statistics for good, in place (its parameters, buffers and keys unchanged)."""
    # Swapping the class keeps the layer's own forward (timm's BatchNormAct2d also applies an activation).
    batchnorm.__class__ = _frozen_class(type(batchnorm))
    batchnorm.train(False)


@functools.cache
def _frozen_class(cls: type[_BatchNorm]) -> type[_BatchNorm]:
    if issubclass(cls, (FrozenBatchNorm, _FrozenStatistics)):
        return cls
    if cls is nn.BatchNorm2d:
        return FrozenBatchNorm
    mixin = FrozenBatchNorm if issubclass(cls, nn.BatchNorm2d) else _FrozenStatistics
    return type(f"Frozen{cls.__name__}", (mixin, cls), {"thawed_class": cls})


def thaw_blocks(model: nn.Module, blocks: Iterable[str]) -> list[nn.Parameter]:
    """Make the frozen parameters of ``blocks`` trainable and give their BatchNorm layers back their own class (and
    the model's mode), so they learn and update their statistics again; returns the parameters that thawed."""
    blocks = list(blocks)
    thawed = [parameter for name, parameter in model.named_parameters()
              if _in_blocks(name, blocks) and not parameter.requires_grad]
    for parameter in thawed:
        parameter.requires_grad_(True)
    for name, module in model.named_modules():
        if _in_blocks(name, blocks) and hasattr(module, "thawed_class"):
            module.__class__ = module.thawed_class
            module.train(model.training)
    return thawed


def parse_unfreeze_at(spec: str, model: nn.Module) -> dict[int, list[str]]:
    """``--unfreeze-at layer3:5,all:10`` as {epoch: the blocks named for it}, in epoch order; names are checked
    against ``model``'s :func:`block_names` (``all`` is kept as written)."""
    names, schedule = block_names(model), {}
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        block, _, epoch = (text.strip() for text in item.rpartition(":"))
        if not block or not epoch.isdigit():
            raise UserError(f"--unfreeze-at {spec}: {item!r} is not BLOCK:EPOCH; write e.g. layer3:5,all:10")
        if block != "all" and block not in names:
            raise UserError(f"--unfreeze-at {spec}: {block} is not a block; use all or one of {', '.join(names)}")
        schedule.setdefault(int(epoch), []).append(block)
    if not schedule:
        raise UserError(f"--unfreeze-at {spec!r}: no BLOCK:EPOCH in it; write e.g. layer3:5,all:10")
    return dict(sorted(schedule.items()))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer should update."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def parameter_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(parameter.numel() for parameter in model.parameters())
    return sum(parameter.numel() for parameter in trainable_parameters(model)), total


# --------------------------------------------------------------------------- sizes, without building


def model_skeleton(arch: str, num_classes: int = 2) -> nn.Module:
    """The network :func:`build_model` makes, on the meta device: its modules and shapes, but no weights, no
    memory and no download (for counting parameters and checking ``--trainable`` before the real build)."""
    check_arch(arch)
    with torch.device("meta"):
        model = _new_network(arch)
        replace_head(model, num_classes, dropout=0.0)
    return model


def parameter_count(arch: str, num_classes: int) -> int:
    """How many parameters the model train.py builds for ``arch`` and ``num_classes`` has (nothing downloaded)."""
    return sum(parameter.numel() for parameter in model_skeleton(arch, num_classes).parameters())


def parse_count(text: str) -> int:
    """A parameter count for ``--max-params``: ``25600000``, ``25.6M``, ``900k``, ``1.2G`` (or ``1.2B``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgGbB]?)\s*", text)
    if match is None:
        raise UserError(f"--max-params {text}: not a parameter count; write e.g. 25600000, 25.6M or 900k")
    if not match.group(2) and not match.group(1).isdigit():
        raise UserError(f"--max-params {text}: a count without a unit must be a whole number; write e.g. 25600000, "
                        "25.6M or 900k")
    count = float(match.group(1)) * COUNT_UNITS[match.group(2).upper()]
    if not math.isfinite(count) or count < 1:
        raise UserError(f"--max-params {text}: must be a count of at least 1; write e.g. 25600000, 25.6M or 900k")
    return round(count)


# --------------------------------------------------------------------------- checkpoints


def model_from_config(config: dict[str, Any], num_classes: int) -> nn.Module:
    """Rebuild the exact module structure a checkpoint was saved from (no pretrained download)."""
    model = build_model(config["arch"], num_classes, weights="none", dropout=config.get("dropout", 0.0))
    freeze_blocks(model, parse_trainable(config.get("trainable", DEFAULT_TRAINABLE), model))
    return model


def describe_model(model: nn.Module, arch: str, weights: str, trainable: str, thawed: Sequence[str] = ()) -> str:
    """'model: resnet18, weights imagenet; training layer4,fc: 8.4M of 11.2M parameters (75.0%)', counted as the
    model is now: blocks ``thawed`` by --unfreeze-at (when resuming past their epoch) included."""
    training = trainable + (f" and, since --unfreeze-at, {','.join(thawed)}" if thawed else "")
    learning, total = parameter_summary(model)
    return (f"model: {arch}, weights {weights}; training {training}: "
            f"{format_count(learning)} of {format_count(total)} parameters ({learning / total:.1%})")


def check_parameter_budget(config: TrainConfig, num_classes: int) -> None:
    """Refuse a model over ``--max-params``, counted without building or downloading it."""
    if config.max_params is None:
        return
    count, limit = parameter_count(config.arch, num_classes), parse_count(config.max_params)
    if count > limit:
        raise UserError(f"--max-params {config.max_params}: --arch {config.arch} has {count:,} parameters with "
                        f"{num_classes} classes ({format_count(count)}), over the budget; choose a smaller model")


def make_model(config: TrainConfig, num_classes: int, accel: Accel,
               resumed_weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The network with its pretrained trunk (or a resumed run's weights), frozen blocks fixed, on the device."""
    weights = "none" if resumed_weights is not None else config.weights
    if weights == "none" and resumed_weights is None and config.trainable != "all":
        print(f"warning: --weights none with --trainable {config.trainable}: the frozen blocks keep their random "
              "initial weights, so only the trained blocks learn; use --weights imagenet (or a weights file), or "
              "--trainable all")
    check_parameter_budget(config, num_classes)
    model = build_model(config.arch, num_classes, weights=weights, dropout=config.dropout)
    freeze_blocks(model, parse_trainable(config.trainable, model))
    if resumed_weights is not None:
        model.load_state_dict(resumed_weights)
    return accel.prepare_model(model)
