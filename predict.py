"""Predict the unlabeled test images with a trained checkpoint and write the submission CSV.

    python predict.py --checkpoint checkpoints/best.pt --test-dir data/test --output prediction.csv
    python predict.py --checkpoint run1/best.pt run2/best.pt --tta flip --topk 5   # ensemble, test-time flips
    python predict.py --checkpoint checkpoints/best.pt photo.jpg more/*.png        # a few files: a table
    python predict.py --checkpoint model.onnx                                       # export.py's model, onnxruntime

Writes ``image_name,pred_label`` with one row per test image, ``pred_label`` being the class folder name.
From Python, :class:`Classifier` loads a checkpoint once and predicts paths and PIL images into a pandas table.

Every prediction is the class with the highest mean softmax probability, the mean taken over the test-time
views (``--tta``) and over the checkpoints (one or more, equally weighted; they must share one class list).
The views are made from the already-transformed batch, so they cost forward passes but no extra decoding:

- ``none``: the evaluation centre crop alone (1 view);
- ``flip``: the centre crop and its horizontal mirror (2 views);
- ``multi``: those two, plus a 1.15x zoom into the centre crop (bilinear upscale of the crop, centre-cropped
  back to the input size) and its mirror (4 views).

Each model's logits are divided by its checkpoint's ``temperature`` (fitted on the validation images at the end of
training) before the softmax, so the probabilities are calibrated; older checkpoints have none (T = 1, with a note).

``--topk K`` also writes ``<output stem>_probabilities.csv`` beside the submission (``prediction_probabilities.csv``
for ``prediction.csv``): ``image_name``, then ``label_1,prob_1,...,label_K,prob_K``, most probable first, and with
``--min-confidence P`` a ``low_confidence`` column (True where the top probability is under P).

The files written (and ``--labels``, the score) are ``submission.py``'s; ``.onnx`` models run through
``onnx_model.py``.
"""

from __future__ import annotations

import argparse
import glob
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from accel import Accel, choose_data_path, set_up_accel
from batch_iterables import HostBatches
from calibration import DEFAULT_TEMPERATURE
from checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint
from dataset import find_test_images, report_ignored, same_name
from engine import predict_probabilities
from images import DEFAULT_MAX_IMAGE_PIXELS, is_image_content, is_image_name, to_rgb
from loader_items import ImageFiles, collate_decoded
from onnx_model import OnnxFile, OnnxModel, is_onnx, load_onnx
from options import add_inference_options, add_max_image_pixels_option, check_max_image_pixels, script_parser
from pipeline import inference_batches, loader_options
from recipe import build_eval_transform, eval_resize_size
from submission import (
    DEFAULT_OUTPUT,
    check_output_paths,
    drop_failed_rows,
    image_names,
    labels_of,
    low_confidence,
    note_unmatched_label_rows,
    output_targets,
    read_labels,
    refuse_unreadable_images,
    report_low_confidence,
    report_score,
    resolve_topk,
    write_outputs,
)
from utils import UserError, argument_list, describe_device, exit_on_user_error, printable, resolve_workers, some_names

if TYPE_CHECKING:
    import pandas as pd

TTA_CHOICES = ("none", "flip", "multi")
MULTI_ZOOM = 1.15  # how far "--tta multi" zooms into the centre crop
DEFAULT_TEST_DIR = "data/test"
FILE_MODE_TOPK = 3  # the table of a few files shows this many labels unless --topk says otherwise
GLOB_CHARACTERS = "*?["


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The prediction options."""
    parser = script_parser(
        "predict.py",
        "Write prediction.csv (image_name,pred_label) for every image in the test folder, or print the "
        "top labels of a few image files.",
        add_help,
    )
    parser.add_argument("files", nargs="*", metavar="FILE",
                        help="image files or globs (photo.jpg 'shots/*.png') to predict instead of --test-dir: prints "
                             "each file's top labels; --output writes the CSV too")
    parser.add_argument("--checkpoint", nargs="+", default=["checkpoints/best.pt"],
                        help="a best.pt or last.pt written by train.py, or a .onnx written by export.py (run with "
                             "onnxruntime on the CPU); several: an ensemble averaging probabilities")
    parser.add_argument("--test-dir", default=None,
                        help=f"folder of unlabeled test images; None: {DEFAULT_TEST_DIR}, unless FILEs are given")
    parser.add_argument("--output", default=None,
                        help=f"the submission CSV to write; None: {DEFAULT_OUTPUT}, or with FILEs no file (the table "
                             "only)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="write the submission even if some test images cannot be decoded (their rows are left "
                             "out and listed)")
    parser.add_argument("--keep-ext", action="store_true", help="keep the file extension in image_name")
    parser.add_argument("--zip", action="store_true",
                        help="also write OUTPUT with .zip, holding prediction.csv, for upload")
    parser.add_argument("--labels",
                        help="CSV of image_name,label to score the predictions against (e.g. "
                             "data/sample/test_labels.csv)")
    parser.add_argument("--tta", default="none", choices=TTA_CHOICES,
                        help="test-time views averaged: none; flip = centre crop + mirror; multi = flip plus a 1.15x "
                             "centre zoom and its mirror (4 views)")
    parser.add_argument("--topk", type=int, default=0, metavar="K",
                        help="also write <OUTPUT stem>_probabilities.csv beside OUTPUT (prediction_probabilities.csv) "
                             "with the K most probable labels of each image and their calibrated probabilities")
    parser.add_argument("--min-confidence", type=float, default=None, metavar="P",
                        help="mark the images whose top probability is under P (0..1) in a low_confidence column of "
                             "the probabilities file (written with --topk 1 if --topk is not given) and count them; "
                             "the submission keeps every row")
    add_inference_options(parser)
    add_max_image_pixels_option(parser)
    return parser


def refuse_labeled_folders(test_dir: Path, paths: Sequence[Path], class_names: Sequence[str]) -> None:
    """A test folder whose sub-folders are the model's classes, or train/val/test, is a labeled split or the data
    folder: predicting it would write a submission of the wrong images."""
    nested = [path.relative_to(test_dir).parts for path in paths]
    folders = sorted({parts[0] for parts in nested if len(parts) > 1})
    splits = [name for name in folders if name in ("train", "val", "test")]
    if splits:
        raise UserError(f"--test-dir {test_dir}: holds {', '.join(name + '/' for name in splits)}, so it is the data "
                        f"folder, not its test images; pass --test-dir {test_dir / 'test'}")
    known = {same_name(name) for name in class_names}
    classes = [name for name in folders if same_name(name) in known]
    if classes:
        raise UserError(f"--test-dir {test_dir}: its sub-folders {', '.join(classes[:5])} are named like the model's "
                        "classes, so it is a labeled split; evaluate it with python evaluate.py --split-dir "
                        f"{test_dir}, or pass the folder of unlabeled test images")


# --------------------------------------------------------------------------- files given on the command line


def split_images_from_checkpoints(checkpoints: list[str], files: list[str]) -> tuple[list[str], list[str]]:
    """``--checkpoint best.pt photo.jpg``: argparse gives the image to ``--checkpoint`` (which takes several values);
    values after the first that name images (by extension, globs too, or by content) are files to predict."""
    images = [value for value in checkpoints[1:] if names_an_image(value)]
    return [value for value in checkpoints if value not in images], images + files


def names_an_image(value: str) -> bool:
    """True when a command-line value is an image file, or a name or glob with an image extension."""
    path = Path(value)
    return is_image_name(path) or (path.is_file() and is_image_content(path))


def expand_files(patterns: Sequence[str]) -> list[Path]:
    """The image files named on the command line, globs expanded here too (a Windows shell leaves them to us), in
    the order given, each once; a missing file or a glob matching nothing is refused, all named in one line."""
    found: list[Path] = []
    missing: list[str] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            raise UserError(f"{pattern}: a folder; pass --test-dir {pattern} to predict the images in it")
        if path.is_file():
            found.append(path)
        elif any(char in pattern for char in GLOB_CHARACTERS):
            matches = sorted(Path(match) for match in glob.glob(pattern) if Path(match).is_file())
            images = [match for match in matches if names_an_image(str(match))]
            report_ignored(pattern, [match for match in matches if match not in images])
            if images:
                found.extend(images)
            else:
                missing.append(f"{pattern} (no image file matches it)")
        else:
            missing.append(f"{pattern} (file not found)")
    if missing:
        raise UserError(f"cannot predict {some_names(missing)}; check the path{'s' if len(missing) > 1 else ''}")
    return list(dict.fromkeys(found))


def top_labels_table(names: Sequence[str], probabilities: torch.Tensor, class_names: Sequence[str], k: int,
                     low: Sequence[bool] | None = None) -> str:
    """Each file's ``k`` most probable labels and their probabilities, as a small text table (``low``: a column
    marking the low-confidence rows)."""
    top_probabilities, top_indices = probabilities.topk(k, dim=1)
    header = ["file"] + [f"top {rank}" for rank in range(1, k + 1)] + (["low confidence"] if low is not None else [])
    rows = [[printable(name)]
            + [f"{class_names[index]} {value:.3f}" for index, value in zip(indices, values, strict=True)]
            + (["yes" if low[row] else ""] if low is not None else [])
            for row, (name, indices, values) in enumerate(zip(names, top_indices.tolist(),
                                                              top_probabilities.tolist(), strict=True))]
    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in [header, *rows])


# --------------------------------------------------------------------------- test-time views and ensembles

View = Callable[[torch.Tensor], torch.Tensor]


def centre(images: torch.Tensor) -> torch.Tensor:
    """The batch as it is: the evaluation centre crop."""
    return images


def hflip(images: torch.Tensor) -> torch.Tensor:
    """Mirror a batch ``[N, C, H, W]`` left to right."""
    return images.flip(-1)


def zoom_centre(images: torch.Tensor, factor: float = MULTI_ZOOM) -> torch.Tensor:
    """Enlarge a batch by ``factor`` (bilinear) and centre-crop it back to its size: a zoom into the centre.

    Bilinear resampling is linear, so doing this on normalized images equals doing it before normalization.
    """
    height, width = images.shape[-2:]
    zoomed = F.interpolate(images, size=(round(height * factor), round(width * factor)), mode="bilinear",
                           align_corners=False)
    top, left = (zoomed.shape[-2] - height) // 2, (zoomed.shape[-1] - width) // 2
    return zoomed[..., top : top + height, left : left + width]


def zoom_centre_flipped(images: torch.Tensor) -> torch.Tensor:
    """The mirror of :func:`zoom_centre`."""
    return hflip(zoom_centre(images))


def tta_views(mode: str) -> list[View]:
    """The views ``--tta`` averages over; the first is always the plain batch."""
    views: dict[str, list[View]] = {
        "none": [centre],
        "flip": [centre, hflip],
        "multi": [centre, hflip, zoom_centre, zoom_centre_flipped],
    }
    if mode not in views:
        raise UserError(f"--tta {mode}: expected one of {', '.join(TTA_CHOICES)}")
    return views[mode]


class AveragedSoftmax(nn.Module):
    """Several models over several views of a batch: the log of their mean softmax probabilities, each model's
    logits divided by its temperature first (1: as they are).

    It returns log-probabilities so it can stand in for a model in ``engine.predict_probabilities``: the softmax
    that function applies turns them back into exactly the mean probabilities.
    """

    def __init__(self, models: Sequence[nn.Module], views: Sequence[View],
                 temperatures: Sequence[float] | None = None) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.views = list(views)
        self.temperatures = [1.0] * len(models) if temperatures is None else list(temperatures)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total = None
        for model, temperature in zip(self.models, self.temperatures, strict=True):
            for view in self.views:
                probabilities = (model(view(images)).float() / temperature).softmax(dim=1)
                total = probabilities if total is None else total + probabilities
        return (total / (len(self.models) * len(self.views))).log()


@dataclass
class Ensemble:
    """The models of ``--checkpoint`` on their device, each with its checkpoint (classes, preprocessing) and its
    softmax temperature."""

    checkpoints: list[Checkpoint]
    models: list[nn.Module]
    temperatures: list[float]
    accel: Accel
    data_path: str = "cpu"  # where files are decoded and cropped: "cpu" or "gpu", as --augment-device chose

    @property
    def class_names(self) -> list[str]:
        """The class list the models share."""
        return list(self.checkpoints[0].class_names)


def load_ensemble(paths: Sequence[str | Path], device: str, amp: str, data_path: str = "auto") -> Ensemble:
    """Read every ``--checkpoint`` (PyTorch or ONNX, not both), and put the models on the device ``--device`` and
    ``--amp`` pick (an ONNX model: onnxruntime on the CPU, fp32); ``data_path``: ``--augment-device``."""
    paths = [str(path) for path in paths]
    loaded = load_checkpoints(paths)
    checkpoints = [checkpoint_of(item) for item in loaded]
    temperatures = [checked_temperature(checkpoint, path) for path, checkpoint in zip(paths, checkpoints, strict=True)]
    if isinstance(loaded[0], OnnxFile):
        if device not in ("auto", "cpu") or amp not in ("auto", "off"):
            print(f"note: --device {device} --amp {amp} do not apply to an ONNX model: onnxruntime runs it on the "
                  "CPU in fp32")
        accel = Accel(torch.device("cpu"), None, channels_last=False)
        return Ensemble(checkpoints, [OnnxModel(item.session) for item in loaded], temperatures, accel, "cpu")
    accel = set_up_accel(device, amp)
    models = [accel.prepare_model(model_from_checkpoint(checkpoint)) for checkpoint in checkpoints]
    return Ensemble(checkpoints, models, temperatures, accel, choose_data_path(data_path, accel.device))


def load_checkpoints(paths: Sequence[str]) -> list[Checkpoint] | list[OnnxFile]:
    """Read every ``--checkpoint`` (train.py's ``.pt`` or export.py's ``.onnx``, one kind); they must share one
    class list (same names, same order)."""
    onnx = [path for path in paths if is_onnx(path)]
    if onnx and len(onnx) < len(paths):
        other = next(path for path in paths if not is_onnx(path))
        raise UserError(f"--checkpoint {onnx[0]} and {other}: an ensemble of ONNX and PyTorch models is not supported "
                        f"(they run on different devices); pass only .pt files, or export {other} with python "
                        "export.py and pass only .onnx files")
    loaded = [load_onnx(path) if is_onnx(path) else load_checkpoint(path) for path in paths]
    checkpoints = [checkpoint_of(item) for item in loaded]
    first = checkpoints[0].class_names
    for path, checkpoint in zip(paths[1:], checkpoints[1:], strict=True):
        if checkpoint.class_names != first:
            raise UserError(f"--checkpoint {paths[0]} and {path} have different class lists "
                            f"({class_list_difference(first, checkpoint.class_names)}); "
                            "an ensemble needs models trained on the same classes")
    for path, checkpoint in zip(paths, checkpoints, strict=True):
        print(f"checkpoint: {path} ({checkpoint.arch}, {len(checkpoint.class_names)} classes, "
              f"{checkpoint.eval_size} px, epoch {checkpoint.epoch})")
    return loaded


def checkpoint_of(item: Checkpoint | OnnxFile) -> Checkpoint:
    """What a loaded ``--checkpoint`` says (classes, preprocessing, temperature), a ``.pt``'s or an ONNX model's."""
    return item.checkpoint if isinstance(item, OnnxFile) else item


def checked_temperature(checkpoint: Checkpoint, path: str) -> float:
    """The temperature dividing the model's logits before the softmax (fitted on validation at the end of training);
    1.0, with a note, for a checkpoint without one; a damaged value is refused."""
    temperature = checkpoint.temperature
    if temperature is None:
        print(f"note: no temperature in {path} (train.py stores one in best.pt when a run ends; last.pt, the best.pt "
              "of an unfinished run and older checkpoints have none): probabilities uncalibrated, "
              f"T={DEFAULT_TEMPERATURE}")
        return DEFAULT_TEMPERATURE
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise UserError(f"--checkpoint {path}: its temperature {temperature!r} is not a positive number; the file is "
                        "damaged, use another copy")
    return float(temperature)


def class_list_difference(first: Sequence[str], second: Sequence[str]) -> str:
    """A short description of how two class lists differ."""
    first_set, second_set = set(first), set(second)
    only_first = [name for name in first if name not in second_set]
    only_second = [name for name in second if name not in first_set]
    if not only_first and not only_second:
        return "the same classes in a different order" if len(first) == len(second) else "repeated class names"
    parts = [f"{len(first)} vs {len(second)} classes"]
    if only_first:
        parts.append(f"only in the first: {', '.join(only_first[:5])}{' ...' if len(only_first) > 5 else ''}")
    if only_second:
        parts.append(f"only in the second: {', '.join(only_second[:5])}{' ...' if len(only_second) > 5 else ''}")
    return "; ".join(parts)


def preprocessing_groups(checkpoints: Sequence[Checkpoint]) -> list[list[int]]:
    """Indices of the checkpoints grouped by input size and normalization: each group shares one decoding pass."""
    groups: dict[tuple, list[int]] = {}
    for index, checkpoint in enumerate(checkpoints):
        key = checkpoint.preprocessing
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def ensemble_probabilities(
    ensemble: Ensemble,
    items: Sequence[str | Path | Image.Image],
    tta: str,
    batch_size: int,
    workers: int,
    max_pixels: int,
    show_progress: bool,
) -> tuple[torch.Tensor, dict[int, str]]:
    """Mean softmax probabilities (temperature-scaled) over the models and test-time views, in ``items`` order;
    and why each position that failed to decode did."""
    views = tta_views(tta)
    total = torch.zeros(len(items), len(ensemble.class_names))
    failed: dict[int, str] = {}
    for group in preprocessing_groups(ensemble.checkpoints):
        batches = item_batches(items, ensemble.checkpoints[group[0]], ensemble.accel, batch_size, workers, max_pixels,
                               ensemble.data_path)
        model = AveragedSoftmax([ensemble.models[index] for index in group], views,
                                [ensemble.temperatures[index] for index in group])
        probabilities, group_failed = predict_probabilities(model, batches, len(items), ensemble.accel, show_progress)
        failed.update(group_failed)
        total += probabilities * len(group)
    return total / len(ensemble.checkpoints), dict(sorted(failed.items()))


def item_batches(items: Sequence[str | Path | Image.Image], checkpoint: Checkpoint, accel: Accel,
                 batch_size: int, workers: int, max_pixels: int, data_path: str = "cpu") -> Any:
    """Batches of ``items`` through ``checkpoint``'s eval recipe: files on the ``data_path`` (``cpu`` or ``gpu``,
    as ``accel.choose_data_path`` chose), or, when PIL images are among them, all on the CPU path (the GPU path
    decodes files' bytes, which an image in memory no longer has)."""
    if all(isinstance(item, (str, Path)) for item in items):
        return inference_batches([str(item) for item in items], *checkpoint.preprocessing, accel, data_path == "gpu",
                                 batch_size, workers, max_pixels)
    size = checkpoint.eval_size
    pictures = PicturesAndFiles(items, build_eval_transform(size, checkpoint.mean, checkpoint.std),
                                eval_resize_size(size), max_pixels)
    sampler = BatchSampler(SequentialSampler(range(len(items))), batch_size, drop_last=False)
    loader = DataLoader(pictures, batch_sampler=sampler, collate_fn=collate_decoded,
                        **loader_options(workers, 0, accel, pin_memory=accel.device.type == "cuda"))
    return HostBatches(loader, accel, labeled=False)


class PicturesAndFiles(Dataset):
    """The CPU path's items (``pipeline.ImageFiles``: image tensor, label -1, position) where some are PIL images
    already in memory: those skip the decoding, and get its EXIF orientation and RGB conversion (``images.to_rgb``)
    before the same transform."""

    def __init__(self, items: Sequence[str | Path | Image.Image], transform: Callable[[Image.Image], torch.Tensor],
                 decode_min_side: int, max_pixels: int) -> None:
        self.files = ImageFiles(["" if isinstance(item, Image.Image) else item for item in items], None, transform,
                                decode_min_side, max_pixels)
        self.pictures = {index: item for index, item in enumerate(items) if isinstance(item, Image.Image)}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int) -> Any:
        if key in self.pictures:
            return self.files.transform(to_rgb(ImageOps.exif_transpose(self.pictures[key]))), -1, key
        return self.files[key]


def check_args(args: argparse.Namespace) -> None:
    """Refuse option values that would only fail later."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.topk < 0:
        raise UserError(f"--topk {args.topk}: must be 0 (no probabilities file) or more")
    if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:
        raise UserError(f"--min-confidence {args.min_confidence:g}: must be a probability, from 0 to 1 (e.g. 0.5)")
    if args.files and args.test_dir is not None:
        raise UserError(f"--test-dir {args.test_dir} and image files ({some_names(args.files, 3)}): pass one of them")
    if args.files and args.zip and args.output is None:
        raise UserError("--zip with image files: pass --output too (with files alone, predict.py only prints a table)")
    check_max_image_pixels(args.max_image_pixels)


def describe_run(ensemble: Ensemble, tta: str) -> str:
    """The line saying where and how the models run."""
    runtime = " (onnxruntime)" if isinstance(ensemble.models[0], OnnxModel) else ""
    models = f"; ensemble of {len(ensemble.models)} models" if len(ensemble.models) > 1 else ""
    return (f"device: {describe_device(ensemble.accel.device)}, precision {ensemble.accel.precision_name}{runtime}; "
            f"test-time views: {tta}{models}")


def resolve_output(args: argparse.Namespace) -> Path | None:
    """The submission to write: ``--output``; without it ``prediction.csv``, or nothing for image files (a table)."""
    if args.output is not None:
        return Path(args.output)
    return None if args.files else Path(DEFAULT_OUTPUT)


@exit_on_user_error
def main(argv: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Predict every test image and write the submission; returns the output path and row count (and the score)."""
    args = get_args_parser().parse_args(argument_list(argv, "predict.py"))
    args.checkpoint, args.files = split_images_from_checkpoints(args.checkpoint, args.files)
    try:
        return predict_and_write(args)
    except KeyboardInterrupt:
        output = resolve_output(args)
        print("interrupted: " + (f"no submission written ({output} is as it was)" if output else "nothing written"),
              file=sys.stderr)
        raise SystemExit(130) from None


def predict_and_write(args: argparse.Namespace) -> dict[str, Any]:
    """The whole prediction: checks, inference, the submission (or, for image files, a table) and its score."""
    check_args(args)
    args.workers = resolve_workers(args.workers)
    output = resolve_output(args)
    check_output_paths(output_targets(output, args.zip, bool(args.topk) or args.min_confidence is not None))
    truth = read_labels(args.labels) if args.labels else None
    test_dir = None if args.files else args.test_dir or DEFAULT_TEST_DIR
    if test_dir is None:
        paths = expand_files(args.files)
    else:  # the folder's errors come before the model is loaded and the device named
        paths, ignored = find_test_images(test_dir)
        report_ignored(test_dir, ignored)
    ensemble = load_ensemble(args.checkpoint, args.device, args.amp, args.augment_device)
    class_names = ensemble.class_names
    topk = resolve_topk(args.topk, len(class_names), args.min_confidence if output else None)
    print(describe_run(ensemble, args.tta))
    if test_dir is not None:
        refuse_labeled_folders(Path(test_dir), paths, class_names)
    names = image_names(paths, args.keep_ext)
    true_label_of = dict(zip(names, labels_of(paths, truth), strict=True)) if truth is not None else {}
    if truth is not None:
        note_unmatched_label_rows(paths, truth, args.labels)
    if not args.allow_missing:
        refuse_unreadable_images(paths, args.workers, args.max_image_pixels)

    probabilities, failed = ensemble_probabilities(ensemble, paths, args.tta, args.batch_size, args.workers,
                                                   args.max_image_pixels, not args.no_progress)
    names, probabilities = drop_failed_rows(names, probabilities, failed, paths, output or "the table",
                                            args.allow_missing)
    predicted = [class_names[index] for index in probabilities.argmax(dim=1).tolist()]
    result: dict[str, Any] = {}
    if args.files:
        kept = [str(path) for index, path in enumerate(paths) if index not in failed]
        print(top_labels_table(kept, probabilities, class_names, min(args.topk or FILE_MODE_TOPK, len(class_names)),
                               low_confidence(probabilities, args.min_confidence)))
    if output is not None:
        result.update(write_outputs(output, names, predicted, probabilities, class_names, topk, args.zip,
                                    args.min_confidence))
    result.update(report_low_confidence(probabilities, args.min_confidence))
    if truth is not None:
        result.update(report_score(names, predicted, [true_label_of[name] for name in names], truth, class_names,
                                   args.labels))
    return result


# --------------------------------------------------------------------------- from Python


class Classifier:
    """A trained model (a checkpoint, an ensemble of them, or export.py's ``.onnx``) loaded once, to predict images
    from Python with predict.py's preprocessing, device, precision and temperature::

        from predict import Classifier
        clf = Classifier("checkpoints/best.pt")            # keyword options as predict.py's flags, same defaults
        table = clf.predict(["a.jpg", Image.open("b.png")], topk=3)

    Files take predict.py's data path for the device; PIL images the CPU path's eval transform (see
    :func:`item_batches`).
    """

    def __init__(self, checkpoint: str | Path | Sequence[str | Path] = "checkpoints/best.pt", *, device: str = "auto",  # noqa: PLR0913
                 amp: str = "auto", tta: str = "none", batch_size: int = 128, workers: int | str = "auto",
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, show_progress: bool = False,
                 augment_device: str = "auto") -> None:
        paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
        tta_views(tta)  # refuses an unknown mode now, not at the first prediction
        self.ensemble = load_ensemble(paths, device, amp, augment_device)
        self.tta, self.batch_size, self.workers = tta, batch_size, resolve_workers(workers)
        self.max_image_pixels, self.show_progress = max_image_pixels, show_progress

    @property
    def class_names(self) -> list[str]:
        """The classes the model predicts, in its order."""
        return self.ensemble.class_names

    def predict(self, items: str | Path | Image.Image | Sequence[str | Path | Image.Image],
                topk: int = 1) -> pd.DataFrame:
        """One row an image, in order: ``name`` (the path as given, or a PIL image's file name or ``image <i>``),
        ``label``, ``probability`` and, for ``topk`` > 1, ``top{i}_label`` and ``top{i}_probability``."""
        import pandas as pd  # only the Python interface needs it

        items = [items] if isinstance(items, (str, Path, Image.Image)) else list(items)
        if topk < 1:
            raise UserError(f"topk={topk}: must be 1 or more")
        paths = [Path(item) for item in items if not isinstance(item, Image.Image)]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise UserError(f"cannot predict {some_names(missing)}: file not found")
        probabilities, failed = ensemble_probabilities(self.ensemble, items, self.tta, self.batch_size, self.workers,
                                                       self.max_image_pixels, self.show_progress)
        if failed:
            raise UserError(f"{len(failed)} image(s) could not be decoded: "
                            + "; ".join(f"{item_name(items[index], index)} ({reason})"
                                        for index, reason in failed.items()))
        return pd.DataFrame(prediction_rows([item_name(item, index) for index, item in enumerate(items)],
                                            probabilities, self.class_names, min(topk, len(self.class_names))))


def item_name(item: str | Path | Image.Image, index: int) -> str:
    """How :meth:`Classifier.predict` names an item: the path as given, a PIL image's file name, or ``image <i>``."""
    if isinstance(item, Image.Image):
        return getattr(item, "filename", "") or f"image {index}"
    return str(item)


def prediction_rows(names: Sequence[str], probabilities: torch.Tensor, class_names: Sequence[str],
                    k: int) -> list[dict[str, Any]]:
    """The rows of :meth:`Classifier.predict`'s table."""
    top_probabilities, top_indices = probabilities.topk(k, dim=1)
    rows = []
    for name, indices, values in zip(names, top_indices.tolist(), top_probabilities.tolist(), strict=True):
        row = {"name": name, "label": class_names[indices[0]], "probability": values[0]}
        if k > 1:
            for rank, (index, value) in enumerate(zip(indices, values, strict=True), start=1):
                row[f"top{rank}_label"], row[f"top{rank}_probability"] = class_names[index], value
        rows.append(row)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
