"""Optional TensorBoard logging for train.py (``--tensorboard``): per-epoch scalars and the final figures.

The ``tensorboard`` package is imported only when a logger is created, so training without the flag never
needs it; when it is missing, creating a logger is a one-line user error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from utils import UserError

TENSORBOARD_MISSING = "--tensorboard needs the tensorboard package: pip install tensorboard"
# History columns -> TensorBoard tags; a shared prefix puts train and val on neighbouring charts.
SCALAR_TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/val",
    "lr": "learning_rate",
    "seconds": "time/epoch_seconds",
}
MAX_FIGURE_PIXELS = 2048  # longest side of a logged figure; a 100-class confusion matrix is ~3000 px


def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, imported now; a :class:`UserError` when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it for a missing and for a too old tensorboard package alike
        raise UserError(TENSORBOARD_MISSING) from None
    return SummaryWriter


class TensorBoardLogger:
    """Writes one run's TensorBoard event files into ``log_dir``."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer = summary_writer_class()(log_dir=str(self.log_dir))

    def log_epoch(self, epoch: int, row: dict[str, Any], images_per_second: float) -> None:
        """Log one epoch's history row (every numeric column but ``epoch``) and the training throughput."""
        for key, value in row.items():
            if key == "epoch" or not isinstance(value, (int, float)):
                continue
            self._writer.add_scalar(SCALAR_TAGS.get(key, key), float(value), epoch)
        self._writer.add_scalar("throughput/train_images_per_second", float(images_per_second), epoch)
        self._writer.flush()

    def log_figure(self, tag: str, png_path: str | Path, step: int | None = None) -> None:
        """Log a saved figure (e.g. ``confusion_matrix.png``) as an image, shrunk to at most 2048 px a side."""
        with Image.open(png_path) as image:
            image = image.convert("RGB")
            image.thumbnail((MAX_FIGURE_PIXELS, MAX_FIGURE_PIXELS))
            pixels = np.asarray(image)
        self._writer.add_image(tag, pixels, global_step=step, dataformats="HWC")
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
