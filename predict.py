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
"""

from __future__ import annotations

import argparse
import errno
import glob
import importlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

import metrics
from accel import Accel, set_up_accel
from calibration import DEFAULT_TEMPERATURE
from checkpoint import eval_size, load_checkpoint, model_from_checkpoint
from dataset import find_test_images, report_ignored, same_name
from engine import predict_probabilities
from images import DEFAULT_MAX_IMAGE_PIXELS, find_unreadable, is_image_content, is_image_name, to_rgb
from options import add_inference_options, add_max_image_pixels_option, check_max_image_pixels
from pipeline import HostBatches, ImageFiles, checkpoint_batches, choose_data_path, collate_decoded, loader_options
from recipe import build_eval_transform, eval_resize_size
from utils import (
    ArgumentParser,
    UserError,
    argument_list,
    atomic_write_bytes,
    csv_text,
    describe_device,
    exit_on_user_error,
    first_line,
    refuse_files_in_the_way,
    resolve_workers,
    some_names,
)

if TYPE_CHECKING:
    import pandas as pd

TTA_CHOICES = ("none", "flip", "multi")
# Header names read as a labels file's image-name and label columns (lower case, spaces as underscores).
NAME_COLUMNS = ("image_name", "image", "image_id", "id", "filename", "file_name", "file")
LABEL_COLUMNS = ("label", "class", "category")
LABELS_ENCODINGS = ("utf-8-sig", "cp1252")  # Excel's "CSV UTF-8" (with a BOM) and its plain "CSV" on Windows
# A labels file's separator (Excel writes ";" where "," is the decimal mark); the first wins a tie.
CSV_SEPARATORS = (",", ";", "\t", "|")
MULTI_ZOOM = 1.15  # how far "--tta multi" zooms into the centre crop
DEFAULT_TEST_DIR = "data/test"
DEFAULT_OUTPUT = "prediction.csv"
FILE_MODE_TOPK = 3  # the table of a few files shows this many labels unless --topk says otherwise
GLOB_CHARACTERS = "*?["
ONNX_FORMAT = "imagefolder-resnet-onnx/1"  # export.py's metadata "format"
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
ONNX_PIP = "pip install onnx onnxruntime onnxscript"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The prediction options."""
    parser = ArgumentParser(
        prog="predict.py",
        description="Write prediction.csv (image_name,pred_label) for every image in the test folder, or print the "
                    "top labels of a few image files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        add_help=add_help,
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


def image_names(paths: Sequence[Path], keep_ext: bool) -> list[str]:
    """The ``image_name`` column: file names without extension (unless ``keep_ext``); must be unique."""
    names = [path.name if keep_ext else path.stem for path in paths]
    first_with: dict[str, Path] = {}
    for path, name in zip(paths, names):
        if name in first_with:
            other = first_with[name]
            fix = "use --keep-ext" if other.name != path.name else "rename one of them"
            raise UserError(f"test images {other} and {path} would share the image_name {name!r}; {fix}")
        first_with[name] = path
    return names


def submission_csv(names: Sequence[str], labels: Sequence[str]) -> str:
    """The CSV text: header ``image_name,pred_label`` and one row per image."""
    return csv_text(["image_name", "pred_label"], zip(names, labels))


def write_zip(submission: bytes, zip_path: Path) -> None:
    """A zip archive holding ``prediction.csv`` (the bytes of the submission), as the course's upload page wants."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("prediction.csv", submission)
    atomic_write_bytes(zip_path, buffer.getvalue())


def read_labels(path: str | Path) -> dict[str, str]:
    """``image_name -> label`` from a labels CSV as people save them: UTF-8 with or without Excel's BOM, or Windows
    (cp1252) text; comma-, semicolon- or tab-separated; an image_name (or id, filename ...) and a label (or class)
    column. Rows without a name or a label are left out.

    Names are kept as written (``scan.001.jpg``, ``scan.001``), less any folder part; :func:`labels_of` matches them
    to the test files.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--labels {path}: file not found")
    table = read_user_csv(path, "--labels")
    name_column, label_column = find_columns(table.columns, path)
    truth: dict[str, str] = {}
    for written, label in zip(table[name_column].str.strip(), table[label_column].str.strip()):
        name = written.replace("\\", "/").rsplit("/", 1)[-1]
        if name and label and truth.setdefault(name, label) != label:
            raise UserError(f"--labels {path}: {name!r} is listed twice, as {truth[name]!r} and {label!r}; keep one "
                            "row per image")
    return truth


def read_user_csv(path: Path, flag: str) -> pd.DataFrame:
    """A CSV file someone saved by hand, as a pandas table of strings (no value read as a number or as missing)."""
    import pandas as pd  # only --labels needs it

    text = decode_user_text(path, flag)
    try:
        return pd.read_csv(io.StringIO(text), sep=sniff_separator(text), dtype=str, keep_default_na=False,
                           index_col=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{flag} {path}: empty; expected a header such as image_name,label and a row per image") \
            from None
    except pd.errors.ParserError as error:
        raise UserError(f"{flag} {path}: cannot be read as CSV ({first_line(error)}); fix that line (a name holding "
                        "the separator needs quotes)") from None


def decode_user_text(path: Path, flag: str) -> str:
    """The text of ``path`` in the first of :data:`LABELS_ENCODINGS` that decodes it (a UTF-8 BOM dropped)."""
    data = path.read_bytes()
    for encoding in LABELS_ENCODINGS:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise UserError(f"{flag} {path}: neither UTF-8 nor Windows (cp1252) text; save it as \"CSV UTF-8\"")


def sniff_separator(text: str) -> str:
    """The separator of CSV ``text``: whichever of :data:`CSV_SEPARATORS` its header line holds most (a comma if
    none: a one-column file)."""
    header = text.split("\n", 1)[0]
    return max(CSV_SEPARATORS, key=header.count)


def find_columns(columns: Sequence[str], path: Path) -> tuple[str, str]:
    """The image-name and label columns of a labels file's header (case, spaces and dashes aside)."""
    by_key = {str(column).strip().lower().replace(" ", "_").replace("-", "_"): column for column in columns}
    name = next((by_key[key] for key in NAME_COLUMNS if key in by_key), None)
    label = next((by_key[key] for key in LABEL_COLUMNS if key in by_key), None)
    if name is None or label is None or name == label:
        raise UserError(f"--labels {path}: its header has the column(s) {', '.join(repr(str(c)) for c in columns)}; "
                        f"expected an image-name column ({' or '.join(NAME_COLUMNS)}) and a label column "
                        f"({' or '.join(LABEL_COLUMNS)}), such as image_name,label")
    return name, label


def labels_of(paths: Sequence[Path], truth: dict[str, str]) -> list[str | None]:
    """The true label of each test file (None: not in ``truth``): the row for its name as written (``scan.001.jpg``),
    else the row for its name without extension (``scan.001``) when no other test file shares that name."""
    stems = Counter(path.stem for path in paths)
    labels: list[str | None] = []
    for path in paths:
        if path.name in truth:
            labels.append(truth[path.name])
        else:
            labels.append(truth.get(path.stem) if stems[path.stem] == 1 else None)
    return labels


def unmatched_label_rows(paths: Sequence[Path], truth: dict[str, str]) -> list[str]:
    """The names of the labels file that no test file takes (the rule of :func:`labels_of`), in the file's order."""
    stems = Counter(path.stem for path in paths)
    used = {path.name for path in paths} | {stem for stem, count in stems.items() if count == 1}
    return [name for name in truth if name not in used]


def note_unmatched_label_rows(paths: Sequence[Path], truth: dict[str, str], source: str) -> None:
    """Say how many rows of the labels file name no test image (and so score nothing), naming a few."""
    unmatched = unmatched_label_rows(paths, truth)
    if unmatched:
        print(f"note: --labels {source}: {len(unmatched)} of its {len(truth)} row(s) name no image being predicted and "
              f"are ignored: {some_names([printable(name) for name in unmatched])}")


def score(true_labels: Sequence[str | None], predicted: Sequence[str]) -> tuple[float, float, int]:
    """(accuracy, balanced accuracy, images scored) of predictions against the known labels (None: not scored)."""
    pairs = [(true, label) for true, label in zip(true_labels, predicted) if true is not None]
    if not pairs:
        raise UserError("--labels: none of the test images appear in the labels file")
    labels = sorted({label for pair in pairs for label in pair})
    index = {label: position for position, label in enumerate(labels)}
    confusion = metrics.confusion_matrix([index[true] for true, _ in pairs], [index[guess] for _, guess in pairs],
                                         len(labels))
    return metrics.accuracy(confusion), metrics.balanced_accuracy(confusion), len(pairs)


def note_label_problems(names: Sequence[str], true_labels: Sequence[str | None], truth: dict[str, str],
                        class_names: Sequence[str], source: str) -> None:
    """Say which test images the labels file leaves unscored, and which of its labels the model cannot predict."""
    unlabeled = [name for name, label in zip(names, true_labels) if label is None]
    if unlabeled:
        print(f"note: --labels {source}: {len(unlabeled)} test image(s) have no label and are not scored "
              f"({some_names([printable(name) for name in unlabeled])})")
    known = set(class_names)
    foreign = sorted({label for label in truth.values() if label not in known})
    if foreign:
        print(f"warning: --labels {source}: label(s) {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''} "
              "are not classes of the model, so those images can never be predicted right")


def report_score(names: Sequence[str], predicted: Sequence[str], true_labels: Sequence[str | None],
                 truth: dict[str, str], class_names: Sequence[str], source: str) -> dict[str, float]:
    """Print the score of the predictions against ``--labels`` (and what it leaves out); returns the figures."""
    note_label_problems(names, true_labels, truth, class_names, source)
    accuracy, balanced, scored = score(true_labels, predicted)
    print(f"score on {scored} labeled images: accuracy {accuracy:.2%}, balanced accuracy {balanced:.2%}")
    return {"accuracy": accuracy, "balanced_accuracy": balanced}


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


# --------------------------------------------------------------------------- file names that are not UTF-8


def undecodable(name: str) -> bool:
    """True for a name holding bytes that are not UTF-8: Python keeps each as a surrogate escape (U+DC80..U+DCFF)."""
    return any("\udc80" <= char <= "\udcff" for char in name)


def printable(name: str) -> str:
    """``name`` safe to print on any console: bytes that are not UTF-8 shown as ``\\xe9``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def csv_bytes(text: str) -> bytes:
    """CSV text as UTF-8, except that a name read from a file name that is not UTF-8 (``caf\\xe9.jpg`` from a zip made
    on Windows) gets its original bytes back, so that row still names its file."""
    return text.encode("utf-8", errors="surrogateescape")


def note_undecodable_names(names: Sequence[str], output: Path) -> None:
    """Say which image names are not UTF-8, and that ``output`` holds them as the files' own bytes."""
    affected = [name for name in names if undecodable(name)]
    if affected:
        print(f"warning: {len(affected)} image name(s) are not UTF-8 (e.g. files unzipped from an archive made on "
              f"Windows): {some_names([printable(name) for name in affected])}; {output} holds them as the files' own "
              "bytes so they match the files, and is UTF-8 everywhere else (rename the files for an all-UTF-8 CSV)",
              file=sys.stderr)


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
    rows = [[printable(name)] + [f"{class_names[index]} {value:.3f}" for index, value in zip(indices, values)]
            + (["yes" if low[row] else ""] if low is not None else [])
            for row, (name, indices, values) in enumerate(zip(names, top_indices.tolist(),
                                                              top_probabilities.tolist()))]
    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
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
        for model, temperature in zip(self.models, self.temperatures):
            for view in self.views:
                probabilities = (model(view(images)).float() / temperature).softmax(dim=1)
                total = probabilities if total is None else total + probabilities
        return (total / (len(self.models) * len(self.views))).log()


@dataclass
class Ensemble:
    """The models of ``--checkpoint`` on their device, each with its checkpoint (classes, preprocessing) and its
    softmax temperature."""

    checkpoints: list[dict[str, Any]]
    models: list[nn.Module]
    temperatures: list[float]
    accel: Accel
    data_path: str = "auto"  # --augment-device: where files are decoded and cropped

    @property
    def class_names(self) -> list[str]:
        """The class list the models share."""
        return list(self.checkpoints[0]["class_names"])


def load_ensemble(paths: Sequence[str | Path], device: str, amp: str, data_path: str = "auto") -> Ensemble:
    """Read every ``--checkpoint`` (PyTorch or ONNX, not both), and put the models on the device ``--device`` and
    ``--amp`` pick (an ONNX model: onnxruntime on the CPU, fp32); ``data_path``: ``--augment-device``."""
    paths = [str(path) for path in paths]
    checkpoints = load_checkpoints(paths)
    temperatures = [checked_temperature(checkpoint, path) for path, checkpoint in zip(paths, checkpoints)]
    if "onnx_session" in checkpoints[0]:
        if device not in ("auto", "cpu") or amp not in ("auto", "off"):
            print(f"note: --device {device} --amp {amp} do not apply to an ONNX model: onnxruntime runs it on the "
                  "CPU in fp32")
        accel = Accel(torch.device("cpu"), None, channels_last=False)
        return Ensemble(checkpoints, [OnnxModel(checkpoint["onnx_session"]) for checkpoint in checkpoints],
                        temperatures, accel)
    accel = set_up_accel(device, amp)
    models = [accel.prepare_model(model_from_checkpoint(checkpoint)) for checkpoint in checkpoints]
    return Ensemble(checkpoints, models, temperatures, accel, choose_data_path(data_path, accel.device))


def load_checkpoints(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Read every ``--checkpoint`` (train.py's ``.pt`` or export.py's ``.onnx``, one kind); they must share one
    class list (same names, same order)."""
    onnx = [path for path in paths if is_onnx(path)]
    if onnx and len(onnx) < len(paths):
        other = next(path for path in paths if not is_onnx(path))
        raise UserError(f"--checkpoint {onnx[0]} and {other}: an ensemble of ONNX and PyTorch models is not supported "
                        f"(they run on different devices); pass only .pt files, or export {other} with python "
                        "export.py and pass only .onnx files")
    checkpoints = [load_onnx(path) if is_onnx(path) else load_checkpoint(path) for path in paths]
    for path, checkpoint in zip(paths[1:], checkpoints[1:]):
        if checkpoint["class_names"] != checkpoints[0]["class_names"]:
            raise UserError(f"--checkpoint {paths[0]} and {path} have different class lists "
                            f"({class_list_difference(checkpoints[0]['class_names'], checkpoint['class_names'])}); "
                            "an ensemble needs models trained on the same classes")
    for path, checkpoint in zip(paths, checkpoints):
        print(f"checkpoint: {path} ({checkpoint['arch']}, {len(checkpoint['class_names'])} classes, "
              f"{eval_size(checkpoint)} px, epoch {checkpoint.get('epoch', '?')})")
    return checkpoints


def checked_temperature(checkpoint: dict[str, Any], path: str) -> float:
    """The temperature dividing the model's logits before the softmax (fitted on validation at the end of training);
    1.0, with a note, for a checkpoint without one; a damaged value is refused."""
    temperature = checkpoint.get("temperature")
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


def preprocessing_groups(checkpoints: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Indices of the checkpoints grouped by input size and normalization: each group shares one decoding pass."""
    groups: dict[tuple, list[int]] = {}
    for index, checkpoint in enumerate(checkpoints):
        key = (eval_size(checkpoint), tuple(checkpoint["mean"]), tuple(checkpoint["std"]))
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


def item_batches(items: Sequence[str | Path | Image.Image], checkpoint: dict[str, Any], accel: Accel,
                 batch_size: int, workers: int, max_pixels: int, data_path: str = "auto") -> Any:
    """Batches of ``items`` through ``checkpoint``'s eval recipe: files on the path ``pipeline.checkpoint_batches``
    picks for the device (as predict.py's folder), or, when PIL images are among them, all on the CPU path (the GPU
    path decodes files' bytes, which an image in memory no longer has)."""
    if all(isinstance(item, (str, Path)) for item in items):
        return checkpoint_batches([str(item) for item in items], checkpoint, accel, batch_size, workers, max_pixels,
                                  data_path)
    size = eval_size(checkpoint)
    pictures = PicturesAndFiles(items, build_eval_transform(size, checkpoint["mean"], checkpoint["std"]),
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


# --------------------------------------------------------------------------- ONNX models (export.py writes them)


def is_onnx(path: str | Path) -> bool:
    """True for a ``.onnx`` file name (a model export.py wrote)."""
    return str(path).lower().endswith(".onnx")


def require_module(name: str, purpose: str) -> ModuleType:
    """Import the optional package ``name``, or refuse in one line naming the ``pip install``."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{purpose} needs the {name} package, which is not installed: {ONNX_PIP}") from None


def load_onnx(path: str) -> dict[str, Any]:
    """An ONNX model written by export.py, as a checkpoint-like dict: its class names, eval size, mean, std and
    temperature (from the model's metadata) and an onnxruntime session (CPU) under ``onnx_session``."""
    onnxruntime = require_module("onnxruntime", f"--checkpoint {path}")
    if not Path(path).is_file():
        raise UserError(f"--checkpoint {path}: file not found; write it with python export.py --checkpoint best.pt "
                        f"--output {path}")
    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types for every unreadable file
        raise UserError(f"--checkpoint {path}: onnxruntime cannot load it ({first_line(error)}); export it again "
                        "with python export.py") from None
    metadata = onnx_metadata(session.get_modelmeta().custom_metadata_map, path)
    size = int(metadata["img_size"])
    return {"format": ONNX_FORMAT, "onnx_session": session, "arch": f"{metadata.get('arch', '?')} as ONNX",
            "class_names": list(metadata["class_names"]), "img_size": size, "test_size": size,
            "mean": [float(value) for value in metadata["mean"]], "std": [float(value) for value in metadata["std"]],
            "temperature": metadata.get("temperature"), "epoch": metadata.get("epoch", "?"), "config": {}}


ONNX_REQUIRED_METADATA = ("class_names", "img_size", "mean", "std")


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


# --------------------------------------------------------------------------- outputs


def probabilities_csv(names: Sequence[str], probabilities: torch.Tensor, class_names: Sequence[str], k: int,
                      low: Sequence[bool] | None = None) -> str:
    """``image_name,label_1,prob_1,...,label_K,prob_K``: each image's K most probable classes, most probable first;
    with ``low``, a ``low_confidence`` column (True where the top probability is under ``--min-confidence``)."""
    top_probabilities, top_indices = probabilities.topk(k, dim=1)
    header = ["image_name"] + [f"{column}_{rank}" for rank in range(1, k + 1) for column in ("label", "prob")]
    rows = [[name] + [item for index, value in zip(indices, values) for item in (class_names[index], f"{value:.6f}")]
            for name, indices, values in zip(names, top_indices.tolist(), top_probabilities.tolist())]
    if low is not None:
        header.append("low_confidence")
        rows = [row + [flag] for row, flag in zip(rows, low)]
    return csv_text(header, rows)


def probabilities_path(output: Path) -> Path:
    """Where ``--topk`` writes: beside the submission, named after it (``sub.csv`` -> ``sub_probabilities.csv``), so
    two submissions in one folder keep their own."""
    return output.with_name(f"{output.stem}_probabilities.csv")


def resolve_topk(requested: int, num_classes: int, min_confidence: float | None = None) -> int:
    """``--topk`` capped at the class count (with a note); 0 means no probabilities file, unless ``--min-confidence``
    asks for one (then 1, with a note)."""
    if requested > num_classes:
        print(f"note: --topk {requested} is more than the {num_classes} classes; writing all {num_classes}")
    if requested == 0 and min_confidence is not None:
        print("note: --min-confidence without --topk: the probabilities file holds each image's top label only "
              "(--topk 1); pass --topk K for more")
        return 1
    return min(requested, num_classes)


def low_confidence(probabilities: torch.Tensor, threshold: float | None) -> list[bool] | None:
    """For each row, whether its top probability is under ``threshold`` (None: no ``--min-confidence``)."""
    if threshold is None:
        return None
    return (probabilities.max(dim=1).values < threshold).tolist() if len(probabilities) else []


def output_targets(output: Path | None, zip_too: bool, probabilities: bool) -> list[tuple[str, Path]]:
    """The files this run writes, each with the flag that asks for it."""
    if output is None:
        return []
    targets = [("--output", output)]
    if zip_too:
        targets.append(("--zip", output.with_suffix(".zip")))
    if probabilities:
        targets.append(("--topk", probabilities_path(output)))
    return targets


def check_output_paths(targets: Sequence[tuple[str, Path]]) -> None:
    """Refuse, before any work, output paths that cannot be written: a folder in the way, a file where a folder must
    go, a folder that is read-only or a disk that is full."""
    for flag, path in targets:
        if path.is_dir():
            output = targets[0][1]
            suggested = output / DEFAULT_OUTPUT if flag == "--output" else output.with_name(DEFAULT_OUTPUT)
            raise UserError(f"{flag}: {path} is a folder; pass a file name for --output, such as {suggested}")
    for flag, path in targets:
        refuse_files_in_the_way(flag, path)
    first_flag_of = {}
    for flag, path in targets:
        first_flag_of.setdefault(nearest_folder(path.parent), flag)
    for folder, flag in first_flag_of.items():
        probe_writable(folder, flag)


def nearest_folder(folder: Path) -> Path:
    """``folder``, or its nearest parent that exists (where writing creates the rest)."""
    return next((candidate for candidate in [folder, *folder.parents] if candidate.is_dir()), Path("."))


def probe_writable(folder: Path, flag: str) -> None:
    """Write a small file in ``folder`` and remove it: refuses a read-only folder or a full disk in one line."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
    except OSError as error:
        raise UserError(unwritable_reason(folder, flag, error)) from None
    try:
        os.write(handle, b"\0" * 4096)
        os.fsync(handle)
    except OSError as error:
        raise UserError(unwritable_reason(folder, flag, error)) from None
    finally:
        os.close(handle)
        os.remove(probe)


def unwritable_reason(folder: Path, flag: str, error: OSError) -> str:
    """Why ``folder`` cannot take ``flag``'s file: read-only, no permission, or a full disk."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB free"
        except OSError:
            free = "no free space"
        return f"{flag}: the disk of {folder} is full ({free}); make room there or write to another folder"
    if error.errno == errno.EROFS:
        return f"{flag}: {folder} is on a read-only file system; write to another folder"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"{flag}: {folder} is read-only for you (no permission to write there); write to another folder"
    return f"{flag}: cannot write in {folder} ({error.strerror or first_line(error)}); write to another folder"


def refuse_unreadable_images(paths: Sequence[Path], workers: int, max_pixels: int) -> None:
    """Refuse test images that cannot be decoded, naming every one at once, before any inference.

    Only headers are read at first; when one fails the submission is refused anyway, so the other images are then
    decoded in full to find those truncated past their header too, all listed in the same error.
    """
    header_failures = find_unreadable(paths, max_pixels=max_pixels)
    if not header_failures:
        return  # a file truncated further in is found during inference, with every other such file
    bad = {path for path, _ in header_failures}
    rest = [path for path in paths if str(path) not in bad]
    print(f"note: {len(bad)} test image(s) cannot be read; decoding the other {len(rest)} to list every unreadable "
          "file at once")
    truncated = find_unreadable(rest, full_decode=True, workers=workers, max_pixels=max_pixels)
    failures = dict(header_failures + truncated)
    refuse_missing_rows({index: failures[str(path)] for index, path in enumerate(paths) if str(path) in failures},
                        paths)


def refuse_missing_rows(failed: dict[int, str], paths: Sequence[Path]) -> NoReturn:
    """Refuse to write a submission lacking the rows of the images at the positions ``failed`` (with reasons)."""
    raise UserError(f"{len(failed)} test image(s) could not be decoded, so no submission was written "
                    f"(--allow-missing writes the other rows): {failure_list(failed, paths)}")


def failure_list(failed: dict[int, str], paths: Sequence[Path]) -> str:
    """``path (reason); ...`` for each failed position, in path order."""
    return "; ".join(f"{paths[index]} ({reason})" for index, reason in sorted(failed.items()))


def drop_failed_rows(names: list[str], probabilities: torch.Tensor, failed: dict[int, str], paths: Sequence[Path],
                     output: Path | str, allow_missing: bool) -> tuple[list[str], torch.Tensor]:
    """The rows of the images that were decoded; refuses (unless ``allow_missing``) when any was not."""
    if not failed:
        return names, probabilities
    if not allow_missing:
        refuse_missing_rows(failed, paths)
    listed = failure_list(failed, paths)
    print(f"warning: --allow-missing: {output} lacks {len(failed)} row(s) for undecodable images: {listed}",
          file=sys.stderr)
    kept = [index for index in range(len(names)) if index not in failed]
    return [names[index] for index in kept], probabilities[kept]


def write_outputs(args: argparse.Namespace, output: Path, names: list[str], predicted: list[str],
                  probabilities: torch.Tensor, class_names: list[str], topk: int) -> dict[str, Any]:
    """The submission, and as asked its zip and the top-k probabilities file; returns what was written."""
    note_undecodable_names(names, output)
    submission = csv_bytes(submission_csv(names, predicted))
    atomic_write_bytes(output, submission)
    print(f"wrote {output}: {len(names)} rows")
    result: dict[str, Any] = {"output": str(output), "rows": len(names)}
    if args.zip:
        write_zip(submission, output.with_suffix(".zip"))
        print(f"wrote {output.with_suffix('.zip')}")
    if topk:
        path = probabilities_path(output)
        low = low_confidence(probabilities, args.min_confidence)
        atomic_write_bytes(path, csv_bytes(probabilities_csv(names, probabilities, class_names, topk, low)))
        print(f"wrote {path}: top {topk} label(s) and probabilities per image")
        result["probabilities"] = str(path)
    return result


def report_low_confidence(probabilities: torch.Tensor, threshold: float | None) -> dict[str, int]:
    """Print how many images have a top probability under ``--min-confidence``; returns the count."""
    low = low_confidence(probabilities, threshold)
    if low is None:
        return {}
    print(f"{sum(low)} of {len(low)} image(s) have a top probability under --min-confidence {threshold:g}"
          + ("" if not sum(low) else " (low_confidence True in the probabilities file)"))
    return {"low_confidence": sum(low)}


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
    runtime = " (onnxruntime)" if "onnx_session" in ensemble.checkpoints[0] else ""
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
    true_label_of = dict(zip(names, labels_of(paths, truth))) if truth is not None else {}
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
        result.update(write_outputs(args, output, names, predicted, probabilities, class_names, topk))
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

    def __init__(self, checkpoint: str | Path | Sequence[str | Path] = "checkpoints/best.pt", *, device: str = "auto",
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
    for name, indices, values in zip(names, top_indices.tolist(), top_probabilities.tolist()):
        row = {"name": name, "label": class_names[indices[0]], "probability": values[0]}
        if k > 1:
            for rank, (index, value) in enumerate(zip(indices, values), start=1):
                row[f"top{rank}_label"], row[f"top{rank}_probability"] = class_names[index], value
        rows.append(row)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
