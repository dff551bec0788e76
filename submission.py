"""predict.py's outputs: the submission CSV (and its zip), the top-k probabilities file, the score against a labels
file, and the checks that keep a row from being lost silently.

The submission is ``image_name,pred_label``, one row per test image, ``image_name`` the file name without its
extension (``--keep-ext``: with it). A name read from a file name that is not UTF-8 keeps its original bytes in the CSV
(surrogate escapes), so its row still names its file. ``--labels`` reads a CSV as people save it (Excel's UTF-8 with a
BOM or Windows cp1252; comma, semicolon or tab) and scores the predictions against it. The output paths are checked
(a folder in the way, a read-only folder, a full disk) before any work; export.py checks its ``--output`` the same way.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

import metrics
from images import find_unreadable
from utils import UserError, atomic_write_bytes, csv_text, first_line, printable, refuse_files_in_the_way, some_names

if TYPE_CHECKING:
    import pandas as pd


# Header names read as a labels file's image-name and label columns (lower case, spaces as underscores).
NAME_COLUMNS = ("image_name", "image", "image_id", "id", "filename", "file_name", "file")
LABEL_COLUMNS = ("label", "class", "category")
LABELS_ENCODINGS = ("utf-8-sig", "cp1252")  # Excel's "CSV UTF-8" (with a BOM) and its plain "CSV" on Windows
# A labels file's separator (Excel writes ";" where "," is the decimal mark); the first wins a tie.
CSV_SEPARATORS = (",", ";", "\t", "|")
DEFAULT_OUTPUT = "prediction.csv"


def image_names(paths: Sequence[Path], keep_ext: bool) -> list[str]:
    """The ``image_name`` column: file names without extension (unless ``keep_ext``); must be unique."""
    names = [path.name if keep_ext else path.stem for path in paths]
    first_with: dict[str, Path] = {}
    for path, name in zip(paths, names, strict=True):
        if name in first_with:
            other = first_with[name]
            fix = "use --keep-ext" if other.name != path.name else "rename one of them"
            raise UserError(f"test images {other} and {path} would share the image_name {name!r}; {fix}")
        first_with[name] = path
    return names


def submission_csv(names: Sequence[str], labels: Sequence[str]) -> str:
    """The CSV text: header ``image_name,pred_label`` and one row per image."""
    return csv_text(["image_name", "pred_label"], zip(names, labels, strict=True))


def write_zip(submission: bytes, zip_path: Path) -> None:
    """A zip archive holding ``prediction.csv`` (the bytes of the submission), as the course's upload page wants."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("prediction.csv", submission)
    atomic_write_bytes(zip_path, buffer.getvalue())


def write_outputs(output: Path, names: list[str], predicted: list[str], probabilities: torch.Tensor,
                  class_names: list[str], topk: int, zipped: bool = False,
                  min_confidence: float | None = None) -> dict[str, Any]:
    """The submission, and as asked its zip (``zipped``: --zip) and the top-k probabilities file (``topk``, with the
    rows under ``min_confidence`` marked); returns what was written."""
    note_undecodable_names(names, output)
    submission = csv_bytes(submission_csv(names, predicted))
    atomic_write_bytes(output, submission)
    print(f"wrote {output}: {len(names)} rows")
    result: dict[str, Any] = {"output": str(output), "rows": len(names)}
    if zipped:
        write_zip(submission, output.with_suffix(".zip"))
        print(f"wrote {output.with_suffix('.zip')}")
    if topk:
        path = probabilities_path(output)
        low = low_confidence(probabilities, min_confidence)
        atomic_write_bytes(path, csv_bytes(probabilities_csv(names, probabilities, class_names, topk, low)))
        print(f"wrote {path}: top {topk} label(s) and probabilities per image")
        result["probabilities"] = str(path)
    return result


# --------------------------------------------------------------------------- the labels file (--labels) and the score


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
    for written, label in zip(table[name_column].str.strip(), table[label_column].str.strip(), strict=True):
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
    pairs = [(true, label) for true, label in zip(true_labels, predicted, strict=True) if true is not None]
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
    unlabeled = [name for name, label in zip(names, true_labels, strict=True) if label is None]
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


# --------------------------------------------------------------------------- file names that are not UTF-8


def undecodable(name: str) -> bool:
    """True for a name holding bytes that are not UTF-8: Python keeps each as a surrogate escape (U+DC80..U+DCFF)."""
    return any("\udc80" <= char <= "\udcff" for char in name)


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


# --------------------------------------------------------------------------- the probabilities file (--topk)


def probabilities_csv(names: Sequence[str], probabilities: torch.Tensor, class_names: Sequence[str], k: int,
                      low: Sequence[bool] | None = None) -> str:
    """``image_name,label_1,prob_1,...,label_K,prob_K``: each image's K most probable classes, most probable first;
    with ``low``, a ``low_confidence`` column (True where the top probability is under ``--min-confidence``)."""
    top_probabilities, top_indices = probabilities.topk(k, dim=1)
    header = ["image_name"] + [f"{column}_{rank}" for rank in range(1, k + 1) for column in ("label", "prob")]
    rows = [[name] + [item for index, value in zip(indices, values, strict=True)
                      for item in (class_names[index], f"{value:.6f}")]
            for name, indices, values in zip(names, top_indices.tolist(), top_probabilities.tolist(), strict=True)]
    if low is not None:
        header.append("low_confidence")
        rows = [row + [flag] for row, flag in zip(rows, low, strict=True)]
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


def report_low_confidence(probabilities: torch.Tensor, threshold: float | None) -> dict[str, int]:
    """Print how many images have a top probability under ``--min-confidence``; returns the count."""
    low = low_confidence(probabilities, threshold)
    if low is None:
        return {}
    print(f"{sum(low)} of {len(low)} image(s) have a top probability under --min-confidence {threshold:g}"
          + ("" if not sum(low) else " (low_confidence True in the probabilities file)"))
    return {"low_confidence": sum(low)}


# --------------------------------------------------------------------------- output paths, checked before any work


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


# --------------------------------------------------------------------------- undecodable images: no row lost


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
