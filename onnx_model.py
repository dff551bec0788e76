"""The ONNX model export.py writes and predict.py runs: its input and output names, its metadata (what predict.py
needs to preprocess and calibrate as for the ``.pt``), the onnxruntime session standing in for the network, and the
one-line message when the optional packages are missing (``pip install onnx onnxruntime onnxscript``).

The metadata (the model's ``metadata_props``, every value JSON) is written by :func:`model_metadata` and read back by
:func:`onnx_metadata`: ``format``, ``class_names``, ``img_size``, ``mean``, ``std``, ``temperature`` (null for a
checkpoint without one), ``arch``, ``epoch`` and ``checkpoint`` (the ``.pt`` it came from).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from checkpoint import Checkpoint
from utils import UserError, first_line

ONNX_FORMAT = "imagefolder-resnet-onnx/1"  # export.py's metadata "format"
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
ONNX_PIP = "pip install onnx onnxruntime onnxscript"
ONNX_REQUIRED_METADATA = ("class_names", "img_size", "mean", "std")


def is_onnx(path: str | Path) -> bool:
    """True for a ``.onnx`` file name (a model export.py wrote)."""
    return str(path).lower().endswith(".onnx")


def require_module(name: str, purpose: str) -> ModuleType:
    """Import the optional package ``name``, or refuse in one line naming the ``pip install``."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{purpose} needs the {name} package, which is not installed: {ONNX_PIP}") from None


def model_metadata(checkpoint: Checkpoint, source: str) -> dict[str, Any]:
    """The metadata export.py writes into the model of ``checkpoint`` (``source``: its path), which predict.py reads
    back (see the module's docstring)."""
    return {"format": ONNX_FORMAT, "class_names": list(checkpoint.class_names), "img_size": checkpoint.eval_size,
            "mean": list(checkpoint.mean), "std": list(checkpoint.std), "temperature": checkpoint.temperature,
            "arch": checkpoint.arch, "epoch": checkpoint.epoch, "checkpoint": source}


@dataclass(frozen=True)
class OnnxFile:
    """An ONNX model export.py wrote: what its checkpoint said (classes, preprocessing, temperature, epoch; no
    weights, no options) and the onnxruntime session (CPU) that runs it."""

    checkpoint: Checkpoint
    session: Any


def load_onnx(path: str) -> OnnxFile:
    """An ONNX model written by export.py: its checkpoint's class names, eval size, mean, std and temperature (from
    the model's metadata) and an onnxruntime session (CPU)."""
    onnxruntime = require_module("onnxruntime", f"--checkpoint {path}")
    if not Path(path).is_file():
        raise UserError(f"--checkpoint {path}: file not found; write it with python export.py --checkpoint best.pt "
                        f"--output {path}")
    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types for every unreadable file
        raise UserError(f"--checkpoint {path}: onnxruntime cannot load it ({first_line(error)}); export it again "
                        "with python export.py") from None
    metadata = onnx_metadata(session.get_modelmeta().custom_metadata_map, path)
    size = int(metadata["img_size"])
    checkpoint = Checkpoint(model={}, arch=f"{metadata.get('arch', '?')} as ONNX",
                            class_names=list(metadata["class_names"]), img_size=size, test_size=size,
                            mean=tuple(float(value) for value in metadata["mean"]),
                            std=tuple(float(value) for value in metadata["std"]), config={},
                            epoch=metadata.get("epoch") or 0, temperature=metadata.get("temperature"))
    return OnnxFile(checkpoint, session)


def onnx_metadata(properties: dict[str, str], path: str) -> dict[str, Any]:
    """export.py's metadata (JSON values) of an ONNX model; refuses a model without it."""
    try:
        metadata = {key: json.loads(value) for key, value in properties.items()}
    except json.JSONDecodeError:
        metadata = {}
    missing = [key for key in ONNX_REQUIRED_METADATA if key not in metadata]
    if metadata.get("format") != ONNX_FORMAT or missing:
        raise UserError(f"--checkpoint {path}: an ONNX model without export.py's metadata (class names, image size, "
                        "mean and std); export it with python export.py --checkpoint best.pt")
    return metadata


class OnnxModel(nn.Module):
    """An onnxruntime session standing in for the network: float32 images ``[N, 3, H, W]`` in, logits out."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run([ONNX_OUTPUT], {ONNX_INPUT: pixels})[0])
