"""Predict the unlabeled test images with a trained checkpoint and write the submission CSV.

    python predict.py --checkpoint checkpoints/best.pt --test-dir data/test --output prediction.csv

Writes ``image_name,pred_label`` with one row per test image, ``pred_label`` being the class folder name.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from accel import AMP_CHOICES, Accel, configure_backends, resolve_amp
from checkpoint import load_checkpoint, model_from_checkpoint
from dataset import UnlabeledImages, build_eval_transform, collate_with_failures, find_test_images, report_ignored
from engine import predict_probabilities
from utils import (
    UserError,
    atomic_write_bytes,
    atomic_write_text,
    describe_device,
    exit_on_user_error,
    pick_device,
    resolve_workers,
)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The prediction options."""
    parser = argparse.ArgumentParser(
        description="Write prediction.csv (image_name,pred_label) for every image in the test folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        add_help=add_help,
    )
    parser.add_argument("--checkpoint", default="checkpoints/best.pt", help="a best.pt or last.pt written by train.py")
    parser.add_argument("--test-dir", default="data/test", help="folder of unlabeled test images")
    parser.add_argument("--output", default="prediction.csv", help="the submission CSV to write")
    parser.add_argument("--keep-ext", action="store_true", help="keep the file extension in image_name")
    parser.add_argument("--zip", action="store_true", help="also write OUTPUT with .zip, holding prediction.csv, for upload")
    parser.add_argument("--labels", help="CSV of image_name,label to score the predictions against (e.g. data/sample/test_labels.csv)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", default="auto", help="DataLoader worker processes: a number, or auto")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    parser.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="mixed precision, as in train.py")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def image_names(paths: Sequence[Path], keep_ext: bool) -> list[str]:
    """The ``image_name`` column: file names without extension (unless ``keep_ext``); must be unique."""
    names = [path.name if keep_ext else path.stem for path in paths]
    clashes = sorted(name for name, count in Counter(names).items() if count > 1)
    if clashes:
        raise UserError(f"test images share the name {clashes[0]!r} once extensions are dropped; use --keep-ext")
    return names


def submission_csv(names: Sequence[str], labels: Sequence[str]) -> str:
    """The CSV text: header ``image_name,pred_label`` and one row per image."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image_name", "pred_label"])
    writer.writerows(zip(names, labels))
    return buffer.getvalue()


def write_zip(csv_text: str, zip_path: Path) -> None:
    """A zip archive holding ``prediction.csv``, as the course's upload page wants."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("prediction.csv", csv_text)
    atomic_write_bytes(zip_path, buffer.getvalue())


def read_labels(path: str | Path) -> dict[str, str]:
    """``image_name -> label`` from a CSV with those two columns (extensions in image_name are dropped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--labels {path}: file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"image_name", "label"} <= set(reader.fieldnames):
            raise UserError(f"--labels {path}: expected a header with image_name and label columns")
        return {Path(row["image_name"]).stem: row["label"] for row in reader}


def score(names: Sequence[str], predicted: Sequence[str], truth: dict[str, str]) -> tuple[float, float, int]:
    """(accuracy, balanced accuracy, images scored) of predictions against known labels."""
    pairs = [(truth[Path(name).stem], label) for name, label in zip(names, predicted) if Path(name).stem in truth]
    if not pairs:
        raise UserError("--labels: none of the test images appear in the labels file")
    accuracy = sum(true == guess for true, guess in pairs) / len(pairs)
    per_class: dict[str, list[bool]] = {}
    for true, guess in pairs:
        per_class.setdefault(true, []).append(true == guess)
    balanced = sum(sum(hits) / len(hits) for hits in per_class.values()) / len(per_class)
    return accuracy, balanced, len(pairs)


def load_model(checkpoint_path: str, accel: Accel) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained network on the device in eval mode, and its checkpoint."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = accel.prepare_model(model_from_checkpoint(checkpoint))
    print(f"checkpoint: {checkpoint_path} ({checkpoint['arch']}, {len(checkpoint['class_names'])} classes, "
          f"{checkpoint['img_size']} px, epoch {checkpoint.get('epoch', '?')})")
    return model, checkpoint


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Predict every test image and write the submission; returns the output path and row count."""
    args = get_args_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    device = pick_device(args.device)
    accel = Accel(device, resolve_amp(args.amp, device))
    configure_backends(device)
    print(f"device: {describe_device(device)}, precision {accel.precision_name}")
    model, checkpoint = load_model(args.checkpoint, accel)
    paths, ignored = find_test_images(args.test_dir)
    report_ignored(args.test_dir, ignored)
    names = image_names(paths, args.keep_ext)

    transform = build_eval_transform(checkpoint["img_size"], checkpoint["mean"], checkpoint["std"])
    workers = resolve_workers(args.workers)
    loader = DataLoader(UnlabeledImages(paths, transform), batch_size=args.batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda", collate_fn=collate_with_failures)
    probabilities, failed = predict_probabilities(model, loader, len(paths), accel, not args.no_progress)
    if failed:
        listed = ", ".join(str(paths[index]) for index in failed)
        raise UserError(f"{len(failed)} test image(s) could not be decoded, so no submission was written: {listed}")

    class_names = checkpoint["class_names"]
    predicted = [class_names[index] for index in probabilities.argmax(dim=1).tolist()]
    csv_text = submission_csv(names, predicted)
    output = Path(args.output)
    atomic_write_text(output, csv_text)
    print(f"wrote {output}: {len(names)} rows")
    if args.zip:
        write_zip(csv_text, output.with_suffix(".zip"))
        print(f"wrote {output.with_suffix('.zip')}")
    result: dict[str, Any] = {"output": str(output), "rows": len(names)}
    if args.labels:
        accuracy, balanced, scored = score(names, predicted, read_labels(args.labels))
        print(f"score on {scored} labeled images: accuracy {accuracy:.2%}, balanced accuracy {balanced:.2%}")
        result.update(accuracy=accuracy, balanced_accuracy=balanced)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
