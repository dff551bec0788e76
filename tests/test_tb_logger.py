"""tb_logger.py: a clean error without the tensorboard package, and what a logger writes (to a fake writer)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tb_logger
from utils import UserError


class FakeWriter:
    """Records SummaryWriter calls."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.images, self.closed = log_dir, {}, {}, False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars[(tag, step)] = value

    def add_image(self, tag: str, pixels: np.ndarray, global_step: int | None = None, dataformats: str = "CHW") -> None:
        self.images[tag] = (pixels.shape, dataformats)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_missing_tensorboard_is_a_user_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes `import tensorboard` fail, installed or not
    with pytest.raises(UserError) as error:
        tb_logger.TensorBoardLogger(tmp_path / "tb")
    assert str(error.value) == "--tensorboard needs the tensorboard package: pip install tensorboard"


def test_logger_writes_epochs_and_figures(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_module = types.ModuleType("torch.utils.tensorboard")
    fake_module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_module)
    Image.fromarray(np.zeros((3000, 1500, 3), dtype=np.uint8)).save(tmp_path / "cm.png")
    row = {"epoch": 2, "train_loss": 1.5, "train_acc": 0.5, "val_loss": 1.2, "val_acc": 0.6, "lr": 1e-3, "seconds": 3.0}
    with tb_logger.TensorBoardLogger(tmp_path / "tb") as logger:
        logger.log_epoch(2, row, images_per_second=123.0)
        logger.log_figure("confusion_matrix", tmp_path / "cm.png")
        writer = logger._writer
    assert writer.log_dir == str(tmp_path / "tb") and writer.closed
    assert writer.scalars == {("loss/train", 2): 1.5, ("accuracy/train", 2): 0.5, ("loss/val", 2): 1.2,
                              ("accuracy/val", 2): 0.6, ("learning_rate", 2): 1e-3, ("time/epoch_seconds", 2): 3.0,
                              ("throughput/train_images_per_second", 2): 123.0}
    assert writer.images == {"confusion_matrix": ((2048, 1024, 3), "HWC")}
