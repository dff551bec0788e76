"""Predict the unlabeled test images with a trained checkpoint and write the submission CSV.

    python predict.py --checkpoint checkpoints/best.pt --test-dir data/test --output prediction.csv
    python predict.py --checkpoint run1/best.pt run2/best.pt --tta flip --topk 5   # ensemble, test-time flips

Writes ``image_name,pred_label`` with one row per test image, ``pred_label`` being the class folder name.

Every prediction is the class with the highest mean softmax probability, the mean taken over the test-time
views (``--tta``) and over the checkpoints (one or more, equally weighted; they must share one class list).
The views are made from the already-transformed batch, so they cost forward passes but no extra decoding:

- ``none``: the evaluation centre crop alone (1 view);
- ``flip``: the centre crop and its horizontal mirror (2 views);
- ``multi``: those two, plus a 1.15x zoom into the centre crop (bilinear upscale of the crop, centre-cropped
  back to the input size) and its mirror (4 views).

``--topk K`` also writes ``probabilities.csv`` beside the submission: ``image_name``, then
``label_1,prob_1,...,label_K,prob_K``, most probable first.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import metrics
from accel import Accel, set_up_accel
from checkpoint import eval_size, load_checkpoint, model_from_checkpoint
from dataset import find_test_images, report_ignored, same_name
from engine import predict_probabilities
from images import find_unreadable
from options import add_inference_options, add_max_image_pixels_option, check_max_image_pixels
from pipeline import checkpoint_batches
from utils import (
    UserError,
    argument_list,
    atomic_write_bytes,
    atomic_write_text,
    csv_text,
    describe_device,
    exit_on_user_error,
    first_line,
    refuse_files_in_the_way,
    resolve_workers,
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


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The prediction options."""
    parser = argparse.ArgumentParser(
        prog="predict.py",
        description="Write prediction.csv (image_name,pred_label) for every image in the test folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        add_help=add_help,
    )
    parser.add_argument("--checkpoint", nargs="+", default=["checkpoints/best.pt"],
                        help="a best.pt or last.pt written by train.py; several: an ensemble averaging probabilities")
    parser.add_argument("--test-dir", default="data/test", help="folder of unlabeled test images")
    parser.add_argument("--output", default="prediction.csv", help="the submission CSV to write")
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
                        help="also write probabilities.csv beside OUTPUT with the K most probable labels of each image")
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


def write_zip(submission: str, zip_path: Path) -> None:
    """A zip archive holding ``prediction.csv``, as the course's upload page wants."""
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
              f"({', '.join(unlabeled[:5])}{' ...' if len(unlabeled) > 5 else ''})")
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
    """Several models over several views of a batch: the log of their mean softmax probabilities.

    It returns log-probabilities so it can stand in for a model in ``engine.predict_probabilities``: the softmax
    that function applies turns them back into exactly the mean probabilities.
    """

    def __init__(self, models: Sequence[nn.Module], views: Sequence[View]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.views = list(views)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total = None
        for model in self.models:
            for view in self.views:
                probabilities = model(view(images)).float().softmax(dim=1)
                total = probabilities if total is None else total + probabilities
        return (total / (len(self.models) * len(self.views))).log()


def load_checkpoints(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Read every ``--checkpoint``; they must share one class list (same names, same order)."""
    checkpoints = [load_checkpoint(path) for path in paths]
    for path, checkpoint in zip(paths[1:], checkpoints[1:]):
        if checkpoint["class_names"] != checkpoints[0]["class_names"]:
            raise UserError(f"--checkpoint {paths[0]} and {path} have different class lists "
                            f"({class_list_difference(checkpoints[0]['class_names'], checkpoint['class_names'])}); "
                            "an ensemble needs models trained on the same classes")
    for path, checkpoint in zip(paths, checkpoints):
        print(f"checkpoint: {path} ({checkpoint['arch']}, {len(checkpoint['class_names'])} classes, "
              f"{eval_size(checkpoint)} px, epoch {checkpoint.get('epoch', '?')})")
    return checkpoints


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
    checkpoints: Sequence[dict[str, Any]],
    paths: Sequence[Path],
    accel: Accel,
    tta: str,
    batch_size: int,
    workers: int,
    max_pixels: int,
    show_progress: bool,
) -> tuple[torch.Tensor, dict[int, str]]:
    """Mean softmax probabilities over checkpoints and test-time views, in ``paths`` order; and why each position
    that failed to decode did."""
    views = tta_views(tta)
    total = torch.zeros(len(paths), len(checkpoints[0]["class_names"]))
    failed: dict[int, str] = {}
    for group in preprocessing_groups(checkpoints):
        first = checkpoints[group[0]]
        batches = checkpoint_batches([str(path) for path in paths], first, accel, batch_size, workers, max_pixels)
        models = [accel.prepare_model(model_from_checkpoint(checkpoints[index])) for index in group]
        probabilities, group_failed = predict_probabilities(AveragedSoftmax(models, views), batches, len(paths), accel,
                                                            show_progress)
        failed.update(group_failed)
        total += probabilities * len(group)
    return total / len(checkpoints), dict(sorted(failed.items()))


# --------------------------------------------------------------------------- top-k file


def probabilities_csv(names: Sequence[str], probabilities: torch.Tensor, class_names: Sequence[str], k: int) -> str:
    """``image_name,label_1,prob_1,...,label_K,prob_K``: each image's K most probable classes, most probable first."""
    top_probabilities, top_indices = probabilities.topk(k, dim=1)
    header = ["image_name"] + [f"{column}_{rank}" for rank in range(1, k + 1) for column in ("label", "prob")]
    rows = ([name] + [item for index, value in zip(indices, values) for item in (class_names[index], f"{value:.6f}")]
            for name, indices, values in zip(names, top_indices.tolist(), top_probabilities.tolist()))
    return csv_text(header, rows)


def resolve_topk(requested: int, num_classes: int) -> int:
    """``--topk`` capped at the class count (with a note); 0 means no probabilities file."""
    if requested < 0:
        raise UserError(f"--topk {requested}: must be 0 (no probabilities.csv) or more")
    if requested > num_classes:
        print(f"note: --topk {requested} is more than the {num_classes} classes; writing all {num_classes}")
    return min(requested, num_classes)


def check_output_paths(output: Path, zip_too: bool, topk: int) -> None:
    """Refuse, before any work, output paths that cannot be written as files."""
    targets = [("--output", output)]
    if zip_too:
        targets.append(("--zip", output.with_suffix(".zip")))
    if topk:
        targets.append(("--topk", output.parent / "probabilities.csv"))
    for flag, path in targets:
        if path.is_dir():
            suggested = output / "prediction.csv" if flag == "--output" else output.with_name("prediction.csv")
            raise UserError(f"{flag}: {path} is a folder; pass a file name for --output, such as {suggested}")
    refuse_files_in_the_way("--output", output)


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
                     output: Path, allow_missing: bool) -> tuple[list[str], torch.Tensor]:
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


def write_outputs(args: argparse.Namespace, names: list[str], predicted: list[str], probabilities: torch.Tensor,
                  class_names: list[str], topk: int) -> dict[str, Any]:
    """The submission, and as asked its zip and the top-k probabilities file; returns what was written."""
    submission = submission_csv(names, predicted)
    output = Path(args.output)
    atomic_write_text(output, submission)
    print(f"wrote {output}: {len(names)} rows")
    result: dict[str, Any] = {"output": str(output), "rows": len(names)}
    if args.zip:
        write_zip(submission, output.with_suffix(".zip"))
        print(f"wrote {output.with_suffix('.zip')}")
    if topk:
        probabilities_path = output.parent / "probabilities.csv"
        atomic_write_text(probabilities_path, probabilities_csv(names, probabilities, class_names, topk))
        print(f"wrote {probabilities_path}: top {topk} labels and probabilities per image")
        result["probabilities"] = str(probabilities_path)
    return result


def check_args(args: argparse.Namespace) -> None:
    """Refuse option values that would only fail later."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    check_max_image_pixels(args.max_image_pixels)


@exit_on_user_error
def main(argv: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Predict every test image and write the submission; returns the output path and row count (and the score)."""
    args = get_args_parser().parse_args(argument_list(argv, "predict.py"))
    try:
        return predict_and_write(args)
    except KeyboardInterrupt:
        print(f"interrupted: no submission written ({args.output} is as it was)", file=sys.stderr)
        raise SystemExit(130) from None


def predict_and_write(args: argparse.Namespace) -> dict[str, Any]:
    """The whole prediction: checks, inference, the submission and, with ``--labels``, its score."""
    check_args(args)
    args.workers = resolve_workers(args.workers)
    truth = read_labels(args.labels) if args.labels else None
    checkpoints = load_checkpoints(args.checkpoint)
    class_names = checkpoints[0]["class_names"]
    topk = resolve_topk(args.topk, len(class_names))
    check_output_paths(Path(args.output), args.zip, topk)
    accel = set_up_accel(args.device, args.amp)
    print(f"device: {describe_device(accel.device)}, precision {accel.precision_name}; test-time views: {args.tta}"
          + (f"; ensemble of {len(checkpoints)} checkpoints" if len(checkpoints) > 1 else ""))
    paths, ignored = find_test_images(args.test_dir)
    report_ignored(args.test_dir, ignored)
    refuse_labeled_folders(Path(args.test_dir), paths, class_names)
    names = image_names(paths, args.keep_ext)
    true_label_of = dict(zip(names, labels_of(paths, truth))) if truth is not None else {}
    if not args.allow_missing:
        refuse_unreadable_images(paths, args.workers, args.max_image_pixels)

    probabilities, failed = ensemble_probabilities(checkpoints, paths, accel, args.tta, args.batch_size, args.workers,
                                                   args.max_image_pixels, not args.no_progress)
    names, probabilities = drop_failed_rows(names, probabilities, failed, paths, Path(args.output), args.allow_missing)
    predicted = [class_names[index] for index in probabilities.argmax(dim=1).tolist()]
    result = write_outputs(args, names, predicted, probabilities, class_names, topk)
    if truth is not None:
        result.update(report_score(names, predicted, [true_label_of[name] for name in names], truth, class_names,
                                   args.labels))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
