"""Evaluate a trained checkpoint on a labeled split and write a report folder.

    python evaluate.py --checkpoint checkpoints/best.pt --data-dir data          # DATA_DIR/val
    python evaluate.py --checkpoint checkpoints/best.pt --split-dir other/labeled # any ImageFolder tree

Class folders are matched to the checkpoint's classes by name. Without DATA_DIR/val, the held-out part of
DATA_DIR/train that training used is rebuilt from the checkpoint's val_fraction and seed. Writes into
--report-dir (default: a report/ folder beside the checkpoint) metrics.json, per_class.csv,
confusion_matrix.png, top_confusions.csv, misclassified.png, reliability.png and report.md; see report.py.
metrics.json has the expected calibration error as the model gives its probabilities (``ece``) and with its logits
divided by the checkpoint's ``temperature`` (``ece_calibrated``; checkpoints written before have none: 1.0).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accel import choose_data_path, set_up_accel
from calibration import DEFAULT_TEMPERATURE
from checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint
from common import Sample
from dataset import load_train_val, report_ignored, require_not_nested, scan_labeled_split, unknown_class_folders
from engine import predict_samples
from options import (
    add_inference_options,
    add_max_image_pixels_option,
    check_max_image_pixels,
    parse_fold,
    script_parser,
)
from pipeline import inference_batches
from report import write_evaluation_report
from utils import (
    UserError,
    argument_list,
    describe_device,
    exit_on_user_error,
    refuse_files_in_the_way,
    resolve_workers,
    some_names,
    unwritable_reason,
)

MAX_NAMES_IN_ERROR = 10


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The evaluation options."""
    parser = script_parser(
        "evaluate.py",
        "Evaluate a checkpoint on a labeled ImageFolder split and write metrics, tables, figures and "
        "report.md.",
        add_help,
    )
    parser.add_argument("--checkpoint", default="checkpoints/best.pt", help="a best.pt or last.pt written by "
                        "train.py, or a run's output folder (its best.pt)")
    parser.add_argument("--data-dir", default="data", help="evaluates DATA_DIR/val/<class>/ (or, without it, "
                        "the held-out part of DATA_DIR/train/ that training used)")
    parser.add_argument("--split-dir", help="evaluate this labeled folder of <class>/ sub-folders instead")
    parser.add_argument("--report-dir", help="where the report goes (None: a report/ folder beside the checkpoint)")
    parser.add_argument("--top-confusions", type=int, default=20, metavar="N",
                        help="rows of top_confusions.csv (largest off-diagonal cells)")
    parser.add_argument("--misclassified", type=int, default=24, metavar="N",
                        help="most confident mistakes shown in misclassified.png")
    add_inference_options(parser)
    add_max_image_pixels_option(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse counts that make no sense before any work is done."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    for flag, value in (("--top-confusions", args.top_confusions), ("--misclassified", args.misclassified)):
        if value < 0:
            raise UserError(f"{flag} {value}: must be 0 or more")
    check_max_image_pixels(args.max_image_pixels)


def _listed(names: Sequence[str]) -> str:
    return some_names(names, MAX_NAMES_IN_ERROR)


def scan_split(split_dir: Path, class_names: Sequence[str], flag: str) -> list[Sample]:
    """Labeled samples of ``split_dir``, its class folders matched to the checkpoint's classes by name."""
    if not split_dir.is_dir():
        raise UserError(f"{flag} {split_dir}: folder not found; it should hold <class>/*.jpg folders")
    require_not_nested(split_dir, "--split-dir" if flag == "--split-dir" else None)
    unknown = unknown_class_folders(split_dir, class_names)
    if unknown:
        raise UserError(f"{split_dir}: class folder(s) {_listed(unknown)} are not classes of the checkpoint "
                        f"(it knows {_listed(list(class_names))})")
    samples, ignored = scan_labeled_split(split_dir, class_names)
    report_ignored(str(split_dir), ignored)
    if not samples:
        raise UserError(f"{flag} {split_dir}: no images in class folders; expected {split_dir}/<class>/*.jpg")
    return samples


def held_out_split(data_dir: Path, checkpoint: Checkpoint, max_pixels: int) -> tuple[list[Sample], str]:
    """The part of ``data_dir/train`` that training held out as val: the checkpoint's list of those images (older
    checkpoints: the split rebuilt from the run's --val-fraction and --seed)."""
    config, held_out = checkpoint.config, checkpoint.held_out_val_files
    if config.get("train_on_all"):
        raise UserError(f"--data-dir {data_dir}: this run trained on all of train/ (--train-on-all), so no part of it "
                        "is held out to evaluate; pass --split-dir with images it has not seen")
    if held_out is None and checkpoint.split_recorded:  # the run validated on a val/ folder
        raise UserError(f"--data-dir {data_dir}: no val/ folder, but this checkpoint's run validated on a val/ folder, "
                        "not on a share of train/; pass the --data-dir it trained on, or --split-dir DIR")
    if held_out is None:
        if "val_fraction" not in config or "seed" not in config:
            raise UserError(f"--data-dir {data_dir}: no val/ folder, and the checkpoint does not record how training "
                            "split train/; pass --split-dir")
        print("note: this checkpoint predates stored validation lists; the split is rebuilt from its --val-fraction "
              f"and --seed, which matches training only if {data_dir / 'train'} has not changed since")
    data = load_train_val(data_dir, config.get("val_fraction", 0.1), config.get("seed", 0), max_pixels=max_pixels,
                          held_out=held_out, fold=parse_fold(config["fold"]) if config.get("fold") else None)
    if data.class_names != checkpoint.class_names:
        raise UserError(f"--data-dir {data_dir}: the class folders of train/ differ from the checkpoint's, so the "
                        "held-out split cannot be rebuilt; pass --split-dir")
    return data.val_samples, data.val_source


def warn_if_trained_on(config: dict[str, Any], folder: Path) -> None:
    """Say so when ``folder`` lies in the data a --train-on-all or --fold run trained on: its accuracy there
    overstates what the model does on new images."""
    trained = Path(config.get("data_dir", "")).resolve()
    if not (config.get("train_on_all") or config.get("fold")) or not folder.resolve().is_relative_to(trained):
        return
    how = ("trained on all of train/ and val/ (--train-on-all)" if config.get("train_on_all") else
           f"trained on every image of train/ and val/ outside its fold {config['fold']} (--fold; evaluate without "
           "--split-dir to score that fold)")
    print(f"warning: {folder} is part of {trained}, which this run {how}: accuracy here overstates what it does on "
          "new images")


def resolve_split(args: argparse.Namespace, checkpoint: Checkpoint) -> tuple[list[Sample], str]:
    """The samples to evaluate and a description of where they come from."""
    class_names, config = checkpoint.class_names, checkpoint.config
    if args.split_dir:
        warn_if_trained_on(config, Path(args.split_dir))
        return scan_split(Path(args.split_dir), class_names, "--split-dir"), str(args.split_dir)
    data_dir = Path(args.data_dir)
    val_dir = data_dir / "val"
    if config.get("fold"):
        print(f"note: evaluating fold {config['fold']} of {data_dir}'s train/ and val/, which this run validated on "
              "(--fold)")
        return held_out_split(data_dir, checkpoint, args.max_image_pixels)
    if val_dir.is_dir():
        warn_if_trained_on(config, val_dir)
        return scan_split(val_dir, class_names, "--data-dir"), str(val_dir)
    if (data_dir / "train").is_dir():
        print(f"note: no {val_dir}; evaluating the part of {data_dir / 'train'} that training held out")
        return held_out_split(data_dir, checkpoint, args.max_image_pixels)
    raise UserError(f"--data-dir {data_dir}: no val/ or train/ folder inside; pass --split-dir DIR to evaluate "
                    "another labeled folder")


def note_missing_temperature(checkpoint: Checkpoint, path: str) -> None:
    """Say so when a checkpoint predates stored temperatures: it is evaluated with T = 1.0."""
    if checkpoint.temperature is None:
        print(f"note: {path} has no temperature (written before train.py stored one); ece_calibrated uses "
              f"T = {DEFAULT_TEMPERATURE}, the same as ece")


def refuse_unwritable_report_dir(report_dir: Path, given: bool) -> None:
    """Refuse, before any work, a report folder where nothing can be written: by default it lies beside the
    checkpoint, which may be on read-only storage (Kaggle's input, a shared course folder)."""
    reason = unwritable_reason(report_dir)
    if reason is None:
        return
    where = f"--report-dir {report_dir}" if given else f"the report folder beside the checkpoint, {report_dir},"
    raise UserError(f"{where} cannot be written ({reason}); pass --report-dir with a folder you can write to")


@exit_on_user_error
def main(argv: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate and write the report; returns the metrics (as in metrics.json) and the report folder."""
    args = get_args_parser().parse_args(argument_list(argv, "evaluate.py"))
    check_args(args)
    args.workers = resolve_workers(args.workers)
    checkpoint = load_checkpoint(args.checkpoint)
    note_missing_temperature(checkpoint, args.checkpoint)
    checkpoint_dir = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
    report_dir = Path(args.report_dir) if args.report_dir else checkpoint_dir / "report"
    refuse_files_in_the_way("--report-dir", report_dir, is_folder=True)  # before the scan and the inference
    refuse_unwritable_report_dir(report_dir, given=bool(args.report_dir))
    samples, source = resolve_split(args, checkpoint)
    if not samples:
        raise UserError(f"{source}: no labeled images to evaluate")
    accel = set_up_accel(args.device, args.amp)
    print(f"device: {describe_device(accel.device)}, precision {accel.precision_name}")
    print(f"checkpoint: {args.checkpoint} ({checkpoint.arch}, {len(checkpoint.class_names)} classes, "
          f"{checkpoint.eval_size} px, epoch {checkpoint.epoch}); {len(samples)} images from {source}")
    model = accel.prepare_model(model_from_checkpoint(checkpoint))
    on_device = choose_data_path(args.augment_device, accel.device) == "gpu"
    batches = inference_batches([path for path, _ in samples], *checkpoint.preprocessing, accel, on_device,
                                args.batch_size, args.workers, args.max_image_pixels)
    predictions = predict_samples(model, batches, samples, accel, show_progress=not args.no_progress)
    return write_evaluation_report(predictions, checkpoint, report_dir, source=source,
                                   history_path=checkpoint_dir / "history.csv", top_confusions=args.top_confusions,
                                   misclassified=args.misclassified, checkpoint_path=args.checkpoint)


if __name__ == "__main__":
    main(sys.argv[1:])
