"""Export a trained checkpoint to ONNX, and check the exported model against PyTorch on real images.

    python export.py --checkpoint checkpoints/best.pt --output model.onnx
    python predict.py --checkpoint model.onnx --test-dir data/test        # runs it with onnxruntime

The model takes float32 images ``[N, 3, S, S]`` named ``images`` (N free, S the checkpoint's evaluation size),
normalized with the checkpoint's mean and std, and returns the logits ``[N, classes]`` named ``logits``. Its
metadata (``metadata_props``, every value JSON) holds ``format``, ``class_names``, ``img_size``, ``mean``, ``std``,
``temperature`` (null for a checkpoint without one), ``arch``, ``epoch`` and ``checkpoint``: what predict.py needs to
preprocess and calibrate as for the ``.pt``.

Parity: the exported model and PyTorch (both fp32 on the CPU) predict the same real images (the checkpoint's
validation images, or ``--images DIR``) through predict.py's CPU path; the largest logit difference and the top-1
agreement are printed, and an export whose largest difference is above ``--tolerance`` times the logit scale
(``max(1, largest |logit|)``) is refused: kept as ``<stem>.parity-failed.onnx`` to inspect, never under
``--output``. Why 1e-3: the two runtimes add in different orders and fuse layers differently (onnxruntime folds each
BatchNorm into its convolution), which moves fp32 logits by under 1e-6 of their scale (measured: 2.4e-6 at scale 6.4,
ResNet-18 on the 60 images of data/sample/val; 4.9e-7 at scale 1, ResNet-50 at 224 px, same images); a faulty export
(a lost normalization, a wrong operator) moves them by the order of the logits themselves. 1e-3 sits more than two
orders of magnitude from both; within it no probability moves by more than about 0.2% of itself per unit of logit
scale (each log-probability moves by at most twice the largest logit difference).

onnx, onnxruntime and onnxscript (which torch's ONNX exporter needs from torch 2.5; it is the default exporter from
torch 2.9) are optional packages: ``pip install onnx onnxruntime onnxscript``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from accel import Accel
from checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint
from dataset import list_images
from onnx_model import ONNX_INPUT, ONNX_OUTPUT, OnnxModel, is_onnx, load_onnx, model_metadata, require_module
from options import script_parser
from pipeline import inference_batches
from submission import check_output_paths
from utils import UserError, argument_list, exit_on_user_error, first_line

DEFAULT_TOLERANCE = 1e-3  # the largest logit difference allowed, relative to max(1, largest |logit|); see above
DEFAULT_MAX_IMAGES = 64
TORCHSCRIPT_OPSET = 17  # the older exporter's opset (torch 2.4); the dynamo exporter picks its own


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The export options."""
    parser = script_parser(
        "export.py",
        "Write an ONNX model of a checkpoint (dynamic batch, metadata for predict.py) and check it "
        "against PyTorch on real images.",
        add_help,
    )
    parser.add_argument("--checkpoint", default="checkpoints/best.pt", help="a best.pt or last.pt written by "
                        "train.py, or a run's output folder (its best.pt)")
    parser.add_argument("--output", help="the .onnx file to write (default: the checkpoint's name with .onnx)")
    parser.add_argument("--images", help="folder of real images for the parity check (default: the checkpoint's "
                        "validation images, found from its config's data_dir)")
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES, metavar="N",
                        help="images the parity check runs (spread evenly over the sorted list); 0 = all")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest |logit difference| allowed between ONNX and PyTorch, relative to "
                             "max(1, largest |logit|)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass in the parity check")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse option values that would only fail later."""
    if not args.tolerance > 0:
        raise UserError(f"--tolerance {args.tolerance:g}: must be above 0 (e.g. {DEFAULT_TOLERANCE:g})")
    if args.max_images < 0:
        raise UserError(f"--max-images {args.max_images}: must be 0 (all) or more")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")


def onnx_exporter() -> str:
    """Which exporter ``torch.onnx.export`` offers: ``dynamo`` where it takes ``dynamo=`` (torch 2.5+, the default
    from 2.9; it needs onnxscript), else ``torchscript`` (torch 2.4)."""
    return "dynamo" if "dynamo" in inspect.signature(torch.onnx.export).parameters else "torchscript"


def require_packages(exporter: str) -> Any:
    """The ``onnx`` module, after checking every package the export and its parity check need."""
    onnx = require_module("onnx", "export.py")
    require_module("onnxruntime", "export.py's parity check")
    if exporter == "dynamo":
        require_module("onnxscript", f"torch {torch.__version__.split('+')[0]}'s ONNX exporter")
    return onnx


def output_path(args: argparse.Namespace) -> Path:
    """``--output``, or the checkpoint's path with ``.onnx``; refused unless it ends in ``.onnx`` (predict.py tells
    an ONNX model by its extension)."""
    checkpoint = Path(args.checkpoint)
    output = Path(args.output) if args.output else (checkpoint / "best.pt" if checkpoint.is_dir() else checkpoint)
    output = output if args.output else output.with_suffix(".onnx")
    if not is_onnx(output):
        raise UserError(f"--output {output}: name it with .onnx (predict.py --checkpoint tells ONNX models by it), "
                        f"e.g. {output.with_suffix('.onnx')}")
    return output


# --------------------------------------------------------------------------- the parity images


def parity_images(checkpoint: Checkpoint, images_dir: str | None, limit: int) -> tuple[list[str], str]:
    """Real images for the parity check, at most ``limit`` (0: all) spread over the sorted list, and where they come
    from: ``--images``, else the checkpoint's validation images."""
    paths, source = folder_images(Path(images_dir)) if images_dir else validation_images(checkpoint)
    if limit and len(paths) > limit:
        paths = [paths[index * len(paths) // limit] for index in range(limit)]
    return [str(path) for path in paths], source


def folder_images(folder: Path) -> tuple[list[Path], str]:
    """The image files in ``folder`` and its sub-folders."""
    if not folder.is_dir():
        raise UserError(f"--images {folder}: folder not found; pass a folder of images like those the model will see")
    paths, _ = list_images(folder)
    if not paths:
        raise UserError(f"--images {folder}: no image files in it or its sub-folders")
    return paths, str(folder)


def validation_images(checkpoint: Checkpoint) -> tuple[list[Path], str]:
    """The validation images of the checkpoint's run: ``DATA_DIR/val``, else the images of ``DATA_DIR/train`` it
    held out (its stored list), with ``DATA_DIR`` from its config."""
    data_dir = checkpoint.config.get("data_dir")
    if data_dir:
        val_dir = Path(data_dir) / "val"
        paths = list_images(val_dir)[0] if val_dir.is_dir() else []
        if paths:
            return paths, str(val_dir)
        train_dir = Path(data_dir) / "train"
        held_out = [train_dir / name for name in checkpoint.held_out_val_files or []]
        paths = [path for path in held_out if path.is_file()]
        if paths:
            return paths, f"the validation images held out of {train_dir}"
    where = f"no val/ or held-out images under its data_dir {data_dir}" if data_dir else "its config has no data_dir"
    raise UserError(f"--images: the parity check needs real images and the checkpoint's validation images are not "
                    f"found here ({where}); pass --images DIR, a folder of images like those the model will see")


# --------------------------------------------------------------------------- export


@contextlib.contextmanager
def exporter_output_held() -> Iterator[io.StringIO]:
    """Hold the exporter's progress lines and warnings back (shown only if it fails)."""
    held = io.StringIO()
    with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield held


def export_onnx(model: nn.Module, img_size: int, path: Path, exporter: str) -> None:
    """``torch.onnx.export`` of ``model`` (on the CPU, fp32, eval mode) for ``[N, 3, img_size, img_size]`` images,
    N free, into the single file ``path``."""
    parameters = inspect.signature(torch.onnx.export).parameters
    options: dict[str, Any] = {"input_names": [ONNX_INPUT], "output_names": [ONNX_OUTPUT]}
    if exporter == "dynamo":
        options.update(dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
        if "external_data" in parameters:
            options["external_data"] = False  # one file: the weights inside, not beside it
    else:
        options.update(dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                       opset_version=TORCHSCRIPT_OPSET)
        if "dynamo" in parameters:
            options["dynamo"] = False
    example = torch.zeros(2, 3, img_size, img_size)
    with exporter_output_held() as held:
        try:
            torch.onnx.export(model, (example,), str(path), **options)
        except Exception as error:  # the exporter raises many types; each means no model
            raise UserError(f"torch.onnx.export ({exporter} exporter) failed: {first_line(error)}"
                            + (f" (its last words: {held.getvalue().strip().splitlines()[-1]})"
                               if held.getvalue().strip() else "")) from None




def write_metadata(onnx: Any, path: Path, metadata: dict[str, Any]) -> None:
    """Set ``metadata`` (JSON values) as the model's ``metadata_props``, check the model, and save it in place."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {key: json.dumps(value) for key, value in metadata.items()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


# --------------------------------------------------------------------------- parity


@dataclass
class Parity:
    """How the exported model's logits compare with PyTorch's on the same images."""

    images: int
    max_difference: float  # the largest |logit difference|
    logit_scale: float  # max(1, the largest |PyTorch logit|)
    agreeing: int  # images whose top-1 class is the same

    def limit(self, tolerance: float) -> float:
        """The largest difference ``tolerance`` allows at this logit scale."""
        return tolerance * self.logit_scale

    def summary(self, tolerance: float) -> str:
        """One line: the figures and the limit."""
        return (f"max |logit difference| {self.max_difference:.2e} (logit scale {self.logit_scale:.2f}, limit "
                f"{self.limit(tolerance):.2e} = {tolerance:g} x scale); top-1 agreement {self.agreeing}/{self.images} "
                f"({self.agreeing / self.images:.2%})")


def pytorch_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The reference: ``model``'s fp32 logits on the CPU."""
    return model(images).float()


@torch.inference_mode()
def measure_parity(model: nn.Module, session: Any, paths: Sequence[str], checkpoint: Checkpoint,
                   batch_size: int) -> Parity:
    """Run PyTorch and the ONNX session on the same batches of ``paths`` (predict.py's CPU path: its decoding and
    eval transform) and compare their logits."""
    accel = Accel(torch.device("cpu"), None, channels_last=False)
    onnx_model = OnnxModel(session)
    images = agreeing = 0
    max_difference, largest = 0.0, 0.0
    batches = inference_batches(paths, *checkpoint.preprocessing, accel, on_device=False, batch_size=batch_size)
    for batch in batches:
        if batch.images is None:
            continue
        expected, exported = pytorch_logits(model, batch.images), onnx_model(batch.images)
        max_difference = max(max_difference, (expected - exported).abs().max().item())
        largest = max(largest, expected.abs().max().item())
        agreeing += int((expected.argmax(dim=1) == exported.argmax(dim=1)).sum())
        images += len(expected)
    if not images:
        raise UserError("none of the parity check's images could be decoded; pass --images DIR with readable images")
    return Parity(images, max_difference, max(1.0, largest), agreeing)


def keep_failed_export(path: Path, output: Path) -> Path:
    """Move a refused export out of ``--output``'s way, under a name that says so; returns that name."""
    failed = output.with_name(f"{output.stem}.parity-failed.onnx")
    os.replace(path, failed)
    return failed


@exit_on_user_error
def main(argv: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Export, check parity, and write ``--output``; returns the path and the parity figures."""
    args = get_args_parser().parse_args(argument_list(argv, "export.py"))
    check_args(args)
    exporter = onnx_exporter()
    onnx = require_packages(exporter)
    output = output_path(args)
    check_output_paths([("--output", output)])
    if is_onnx(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint}: already an ONNX model; pass the .pt it was exported from")
    checkpoint = load_checkpoint(args.checkpoint)
    paths, source = parity_images(checkpoint, args.images, args.max_images)
    model = model_from_checkpoint(checkpoint)
    size = checkpoint.eval_size
    print(f"exporting {args.checkpoint} ({checkpoint.arch}, {len(checkpoint.class_names)} classes, {size} px) "
          f"with torch {torch.__version__}'s {exporter} exporter")
    exporting = output.with_name(f"{output.stem}.exporting.onnx")
    try:
        export_onnx(model, size, exporting, exporter)
        write_metadata(onnx, exporting, model_metadata(checkpoint, str(args.checkpoint)))
        parity = measure_parity(model, load_onnx(str(exporting)).session, paths, checkpoint, args.batch_size)
    except BaseException:
        exporting.unlink(missing_ok=True)
        raise
    print(f"parity on {parity.images} images of {source} (onnxruntime vs PyTorch, fp32 on the CPU): "
          f"{parity.summary(args.tolerance)}")
    if parity.max_difference > parity.limit(args.tolerance):
        failed = keep_failed_export(exporting, output)
        raise UserError(f"the ONNX model's logits differ from PyTorch's by up to {parity.max_difference:.2e}, above "
                        f"the limit {parity.limit(args.tolerance):.2e} (--tolerance {args.tolerance:g}); not written "
                        f"to {output} (kept as {failed} to inspect)")
    os.replace(exporting, output)
    temperature = checkpoint.temperature
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB; temperature "
          f"{f'{temperature:.3f}' if temperature is not None else 'none'}): python predict.py --checkpoint {output}")
    return {"output": str(output), "images": parity.images, "max_difference": parity.max_difference,
            "logit_scale": parity.logit_scale, "agreeing": parity.agreeing}


if __name__ == "__main__":
    main(sys.argv[1:])
