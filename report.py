"""The evaluation report of a trained checkpoint on a labeled split: metrics, per-class table, figures, report.md.

One implementation, used by ``evaluate.py`` and by ``train.py`` at the end of training (for ``best.pt``):

    batches = pipeline.inference_batches(paths, *checkpoint.preprocessing, accel, on_device=False)
    predictions = engine.predict_samples(model, batches, samples, accel)
    write_evaluation_report(predictions, checkpoint, report_dir, source="data/val", history_path=...)

writes into ``report_dir``:

- ``metrics.json``: accuracy, balanced accuracy, macro-F1, top-k accuracy (k = 5, when there are more classes), plain
  cross-entropy loss, image count, the classes with no images in the split (balanced accuracy and macro-F1
  average over the others), and the files that could not be decoded, each with the reason;
- ``per_class.csv``: support, predictions, precision, recall, F1 and the class each is most confused with;
- ``confusion_matrix.png``: normalized by true class, in :func:`class_order.auto_class_order` (folder order up to 30
  classes, grouped by confusion beyond);
- ``top_confusions.csv``: the largest off-diagonal cells;
- ``misclassified.png``: the most confident mistakes, as the original images;
- ``reliability.png``: accuracy per confidence bin, as the model gave its probabilities and divided by the
  checkpoint's temperature (see ``calibration.py``); metrics.json has their ``ece``, ``ece_calibrated`` and the
  ``temperature``;
- ``report.md``: one page tying these together with the run's configuration and training history;
- ``report.html``: the same as one self-contained page that opens offline, with a sortable class table, a clickable
  confusion matrix showing each cell's images, and the mistakes; see :mod:`report_html`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import calibration
import figures
import image_grids
import metrics
import plots
import report_html
from checkpoint import Checkpoint
from common import REPORT_FILES
from engine import Predictions
from history_csv import read_history
from images import load_rgb
from utils import UserError, atomic_write_text, counted, csv_text

TOP_K = 5
THUMBNAIL_PIXELS = 256  # longest side of a misclassified thumbnail; more only makes the figure heavy
MAX_CAPTION_CHARS = 28  # keeps a caption line within its grid cell (about 30 characters at 8.5 pt)
MAX_CAPTION_NAME_CHARS = 18  # a class name, leaving room for "pred: " and " (38%)"
FULL_CLASS_TABLE_UP_TO = 15  # report.md lists every class up to this count, else only the weakest
WEAKEST_CLASSES_SHOWN = 10
TOP_CONFUSIONS_SHOWN = 10


# --------------------------------------------------------------------------- the report


def write_evaluation_report(
    predictions: Predictions,
    checkpoint: Checkpoint,
    report_dir: str | Path,
    *,
    source: str = "",
    history_path: str | Path | None = None,
    top_confusions: int = 20,
    misclassified: int = 24,
    checkpoint_path: str | Path | None = None,
) -> dict[str, Any]:
    """Write the report of ``predictions`` (``engine.predict_samples``) on a labeled split, first listing the files
    that could not be decoded. ``source`` names the split; ``history_path`` is the run's ``history.csv`` (skipped
    if absent); ``checkpoint_path``, the file the predictions came from, is named in report.html. Returns the
    contents of ``metrics.json`` plus ``report_dir``.
    """
    say_undecodable(predictions, source)
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    class_names = [str(name) for name in checkpoint.class_names]
    confusion = metrics.confusion_matrix(predictions.targets, predictions.predicted, len(class_names))
    temperature = checkpoint.logit_temperature
    summary = {**metrics_summary(predictions, confusion, class_names, source),
               **calibration.calibration_metrics(predictions.probabilities, predictions.targets, temperature)}
    if summary["classes_without_images"]:
        print(classes_without_images_note(summary))
    atomic_write_text(report_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(report_dir / "per_class.csv", per_class_csv(confusion, class_names))
    pairs = metrics.top_confusions(confusion, top_confusions)
    atomic_write_text(report_dir / "top_confusions.csv", top_confusions_csv(pairs, class_names))
    grouped = plot_report_confusion(confusion, class_names, source, report_dir / "confusion_matrix.png")
    shown = plot_misclassified(predictions, class_names, misclassified, report_dir / "misclassified.png")
    plot_reliability(predictions, temperature, source, report_dir / "reliability.png")
    history = read_history(history_path)
    curve = relative_curve_path(history_path, report_dir)
    atomic_write_text(report_dir / "report.md", report_markdown(
        summary, confusion, class_names, pairs, checkpoint, history, curve, grouped=grouped, mistakes_shown=shown))
    atomic_write_text(report_dir / "report.html", report_html.report_html(
        predictions, confusion, summary, checkpoint, report_dir, checkpoint_path=checkpoint_path,
        history_path=history_path, history=history))
    print(f"evaluation on {source or 'the split'}: {summary['images']} images, accuracy {summary['accuracy']:.2%}, "
          f"balanced accuracy {summary['balanced_accuracy']:.2%}, macro-F1 {summary['macro_f1']:.3f}; "
          f"wrote {report_dir}/" + "{" + ",".join(REPORT_FILES) + "}")
    return {**summary, "report_dir": str(report_dir)}


def say_undecodable(predictions: Predictions, source: str) -> None:
    """Warn of the files that could not be decoded; refuse a split none of whose images could be."""
    if predictions.failed:
        print(f"warning: left out {len(predictions.failed)} image(s) that could not be decoded:"
              + "".join(f"\n  {path}: {reason}" for path, reason in predictions.failed))
    if not predictions.paths:
        raise UserError(f"{source or 'evaluation'}: none of the {len(predictions.failed)} images could be decoded")


def metrics_summary(predictions: Predictions, confusion: np.ndarray, class_names: Sequence[str],
                    source: str) -> dict[str, Any]:
    """The contents of ``metrics.json``."""
    return {**metrics.summary_metrics(predictions.probabilities, predictions.targets, TOP_K),
            "classes": len(class_names), "split": source,
            "classes_without_images": classes_without_images(confusion, class_names),
            "class_averages_over": "the classes with images in this split (balanced_accuracy, macro_f1)",
            "undecodable": [{"path": path, "reason": reason} for path, reason in predictions.failed]}


def classes_without_images(confusion: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """Names of the classes with no true image in the evaluated split, in folder order."""
    present = set(metrics.classes_with_images(confusion))
    return [name for index, name in enumerate(class_names) if index not in present]


def classes_without_images_note(summary: dict[str, Any]) -> str:
    """The console note naming the classes without images, which the class-averaged metrics leave out."""
    absent = summary["classes_without_images"]
    return (f"note: {len(absent)} class(es) have no images in {summary['split'] or 'the split'}: {', '.join(absent)}; "
            f"balanced accuracy and macro-F1 average over the other {summary['classes'] - len(absent)}")


# --------------------------------------------------------------------------- tables


def per_class_csv(confusion: np.ndarray, class_names: Sequence[str]) -> str:
    """``per_class.csv``: one row per class in folder order."""
    scores = metrics.class_scores(confusion)
    confused = metrics.most_confused_with(confusion)
    rows = []
    for index, name in enumerate(class_names):
        other = confused[index]
        rows.append([name, int(scores.support[index]), int(scores.predicted[index]),
                     f"{scores.precision[index]:.4f}", f"{scores.recall[index]:.4f}", f"{scores.f1[index]:.4f}",
                     class_names[other[0]] if other else "", f"{other[1]:.4f}" if other else ""])
    header = ["class", "support", "predicted", "precision", "recall", "f1", "most_confused_with", "confused_share"]
    return csv_text(header, rows)


def top_confusions_csv(pairs: Sequence[tuple[int, int, int, float]], class_names: Sequence[str]) -> str:
    """``top_confusions.csv``: true class, predicted class, count and share of the true class, largest first."""
    rows = [[class_names[true], class_names[predicted], count, f"{share:.4f}"]
            for true, predicted, count, share in pairs]
    return csv_text(["true", "predicted", "count", "share_of_true"], rows)


# --------------------------------------------------------------------------- figures


def plot_report_confusion(confusion: np.ndarray, class_names: list[str], source: str, path: Path) -> bool:
    """The confusion matrix figure, in :func:`class_order.auto_class_order`; True when that is not folder order."""
    where = f" on {source}" if source else ""
    title = f"Confusion matrix{where} (normalized by true class)"
    # Without an order, plots draws auto_class_order and adds a grouping to the title itself.
    order = plots.plot_confusion_matrix(confusion, class_names, path, title=title)
    return order != list(range(len(class_names)))


def plot_reliability(predictions: Predictions, temperature: float, source: str, path: Path) -> None:
    """The reliability diagram of the predictions as given and divided by ``temperature`` (one curve when 1)."""
    before = calibration.reliability_bins(predictions.probabilities, predictions.targets)
    after = None
    if temperature != calibration.DEFAULT_TEMPERATURE:
        calibrated = calibration.apply_temperature(predictions.probabilities, temperature)
        after = calibration.reliability_bins(calibrated, predictions.targets)
    where = f" on {source}" if source else ""
    plots.plot_reliability_diagram(before, after, temperature, path,
                                   title=f"Reliability diagram{where} ({len(predictions.targets)} images)")


def relative_curve_path(history_path: str | Path | None, report_dir: Path) -> str | None:
    """``accuracy_curve.png`` beside the history, relative to the report folder (for report.md); None if absent."""
    if history_path is None:
        return None
    curve = Path(history_path).parent / "accuracy_curve.png"
    if not curve.is_file():
        return None
    return Path(os.path.relpath(curve.resolve(), report_dir.resolve())).as_posix()


def worst_mistakes(predictions: Predictions, limit: int) -> list[int]:
    """Positions of the wrong predictions with the highest confidence, most confident first."""
    predicted = predictions.predicted
    wrong = np.flatnonzero(predicted != predictions.targets)
    confidence = predictions.probabilities[wrong, predicted[wrong]]
    ranked = wrong[np.argsort(-confidence, kind="stable")]
    return [int(position) for position in ranked[: max(limit, 0)]]


def plot_misclassified(predictions: Predictions, class_names: Sequence[str], limit: int, path: Path) -> int:
    """The grid of the most confident mistakes; returns how many it shows."""
    positions = worst_mistakes(predictions, limit)
    wrong_total = int((predictions.predicted != predictions.targets).sum())
    images = [thumbnail(predictions.paths[position]) for position in positions]
    labels = figures.shorten_labels(class_names, MAX_CAPTION_NAME_CHARS)  # distinct, shortened in the middle
    captions = [mistake_caption(predictions, position, labels) for position in positions]
    title = f"Most confident mistakes: {len(positions)} of {wrong_total} misclassified images"
    image_grids.plot_image_grid(images, captions, path, title, empty_message="no misclassified images")
    return len(positions)


def thumbnail(path: str) -> np.ndarray:
    """The original image (EXIF-oriented RGB, not normalized), shrunk to at most ``THUMBNAIL_PIXELS`` a side."""
    image = load_rgb(path)
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    return np.asarray(image)


def mistake_caption(predictions: Predictions, position: int, labels: Sequence[str]) -> str:
    """Four lines: true class, predicted class with its confidence, the true class' probability, ``folder/file``.

    ``labels`` are the class names as shown (see :func:`figures.shorten_labels`). The file is named with its class
    folder (``3/0.jpg``), since file names repeat across classes, shortened in the middle when long.
    """
    true, guess = int(predictions.targets[position]), int(predictions.predicted[position])
    probabilities = predictions.probabilities[position]
    path = Path(predictions.paths[position])
    [file_label] = figures.shorten_labels([f"{path.parent.name}/{path.name}"], MAX_CAPTION_CHARS)
    return (f"true: {labels[true]}\n"
            f"pred: {labels[guess]} ({probabilities[guess]:.0%})\n"
            f"p(true) = {probabilities[true]:.1%}\n"
            f"{file_label}")


# --------------------------------------------------------------------------- report.md


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]


def report_markdown(  # noqa: PLR0913
    summary: dict[str, Any],
    confusion: np.ndarray,
    class_names: Sequence[str],
    pairs: Sequence[tuple[int, int, int, float]],
    checkpoint: Checkpoint,
    history: list[dict[str, float]],
    curve: str | None,
    grouped: bool,
    mistakes_shown: int,
) -> str:
    """The one-page summary, linking the figures and CSV files by relative path."""
    sections = [
        _header_section(summary, checkpoint),
        _metrics_section(summary),
        _training_section(history, checkpoint, curve),
        _confusion_section(grouped, pairs, class_names),
        _class_section(confusion, class_names),
        _mistakes_section(mistakes_shown),
        _calibration_section(summary, checkpoint),
        _config_section(checkpoint.config, checkpoint.runtime),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _test_size_note(checkpoint: Checkpoint) -> str:
    test_size = checkpoint.test_size
    return f" (evaluated at {test_size} px)" if test_size != checkpoint.img_size else ""


def _header_section(summary: dict[str, Any], checkpoint: Checkpoint) -> list[str]:
    lines = [
        "# Evaluation report",
        "",
        f"Checkpoint: {checkpoint.arch}, {summary['classes']} classes, "
        f"{checkpoint.img_size} px{_test_size_note(checkpoint)}, "
        f"saved at epoch {checkpoint.epoch}. Evaluated on {summary['split'] or 'a labeled split'}: "
        f"{summary['images']} images.",
    ]
    if summary["undecodable"]:
        lines += ["", f"Left out {len(summary['undecodable'])} file(s) that could not be decoded:", ""]
        lines += [f"- `{failure['path']}`: {failure['reason']}" for failure in summary["undecodable"]]
    return lines


def _metrics_section(summary: dict[str, Any]) -> list[str]:
    rows = [
        ("accuracy", f"{summary['accuracy']:.2%}"),
        ("balanced accuracy (mean recall)", f"{summary['balanced_accuracy']:.2%}"),
        ("macro-F1", f"{summary['macro_f1']:.4f}"),
        *([(f"top-{summary['top_k']} accuracy", f"{summary['top_k_accuracy']:.2%}")] if "top_k" in summary else []),
        ("loss (plain cross-entropy)", f"{summary['loss']:.4f}"),
        ("images", summary["images"]),
    ]
    return ["## Metrics", "", *_table(["metric", "value"], rows), "",
            f"{_averaging_convention(summary)} All figures are in `metrics.json`. The loss has no class weights and "
            "no label smoothing, so it differs from the val loss in the training log when those were on."]


def _averaging_convention(summary: dict[str, Any]) -> str:
    absent = summary["classes_without_images"]
    averaged = (f"Balanced accuracy and macro-F1 average over the {summary['classes'] - len(absent)} classes with "
                "images in this split")
    return f"{averaged}; class(es) {', '.join(absent)} have none and are left out." if absent else f"{averaged}."


def _training_section(history: list[dict[str, float]], checkpoint: Checkpoint, curve: str | None) -> list[str]:
    if not history or not all("val_acc" in row and "epoch" in row for row in history):
        return ["## Training", "", "No `history.csv` beside the checkpoint."]
    best = max(history, key=lambda row: row["val_acc"])  # the first of equal maxima, as train.py keeps it
    final = history[-1]
    configured = checkpoint.config.get("epochs")
    of = f" of {configured} configured" if configured else ""
    return ["## Training", "",
            f"Best epoch {int(best['epoch'])} (val accuracy {best['val_acc']:.2%}); final epoch {int(final['epoch'])}"
            f"{of} (val accuracy {final['val_acc']:.2%})."] + (["", f"![accuracy curve]({curve})"] if curve else [])


def _confusion_section(grouped: bool, pairs: Sequence[tuple[int, int, int, float]],
                       class_names: Sequence[str]) -> list[str]:
    order_note = ("Classes are grouped by confusion (average-linkage clustering), so classes mistaken for each "
                  "other sit together." if grouped else "Classes are in folder order.")
    lines = ["## Confusion matrix", "", "![confusion matrix](confusion_matrix.png)", "", order_note, "",
             "### Top confusions", ""]
    if not pairs:
        return lines + ["No mistakes."]
    rows = [(class_names[true], class_names[guess], count, f"{share:.1%}")
            for true, guess, count, share in pairs[:TOP_CONFUSIONS_SHOWN]]
    return lines + _table(["true", "predicted as", "count", "share of true class"], rows) + [
        "", f"The largest {len(pairs)} are in `top_confusions.csv`."]


def _class_section(confusion: np.ndarray, class_names: Sequence[str]) -> list[str]:
    scores = metrics.class_scores(confusion)
    confused = metrics.most_confused_with(confusion)
    present = metrics.classes_with_images(confusion)
    if len(class_names) <= FULL_CLASS_TABLE_UP_TO:
        title, shown = "## Per class", present
    else:
        title = f"## Weakest {min(WEAKEST_CLASSES_SHOWN, len(present))} classes (lowest F1)"
        shown = sorted(present, key=lambda index: (scores.f1[index], index))[:WEAKEST_CLASSES_SHOWN]
    rows = []
    for index in shown:
        other = confused[index]
        rows.append((class_names[index], int(scores.support[index]), f"{scores.precision[index]:.2f}",
                     f"{scores.recall[index]:.2f}", f"{scores.f1[index]:.2f}",
                     f"{class_names[other[0]]} ({other[1]:.0%})" if other else "-"))
    missing = len(class_names) - len(present)
    note = [f"{missing} class(es) have no images in this split."] if missing else []
    return [title, "", *_table(["class", "support", "precision", "recall", "F1", "most confused with"], rows), "",
            "Every class is in `per_class.csv`.", *note]


def _mistakes_section(mistakes_shown: int) -> list[str]:
    if not mistakes_shown:
        return ["## Most confident mistakes", "", "No misclassified images."]
    return ["## Most confident mistakes", "",
            "The wrong predictions the model was surest of (often label noise or truly ambiguous images):", "",
            "![most confident mistakes](misclassified.png)"]


def _calibration_section(summary: dict[str, Any], checkpoint: Checkpoint) -> list[str]:
    if checkpoint.temperature is None:
        fitted = "The checkpoint has no temperature (written before calibration was stored), so it is 1."
    elif summary["temperature"] == calibration.DEFAULT_TEMPERATURE:
        fitted = "The checkpoint's temperature is 1: its run had no validation split to fit one on."
    else:
        fitted = (f"The checkpoint's temperature, {summary['temperature']:.3f}, was fitted on its run's validation "
                  "split: on that split the calibrated figure is optimistic.")
    return ["## Calibration", "",
            f"Expected calibration error ({calibration.ECE_BINS} confidence bins): {summary['ece']:.2%} as the model "
            f"gives its probabilities, {summary['ece_calibrated']:.2%} with its logits divided by the temperature. "
            + fitted + _noisy_ece_note(summary["images"]), "", "![reliability diagram](reliability.png)"]


def _noisy_ece_note(images: int) -> str:
    if images >= calibration.NOISY_ECE_BELOW:
        return ""
    return (f" On {images} images a bin holds only a few, so both figures move by several points with small changes "
            "of the temperature.")


def _config_section(config: dict[str, Any], runtime: dict[str, Any]) -> list[str]:
    lines = ["## Configuration", ""]
    if runtime:
        lines += [f"Trained on {runtime.get('device', '?')} in {runtime.get('precision', '?')}, "
                  f"{counted(runtime.get('workers', '?'), 'loader worker')}, augmentation on the "
                  f"{runtime.get('augment_device', '?')}; torch {runtime.get('torch', '?')}. The options as given "
                  "(`auto` chose what this line says):", ""]
    lines += ["```yaml"] + [f"{key}: {value}" for key, value in sorted(config.items())]
    return lines + ["```"]
