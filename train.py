"""Fine-tune an ImageNet-pretrained ResNet on an ImageFolder dataset.

    python train.py                                   # the reference recipe on data/
    python train.py --config configs/sample.yaml      # the bundled sample, on a CPU
    python train.py --trainable all --img-size 320    # a stronger recipe: one flag at a time

Writes into --output-dir: best.pt, last.pt, history.csv, loss_curve.png, accuracy_curve.png,
confusion_matrix.png and config.yaml.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

import plots
from accel import AMP_CHOICES, Accel, configure_backends, device_peak_memory_mb, host_peak_rss_mb, make_grad_scaler
from accel import maybe_compile, resolve_amp
from checkpoint import make_checkpoint, save_checkpoint
from dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LabeledImages,
    TrainValData,
    balanced_class_weights,
    build_eval_transform,
    build_train_transform,
    class_counts,
    collate_skipping_failures,
    load_train_val,
)
from engine import EvalResult, confusion_matrix, evaluate, train_one_epoch
from model import DEFAULT_TRAINABLE, SUPPORTED_ARCHS, build_model, freeze_blocks, parameter_summary, parse_trainable
from model import trainable_parameters
from utils import (
    UserError,
    atomic_write_text,
    describe_device,
    exit_on_user_error,
    format_count,
    load_yaml_config,
    pick_device,
    resolve_workers,
    seed_everything,
)

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


# --------------------------------------------------------------------------- options


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The training options; defaults are the reference recipe."""
    parser = argparse.ArgumentParser(
        description="Fine-tune an ImageNet-pretrained ResNet on data/train/<class>/*.jpg.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        add_help=add_help,
    )
    parser.add_argument("--config", help="YAML file of option: value lines; command-line flags override it")
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="data", help="folder holding train/<class>/ and optionally val/<class>/")
    data.add_argument("--val-fraction", type=float, default=0.1, help="stratified share of train/ used as val/ when there is no val/ folder")
    data.add_argument("--img-size", type=int, default=224, help="training crop and evaluation size, in pixels")
    data.add_argument("--workers", default="auto", help="DataLoader worker processes: a number, or auto")
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default="resnet50", help=f"one of: {', '.join(SUPPORTED_ARCHS)}")
    model.add_argument("--weights", default="imagenet", help="imagenet (torchvision's best), none, or a PATH to a state dict")
    model.add_argument("--trainable", default=DEFAULT_TRAINABLE, help="blocks to train, comma-separated (conv1,bn1,layer1..layer4,fc), or all")
    model.add_argument("--dropout", type=float, default=0.2, help="dropout before the final Linear layer")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=50, help="maximum epochs; the cosine schedule spans them")
    optim.add_argument("--batch-size", type=int, default=128)
    optim.add_argument("--lr", type=float, default=3e-5, help="AdamW learning rate")
    optim.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    optim.add_argument("--label-smoothing", type=float, default=0.05)
    optim.add_argument("--class-weights", choices=("balanced", "none"), default="balanced", help="cross-entropy class weights")
    optim.add_argument("--patience", type=int, default=10, help="stop after this many epochs without a better val accuracy; 0 never stops early")
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default="checkpoints", help="where checkpoints, history, plots and config go")
    run.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    run.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="mixed precision: auto = bf16 where the hardware has it, fp16 on older CUDA GPUs, else fp32")
    run.add_argument("--channels-last", default=True, action=argparse.BooleanOptionalAction, help="NHWC memory format (faster convolutions on GPUs and CPUs)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (falls back with a note where it cannot)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no-progress", action="store_true", help="hide the per-batch progress bars")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags; a ``--config`` file sets the defaults first, so the command line wins."""
    parser = get_args_parser()
    pre_args, _ = parser.parse_known_args(argv)
    if pre_args.config:
        parser.set_defaults(**_config_defaults(parser, pre_args.config))
    args = parser.parse_args(argv)
    validate_args(args)
    return args


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    values = load_yaml_config(path)
    known = {action.dest for action in parser._actions} - {"help", "config"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"--config {path}: unknown option(s) {', '.join(unknown)}; see python train.py --help")
    return values


def validate_args(args: argparse.Namespace) -> None:
    """Reject values that would only fail later, deep in the loop."""
    positive = {"--epochs": args.epochs, "--batch-size": args.batch_size, "--img-size": args.img_size}
    for flag, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{flag} {value}: must be a whole number of at least 1")
    if args.img_size < 16:
        raise UserError(f"--img-size {args.img_size}: too small for a ResNet; use 16 or more (224 is the recipe)")
    if args.lr <= 0:
        raise UserError(f"--lr {args.lr}: must be positive")
    if not 0 <= args.label_smoothing < 1:
        raise UserError(f"--label-smoothing {args.label_smoothing}: must be in [0, 1)")
    if args.patience < 0:
        raise UserError(f"--patience {args.patience}: must be 0 (never stop early) or more")
    args.workers = resolve_workers(args.workers)
    parse_trainable(args.trainable)


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The effective configuration as plain values (what is printed, saved and stored in checkpoints)."""
    return {key: value for key, value in sorted(vars(args).items()) if key != "config"}


# --------------------------------------------------------------------------- setup


def make_loaders(data: TrainValData, args: argparse.Namespace, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """Training loader (shuffled, augmented) and validation loader (eval transform)."""
    common = dict(
        batch_size=args.batch_size,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
        collate_fn=collate_skipping_failures,
    )
    train_set = LabeledImages(data.train_samples, build_train_transform(args.img_size))
    val_set = LabeledImages(data.val_samples, build_eval_transform(args.img_size))
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, shuffle=True, drop_last=False, generator=generator, **common)
    val_loader = DataLoader(val_set, shuffle=False, **common)
    return train_loader, val_loader


def make_criterion(data: TrainValData, args: argparse.Namespace, device: torch.device) -> nn.Module:
    """Cross-entropy with label smoothing and, by default, 'balanced' class weights from the train counts."""
    weights = None
    if args.class_weights == "balanced":
        weights = balanced_class_weights(class_counts(data.train_samples, len(data.class_names))).to(device)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing)


def make_model(args: argparse.Namespace, num_classes: int, accel: Accel) -> nn.Module:
    """The network with its pretrained trunk, frozen blocks fixed, on the device in its memory format."""
    model = build_model(args.arch, num_classes, weights=args.weights, dropout=args.dropout)
    freeze_blocks(model, parse_trainable(args.trainable))
    trainable, total = parameter_summary(model)
    print(f"model: {args.arch}, weights {args.weights}; training {args.trainable}: "
          f"{format_count(trainable)} of {format_count(total)} parameters ({trainable / total:.1%})")
    return accel.prepare_model(model)


def describe_data(data: TrainValData) -> None:
    """Print the class count, split sizes, imbalance and any skipped files."""
    counts = class_counts(data.train_samples, len(data.class_names))
    print(f"data: {len(data.class_names)} classes; train {len(data.train_samples)} images "
          f"({min(counts)} to {max(counts)} a class); val {len(data.val_samples)} images from {data.val_source}")
    if data.skipped:
        print(f"warning: skipped {len(data.skipped)} unreadable image file(s):")
        for path, reason in data.skipped:
            print(f"  {path}: {reason}")


# --------------------------------------------------------------------------- outputs


def write_history(history: list[dict[str, float]], path: Path) -> None:
    """Write the per-epoch history as CSV."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def epoch_line(row: dict[str, float], epochs: int, is_best: bool, images_per_second: float,
               device: torch.device) -> str:
    """One summary line per epoch: metrics, learning rate, time, training throughput and peak memory."""
    gpu_mb = device_peak_memory_mb(device)
    memory = f"host {host_peak_rss_mb():.0f} MiB" + (f", gpu {gpu_mb:.0f} MiB" if gpu_mb is not None else "")
    return (f"epoch {int(row['epoch']):>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}  "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}  lr {row['lr']:.2e}  {row['seconds']:.1f}s  "
            f"{images_per_second:.0f} img/s  peak {memory}" + ("  * best" if is_best else ""))


def save_final_plots(history: list[dict], best: EvalResult, best_epoch: int, stopped_epoch: int | None,
                     class_names: list[str], output_dir: Path) -> None:
    """Loss and accuracy curves, and the best model's normalized confusion matrix on val."""
    plots.plot_loss_curve(history, output_dir / "loss_curve.png", best_epoch, stopped_epoch)
    plots.plot_accuracy_curve(history, output_dir / "accuracy_curve.png", best_epoch, stopped_epoch)
    matrix = confusion_matrix(best.predictions, best.targets, len(class_names)).numpy()
    plots.plot_confusion_matrix(matrix, class_names, output_dir / "confusion_matrix.png")


# --------------------------------------------------------------------------- main


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train with the given command-line arguments; returns a summary (best epoch, accuracy, output folder)."""
    args = parse_args(argv)
    config = config_of(args)
    print("config:\n" + "".join(f"  {key}: {value}\n" for key, value in config.items()), end="")
    device = pick_device(args.device)
    accel = Accel(device, resolve_amp(args.amp, device), args.channels_last)
    configure_backends(device)
    print(f"device: {describe_device(device)}, precision {accel.precision_name}"
          + (", channels_last" if accel.channels_last else ""))
    seed_everything(args.seed)

    data = load_train_val(args.data_dir, args.val_fraction, args.seed)
    describe_data(data)
    train_loader, val_loader = make_loaders(data, args, device)
    model = make_model(args, len(data.class_names), accel)
    step_model = maybe_compile(model, args.compile)
    criterion = make_criterion(data, args, device)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    scaler = make_grad_scaler(accel)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "config.yaml", yaml.safe_dump(config, sort_keys=True))

    history: list[dict[str, float]] = []
    best_accuracy, best_epoch, best_eval, stopped_epoch = -1.0, 0, None, None
    for epoch in range(1, args.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        trained = train_one_epoch(step_model, train_loader, criterion, optimizer, accel, scaler,
                                  description=f"epoch {epoch}/{args.epochs}", show_progress=not args.no_progress)
        evaluated = evaluate(step_model, val_loader, criterion, accel, show_progress=not args.no_progress)
        scheduler.step()
        row = {"epoch": epoch, "train_loss": trained.loss, "train_acc": trained.accuracy, "val_loss": evaluated.loss,
               "val_acc": evaluated.accuracy, "lr": lr, "seconds": trained.seconds + evaluated.seconds}
        history.append(row)
        is_best = evaluated.accuracy > best_accuracy
        print(epoch_line(row, args.epochs, is_best, trained.images / max(trained.seconds, 1e-9), device), flush=True)

        metrics = {key: value for key, value in row.items() if key != "epoch"}
        checkpoint = make_checkpoint(model, data.class_names, config, epoch, metrics, IMAGENET_MEAN, IMAGENET_STD)
        if is_best:
            best_accuracy, best_epoch, best_eval = evaluated.accuracy, epoch, evaluated
            save_checkpoint(checkpoint, output_dir / "best.pt")
        save_checkpoint(checkpoint, output_dir / "last.pt")
        write_history(history, output_dir / "history.csv")
        if args.patience and epoch - best_epoch >= args.patience and epoch < args.epochs:
            stopped_epoch = epoch
            print(f"early stop: no better val accuracy for {args.patience} epochs")
            break

    save_final_plots(history, best_eval, best_epoch, stopped_epoch, data.class_names, output_dir)
    print(f"best val accuracy {best_accuracy:.2%} at epoch {best_epoch}; wrote {output_dir}/best.pt, last.pt, "
          "history.csv, loss_curve.png, accuracy_curve.png, confusion_matrix.png, config.yaml")
    return {"best_epoch": best_epoch, "best_val_acc": best_accuracy, "output_dir": str(output_dir),
            "epochs_run": len(history)}


if __name__ == "__main__":
    main(sys.argv[1:])
