"""Checkpoints: one self-sufficient file (weights, class names, preprocessing, config), typed (:class:`Checkpoint`),
written and read safely here alone; files of older formats load too."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import model_from_config
from resume import TrainingState
from utils import UserError, atomic_torch_save

FORMAT_NAME = "imagefolder-resnet-checkpoint"
FORMAT_VERSION = 2  # 2: every key written, ``temperature`` None until fitted. 1: test_size, runtime... could be absent
CHECKPOINT_FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
REQUIRED_KEYS = ("format", "model", "arch", "class_names", "img_size", "mean", "std", "config")


@dataclass(frozen=True)
class Checkpoint:
    """One self-sufficient checkpoint: the weights and everything prediction needs (classes, preprocessing, the
    run's options), and, in last.pt, the training state. Stored as a dict of tensors and plain values (loadable with
    ``weights_only=True``) by :func:`save_checkpoint`; read back, older formats included, by :func:`load_checkpoint`.
    """

    model: dict[str, torch.Tensor]
    arch: str
    class_names: list[str]
    img_size: int
    test_size: int  # evaluation and prediction size (older files: img_size)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    config: dict[str, Any]  # the run's options (run_config.TrainConfig.saved_options)
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    held_out_val_files: list[str] | None = None  # validation images split off train/ (dataset.TrainValData)
    runtime: dict[str, Any] = field(default_factory=dict)  # what the options resolved to where it trained
    temperature: float | None = None  # best.pt, at the end of training: readers divide the logits by it
    weights: str | None = None  # best.pt: "raw" or "ema" (the moving average)
    training_state: TrainingState | None = None  # last.pt only (resume.py makes and restores it)
    ema_model: dict[str, torch.Tensor] | None = None  # last.pt with --ema: the moving average's weights
    split_recorded: bool = True  # False for files from before held_out_val_files was stored (None meant: no list)

    @property
    def eval_size(self) -> int:
        """The size evaluation and prediction use: the run's --test-size (else its --img-size)."""
        return self.test_size

    @property
    def logit_temperature(self) -> float:
        """The temperature to divide the logits by before the softmax: the fitted one, 1.0 (none) when there is
        none (last.pt, an unfinished run's best.pt, older checkpoints)."""
        return 1.0 if self.temperature is None else float(self.temperature)

    @property
    def preprocessing(self) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
        """(eval size, mean, std): what ``pipeline.inference_batches`` takes after the paths."""
        return self.test_size, self.mean, self.std

    def to_dict(self) -> dict[str, Any]:
        """The stored form: tensors and plain values, with the format and its version."""
        stored = {"format": CHECKPOINT_FORMAT, **{key: value for key, value in vars(self).items()
                                                  if key not in ("training_state", "ema_model", "split_recorded")}}
        stored.update(mean=list(self.mean), std=list(self.std))
        if self.training_state is not None:
            stored["training_state"] = {**vars(self.training_state)}
        if self.ema_model is not None:
            stored["ema_model"] = self.ema_model
        return stored

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> Checkpoint:
        """A checkpoint from its stored form, any version up to :data:`FORMAT_VERSION` (checked by the caller)."""
        state = stored.get("training_state")
        return cls(
            model=stored["model"], arch=stored["arch"], class_names=list(stored["class_names"]),
            img_size=int(stored["img_size"]), test_size=int(stored.get("test_size") or stored["img_size"]),
            mean=tuple(float(value) for value in stored["mean"]), std=tuple(float(value) for value in stored["std"]),
            config=dict(stored["config"]), epoch=int(stored.get("epoch", 0)), metrics=dict(stored.get("metrics", {})),
            held_out_val_files=stored.get("held_out_val_files"), runtime=dict(stored.get("runtime") or {}),
            temperature=stored.get("temperature"), weights=stored.get("weights"),
            training_state=None if state is None else TrainingState(**state), ema_model=stored.get("ema_model"),
            split_recorded="held_out_val_files" in stored)


def make_checkpoint(  # noqa: PLR0913
    model: nn.Module,
    class_names: list[str],
    config: dict[str, Any],
    epoch: int,
    metrics: dict[str, float],
    mean: Sequence[float],
    std: Sequence[float],
    held_out: list[str] | None = None,
    runtime: dict[str, Any] | None = None,
) -> Checkpoint:
    """The checkpoint of ``model`` (its weights as CPU tensors) after ``epoch``, for a run with options
    ``config`` (saved options, as plain values).

    ``held_out`` is the list of validation images split off train/ (see ``dataset.TrainValData``); ``runtime``
    records what the options resolved to on the machine that trained (device, precision, workers, versions).
    The ``temperature`` comes later, from :func:`store_temperature` at the end of training.
    """
    return Checkpoint(
        model={key: value.detach().cpu() for key, value in model.state_dict().items()},
        arch=config["arch"], class_names=list(class_names), img_size=int(config["img_size"]),
        test_size=int(config.get("test_size") or config["img_size"]),
        mean=tuple(float(value) for value in mean), std=tuple(float(value) for value in std),
        config=dict(config), epoch=int(epoch), metrics={key: float(value) for key, value in metrics.items()},
        held_out_val_files=None if held_out is None else list(held_out), runtime=dict(runtime or {}),
    )


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> None:
    """Write a checkpoint atomically: a crash mid-write leaves the previous file intact."""
    atomic_torch_save(checkpoint.to_dict(), path)


def store_temperature(checkpoint: Checkpoint, path: str | Path, temperature: float) -> Checkpoint:
    """Write ``checkpoint`` to ``path`` (atomically) with its ``temperature``: a float that readers divide its
    logits by before the softmax (``Checkpoint.logit_temperature``: 1.0 when absent). Returns the checkpoint written."""
    calibrated = replace(checkpoint, temperature=float(temperature))
    save_checkpoint(calibrated, path)
    return calibrated


def load_checkpoint(path: str | Path, flag: str = "--checkpoint", file_in_folder: str = "best.pt") -> Checkpoint:
    """Read one of our checkpoints safely (``weights_only=True``); anything else is a :class:`UserError`.

    A run folder stands for its ``file_in_folder``. ``flag`` is the option errors name.
    """
    path = Path(path)
    if path.is_dir():
        path = path / file_in_folder
        if not path.is_file():
            others = sorted(other.name for other in path.parent.glob("*.pt"))
            suggested = next((name for name in ("best.pt", "last.pt") if name in others), others[0] if others else "")
            hint = f" (it holds {', '.join(others)}: pass {path.parent / suggested})" if others else ""
            raise UserError(f"{flag} {path.parent}: a folder without {file_in_folder}{hint}; pass a run's output "
                            "folder or a checkpoint file written by train.py")
        print(f"{flag}: using {path}")
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found; train first (python train.py) or pass the right path")
    stored = _read_safely(path, flag)
    version = format_version(stored)
    if version is None:
        raise UserError(f"{flag} {path}: not a checkpoint written by this project's train.py")
    if version > FORMAT_VERSION:
        raise UserError(f"{flag} {path}: written by a newer version of this project (checkpoint format {version}, "
                        f"this one reads up to {FORMAT_VERSION}); update the code (git pull)")
    missing = [key for key in REQUIRED_KEYS if key not in stored]
    if missing:
        raise UserError(f"{flag} {path}: incomplete checkpoint, missing {', '.join(missing)}")
    return Checkpoint.from_dict(stored)


def format_version(stored: Any) -> int | None:
    """The format version of a stored checkpoint (``imagefolder-resnet-checkpoint/N``), or None if it is none of
    ours."""
    if not isinstance(stored, dict) or not isinstance(stored.get("format"), str):
        return None
    name, _, version = stored["format"].partition("/")
    return int(version) if name == FORMAT_NAME and version.isdigit() else None


def _read_safely(path: Path, flag: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # every failure means the file is not a checkpoint we can trust
        raise UserError(f"{flag} {path}: {_why_unreadable(path, error, flag)}") from None


# How torch.save's files start: a zip archive, or (older PyTorch) a pickle of protocol 2 or more.
TORCH_SAVE_STARTS = (b"PK\x03\x04", b"\x80")


def _why_unreadable(path: Path, error: Exception, flag: str) -> str:
    with path.open("rb") as handle:
        head = handle.read(64)
    # The weights-only unpickler met an object it refuses to build; in a file torch.save wrote, not in text whose
    # first letter happens to be pickle's GLOBAL opcode ("c").
    if "GLOBAL" in str(error) and head.startswith(TORCH_SAVE_STARTS):
        return ("holds Python objects that are unsafe to load (a checkpoint of this project holds only tensors and "
                "plain values); refusing to read it")
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file itself; fetch it with git lfs pull"
    instead = "another copy of it" if flag == "--resume" else "another copy, or the run's last.pt or best.pt"
    return f"truncated or corrupt, or not a checkpoint of this project at all; use {instead}"


def model_from_checkpoint(checkpoint: Checkpoint) -> nn.Module:
    """Rebuild the network a checkpoint was saved from and load its weights (on the CPU, in eval mode)."""
    model = model_from_config(checkpoint.config, num_classes=len(checkpoint.class_names))
    model.load_state_dict(checkpoint.model)
    return model.eval()
