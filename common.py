"""Constants and small types that the data part, the model and the loop share; this module imports none of ours."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Sample = tuple[str, int]  # (image path, class index)


class DecodeFailure(NamedTuple):
    """What a dataset yields for an image it could not decode: its path, why, and its position in the dataset."""

    path: str
    reason: str = "cannot be decoded"
    position: int = -1


class Batch(NamedTuple):
    """A batch: model-ready images on the device (None when every image of it failed to decode), their class
    indices on the device (None for unlabeled images), the dataset positions of the images in order, and the
    images that could not be decoded."""

    images: Tensor | None
    targets: Tensor | None
    positions: list[int]
    failed: list[DecodeFailure]


class Mixed(NamedTuple):
    """A mixed batch (mixup or cutmix): images, the two label sets, and the weight of the first."""

    images: Tensor
    targets_a: Tensor
    targets_b: Tensor
    lam: float


DEFAULT_TIMEOUT_S = 300.0  # long enough for rank 0 to write a checkpoint while the others wait at the next collective


@dataclass(frozen=True)
class World:
    """This process's place in the job: its rank, its rank on this node, how many processes, its device, the
    collectives' timeout, and the rendezvous store (None in a single process)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    timeout_s: float = DEFAULT_TIMEOUT_S
    store: Any = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one process that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


SINGLE_PROCESS = World()  # the default world: one process, on the CPU


def processes_per_node() -> int:
    """torchrun's processes on this machine (``LOCAL_WORLD_SIZE``; 1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


# The files report.py writes into a report folder (run_folder.py clears them for a new run).
REPORT_FILES = ("metrics.json", "per_class.csv", "confusion_matrix.png", "top_confusions.csv",
                "misclassified.png", "reliability.png", "report.md", "report.html")
