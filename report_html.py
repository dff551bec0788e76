"""``report.html``: the evaluation report as one self-contained page that opens offline from ``file://``.

Written by :func:`report.write_evaluation_report` beside ``report.md``. Everything is inside the one file, so it can be
mailed or zipped: inline CSS and a little plain JavaScript, the figures of the report folder and the run folder as
``data:`` PNGs, small JPEG thumbnails made with Pillow, and the data as JSON in a
``<script type="application/json">`` (``<``, ``>`` and ``&`` escaped, so no ``</script>`` in a class name or a
path can end it). A Content-Security-Policy meta tag allows nothing but that, so a stray outside link fails
visibly instead of calling out.

The page: where the predictions came from, metric cards saying how each averages, every class in a sortable and
filterable table, the confusion matrix in :func:`class_order.auto_class_order` (a click on a cell shows that cell's
images with their top-3 probabilities), the mistakes with their full paths filterable by true and predicted
class, the curves, the reliability diagram when calibration wrote one, the configuration and the files that
could not be decoded. Class names and paths are text everywhere: Jinja2 autoescapes, the JavaScript sets
``textContent``.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

import class_order
import metrics
from checkpoint import Checkpoint
from engine import Predictions
from images import DECODE_ERRORS, decode_error_reason, load_rgb

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE_NAME = "report.html.j2"
THUMBNAIL_PIXELS = 64  # longest side of an embedded thumbnail
MAX_THUMBNAILS = 500  # about 1-2 KB each as JPEG: the page stays near 1 MB whatever the split's size
THUMBNAIL_QUALITY = 75
TOP_PROBABILITIES = 3  # the most probable classes listed under each image
MAX_MATRIX_CLASSES = 100  # above this the clickable matrix is too big to read; the PNG and the largest cells instead
LARGEST_CONFUSIONS = 15
CONTENT_SECURITY_POLICY = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                           "script-src 'unsafe-inline'")
# Training options worth seeing beside the metrics, in this order, where the checkpoint's config has them.
RECIPE_KEYS = ("weights", "trainable", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs",
               "label_smoothing", "class_weights", "sampler", "auto_augment", "random_erase", "mixup", "cutmix",
               "ema", "dropout", "seed")
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}


@dataclass(frozen=True)
class Figure:
    """A PNG of the report or run folder, inlined in the page."""

    title: str
    data_uri: str


# --------------------------------------------------------------------------- embedding


def script_json(data: Any) -> str:
    """``data`` as JSON safe inside a ``<script>`` element: no ``<``, ``>`` or ``&`` left to end or open a tag."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return "".join(_JSON_ESCAPES.get(char, char) for char in text)


def png_data_uri(path: Path) -> str | None:
    """The PNG file as a ``data:`` URI; None when it is absent."""
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def thumbnail_data_uri(path: str) -> str | None:
    """The image as a JPEG ``data:`` URI at most ``THUMBNAIL_PIXELS`` a side; None when it cannot be read now."""
    try:
        image = load_rgb(path, min_side=THUMBNAIL_PIXELS)
    except DECODE_ERRORS as error:  # moved or changed since the inference: the page shows a blank, no more
        print(f"note: report.html: no thumbnail of {path}: {decode_error_reason(error, path)}")
        return None
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail_positions(predictions: Predictions, limit: int) -> list[int]:
    """The images that get a thumbnail: every mistake first, most confident first, then correct images taken in
    turn from each class, so each class has some up to ``limit`` in all."""
    predicted, targets = predictions.predicted, predictions.targets
    wrong = np.flatnonzero(predicted != targets)
    wrong = wrong[np.argsort(-predictions.probabilities[wrong, predicted[wrong]], kind="stable")]
    right_by_class = [np.flatnonzero((predicted == targets) & (targets == label)).tolist()
                      for label in range(predictions.probabilities.shape[1])]
    right_in_turn = [row[depth] for depth in range(max(map(len, right_by_class), default=0))
                     for row in right_by_class if depth < len(row)]
    return [int(position) for position in [*wrong, *right_in_turn][: max(limit, 0)]]


# --------------------------------------------------------------------------- the page's data


def path_root(paths: Sequence[str]) -> str:
    """The folder all ``paths`` share, with its trailing separator (written once in the page); '' if none."""
    try:
        root = os.path.commonpath([os.path.dirname(path) for path in paths]) if paths else ""
    except ValueError:  # absolute and relative paths mixed
        return ""
    return root + os.sep if root else ""


def image_records(predictions: Predictions, root: str, thumbnail_of: dict[int, int]) -> list[dict[str, Any]]:
    """One record per image, in sample order: path after ``root``, true and predicted class, the top-3
    ``[class, probability]`` pairs and the index of its thumbnail (-1: none)."""
    top = min(TOP_PROBABILITIES, predictions.probabilities.shape[1])
    ranked = np.argsort(-predictions.probabilities, axis=1, kind="stable")[:, :top]  # ties: the lower class first
    predicted = predictions.predicted
    records = []
    for position, (path, target) in enumerate(zip(predictions.paths, predictions.targets, strict=True)):
        probabilities = predictions.probabilities[position]
        records.append({"path": path[len(root):], "true": int(target), "pred": int(predicted[position]),
                        "top": [[int(label), round(float(probabilities[label]), 4)] for label in ranked[position]],
                        "thumb": thumbnail_of.get(position, -1)})
    return records


def class_rows(confusion: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The class table: one row per class in folder order; a score with nothing to divide by is null."""
    scores = metrics.class_scores(confusion)
    confused = metrics.most_confused_with(confusion)
    rows = []
    for index, name in enumerate(class_names):
        support, predicted = int(scores.support[index]), int(scores.predicted[index])
        other = confused[index]
        rows.append({"name": name, "support": support, "predicted": predicted,
                     "precision": float(scores.precision[index]) if predicted else None,
                     "recall": float(scores.recall[index]) if support else None,
                     "f1": float(scores.f1[index]) if support else None,
                     "confused_with": class_names[other[0]] if other else None,
                     "confused_share": other[1] if other else None})
    return rows


def largest_confusions(confusion: np.ndarray) -> list[dict[str, Any]]:
    """The largest off-diagonal cells, largest first, as ``true``, ``pred``, ``count`` and ``share`` of the true
    class."""
    return [{"true": true, "pred": predicted, "count": count, "share": share}
            for true, predicted, count, share in metrics.top_confusions(confusion, LARGEST_CONFUSIONS)]


def page_data(predictions: Predictions, confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Everything the page's script draws from: classes, class table, matrix, images and their thumbnails."""
    # A hand-built Predictions may carry scores without paths (tests do): only images with a file get a thumbnail.
    positions = [position for position in thumbnail_positions(predictions, MAX_THUMBNAILS)
                 if position < len(predictions.paths)]
    thumbnails = [thumbnail_data_uri(predictions.paths[position]) for position in positions]
    thumbnail_of = {position: index for index, position in enumerate(positions)}
    root = path_root(predictions.paths)
    return {
        "classes": list(class_names),
        "rows": class_rows(confusion, class_names),
        "order": class_order.auto_class_order(confusion),
        "matrix": confusion.tolist() if len(class_names) <= MAX_MATRIX_CLASSES else None,
        "largest": largest_confusions(confusion),
        "root": root,
        "images": image_records(predictions, root, thumbnail_of),
        "thumbs": thumbnails,
    }


# --------------------------------------------------------------------------- what the page says


def metric_cards(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline numbers: key in ``metrics.json``, label, value as shown, and how it averages."""
    classes_with_images = summary["classes"] - len(summary["classes_without_images"])
    images = summary["images"]
    cards = [
        ("accuracy", "accuracy", f"{summary['accuracy']:.1%}",
         f"share of the {images:,} images classified right; every image counts once (micro average)"),
        ("balanced_accuracy", "balanced accuracy", f"{summary['balanced_accuracy']:.1%}",
         f"mean of the per-class recalls over the {classes_with_images} classes with images; every class counts "
         "once"),
        ("macro_f1", "macro-F1", f"{summary['macro_f1']:.3f}",
         f"unweighted mean of the per-class F1 over the {classes_with_images} classes with images"),
        ("loss", "loss", f"{summary['loss']:.4f}",
         "mean cross-entropy per image, without class weights or label smoothing"),
    ]
    if "top_k" in summary:  # left out where k is not below the class count: it would always be 100%
        cards.insert(3, ("top_k_accuracy", f"top-{summary['top_k']} accuracy", f"{summary['top_k_accuracy']:.1%}",
                         f"share of the {images:,} images whose class is among the {summary['top_k']} most probable"))
    if summary.get("ece") is not None:
        cards.append(("ece", "ECE", f"{summary['ece']:.1%}", _ece_note(summary)))
    return [{"key": key, "label": label, "value": summary[key], "text": text, "how": how}
            for key, label, text, how in cards]


def _ece_note(summary: dict[str, Any]) -> str:
    note = ("expected calibration error: the gap between confidence and accuracy in confidence bins, averaged "
            "weighted by the images in each bin; 0 is perfectly calibrated")
    if summary.get("ece_calibrated") is not None and summary.get("temperature") is not None:
        note += (f". After temperature scaling (T = {summary['temperature']:.3g}): "
                 f"{summary['ece_calibrated']:.1%}")
    return note


def _checkpoint_text(checkpoint_path: str | Path | None, history_path: str | Path | None) -> str:
    if checkpoint_path:
        return str(checkpoint_path)
    if history_path is not None:  # the run folder is known even when the file name is not
        return f"a checkpoint in {Path(history_path).parent}"
    return "(not named)"


def provenance(summary: dict[str, Any], checkpoint: Checkpoint, checkpoint_path: str | Path | None,
               history_path: str | Path | None) -> list[tuple[str, str]]:
    """Where the predictions came from, as (label, text) lines."""
    size = f"{checkpoint.img_size} px"
    if checkpoint.test_size != checkpoint.img_size:
        size += f", evaluated at {checkpoint.test_size} px"
    config = checkpoint.config
    recipe = ", ".join(f"{key} {config[key]}" for key in RECIPE_KEYS if config.get(key) not in (None, ""))
    runtime = checkpoint.runtime
    lines = [
        ("checkpoint", _checkpoint_text(checkpoint_path, history_path)),
        ("model", f"{checkpoint.arch}, {summary['classes']} classes, {size}, saved at epoch "
                  f"{checkpoint.epoch}"),
        ("split", f"{summary['split'] or 'a labeled split'}: {summary['images']:,} images"
                  + (f", {len(summary['undecodable'])} undecodable left out" if summary["undecodable"] else "")),
        ("recipe", recipe or "(not recorded)"),
    ]
    if runtime:
        lines.append(("trained on", f"{runtime.get('device', '?')}, {runtime.get('precision', '?')}, torch "
                                    f"{runtime.get('torch', '?')}"))
    return lines


def figures(report_dir: Path, history_path: str | Path | None, matrix_drawn: bool) -> dict[str, Figure | None]:
    """The PNGs the page inlines, by role; None where the file is absent. The curves are in the run folder
    (beside ``history.csv``), the reliability diagram and the confusion matrix in the report folder."""
    run_dir = Path(history_path).parent if history_path is not None else None
    files = {
        "loss": ("Loss", run_dir / "loss_curve.png" if run_dir else None),
        "accuracy": ("Accuracy", run_dir / "accuracy_curve.png" if run_dir else None),
        "reliability": ("Reliability diagram", report_dir / "reliability.png"),
        "confusion": ("Confusion matrix", None if matrix_drawn else report_dir / "confusion_matrix.png"),
    }
    found = {}
    for role, (title, path) in files.items():
        uri = png_data_uri(path) if path is not None else None
        found[role] = Figure(title, uri) if uri else None
    return found


def best_epoch_line(history: Sequence[dict[str, float]]) -> str:
    """'Best epoch 7 (val accuracy 73.3%) of 8.' from history.csv's rows; '' without them."""
    if not history or not all("val_acc" in row and "epoch" in row for row in history):
        return ""
    best = max(history, key=lambda row: row["val_acc"])  # the first of equal maxima, as train.py keeps it
    return (f"Best epoch {int(best['epoch'])} (val accuracy {best['val_acc']:.1%}); final epoch "
            f"{int(history[-1]['epoch'])} (val accuracy {history[-1]['val_acc']:.1%}).")


# --------------------------------------------------------------------------- the file


def render_report_html(context: dict[str, Any]) -> str:
    """The page from ``templates/report.html.j2`` (autoescaped: names and paths stay text)."""
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
                                     undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return environment.get_template(TEMPLATE_NAME).render(**context)


def report_html(
    predictions: Predictions,
    confusion: np.ndarray,
    summary: dict[str, Any],
    checkpoint: Checkpoint,
    report_dir: Path,
    *,
    checkpoint_path: str | Path | None = None,
    history_path: str | Path | None = None,
    history: Sequence[dict[str, float]] = (),
) -> str:
    """The text of ``report.html`` for the predictions and ``summary`` (``metrics.json``'s contents)."""
    class_names = [str(name) for name in checkpoint.class_names]
    data = page_data(predictions, confusion, class_names)
    embedded = sum(uri is not None for uri in data["thumbs"])
    config, runtime = checkpoint.config, checkpoint.runtime
    return render_report_html({
        "csp": CONTENT_SECURITY_POLICY,
        "title": f"Evaluation report: {summary['split'] or 'labeled split'}",
        "provenance": provenance(summary, checkpoint, checkpoint_path, history_path),
        "cards": metric_cards(summary),
        "classes_without_images": summary["classes_without_images"],
        "thumbnail_note": (f"Thumbnails ({THUMBNAIL_PIXELS} px): {embedded:,} of {len(predictions.paths):,} images "
                           f"embedded, at most {MAX_THUMBNAILS:,}: the mistakes first (most confident first), then "
                           "correct images from every class in turn."),
        "matrix_drawn": data["matrix"] is not None,
        "order_note": ("Classes are grouped by confusion, so classes mistaken for each other sit together."
                       if data["order"] != list(range(len(class_names))) else "Classes are in folder order."),
        "figures": figures(report_dir, history_path, data["matrix"] is not None),
        "history_line": best_epoch_line(history),
        "config": sorted((str(key), str(value)) for key, value in config.items()),
        "runtime": sorted((str(key), str(value)) for key, value in runtime.items()),
        "undecodable": summary["undecodable"],
        "data_json": script_json(data),
    })
