"""Fine-tune an ImageNet-pretrained ResNet on an ImageFolder dataset.

    python train.py                                   # the reference recipe on data/
    python train.py --config configs/sample.yaml      # the bundled sample, on a CPU
    python train.py --trainable all --img-size 320    # a stronger recipe: one flag at a time

Writes into --output-dir: best.pt, last.pt, history.csv, loss_curve.png, accuracy_curve.png,
confusion_matrix.png and config.yaml.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import math
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torchvision
import yaml
from torch import nn

import metrics
import plots
from accel import AMP_CHOICES, DEVICE_CHOICES, Accel, device_peak_memory_mb, host_peak_rss_mb, make_grad_scaler
from accel import maybe_compile, set_up_accel
from cache import CACHE_CHOICES, CacheChoice, DecodedImages, cache_bytes, choose_cache
from cache import gpu_free_bytes
from checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from dataset import (
    AUTO_AUGMENT_CHOICES,
    DecodeFailure,
    TrainValData,
    add_max_image_pixels_option,
    balanced_class_weights,
    check_max_image_pixels,
    class_counts,
    class_folders,
    epoch_seed,
    has_images,
    load_train_val,
    parse_fold,
    train_decode_side,
)
from distributed import (
    GlobalCrossEntropy,
    PeerStoppedError,
    World,
    all_ranks_true,
    all_reduce_epoch,
    all_reduce_eval,
    announce_stop,
    any_rank,
    broadcast_flag,
    close_world,
    describe_sync_bn,
    gather_objects,
    init_world,
    mistakes_told_by_rank_0,
    peer_failures,
    release_wrapper,
    shard_range,
    silence_other_ranks,
    sync_buffers,
    sync_trainable_batchnorm,
    wrap_model,
)
from engine import (
    EvalResult,
    NonFiniteLossError,
    StepOptions,
    WeightAverage,
    evaluate,
    make_optimizer,
    train_one_epoch,
)
from model import (
    DEFAULT_TRAINABLE,
    SUPPORTED_ARCHS,
    TIMM_PREFIX,
    block_names,
    build_model,
    classifier_name,
    fixed_input_size,
    freeze_blocks,
    has_trainable_batchnorm,
    head_block,
    input_normalization,
    model_skeleton,
    parameter_count,
    parameter_summary,
    parse_count,
    parse_trainable,
    parse_unfreeze_at,
    thaw_blocks,
)
from gpu_augment import BatchMix
from pipeline import DeviceEvalBatches, DeviceTrainBatches, HostBatches, TrainRecipe, eval_batches, train_batches
from report import REPORT_FILES, write_evaluation_report
from resume import (
    Progress,
    StopRequest,
    carry_over_best_checkpoint,
    resolve_resume_path,
    restore_training_state,
    training_state,
)
from tb_logger import TensorBoardLogger, summary_writer_class
from utils import (
    ArgumentParser,
    UserError,
    argument_list,
    atomic_write_text,
    available_ram_bytes,
    command_hint,
    describe_device,
    exit_on_user_error,
    file_in_the_way,
    format_count,
    load_yaml_config,
    pick_device,
    resolve_workers,
    seed_everything,
    some_names,
)

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "lr", "seconds")
EMA_FIELDS = ("ema_val_loss", "ema_val_acc", "ema_val_balanced_acc")  # in the history when --ema is on
MONITOR_CHOICES = ("val_acc", "val_balanced_acc", "val_loss")


# --------------------------------------------------------------------------- options


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The training options; defaults are the reference recipe."""
    parser = ArgumentParser(
        prog="train.py",
        description="Fine-tune an ImageNet-pretrained ResNet on data/train/<class>/*.jpg.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        add_help=add_help,
    )
    parser.add_argument("--config", help="YAML file of option: value lines; command-line flags override it")
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="data", help="folder holding train/<class>/ and optionally val/<class>/")
    data.add_argument("--val-fraction", type=float, default=0.1, help="stratified share of train/ used as val/ when there is no val/ folder")
    data.add_argument("--fold", metavar="I/K", help="pool train/ and val/, split them into K stratified folds (seeded by --seed) and validate on fold I (1..K); the split is stored in the checkpoint. K runs, then predict.py with their K best.pt, make a K-fold ensemble; unset: no folds")
    data.add_argument("--train-on-all", action="store_true", help="train on train/ and val/ together with no validation and no early stopping, for the final fit once --epochs is known; best.pt holds the last epoch's weights (the moving average with --ema)")
    data.add_argument("--img-size", type=int, default=224, help="training crop size, in pixels (and the evaluation size unless --test-size)")
    data.add_argument("--test-size", type=int, help="evaluation and prediction size (resize to size*256/224, centre crop); default: --img-size. Stored in the checkpoint for predict.py and evaluate.py")
    data.add_argument("--augment-device", default="auto", choices=("auto", "cpu", "gpu"), help="where training augmentation runs: gpu = batched on the CUDA device (auto on CUDA), cpu = PIL in the loader workers")
    data.add_argument("--verify-images", action="store_true", help="decode every image at start (slower) instead of reading headers only, to list all broken files up front")
    data.add_argument("--workers", default="auto", help="DataLoader worker processes: a number, or auto (one per CPU core, up to 8)")
    data.add_argument("--cache", default="auto", choices=CACHE_CHOICES, help="on the GPU path, keep the decoded training images (and validation crops) after the first epoch, so later epochs decode nothing: gpu = in GPU memory, ram = in host memory, auto = on the GPU when they fit in half its free memory, else in RAM when they fit in half of it, else none")
    add_max_image_pixels_option(data)
    data.add_argument("--auto-augment", choices=AUTO_AUGMENT_CHOICES, default="none", help="an augmentation policy after the flip: ta_wide (TrivialAugmentWide), ra (RandAugment), aa (AutoAugment, ImageNet policy); runs on the CPU path")
    data.add_argument("--random-erase", type=float, default=0.0, metavar="P", help="RandomErasing with this probability at the end of the recipe (e.g. 0.25); 0: off")
    data.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="mixup of each batch with itself rolled by one, lam ~ Beta(ALPHA, ALPHA) (e.g. 0.2); 0: off")
    data.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA", help="CutMix, likewise (e.g. 1.0); with --mixup too, each batch uses one of the two; 0: off")
    data.add_argument("--sampler", choices=("uniform", "balanced"), default="uniform", help="balanced draws each class equally often (with replacement), an alternative to --class-weights balanced")
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default="resnet50", help=f"one of: {', '.join(SUPPORTED_ARCHS)} (torchvision), or {TIMM_PREFIX}NAME for any timm model (pip install timm), e.g. {TIMM_PREFIX}seresnextaa101d_32x8d.sw_in12k_ft_in1k_288")
    model.add_argument("--max-params", metavar="N", help="refuse a model with more parameters than N (e.g. 100M, 25.6M, 900k), counted before anything is downloaded; unset: no limit")
    model.add_argument("--weights", default="imagenet", help="imagenet (torchvision's best weights, or timm's default pretrained tag), none, or a PATH to a state dict")
    model.add_argument("--trainable", default=DEFAULT_TRAINABLE, help="blocks to train, comma-separated, or all. Blocks are the model's top-level modules: conv1,bn1,layer1..layer4,fc for a ResNet (torchvision's or timm's); the new head always trains")
    model.add_argument("--unfreeze-at", metavar="BLOCK:EPOCH,...", help="gradual unfreezing: each block (or all) starts training at the start of the given epoch, e.g. layer3:5,all:10 with --trainable layer4,fc; its BatchNorm stays fixed until then and it joins the optimizer at --backbone-lr-mult; unset: nothing thaws")
    model.add_argument("--dropout", type=float, default=0.2, help="dropout before the final Linear layer")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=50, help="maximum epochs; the cosine schedule spans them")
    optim.add_argument("--batch-size", type=int, default=128, help="training images per step (lower it if the GPU runs out of memory)")
    optim.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="adamw, or sgd with Nesterov momentum 0.9 (torchvision's references)")
    optim.add_argument("--lr", type=float, default=3e-5, help="learning rate of the new head (and of the backbone, times --backbone-lr-mult)")
    optim.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    optim.add_argument("--warmup-epochs", type=int, default=0, help="epochs of linear warmup (epoch k of W gets lr*k/(W+1)) before the cosine schedule, which then spans the other epochs")
    optim.add_argument("--backbone-lr-mult", type=float, default=1.0, help="learning rate of the pretrained blocks relative to the new head's (e.g. 0.1)")
    optim.add_argument("--accum-steps", type=int, default=1, help="batches whose gradients add up before each optimizer step (an effective batch of batch-size x this, for small GPUs)")
    optim.add_argument("--label-smoothing", type=float, default=0.05, help="share of each target spread over the other classes")
    optim.add_argument("--class-weights", choices=("balanced", "none"), default="balanced", help="cross-entropy class weights")
    optim.add_argument("--patience", type=int, default=10, help="stop after this many epochs without a better --monitor value; 0 never stops early")
    optim.add_argument("--monitor", choices=MONITOR_CHOICES, default="val_acc", help="what early stopping and best.pt follow: val_acc, val_balanced_acc (mean recall over the classes) or val_loss")
    optim.add_argument("--ema", type=float, default=0.0, metavar="DECAY", help="also keep an exponential moving average of the weights (e.g. 0.999), validated each epoch; best.pt holds the better of it and the raw weights. 0: off")
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default="checkpoints", help="where checkpoints, history, plots and config go")
    run.add_argument("--overwrite", action="store_true", help="start a new run in an --output-dir that holds another one, deleting its checkpoints, history, plots and report")
    run.add_argument("--epochs-this-run", type=int, help="stop after this many epochs now and resume later (e.g. within a Colab session's time)")
    run.add_argument("--resume", help="continue a run exactly: a last.pt, its folder, or auto (the output folder's last.pt, if any)")
    run.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="auto = CUDA, then Apple MPS, then the CPU")
    run.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="mixed precision: auto = bf16 where the hardware has it, fp16 on older CUDA GPUs, else fp32 (off)")
    run.add_argument("--channels-last", default=True, action=argparse.BooleanOptionalAction, help="NHWC memory format (faster convolutions on GPUs and CPUs)")
    run.add_argument("--sync-bn", action="store_true", help="under torchrun on CUDA GPUs: the BatchNorm layers that learn normalize with the statistics of every process's images (SyncBatchNorm), not only their own")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (falls back with a note where it cannot)")
    run.add_argument("--seed", type=int, default=0, help="seeds the split, the data order, every augmentation and the weights of new layers")
    run.add_argument("--no-progress", action="store_true", help="hide the per-batch progress bars")
    run.add_argument("--tensorboard", action="store_true", help="also log to OUTPUT_DIR/tensorboard (needs the tensorboard package)")
    return parser


# Options that may differ from the checkpoint's when a run is resumed; any other difference is an error.
RESUMABLE_OPTIONS = frozenset({"epochs", "patience", "workers", "device", "amp", "channels_last", "compile",
                               "no_progress", "data_dir", "output_dir", "resume", "epochs_this_run", "tensorboard",
                               "verify_images", "cache", "overwrite", "max_image_pixels",
                               "max_params"})
# Options in which a command may differ from the one that started the run in --output-dir and still be that run's
# own: they change how a run goes, not what it computes (and the folder is the run's, however it is spelled).
SAME_RUN_MAY_DIFFER = frozenset({"workers", "no_progress", "verify_images", "tensorboard", "max_image_pixels",
                                 "output_dir", "max_params"})
# Options that are about this invocation only, never saved.
INVOCATION_OPTIONS = ("config", "resume", "epochs_this_run", "overwrite", "val_fraction_given")


def parse_args(argv: str | Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags; a ``--config`` file sets the defaults first, so the command line wins."""
    return parse_args_and_resume(argv)[0]


def parse_args_and_resume(argv: str | Sequence[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any] | None]:
    """The effective options and, with ``--resume``, the checkpoint to continue from.

    A resumed run takes its options from the checkpoint; flags may change only :data:`RESUMABLE_OPTIONS`.
    """
    argv = argument_list(argv, "train.py")
    parser, pre_parser = get_args_parser(), get_args_parser(add_help=False)  # --help waits for the config's values
    pre_args, _ = pre_parser.parse_known_args(argv)
    from_file = config_file_defaults(parser, pre_args.config) if pre_args.config else {}
    if from_file:
        parser.set_defaults(**from_file)
        pre_parser.set_defaults(**from_file)
        pre_args, _ = pre_parser.parse_known_args(argv)
    resume_path = resolve_resume_path(pre_args.resume, pre_args.output_dir) if pre_args.resume else None
    if resume_path is None:
        args = parser.parse_args(argv)
        args.val_fraction_given = "val_fraction" in from_file or "val_fraction" in given_options(argv)
        validate_args(args)
        return args, None
    checkpoint = load_checkpoint(resume_path, flag="--resume", file_in_folder="last.pt")
    if "training_state" not in checkpoint:
        raise UserError(f"--resume {resume_path}: holds no training state (best.pt is for prediction); use last.pt")
    saved = dict(checkpoint["config"])
    # A --config file (the same cell re-run in Colab, say) counts like flags: it must agree with the checkpoint.
    parser.set_defaults(**{**saved, "output_dir": str(resume_path.parent), **from_file})
    args = parser.parse_args(argv)
    args.val_fraction_given = False  # the resumed run keeps the split it had
    validate_args(args)
    changed = differing_options(vars(args), saved, ignore=RESUMABLE_OPTIONS)
    if changed:
        raise UserError(f"--resume: {flag_names(changed)} {'differs' if len(changed) == 1 else 'differ'} from the "
                        "checkpoint's; only --epochs, --patience, --workers, --device, --amp, --data-dir, --output-dir "
                        "and such may change when resuming")
    refuse_changed_classes(args, checkpoint["class_names"], class_folders_now(args.data_dir, checkpoint["class_names"]))
    print(f"resuming from {resume_path}")
    return args, checkpoint


def given_options(argv: Sequence[str]) -> set[str]:
    """The options set on the command line itself (abbreviated or ``--flag=value`` spellings included)."""
    parser = get_args_parser(add_help=False)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(argv)
    return set(vars(given))


# Options whose values are paths: compared as the folders or files they name, however spelled.
PATH_OPTIONS = frozenset({"data_dir", "weights"})


def differing_options(options: dict[str, Any], saved: dict[str, Any], ignore: Iterable[str]) -> list[str]:
    """The option names whose value differs from a run's ``saved`` config (options the run did not know: equal)."""
    ignore = set(ignore)
    return sorted(key for key, value in options.items() if key in saved and key not in ignore
                  and comparable(key, value) != comparable(key, saved[key]))


def comparable(key: str, value: Any) -> Any:
    """``value`` as compared between runs: a path option's value resolved (``./data/`` is ``data``)."""
    if key in PATH_OPTIONS and isinstance(value, str) and value not in ("imagenet", "none"):
        return str(Path(value).resolve())
    return value


def flag_names(keys: Iterable[str]) -> str:
    """``['batch_size', 'lr']`` -> ``'--batch-size, --lr'``."""
    return ", ".join(f"--{key.replace('_', '-')}" for key in keys)


def config_file_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The options of a ``--config`` file, each checked and converted as its command-line flag would be."""
    values = load_yaml_config(path)
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UserError(f"--config {path}: unknown option(s) {', '.join(unknown)}; see python train.py --help")
    return {key: config_value(actions[key], value, path) for key, value in values.items()}


YAML_TRUE = frozenset({"true", "yes", "on", "1"})
YAML_FALSE = frozenset({"false", "no", "off", "0"})


def config_value(action: argparse.Action, value: Any, path: str) -> Any:
    """A config file's ``value`` for ``action``, converted and checked like the flag's command-line text.

    YAML reads ``amp: off`` as the boolean false: a boolean given to an option of choices is read back as the
    word among them (``off``, ``none``).
    """
    flag = action.option_strings[0]
    if action.nargs == 0:  # a switch such as --tensorboard or --channels-last
        text = str(value).lower()
        if isinstance(value, bool) or text in YAML_TRUE | YAML_FALSE:
            return value if isinstance(value, bool) else text in YAML_TRUE
        raise UserError(f"--config {path}: {action.dest}: {value!r} is not true or false (as {flag} is a switch)")
    if isinstance(value, bool) and action.choices is not None:
        words = YAML_TRUE if value else YAML_FALSE | {"none"}
        value = next((choice for choice in action.choices if choice in words), value)
    try:
        converted = action.type(str(value)) if action.type is not None else str(value)
    except (TypeError, ValueError):
        kind = {int: "a whole number", float: "a number"}.get(action.type, "valid")
        raise UserError(f"--config {path}: {action.dest}: {value!r} is not {kind} (as {flag} takes)") from None
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"--config {path}: {action.dest}: {value!r} is not one of "
                        f"{', '.join(map(str, action.choices))} (as {flag} takes)")
    return converted


def validate_args(args: argparse.Namespace) -> None:
    """Reject values that would only fail later, deep in the loop; spell --trainable and --workers out."""
    positive = {"--epochs": args.epochs, "--batch-size": args.batch_size, "--img-size": args.img_size}
    for flag, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{flag} {value}: must be a whole number of at least 1")
    if args.img_size < 16:
        raise UserError(f"--img-size {args.img_size}: too small for a ResNet; use 16 or more (224 is the recipe)")
    if args.lr <= 0:
        raise UserError(f"--lr {args.lr}: must be positive")
    if args.weight_decay < 0:
        raise UserError(f"--weight-decay {args.weight_decay}: must be 0 or more (1e-4 is the recipe)")
    if args.test_size is not None and args.test_size < 16:
        raise UserError(f"--test-size {args.test_size}: too small for a ResNet; use 16 or more (or leave it out)")
    if not 0 <= args.warmup_epochs < args.epochs:
        raise UserError(f"--warmup-epochs {args.warmup_epochs}: must be 0 or more and fewer than --epochs "
                        f"{args.epochs}")
    if args.backbone_lr_mult <= 0:
        raise UserError(f"--backbone-lr-mult {args.backbone_lr_mult}: must be positive (freeze blocks with "
                        "--trainable instead)")
    if not 0 <= args.random_erase <= 1:
        raise UserError(f"--random-erase {args.random_erase}: a probability, in [0, 1]")
    for flag, value in (("--mixup", args.mixup), ("--cutmix", args.cutmix)):
        if value < 0:
            raise UserError(f"{flag} {value}: the Beta distribution's alpha must be positive (0 is off)")
    if not 0 <= args.ema < 1:
        raise UserError(f"--ema {args.ema}: the decay must be in [0, 1) (e.g. 0.999; 0 is off)")
    if args.accum_steps < 1:
        raise UserError(f"--accum-steps {args.accum_steps}: must be 1 (no accumulation) or more")
    if not 0 <= args.label_smoothing < 1:
        raise UserError(f"--label-smoothing {args.label_smoothing}: must be in [0, 1)")
    if args.epochs_this_run is not None and args.epochs_this_run < 1:
        raise UserError(f"--epochs-this-run {args.epochs_this_run}: must be at least 1")
    if args.patience < 0:
        raise UserError(f"--patience {args.patience}: must be 0 (never stop early) or more")
    check_output_dir(args.output_dir)
    check_max_image_pixels(args.max_image_pixels)
    if args.sync_bn and pick_device(args.device).type != "cuda":
        raise UserError("--sync-bn: SyncBatchNorm needs CUDA GPUs (torchrun with one process a GPU); without it each "
                        "process's BatchNorm normalizes its own images")
    if args.fold is not None:
        parse_fold(args.fold)
        if args.train_on_all:
            raise UserError(f"--fold {args.fold} with --train-on-all: a fold validates, --train-on-all does not; "
                            "pick one")
    if isinstance(args.cache, bool):  # a run started when --cache was a switch
        args.cache = "auto" if args.cache else "none"
    args.workers = resolve_workers(args.workers)
    skeleton = model_skeleton(args.arch)  # an unknown --arch, or timm missing, is refused here: nothing downloaded
    fixed = fixed_input_size(args.arch)
    for flag, size in (("--img-size", args.img_size), ("--test-size", args.test_size)):
        if fixed is not None and size is not None and size != fixed:
            raise UserError(f"{flag} {size}: {args.arch} takes only {fixed}-px images (its pretrained config fixes "
                            f"the input size); use {flag} {fixed}")
    if args.max_params is not None:  # a YAML config may give a number
        args.max_params = str(args.max_params)
        parse_count(args.max_params)
    args.trainable = spelled_out_trainable(args.trainable, skeleton)
    thawing = [block for blocks in unfreeze_schedule(args, skeleton).values() for block in blocks]
    trained = parse_trainable(args.trainable, skeleton) + thawing
    if args.batch_size < 2 and has_trainable_batchnorm(trained, skeleton):
        raise UserError(f"--batch-size {args.batch_size}: the trained blocks ({','.join(trained)}) hold BatchNorm "
                        "layers, which need at least 2 images a batch; use --batch-size 2 or more")


def check_output_dir(output_dir: str) -> None:
    """Refuse an --output-dir that is a file, or lies inside one (it could never be created)."""
    blocker = file_in_the_way(Path(output_dir), is_folder=True)
    if blocker == Path(output_dir):
        raise UserError(f"--output-dir {output_dir}: is a file; pass a folder (it is created if missing)")
    if blocker is not None:
        raise UserError(f"--output-dir {output_dir}: {blocker} is a file, not a folder; pass another --output-dir")


def spelled_out_trainable(spec: str, model: nn.Module | None = None) -> str:
    """``--trainable`` as the blocks of ``model`` (default: a torchvision ResNet) that will train; the head (``fc``
    for a ResNet) is added, with a note, when it was left out."""
    if spec.strip() == "all":
        return "all"
    blocks, head = parse_trainable(spec, model), "fc" if model is None else head_block(model)
    if head not in [name.strip() for name in spec.split(",")]:
        print(f"note: --trainable {spec}: the new head ({head}) starts from random weights, so it always trains; "
              f"training {','.join(blocks)}")
    return ",".join(blocks)


def unfreeze_schedule(args: argparse.Namespace, model: nn.Module) -> dict[int, list[str]]:
    """``--unfreeze-at`` as {epoch: blocks that start training then}; refused when an epoch is outside 2..--epochs
    or a named block already trains."""
    if not args.unfreeze_at:
        return {}
    schedule, trained = {}, parse_trainable(args.trainable, model)
    for epoch, named in parse_unfreeze_at(args.unfreeze_at, model).items():
        if not 2 <= epoch <= args.epochs:
            raise UserError(f"--unfreeze-at {args.unfreeze_at}: epoch {epoch} is not in 2..{args.epochs} (--epochs); "
                            "blocks that train from epoch 1 belong in --trainable")
        already = [block for block in named if block in trained]
        if already:
            raise UserError(f"--unfreeze-at {args.unfreeze_at}: {already[0]} already trains by then (--trainable "
                            f"{args.trainable}, or an earlier epoch); name only frozen blocks")
        thawing = [block for block in block_names(model) if block not in trained and ("all" in named or block in named)]
        if thawing:
            schedule[epoch] = thawing
            trained += thawing
    return schedule


def thaw(model: nn.Module, optimizer: torch.optim.Optimizer, blocks: list[str], lr_mult: float) -> None:
    """Let ``blocks`` train from now on: their parameters join the optimizer as a new group at ``lr_mult``."""
    thawed = thaw_blocks(model, blocks)
    if thawed:
        optimizer.add_param_group({"params": thawed, "lr_mult": lr_mult})


def check_parameter_budget(args: argparse.Namespace, num_classes: int) -> None:
    """Refuse a model over ``--max-params``, counted without building or downloading it."""
    if args.max_params is None:
        return
    count, limit = parameter_count(args.arch, num_classes), parse_count(args.max_params)
    if count > limit:
        raise UserError(f"--max-params {args.max_params}: --arch {args.arch} has {count:,} parameters with "
                        f"{num_classes} classes ({format_count(count)}), over the budget; choose a smaller model")


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The effective configuration as plain values (what is printed, saved and stored in checkpoints)."""
    return {key: value for key, value in sorted(vars(args).items()) if key not in INVOCATION_OPTIONS}


# --------------------------------------------------------------------------- setup


@dataclass
class Loaders:
    """The training and validation batches (``pipeline.Batch`` es on the device), and where the cache is."""

    train: HostBatches | DeviceTrainBatches
    val: HostBatches | DeviceEvalBatches | None  # None with --train-on-all
    cache: CacheChoice


def resolve_augment_device(request: str, device: torch.device) -> str:
    """``--augment-device``: ``auto`` decodes and augments on the GPU when training on CUDA, else on the CPU in the
    loader workers. ``gpu`` on another device runs that path there (batched in the main process: slower than the
    workers on a CPU, but the same code as on a GPU), with a note."""
    if request == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    if request == "gpu" and device.type != "cuda":
        print(f"note: --augment-device gpu on a {device.type} run: images are decoded and augmented batched on the "
              f"{device.type} by the GPU path's code (slower than --augment-device cpu here)")
    return request


def cached_bytes(args: argparse.Namespace, samples: Sequence[tuple[str, int]], data: TrainValData,
                 training: bool) -> int:
    """Bytes the cache needs for ``samples``: decoded training images (sizes from the headers), or eval crops."""
    if training:
        sizes = [data.sizes.get(path, (0, 0)) for path, _ in samples]
        return cache_bytes(sizes, train_decode_side(args.img_size))
    return len(samples) * 3 * (args.test_size or args.img_size) ** 2


def resolve_cache(args: argparse.Namespace, data: TrainValData, accel: Accel, on_device: bool,
                  train_bytes: int) -> CacheChoice:
    """Where ``--cache`` keeps the decoded training images (``train_bytes``) and validation crops, said in one
    line. Processes on one node (torchrun) share its host memory."""
    needed = train_bytes + cached_bytes(args, data.val_samples, data, training=False)
    choice = choose_cache(args.cache, needed, gpu_free_bytes(accel.device), available_ram_bytes(), on_device,
                          processes_on_node=processes_per_node())
    if on_device or args.cache != "auto":
        print(f"cache: {choice.place} ({choice.reason})")
    return choice


def make_loaders(data: TrainValData, args: argparse.Namespace, accel: Accel, world: World = World()) -> Loaders:
    """Training batches (shuffled, augmented) and validation batches (the eval transform predict.py uses).

    On the CPU path the loader workers decode and augment each image with PIL; on the GPU path they read the
    files' bytes, and decoding and augmentation run on the device (see pipeline.py). Under torchrun each process
    gets its share of every step's batch and its contiguous part of the validation images.
    """
    on_device = resolve_augment_device(args.augment_device, accel.device) == "gpu"
    if on_device and args.auto_augment != "none":
        print(f"note: --auto-augment {args.auto_augment} runs in the loader workers: training images take the CPU "
              "path (PIL), validation stays on the device")
    train_bytes = cached_bytes(args, data.train_samples, data, training=True)
    choice = resolve_cache(args, data, accel, on_device, train_bytes)
    mean, std = input_normalization(args.arch)
    recipe = TrainRecipe(args.auto_augment, args.random_erase, args.sampler == "balanced", mean, std)
    place = {"gpu": accel.device, "ram": torch.device("cpu")}.get(choice.place)
    train_paths, train_labels = [path for path, _ in data.train_samples], [label for _, label in data.train_samples]
    own_val = [data.val_samples[index] for index in shard_range(len(data.val_samples), world)]
    val_paths, val_labels = [path for path, _ in own_val], [label for _, label in own_val]
    train_on_device = on_device and args.auto_augment == "none"
    train_cache = val_cache = None
    if place is not None:
        val_cache = DecodedImages(len(val_paths), place, capacity=cached_bytes(args, own_val, data, training=False))
        if train_on_device:
            train_cache = DecodedImages(len(train_paths), place, capacity=train_bytes)
    train = train_batches(train_paths, train_labels, args.img_size, args.batch_size, args.workers, args.seed, accel,
                          train_on_device, train_cache, args.max_image_pixels, recipe, world)
    val = None if not val_paths else eval_batches(
        val_paths, val_labels, args.test_size or args.img_size, mean, std, args.batch_size,
        args.workers, accel, on_device, val_cache, args.max_image_pixels, warn=True)
    return Loaders(train, val, choice)


def make_criterion(data: TrainValData, args: argparse.Namespace, device: torch.device,
                   world: World = World()) -> nn.Module:
    """Cross-entropy with label smoothing and, by default, 'balanced' class weights from the train counts."""
    weights = None
    if args.class_weights == "balanced":
        weights = balanced_class_weights([label for _, label in data.train_samples], len(data.class_names))
        weights = weights.to(device)
    if world.distributed:  # the weighted mean over every process's images, not a mean of each one's mean
        return GlobalCrossEntropy(world, weights, args.label_smoothing)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing)


def parameter_groups(model: nn.Module, backbone_lr_mult: float) -> list[nn.Parameter] | list[dict[str, Any]]:
    """The trainable parameters, in two groups when the backbone learns at another rate than the new head (each
    group's ``lr_mult`` scales the epoch's learning rate)."""
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    if backbone_lr_mult == 1.0:
        return [parameter for _, parameter in trainable]
    head = classifier_name(model)
    groups = [{"params": [p for name, p in trainable if name.startswith(head + ".")], "lr_mult": 1.0},
              {"params": [p for name, p in trainable if not name.startswith(head + ".")], "lr_mult": backbone_lr_mult}]
    return [group for group in groups if group["params"]]


def make_model(args: argparse.Namespace, num_classes: int, accel: Accel,
               resume: dict[str, Any] | None = None) -> nn.Module:
    """The network with its pretrained trunk (or a resumed checkpoint's weights), frozen blocks fixed, on the device."""
    weights = "none" if resume is not None else args.weights
    if weights == "none" and resume is None and args.trainable != "all":
        print(f"warning: --weights none with --trainable {args.trainable}: the frozen blocks keep their random "
              "initial weights, so only the trained blocks learn; use --weights imagenet (or a weights file), or "
              "--trainable all")
    check_parameter_budget(args, num_classes)
    model = build_model(args.arch, num_classes, weights=weights, dropout=args.dropout)
    freeze_blocks(model, parse_trainable(args.trainable, model))
    if resume is not None:
        model.load_state_dict(resume["model"])
    return accel.prepare_model(model)


def describe_data(data: TrainValData) -> None:
    """Print the class count, split sizes, imbalance and any skipped files."""
    counts = class_counts(data.train_samples, len(data.class_names))
    print(f"data: {len(data.class_names)} classes; train {len(data.train_samples)} images "
          f"({min(counts)} to {max(counts)} a class); {describe_val(data)}")
    if data.skipped:
        print(f"warning: skipped {len(data.skipped)} image file(s) that cannot be read or are too large:")
        for path, reason in data.skipped:
            print(f"  {path}: {reason}")


def describe_val(data: TrainValData) -> str:
    """'val 40 images from data/val', or 'no val (--train-on-all: ...)' when nothing validates."""
    if data.val_samples:
        return f"val {len(data.val_samples)} images from {data.val_source}"
    if data.val_source.startswith("nothing "):
        return f"no val {data.val_source.removeprefix('nothing ')}"
    return f"no val images from {data.val_source}"


# --------------------------------------------------------------------------- outputs


def write_history(history: list[dict[str, float]], path: Path) -> None:
    """Write the per-epoch history as CSV."""
    buffer = io.StringIO()
    fields = [*HISTORY_FIELDS, *(field for field in EMA_FIELDS if history and field in history[0])]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def epoch_line(row: dict[str, float], epochs: int, is_best: bool, images_per_second: float,
               device: torch.device) -> str:
    """One summary line per epoch: metrics, learning rate, time, training throughput and peak memory."""
    gpu_mb = device_peak_memory_mb(device)
    memory = f"host {host_peak_rss_mb():.0f} MiB" + (f", gpu {gpu_mb:.0f} MiB" if gpu_mb is not None else "")
    averaged = f" (ema {row['ema_val_acc']:.2%})" if "ema_val_acc" in row else ""
    val = "no val" if row["val_acc"] is None else f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}{averaged}"
    return (f"epoch {int(row['epoch']):>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}  "
            f"{val}  lr {row['lr']:.2e}  "
            f"{row['seconds']:.1f}s  {images_per_second:.0f} img/s  peak {memory}" + ("  * best" if is_best else ""))


def save_final_plots(progress: Progress, stopped_epoch: int | None, class_names: list[str], output_dir: Path) -> None:
    """Loss and accuracy curves, and the best model's normalized confusion matrix on val."""
    plots.plot_loss_curve(progress.history, output_dir / "loss_curve.png", progress.best_epoch, stopped_epoch)
    plots.plot_accuracy_curve(progress.history, output_dir / "accuracy_curve.png", progress.best_epoch, stopped_epoch)
    if not progress.best_targets:  # --train-on-all: no validation predictions
        return
    matrix = metrics.confusion_matrix(progress.best_targets, progress.best_predictions, len(class_names))
    plots.plot_confusion_matrix(matrix, class_names, output_dir / "confusion_matrix.png")


def learning_rate(base_lr: float, epoch: int, epochs: int, warmup_epochs: int = 0) -> float:
    """The learning rate of an epoch: a linear warmup over ``warmup_epochs`` (epoch k gets ``base_lr * k / (W+1)``),
    then cosine annealing from ``base_lr`` towards 0 over the remaining epochs, as CosineAnnealingLR.

    A closed form of the epoch rather than a stateful scheduler, so a resumed run, or one whose --epochs was
    extended, gets exactly the rate a run started with those epochs would have had.
    """
    if epoch <= warmup_epochs:
        return base_lr * epoch / (warmup_epochs + 1)
    return base_lr * (1 + math.cos(math.pi * (epoch - warmup_epochs - 1) / (epochs - warmup_epochs))) / 2


# --------------------------------------------------------------------------- main


@dataclass
class Run:
    """The objects one training run works with."""

    args: argparse.Namespace
    config: dict[str, Any]
    accel: Accel
    data: TrainValData
    loaders: Loaders
    model: nn.Module
    step_model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    output_dir: Path
    runtime: dict[str, Any]
    step_options: StepOptions
    ema: WeightAverage | None = None
    logger: TensorBoardLogger | None = None
    thaw_schedule: dict[int, list[str]] = field(default_factory=dict)  # --unfreeze-at: epoch -> blocks
    world: World = field(default_factory=World)  # this process's place under torchrun (one process: rank 0 of 1)


def set_up(args: argparse.Namespace, resume: dict[str, Any] | None, world: World) -> tuple[Run, Progress]:
    """Device, data, loaders, model, loss, optimizer and schedule; restored from ``resume`` when given. Under
    torchrun every process sets up the same way; only rank 0 touches the output folder."""
    config = config_of(args)
    accel = set_up_accel(args.device, args.amp, args.channels_last)
    device = accel.device
    print(f"device: {describe_device(device)}, precision {accel.precision_name}"
          + (", channels_last" if accel.channels_last else ""))
    seed_everything(args.seed)  # the same on every process: the new head starts the same everywhere
    data = load_train_val(args.data_dir, args.val_fraction, args.seed, args.verify_images, args.workers,
                          args.max_image_pixels, held_out=resume.get("held_out_val_files") if resume else None,
                          fold=parse_fold(args.fold) if args.fold else None, train_on_all=args.train_on_all,
                          val_fraction_given=args.val_fraction_given)
    if resume is not None:  # a folder emptied since: the early check in main() only saw that it is there
        refuse_changed_classes(args, resume["class_names"], data.class_names)
    describe_data(data)
    model = make_model(args, len(data.class_names), accel, resume)
    optimizer = make_optimizer(parameter_groups(model, args.backbone_lr_mult), args.lr, args.weight_decay, device,
                               args.optimizer)
    scaler = make_grad_scaler(accel)
    progress = Progress()
    thaw_schedule = unfreeze_schedule(args, model)
    thawed = thaw_resumed_blocks(model, optimizer, thaw_schedule, resume, args.backbone_lr_mult)
    print(describe_model(args, model, thawed))
    if resume is not None:
        progress = restore_training_state(resume["training_state"], optimizer, scaler)
        note_process_count_change(args, resume, world)
        print(f"resumed after epoch {progress.epoch} ("
              f"{describe_best(progress.best_val_acc, progress.best_epoch, args.monitor, progress.best_score)})")
    output_dir = Path(args.output_dir)
    runtime = runtime_record(args, accel, world)
    logger = prepare_output_dir(args, resume, data, config_yaml(config, runtime)) if world.is_main else None
    ema = make_ema(model, args.ema, resume)
    step_options = StepOptions(args.accum_steps, after_step=(lambda: ema.update(model)) if ema else None,
                               all_finite=(lambda finite: all_ranks_true(finite, world)) if world.distributed else None,
                               empty_images=(lambda: empty_input(args.img_size, accel)) if world.distributed else None)
    if args.sampler == "balanced" and args.class_weights == "balanced":
        print("note: --sampler balanced and --class-weights balanced both correct the imbalance; with the sampler, "
              "--class-weights none is the usual choice")
    describe_batch(args, world)
    loaders = make_loaders(data, args, accel, world)
    if ema is not None:
        warn_short_average(args.ema, optimizer_steps(len(loaders.train), args.accum_steps), args.epochs)
    run = Run(args, config, accel, data, loaders, model, model_for_training(model, args, world),
              make_criterion(data, args, device, world), optimizer, scaler, output_dir, runtime, step_options, ema,
              logger, thaw_schedule, world)
    print(describe_config(config, output_dir))
    return run, progress


def thaw_resumed_blocks(model: nn.Module, optimizer: torch.optim.Optimizer, thaw_schedule: dict[int, list[str]],
                        resume: dict[str, Any] | None, lr_mult: float) -> list[str]:
    """Thaw the blocks a resumed run had thawed by its last epoch (--unfreeze-at), so the model and the optimizer's
    groups are as saved; returns those blocks."""
    if resume is None:
        return []
    done = resume["training_state"]["progress"]["epoch"]
    thawed = []
    for epoch in sorted(epoch for epoch in thaw_schedule if epoch <= done):
        thaw(model, optimizer, thaw_schedule[epoch], lr_mult)
        thawed += thaw_schedule[epoch]
    return thawed


def describe_config(config: dict[str, Any], output_dir: Path) -> str:
    """One line: the options that differ from train.py's defaults, as flags (config.yaml holds them all)."""
    defaults = default_options()
    flags = [flag_text(key, value) for key, value in config.items() if value != defaults.get(key, value)]
    return f"config: {' '.join(flags) or 'the defaults'} (all options in {output_dir / 'config.yaml'})"


def default_options() -> dict[str, Any]:
    """train.py's option defaults, with --workers auto resolved as on this machine."""
    defaults = vars(get_args_parser().parse_args([]))
    return {**defaults, "workers": resolve_workers(defaults["workers"])}


def flag_text(key: str, value: Any) -> str:
    """An option as on the command line: ``--lr 0.001``, ``--train-on-all``, ``--no-channels-last``."""
    flag = f"--{key.replace('_', '-')}"
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {shlex.quote(str(value))}"


def optimizer_steps(batches: int, accum_steps: int) -> int:
    """Optimizer steps in an epoch of ``batches`` batches, ``accum_steps`` to a step (a last partial window steps)."""
    return math.ceil(batches / accum_steps)


# An average with decay D spans about 1/(1-D) steps; fewer steps than a few spans, and it says little.
EMA_SPANS_NEEDED = 3


def warn_short_average(decay: float, steps_per_epoch: int, epochs: int) -> None:
    """Warn when --ema's average spans more optimizer steps than the run has to fill it a few times over."""
    steps, span = steps_per_epoch * epochs, 1 / (1 - decay)
    if steps >= EMA_SPANS_NEEDED * span:
        return
    fitting = math.floor((1 - EMA_SPANS_NEEDED / steps) * 1000) / 1000 if steps > EMA_SPANS_NEEDED else 0.0
    advice = f"--ema {fitting:g} or lower fits this run" if fitting >= 0.5 else "leave --ema off for this run"
    print(f"warning: --ema {decay:g} averages over about {span:,.0f} optimizer steps, but this run takes {steps} "
          f"({steps_per_epoch} an epoch x {epochs} epochs); its decay warms up, so the average stays close to the "
          f"latest weights and adds little: {advice}, or train longer")


def describe_model(args: argparse.Namespace, model: nn.Module, thawed: Sequence[str] = ()) -> str:
    """'model: resnet18, weights imagenet; training layer4,fc: 8.4M of 11.2M parameters (75.0%)', counted as the
    model is now: blocks ``thawed`` by --unfreeze-at (when resuming past their epoch) included."""
    trainable, total = parameter_summary(model)
    training = args.trainable + (f" and, since --unfreeze-at, {','.join(thawed)}" if thawed else "")
    return (f"model: {args.arch}, weights {args.weights}; training {training}: "
            f"{format_count(trainable)} of {format_count(total)} parameters ({trainable / total:.1%})")


def empty_input(img_size: int, accel: Accel) -> torch.Tensor:
    """A batch of no training image, for a process whose whole batch failed to decode (see ``StepOptions``)."""
    return accel.images_to_device(torch.empty(0, 3, img_size, img_size))


def note_process_count_change(args: argparse.Namespace, resume: dict[str, Any], world: World) -> None:
    """Say so when a run continues with another number of processes than it ran with: its global batch changes."""
    before = resume.get("runtime", {}).get("processes", 1)
    if before != world.world_size:
        batch = args.batch_size * args.accum_steps
        print(f"note: this run trained with {before} process(es), a global batch of {batch * before}; it continues "
              f"with {world.world_size}, a global batch of {batch * world.world_size} (start it as before to keep "
              "the steps it took)")


def prepare_output_dir(args: argparse.Namespace, resume: dict[str, Any] | None, data: TrainValData,
                       config_text: str) -> TensorBoardLogger | None:
    """Clear a fresh run's folder (only now: every check has passed), write config.yaml and the skip list; the
    TensorBoard logger when asked."""
    output_dir = Path(args.output_dir)
    if args.tensorboard:
        summary_writer_class()  # a missing package is refused before anything in the folder changes
    if resume is None or (args.overwrite and args.resume not in (None, "auto")):
        refuse_a_foreign_config_file(output_dir)
        clear_run_outputs(output_dir, args.config)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.resume not in (None, "auto"):
        carry_over_best_checkpoint(resolve_resume_path(args.resume, args.output_dir), output_dir)
    atomic_write_text(output_dir / "config.yaml", config_text)
    if data.skipped:
        write_skipped(data.skipped, output_dir)
    return TensorBoardLogger(output_dir / "tensorboard") if args.tensorboard else None


def describe_batch(args: argparse.Namespace, world: World) -> None:
    """Say how many images an optimizer step sees, when that is more than --batch-size."""
    if world.distributed:
        accumulated = f" x {args.accum_steps} accumulated" if args.accum_steps > 1 else ""
        print(f"global batch: {args.batch_size} a process x {world.world_size} processes{accumulated} = "
              f"{args.batch_size * world.world_size * args.accum_steps} images a step (--lr is not scaled for you: "
              "see the README's linear scaling rule)")
    elif args.accum_steps > 1:
        print(f"effective batch: {args.batch_size} x {args.accum_steps} accumulated = "
              f"{args.batch_size * args.accum_steps} images a step")


def model_for_training(model: nn.Module, args: argparse.Namespace, world: World) -> nn.Module:
    """What training calls: ``model`` under DistributedDataParallel when several processes train (its learning
    BatchNorm layers synchronised with --sync-bn), compiled with --compile."""
    if world.distributed and args.sync_bn:
        print(describe_sync_bn(model, sync_trainable_batchnorm(model)))
    return maybe_compile(wrap_model(model, world), args.compile)


def make_ema(model: nn.Module, decay: float, resume: dict[str, Any] | None) -> WeightAverage | None:
    """The exponential moving average of ``model``'s weights and buffers (None when ``decay`` is 0), restored from
    a resumed run's last.pt."""
    if not decay:
        return None
    ema = WeightAverage(model, decay)
    if resume is not None and "ema_model" in resume:
        ema.module.load_state_dict(resume["ema_model"])
        ema.updates = int(resume["training_state"].get("ema_updates", 0))
    return ema


def runtime_record(args: argparse.Namespace, accel: Accel, world: World) -> dict[str, Any]:
    """What the run's options resolved to on this machine ("auto" included), the process count, and the software
    versions."""
    return {"device": describe_device(accel.device), "device_type": accel.device.type, "processes": world.world_size,
            "processes_per_node": processes_per_node() if world.distributed else 1,
            "precision": accel.precision_name, "workers": args.workers,
            "augment_device": resolve_augment_device(args.augment_device, accel.device),
            "channels_last": accel.channels_last, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "python": platform.python_version()}


def config_yaml(config: dict[str, Any], runtime: dict[str, Any]) -> str:
    """config.yaml: the options with every "auto" replaced by what it chose here, so the file repeats the run."""
    as_run = {**config, "device": runtime["device_type"], "workers": runtime["workers"],
              "test_size": config.get("test_size") or config["img_size"],
              "augment_device": runtime["augment_device"],
              "amp": {"fp32": "off"}.get(runtime["precision"], runtime["precision"])}
    processes = runtime.get("processes", 1)
    launcher = launch_command(processes, runtime.get("processes_per_node", processes))
    header = (f"{CONFIG_HEADER_START}{runtime['device']} in {runtime['precision']}, {runtime['workers']} loader workers, "
              f"augmentation on the {runtime['augment_device']}"
              + (f", {processes} processes (torchrun)" if processes > 1 else "") + ";\n"
              f"# torch {runtime['torch']}, torchvision {runtime['torchvision']}, Python {runtime['python']}. "
              "Options given as auto are written as what\n"
              f"# they chose, so `{launcher} train.py --config THIS_FILE --output-dir NEW_FOLDER` repeats the run.\n")
    written = {key: value for key, value in as_run.items() if value is not None}  # unset: off (--fold, --max-params)
    return header + yaml.safe_dump(written, sort_keys=True)


def record_skipped(run: Run, failed: Sequence[DecodeFailure]) -> None:
    """Add images that failed to decode during training to the run's skip list and skipped_files.txt."""
    known = {path for path, _ in run.data.skipped}
    new = list({failure.path: (failure.path, failure.reason) for failure in failed
                if failure.path not in known}.values())
    if new:
        run.data.skipped.extend(new)
        if run.world.is_main:
            write_skipped(run.data.skipped, run.output_dir)


def write_skipped(skipped: Sequence[tuple[str, str]], output_dir: Path) -> None:
    """``skipped_files.txt``: one ``path<TAB>reason`` line per image left out of training or validation."""
    atomic_write_text(output_dir / "skipped_files.txt", "".join(f"{path}\t{reason}\n" for path, reason in skipped))


@dataclass
class EpochOutcome:
    """One finished epoch: its history row, the validation of the raw weights and of their moving average (when
    --ema), and the training images/s."""

    row: dict[str, float]
    raw: EvalResult | None  # None with --train-on-all: nothing validates
    ema: EvalResult | None
    images_per_second: float


def run_epoch(run: Run, epoch: int, stop: StopRequest) -> EpochOutcome | None:
    """Train and validate one epoch; None when a stop request cut it short."""
    args = run.args
    if epoch in run.thaw_schedule:
        thaw(run.model, run.optimizer, run.thaw_schedule[epoch], args.backbone_lr_mult)
        if run.world.distributed:  # DDP fixes the parameters it reduces when it is built
            release_wrapper(run.step_model)  # its reducer and hooks go now, not when (or if) the GC finds them
            run.step_model = model_for_training(run.model, args, run.world)
        trainable, total = parameter_summary(run.model)
        print(f"epoch {epoch}: {','.join(run.thaw_schedule[epoch])} start(s) training (--unfreeze-at); now "
              f"{format_count(trainable)} of {format_count(total)} parameters")
    lr = learning_rate(args.lr, epoch, args.epochs, args.warmup_epochs)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    run.loaders.train.set_epoch(epoch)
    if run.world.distributed:  # each process its own dropout masks, drawn again the same way after a resume
        torch.manual_seed((epoch_seed(args.seed, epoch) + run.world.rank) % 2**63)
    if args.mixup or args.cutmix:
        run.step_options.mix = BatchMix(args.mixup, args.cutmix, epoch_seed(args.seed, epoch))
    with peer_failures(run.world, f"epoch {epoch}"):
        trained = train_one_epoch(run.step_model, run.loaders.train, run.criterion, run.optimizer, run.accel,
                                  run.scaler, description=bar_label(f"epoch {epoch}/{args.epochs}", run.world),
                                  show_progress=not args.no_progress and run.world.is_main,
                                  should_stop=stop_check(stop, run),
                                  options=run.step_options)
    trained = all_reduce_epoch(trained, run.world)
    record_every_rank_skipped(run, trained.failed)
    if trained.interrupted:
        return None
    row = {"epoch": epoch, "train_loss": trained.loss, "train_acc": trained.accuracy, "val_loss": None,
           "val_acc": None, "val_balanced_acc": None, "lr": lr}
    if run.loaders.val is None:  # --train-on-all
        return EpochOutcome({**row, "seconds": trained.seconds}, None, None,
                            trained.images / max(trained.seconds, 1e-9))
    raw = validate(run, run.step_model, "val")
    record_every_rank_skipped(run, raw.failed)  # the EMA's pass meets the same files
    row.update(val_loss=raw.loss, val_acc=raw.accuracy,
               val_balanced_acc=balanced_accuracy(raw, len(run.data.class_names)))
    averaged = None
    if run.ema is not None:
        averaged = validate(run, run.ema.module, "val (ema)")
        row.update(ema_val_loss=averaged.loss, ema_val_acc=averaged.accuracy,
                   ema_val_balanced_acc=balanced_accuracy(averaged, len(run.data.class_names)))
    row["seconds"] = trained.seconds + raw.seconds + (averaged.seconds if averaged else 0.0)
    return EpochOutcome(row, raw, averaged, trained.images / max(trained.seconds, 1e-9))


def validate(run: Run, model: nn.Module, description: str) -> EvalResult:
    """``model`` on the validation images: this process's part, then every process's results put together."""
    sync_buffers(model, run.world)  # BatchNorm statistics as rank 0's, so every part is judged by one model
    with peer_failures(run.world, description):
        evaluated = evaluate(model, run.loaders.val, run.criterion, run.accel,
                             description=bar_label(description, run.world),
                             show_progress=not run.args.no_progress and run.world.is_main)
    return all_reduce_eval(evaluated, run.world)


def record_every_rank_skipped(run: Run, failed: Sequence[DecodeFailure]) -> None:
    """:func:`record_skipped` for the images that every process failed to decode (``failed``: this process's)."""
    record_skipped(run, [failure for part in gather_objects(list(failed), run.world) for failure in part])


def bar_label(description: str, world: World) -> str:
    """A progress bar's label: under torchrun the bar (rank 0's) counts and scores only rank 0's images, while the
    epoch line reports the whole job's, so it says so."""
    return f"{description} (rank 0's images)" if world.distributed else description


def stop_check(stop: StopRequest, run: Run) -> Callable[[], bool]:
    """Whether to stop after this batch. Under torchrun the processes agree on it (a stop on any one stops all at
    the same batch), asking each other every batch on the CPU and every 25 batches on a GPU."""
    if not run.world.distributed:
        return stop
    interval, calls = (1 if run.accel.device.type == "cpu" else 25), itertools.count(1)
    return lambda: next(calls) % interval == 0 and stop_agreed(stop, run.world)


def stop_agreed(stop: StopRequest, world: World) -> bool:
    """Whether to stop now. Under torchrun the processes agree (a stop requested on any one stops all, which then
    count it as their own), so none of them is left waiting for another that has left."""
    if world.distributed and any_rank(stop.requested, world):
        stop.requested = True
    return stop.requested


def balanced_accuracy(evaluated: EvalResult, num_classes: int) -> float:
    """Mean recall over the classes with validation images."""
    if not evaluated.images:
        return 0.0
    return metrics.balanced_accuracy(metrics.confusion_matrix(evaluated.targets.numpy(),
                                                              evaluated.predictions.numpy(), num_classes))


def monitored(evaluated: EvalResult, monitor: str, num_classes: int) -> float:
    """The value --monitor follows, higher is better (the loss negated)."""
    if monitor == "val_loss":
        return -evaluated.loss
    if monitor == "val_balanced_acc":
        return balanced_accuracy(evaluated, num_classes)
    return evaluated.accuracy


def record_epoch(run: Run, progress: Progress, outcome: EpochOutcome) -> bool:
    """Update the progress with a finished epoch and write best.pt, last.pt and history.csv; True if best.

    best.pt holds the better, by --monitor, of the raw weights and their moving average (it says which)."""
    epoch = int(outcome.row["epoch"])
    progress.epoch = epoch
    progress.history.append(outcome.row)
    if outcome.raw is None:  # --train-on-all: nothing validates, so best.pt is the latest weights
        weights, model = ("ema", run.ema.module) if run.ema is not None else ("raw", run.model)
        progress.best_epoch, progress.best_weights, progress.best_val_acc = epoch, weights, math.nan
        is_best = True
    else:
        weights, model, is_best = choose_best(run, progress, outcome)
    if not run.world.is_main:
        return is_best
    if is_best:
        save_checkpoint({**epoch_checkpoint(run, model, outcome.row), "weights": weights}, run.output_dir / "best.pt")
    checkpoint = epoch_checkpoint(run, run.model, outcome.row)
    checkpoint["training_state"] = training_state(progress, run.optimizer, run.scaler)
    if run.ema is not None:
        checkpoint["ema_model"] = {key: value.detach().cpu() for key, value in run.ema.module.state_dict().items()}
        checkpoint["training_state"]["ema_updates"] = run.ema.updates
    save_checkpoint(checkpoint, run.output_dir / "last.pt")
    write_history(progress.history, run.output_dir / "history.csv")
    return is_best


def choose_best(run: Run, progress: Progress, outcome: EpochOutcome) -> tuple[str, nn.Module, bool]:
    """The better, by --monitor, of the epoch's raw weights and their moving average: (which, model, whether it
    beats the best so far, in which case ``progress`` records it)."""
    num_classes = len(run.data.class_names)
    candidates = [("raw", run.model, outcome.raw)] + ([("ema", run.ema.module, outcome.ema)] if outcome.ema else [])
    weights, model, evaluated = max(candidates, key=lambda item: monitored(item[2], run.args.monitor, num_classes))
    score = monitored(evaluated, run.args.monitor, num_classes)
    is_best = score > progress.best_score
    if is_best:
        progress.best_score, progress.best_epoch, progress.best_weights = score, progress.epoch, weights
        progress.best_val_acc = evaluated.accuracy
        progress.best_predictions = evaluated.predictions.tolist()
        progress.best_targets = evaluated.targets.tolist()
    return weights, model, is_best


def epoch_checkpoint(run: Run, model: nn.Module, row: dict[str, float]) -> dict[str, Any]:
    """The checkpoint of ``model`` after the epoch of ``row``."""
    epoch_metrics = {key: value for key, value in row.items() if key != "epoch" and value is not None}
    mean, std = input_normalization(run.args.arch)
    return make_checkpoint(model, run.data.class_names, run.config, int(row["epoch"]), epoch_metrics, mean, std,
                           held_out=run.data.held_out, runtime=run.runtime)


def write_best_report(run: Run) -> None:
    """The evaluation report (metrics, per-class table, pictures) of best.pt on the validation split."""
    best_checkpoint = load_checkpoint(run.output_dir / "best.pt")
    model = run.accel.prepare_model(model_from_checkpoint(best_checkpoint))
    write_evaluation_report(model, best_checkpoint, run.data.val_samples, run.output_dir / "report", run.accel,
                            source=run.data.val_source, history_path=run.output_dir / "history.csv",
                            batch_size=run.args.batch_size, workers=run.args.workers,
                            show_progress=not run.args.no_progress, max_pixels=run.args.max_image_pixels)


def finish(run: Run, progress: Progress, stopped_epoch: int | None) -> dict[str, Any]:
    """Plots of the whole run and a closing line (rank 0); returns the run's summary."""
    if not run.world.is_main:
        return run_summary(progress, run.output_dir)
    save_final_plots(progress, stopped_epoch, run.data.class_names, run.output_dir)
    if run.loaders.val is None:
        print("note: --train-on-all: no validation split, so no confusion matrix or report/")
    elif (run.output_dir / "best.pt").is_file():
        write_best_report(run)
    else:  # resumed from a last.pt kept without its best.pt, and no epoch since did better
        print(f"note: no best.pt in {run.output_dir} (the best epoch, {progress.best_epoch}, was not kept beside "
              "the resumed last.pt); skipped the evaluation report")
    if run.logger is not None:
        for name in ("loss_curve", "accuracy_curve", "confusion_matrix"):
            if (run.output_dir / f"{name}.png").is_file():
                run.logger.log_figure(name, run.output_dir / f"{name}.png")
        run.logger.close()
    validated = run.loaders.val is not None
    best = describe_best(progress.best_val_acc, progress.best_epoch, run.args.monitor, progress.best_score)
    print(f"{best}; wrote {run.output_dir}/best.pt, last.pt, "
          "history.csv, loss_curve.png, accuracy_curve.png, "
          + ("confusion_matrix.png, config.yaml, report/" if validated else "config.yaml"))
    return run_summary(progress, run.output_dir)


def describe_best(best_val_acc: float, best_epoch: int | str, monitor: str = "val_acc",
                  best_score: float | None = None) -> str:
    """'best val accuracy 81.20% at epoch 6' (or the --monitor value best.pt was chosen by, with its accuracy), or
    what best.pt holds when nothing was validated (--train-on-all)."""
    if math.isnan(best_val_acc):
        return f"no validation (--train-on-all); best.pt holds epoch {best_epoch}"
    if monitor == "val_acc" or best_score is None or not math.isfinite(best_score):
        return f"best val accuracy {best_val_acc:.2%} at epoch {best_epoch}"
    value = f"{-best_score:.4f}" if monitor == "val_loss" else f"{best_score:.2%}"
    return f"best {monitor} {value} at epoch {best_epoch} (val accuracy {best_val_acc:.2%})"


def run_summary(progress: Progress, output_dir: Path) -> dict[str, Any]:
    """What ``main`` returns: the best epoch and its val accuracy, the output folder, the epochs run."""
    return {"best_epoch": progress.best_epoch, "best_val_acc": progress.best_val_acc,
            "output_dir": str(output_dir), "epochs_run": len(progress.history)}


def resume_hint(output_dir: Path, world: World = World()) -> str:
    """The command (or, in a notebook, the ``train.main`` call) that continues the run in ``output_dir``; under
    torchrun, the torchrun command (resuming with another process count changes the global batch)."""
    if not world.distributed:
        return command_hint("train.py", ["--resume", str(output_dir / "last.pt")])
    launcher = launch_command(world.world_size, processes_per_node())
    return f"{launcher} train.py --resume {output_dir / 'last.pt'}"


def launch_command(processes: int, per_node: int) -> str:
    """How a run of ``processes`` processes (``per_node`` on each machine) is started: python, or torchrun."""
    if processes == 1:
        return "python"
    if processes == per_node:
        return f"torchrun --nproc_per_node={processes}"
    return f"torchrun --nnodes={processes // per_node} --nproc_per_node={per_node} (and your --rdzv options)"


def processes_per_node() -> int:
    """torchrun's processes on this machine (``LOCAL_WORLD_SIZE``; 1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def report_interruption(run: Run, progress: Progress) -> None:
    """Say what an interrupted run kept and how to continue it (rank 0)."""
    if not run.world.is_main:
        return
    last = run.output_dir / "last.pt"
    if progress.epoch == 0:
        print("interrupted before the first epoch finished; nothing was saved", file=sys.stderr)
    else:
        print(f"interrupted: {last} holds epoch {progress.epoch}; continue with: "
              f"{resume_hint(run.output_dir, run.world)}",
              file=sys.stderr)


def train_epochs_or_stop_with_peers(run: Run, progress: Progress, stop: StopRequest) -> int | None:
    """:func:`train_epochs`; under torchrun, when another process stopped on request (Ctrl-C, SIGTERM) and left, this
    one stops too, as quietly (exit code 130)."""
    try:
        return train_epochs(run, progress, stop)
    except PeerStoppedError as error:
        print(error, file=sys.stderr)
        raise SystemExit(130) from None


def train_epochs(run: Run, progress: Progress, stop: StopRequest) -> int | None:
    """The epoch loop, with early stopping; returns the epoch where early stopping fired, if it did."""
    args = run.args
    last_epoch = args.epochs if args.epochs_this_run is None else min(args.epochs, progress.epoch + args.epochs_this_run)
    for epoch in range(progress.epoch + 1, last_epoch + 1):
        try:
            outcome = run_epoch(run, epoch, stop)
        except NonFiniteLossError as error:
            kept = (f"{run.output_dir / 'last.pt'} keeps epoch {progress.epoch}, the last good one" if progress.epoch
                    else "no epoch had finished, so nothing was saved")
            amp_hint = " (or --amp off)" if run.accel.amp_dtype is not None else ""
            raise UserError(f"training diverged in epoch {epoch}: {error}; {kept}; try a lower --lr{amp_hint}"
                            ) from None
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"out of GPU memory at --batch-size {args.batch_size} in epoch {epoch}; try "
                            f"--batch-size {max(1, args.batch_size // 2)} (or a smaller --img-size)") from None
        if outcome is None:
            return None
        is_best = record_epoch(run, progress, outcome)
        print(epoch_line(outcome.row, args.epochs, is_best, outcome.images_per_second, run.accel.device), flush=True)
        if run.logger is not None:
            run.logger.log_epoch(epoch, outcome.row, outcome.images_per_second)
        if stop_agreed(stop, run.world):
            return None
        patience_over = bool(args.patience) and progress.epochs_without_improvement() >= args.patience
        if broadcast_flag(patience_over and epoch < args.epochs, run.world):  # rank 0 decides for every process
            print(f"early stop: no better {args.monitor} for {args.patience} epochs")
            return epoch
    return None


# --------------------------------------------------------------------------- the output folder

# Their presence means a run lives in the folder.
RUN_FILES = ("last.pt", "best.pt", "history.csv")
# The files train.py writes there by these names (config.yaml, report/ and tensorboard/ are checked more closely).
RUN_OUTPUTS = (*RUN_FILES, "loss_curve.png", "accuracy_curve.png", "confusion_matrix.png", "skipped_files.txt")
CONFIG_HEADER_START = "# Ran on "


def run_to_continue(args: argparse.Namespace) -> dict[str, Any] | None:
    """The last.pt of the run in --output-dir when this command is that run's own (a re-run cell, a re-submitted
    job); None when there is no run there, or --overwrite. Any other run there is refused, never replaced."""
    output_dir = Path(args.output_dir)
    if args.overwrite or not holds_a_run(output_dir):
        return None
    checkpoint = run_checkpoint(output_dir)
    changed = differing_options(config_of(args), checkpoint["config"], ignore=SAME_RUN_MAY_DIFFER)
    if changed:
        resumable = all(key in RESUMABLE_OPTIONS for key in changed)
        choices = "continue it with --resume auto, start over" if resumable else "start over"
        raise UserError(f"--output-dir {output_dir}: holds another run ({describe_run(checkpoint)}; other "
                        f"{flag_names(changed)}); {choices} with --overwrite, or pass another --output-dir")
    return checkpoint


def holds_a_run(output_dir: Path) -> bool:
    """True when ``output_dir`` holds a run's checkpoints or history."""
    return any((output_dir / name).exists() for name in RUN_FILES)


def run_checkpoint(output_dir: Path) -> dict[str, Any]:
    """The last.pt of the run in ``output_dir``; a folder without a readable one is refused with the choices."""
    found = [name for name in RUN_FILES if (output_dir / name).exists()]
    choices = "start over there with --overwrite, or pass another --output-dir"
    if not (output_dir / "last.pt").is_file():
        raise UserError(f"--output-dir {output_dir}: holds {', '.join(found)} of an earlier run but no last.pt to "
                        f"continue it; {choices}")
    try:
        checkpoint = load_checkpoint(output_dir / "last.pt", flag="--output-dir")
    except UserError as error:
        raise UserError(f"{str(error).split('; ')[0]} (the last.pt of the run there); {choices}") from None
    if "training_state" not in checkpoint:
        raise UserError(f"--output-dir {output_dir}: its last.pt holds no training state; {choices}")
    return checkpoint


def refuse_resuming_over_another_run(args: argparse.Namespace) -> None:
    """``--resume`` of a run into an --output-dir that holds a different run would mix the two: refused, unless
    ``--overwrite`` replaces that run; ``--overwrite`` of the very run being resumed is a contradiction."""
    source = resolve_resume_path(args.resume, args.output_dir) if args.resume not in (None, "auto") else None
    output_dir = Path(args.output_dir)
    same_folder = args.resume == "auto" or (source is not None and source.parent.resolve() == output_dir.resolve())
    if args.overwrite and args.resume and same_folder:
        raise UserError("--overwrite with --resume of the run in --output-dir: --resume continues that run, "
                        "--overwrite replaces it; pass one of them")
    if source is None or source.parent.resolve() == output_dir.resolve() or not holds_a_run(output_dir):
        return
    if not args.overwrite:
        raise UserError(f"--output-dir {output_dir}: holds another run than {source}; resume into an empty folder, "
                        "replace that run with --overwrite, or leave --output-dir out to continue in "
                        f"{source.parent}")


def class_folders_now(data_dir: str, saved: Sequence[str]) -> list[str] | None:
    """The class folders of ``data_dir``/train as the scan will find them, told apart from a run's ``saved``
    classes without reading every folder: a folder new to the run counts when it holds images (None when there is
    no train/ folder: the scan says what is wrong)."""
    train_dir = Path(data_dir) / "train"
    if not train_dir.is_dir():
        return None
    return [name for name in class_folders(train_dir) if name in saved or has_images(train_dir / name)]


def refuse_changed_classes(args: argparse.Namespace, saved: Sequence[str], found: Sequence[str] | None) -> None:
    """A run keeps the classes it started with: refuse to continue it when --data-dir's train/ has other classes
    (``found``) than the run's (``saved``), naming those added and missing, before anything says it continues."""
    if found is None or list(found) == list(saved):
        return
    added, missing = [name for name in found if name not in saved], [name for name in saved if name not in found]
    changes = "; ".join(f"{label}: {some_names(names)}" for label, names in (("new", added), ("missing", missing))
                        if names) or "in another order"
    if args.resume:
        where = f"--resume {args.resume}"
        fix = "start a new run with --overwrite in place of --resume, or with another --output-dir"
    else:
        where = f"--output-dir {args.output_dir}"
        fix = "start a new run there with --overwrite, or pass another --output-dir"
    raise UserError(f"{where}: {Path(args.data_dir) / 'train'} has other classes than the {len(saved)} the run "
                    f"learned ({changes}); a run keeps its classes: {fix}")


def describe_run(checkpoint: dict[str, Any]) -> str:
    """'epoch 7 of 50, best val accuracy 81.20% at epoch 6' for a last.pt."""
    progress, config = checkpoint.get("training_state", {}).get("progress", {}), checkpoint["config"]
    best = describe_best(progress.get("best_val_acc", 0.0), progress.get("best_epoch", "?"),
                         config.get("monitor", "val_acc"), progress.get("best_score"))
    return f"epoch {progress.get('epoch', checkpoint.get('epoch', '?'))} of {config.get('epochs', '?')}, {best}"


def clear_run_outputs(output_dir: Path, config_file: str | None) -> None:
    """Delete what an earlier run of train.py wrote into ``output_dir``, so none of it outlives it: its checkpoints,
    history, plots, skip list, the report's files, TensorBoard's event files, and a config.yaml that train.py wrote
    (never the ``--config`` file in use). Anything else in the folder is left alone."""
    removed = [name for name in RUN_OUTPUTS if _remove_file(output_dir / name)]
    if _is_written_config(output_dir / "config.yaml", config_file) and _remove_file(output_dir / "config.yaml"):
        removed.append("config.yaml")
    for folder, names in (("report", lambda path: path.name in REPORT_FILES),
                          ("tensorboard", lambda path: path.name.startswith("events.out.tfevents."))):
        inside = [path for path in (output_dir / folder).glob("*") if names(path)] if (output_dir / folder).is_dir() else []
        if [path for path in inside if _remove_file(path)]:
            removed.append(f"{folder}/")
            with contextlib.suppress(OSError):
                (output_dir / folder).rmdir()  # only when nothing else is in it
    if removed:
        print(f"note: removed the earlier run's {', '.join(removed)} from {output_dir}")


def refuse_a_foreign_config_file(output_dir: Path) -> None:
    """A new run writes config.yaml into ``output_dir``: one there that train.py did not write (your own, perhaps
    the very --config in use) is not replaced."""
    path = output_dir / "config.yaml"
    if path.is_file() and not _is_written_config(path, None):
        raise UserError(f"--output-dir {output_dir}: holds a config.yaml that train.py did not write, and a run writes "
                        "its own there; move that file, or pass another --output-dir")


def _remove_file(path: Path) -> bool:
    if path.is_file() or path.is_symlink():
        path.unlink()
        return True
    return False


def _is_written_config(path: Path, config_file: str | None) -> bool:
    """True for a config.yaml that train.py wrote (its first line says where it ran) and that is not in use."""
    if not path.is_file() or (config_file and Path(config_file).resolve() == path.resolve()):
        return False
    with path.open(encoding="utf-8", errors="ignore") as handle:
        return handle.readline().startswith(CONFIG_HEADER_START)


def run_is_complete(args: argparse.Namespace, progress: Progress) -> bool:
    """True when the run has trained all --epochs, or early stopping has ended it."""
    early_stopped = bool(args.patience) and progress.epochs_without_improvement() >= args.patience
    return progress.epoch >= args.epochs or early_stopped


def say_complete(args: argparse.Namespace, progress: Progress) -> None:
    """Tell that the run is already complete, and how to train it further."""
    output_dir = Path(args.output_dir)
    trained = f"all {args.epochs} epochs trained" if args.epochs > 1 else "its 1 epoch trained"
    how = trained if progress.epoch >= args.epochs else f"early stopping after epoch {progress.epoch} of {args.epochs}"
    longer = command_hint("train.py", ["--resume", str(output_dir / "last.pt"), "--epochs", str(args.epochs + 10)])
    print(f"the run in {output_dir} is complete ({how}; "
          f"{describe_best(progress.best_val_acc, progress.best_epoch, args.monitor, progress.best_score)}); "
          f"to train longer: {longer}"
          + (" (with a larger --patience)" if progress.epoch < args.epochs else ""))


def note_schedule_change(args: argparse.Namespace, checkpoint: dict[str, Any], progress: Progress) -> None:
    """Say so when --epochs differs from the run's: the cosine schedule is re-stretched over the new count."""
    before = int(checkpoint["config"].get("epochs", args.epochs))
    if before == args.epochs or progress.epoch >= args.epochs:
        return
    last_lr = learning_rate(args.lr, progress.epoch, before, args.warmup_epochs)
    next_lr = learning_rate(args.lr, progress.epoch + 1, args.epochs, args.warmup_epochs)
    print(f"note: --epochs {args.epochs} (the run had {before}): the cosine schedule is re-stretched over "
          f"{args.epochs} epochs, so the learning rate goes from {last_lr:.2e} at epoch {progress.epoch} to "
          f"{next_lr:.2e} at epoch {progress.epoch + 1}" + (" (it rises)" if next_lr > last_lr else ""))


def train_and_finish(args: argparse.Namespace, resume: dict[str, Any] | None) -> dict[str, Any]:
    """Set the run up (as this process's part of the job under torchrun), train the epochs left, and write the final
    plots and report; returns the summary."""
    with joined_world(args) as world:
        run, progress = set_up(args, resume, world)
        with StopRequest() as stop:
            stopped_epoch = train_epochs_or_stop_with_peers(run, progress, stop)
        if stop.requested:
            announce_stop(world)  # before leaving: a process still in a collective must not read it as a crash
            report_interruption(run, progress)
            raise SystemExit(130)
        if progress.epoch < args.epochs and stopped_epoch is None:
            print(f"stopped after epoch {progress.epoch} of {args.epochs} (--epochs-this-run); continue with: "
                  f"{resume_hint(run.output_dir, run.world)}")
        return finish(run, progress, stopped_epoch)


@contextlib.contextmanager
def joined_world(args: argparse.Namespace) -> Iterator[World]:
    """The job torchrun started (this process one of its ranks), or a one-process world; left at the end."""
    world = init_world(args.device)
    try:
        yield world
    finally:
        close_world(world)


def finish_complete_run(args: argparse.Namespace, resume: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """A complete run: its summary, after writing the plots and report only if they are missing."""
    say_complete(args, progress)
    output_dir = Path(args.output_dir)
    outputs = ["loss_curve.png"] if args.train_on_all else ["report/metrics.json", "confusion_matrix.png"]
    if all((output_dir / name).is_file() for name in outputs):
        return run_summary(progress, output_dir)
    with joined_world(args) as world:
        run, progress = set_up(args, resume, world)
        return finish(run, progress, progress.epoch if progress.epoch < args.epochs else None)


@exit_on_user_error
def main(argv: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Train with the given arguments (a list, or one string split as a shell would); returns a summary (best
    epoch, accuracy, output folder)."""
    silence_other_ranks()
    with mistakes_told_by_rank_0():
        args, resume = parse_args_and_resume(argv)
        refuse_resuming_over_another_run(args)
    same_command = False
    if resume is None:  # no --resume: the folder may hold this very command's run, to continue
        with mistakes_told_by_rank_0():
            resume = run_to_continue(args)
            if resume is not None:
                refuse_changed_classes(args, resume["class_names"],
                                       class_folders_now(args.data_dir, resume["class_names"]))
        same_command = resume is not None
    if resume is None:
        return train_and_finish(args, None)
    progress = Progress(**resume["training_state"]["progress"])
    note_schedule_change(args, resume, progress)
    if run_is_complete(args, progress):
        return finish_complete_run(args, resume, progress)
    if same_command:
        print(f"note: {args.output_dir} holds this run ({describe_run(resume)}); continuing it (--overwrite starts "
              "over)")
    return train_and_finish(args, resume)


if __name__ == "__main__":
    main(sys.argv[1:])
