"""The typed configuration of a training run: :class:`TrainConfig`, built once by ``options.build_config`` from the
flags and ``--config`` file, with every ``auto`` decided (:class:`Chosen`), and frozen.

train.py and the modules it calls read the run's choices from it (or from the typed parts they need); nothing
re-derives a choice or changes one. A leaf module, so that the data part, the model and the run folder can name the
type without importing the parsers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

# Options that are about one invocation of train.py, never saved with the run.
INVOCATION_OPTIONS = ("config", "resume", "epochs_this_run", "overwrite", "val_fraction_given")


@dataclass(frozen=True)
class Chosen:
    """What each ``auto`` (and each explicit choice of device, precision and data path) comes to on this machine,
    decided once when the options are read."""

    device: torch.device  # --device (a torchrun rank on CUDA uses GPU LOCAL_RANK of this type)
    amp_dtype: torch.dtype | None  # --amp: bfloat16, float16, or None for fp32
    train_path: str  # "gpu" or "cpu": where training images are decoded and augmented (--auto-augment: "cpu")
    eval_path: str  # where validation images, and the final report's, are decoded and resized: --augment-device
    thaw_schedule: tuple[tuple[int, tuple[str, ...]], ...] = ()  # --unfreeze-at: (epoch, blocks that start then)

    @property
    def precision(self) -> str:
        """``bf16``, ``fp16`` or ``fp32``."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")


@dataclass(frozen=True)
class TrainConfig:
    """train.py's options after the ``--config`` file, the command line and the checks, spelled out (``--workers``
    as a count, ``--trainable`` as the blocks), with the machine's choices in ``chosen``. Field names are the
    options' (``--batch-size`` is ``batch_size``)."""

    # data
    data_dir: str
    val_fraction: float
    fold: str | None
    train_on_all: bool
    img_size: int
    test_size: int | None
    augment_device: str  # as asked: auto, cpu or gpu (chosen.train_path and chosen.eval_path: what it came to)
    verify_images: bool
    workers: int
    cache: str
    max_image_pixels: int
    auto_augment: str
    random_erase: float
    mixup: float
    cutmix: float
    sampler: str
    # model
    arch: str
    max_params: str | None
    weights: str
    trainable: str
    unfreeze_at: str | None
    dropout: float
    # optimisation
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    warmup_epochs: int
    backbone_lr_mult: float
    accum_steps: int
    label_smoothing: float
    class_weights: str
    patience: int
    monitor: str
    ema: float
    # run
    output_dir: str
    device: str  # as asked (chosen.device: what it came to)
    amp: str  # as asked (chosen.amp_dtype)
    channels_last: bool
    sync_bn: bool
    compile: bool
    seed: int
    no_progress: bool
    tensorboard: bool
    # this invocation only (INVOCATION_OPTIONS)
    config: str | None
    resume: str | None
    epochs_this_run: int | None
    overwrite: bool
    val_fraction_given: bool  # --val-fraction set by a flag or the --config file, not the default
    chosen: Chosen

    @property
    def eval_size(self) -> int:
        """The size validation (and prediction with the run's checkpoints) uses: --test-size, else --img-size."""
        return self.test_size or self.img_size

    @property
    def thaw_schedule(self) -> dict[int, list[str]]:
        """--unfreeze-at as {epoch: blocks that start training then}."""
        return {epoch: list(blocks) for epoch, blocks in self.chosen.thaw_schedule}

    def saved_options(self) -> dict[str, Any]:
        """The options as plain values, sorted by name: what config.yaml, the checkpoints and run comparisons hold
        (not this invocation's, not the machine's choices)."""
        return {name: getattr(self, name) for name in sorted(option_names())}


def option_names() -> list[str]:
    """The names of the options a run saves: every field of :class:`TrainConfig` but this invocation's and
    ``chosen``."""
    return [field.name for field in fields(TrainConfig) if field.name not in (*INVOCATION_OPTIONS, "chosen")]
