"""The options of train.py, predict.py and evaluate.py: the parsers, ``--config`` files, the checks, the run's typed
configuration, and what a run records of it (config.yaml, the runtime record).

``get_args_parser`` is train.py's parser; ``add_device_options``, ``add_inference_options`` and
``add_max_image_pixels_option`` are the options the scripts share. A ``--config`` file sets the parser's defaults
(each value converted as its flag would be), so the command line wins. :func:`parse_args_and_resume` turns the flags
into one frozen ``run_config.TrainConfig`` through :func:`build_config`: ``check_args`` refuses what cannot work, and
every ``auto`` (device, precision, workers, each split's data path, the thaw schedule) is decided there, once.
"""

from __future__ import annotations

import argparse
import platform
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torchvision
import yaml
from torch import nn

from accel import AMP_CHOICES, Accel, choose_data_path, resolve_amp
from cache import CACHE_CHOICES
from checkpoint import Checkpoint, load_checkpoint
from common import World, processes_per_node
from distributed import launch_command
from images import DEFAULT_MAX_IMAGE_PIXELS
from model import (
    DEFAULT_TRAINABLE,
    SUPPORTED_ARCHS,
    TIMM_PREFIX,
    block_names,
    fixed_input_size,
    has_trainable_batchnorm,
    model_skeleton,
    parse_count,
    parse_trainable,
    parse_unfreeze_at,
    spelled_out_trainable,
)
from recipe import AUTO_AUGMENT_CHOICES
from run_config import Chosen, TrainConfig
from utils import (
    DEVICE_CHOICES,
    ArgumentParser,
    UserError,
    argument_list,
    counted,
    describe_device,
    did_you_mean,
    file_in_the_way,
    load_yaml_config,
    pick_device,
    refuse_unwritable_folder,
    resolve_workers,
)


def add_max_image_pixels_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--max-image-pixels``, shared by train.py, predict.py and evaluate.py."""
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                        help="images with more pixels are skipped and listed as too large (decoding one takes "
                             "3 bytes a pixel and more); 0 = no limit. The default is one pixel per 16 bytes of this "
                             f"machine's total physical memory (here {DEFAULT_MAX_IMAGE_PIXELS:,} pixels), the same "
                             "on every run, and never below Pillow's own limit. An image under the limit that would "
                             "not fit in half the memory available when it is decoded is skipped too")


def check_max_image_pixels(value: int) -> None:
    """Refuse a negative ``--max-image-pixels``."""
    if value < 0:
        raise UserError(f"--max-image-pixels {value}: must be 0 (no limit) or a pixel count")


MONITOR_CHOICES = ("val_acc", "val_balanced_acc", "val_loss")


# The options a newcomer changes first: all that --help shows (with those a --config file sets); --help-all has all.
FIRST_USE_OPTIONS = ("config", "data_dir", "output_dir", "epochs", "batch_size", "lr", "weights", "device", "resume")


class ShortHelp(argparse.Action):
    """``--help``: the options to change first, those the ``--config`` file sets, and how to list them all."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(short_help(parser), end="")
        parser.exit()


def short_help(parser: argparse.ArgumentParser) -> str:
    """train.py's --help: its first-use options and the options whose defaults a --config file changed."""
    own_defaults = get_args_parser(add_help=False)
    options = [action for action in parser._actions if action.dest not in ("help", "help_all")]
    first = sorted((action for action in options if action.dest in FIRST_USE_OPTIONS),
                   key=lambda action: FIRST_USE_OPTIONS.index(action.dest))
    from_config = [action for action in options if action.dest not in FIRST_USE_OPTIONS
                   and action.default != own_defaults.get_default(action.dest)]
    formatter = parser._get_formatter()
    formatter.add_usage(parser.usage, parser._actions, [])
    formatter.add_text(parser.description)
    for title, actions in (("the options to change first", first), ("set by the --config file", from_config)):
        if actions:
            formatter.start_section(title)
            formatter.add_arguments(actions)
            formatter.end_section()
    formatter.add_text(f"python train.py --help-all lists all {len(options)} options, in groups: "
                       f"{', '.join(group.title for group in parser._action_groups[2:])}.")
    return formatter.format_help()


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The training options; defaults are the reference recipe. ``--help`` lists the first-use options,
    ``--help-all`` every one."""
    parser = ArgumentParser(
        prog="train.py",
        usage="%(prog)s [--config FILE] [--data-dir DIR] [--output-dir DIR] [--epochs N] [other options]",
        description="Fine-tune an ImageNet-pretrained ResNet on data/train/<class>/*.jpg.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        add_help=False,
    )
    if add_help:
        parser.add_argument("-h", "--help", action=ShortHelp, help="show the options to change first, and exit")
        parser.add_argument("--help-all", action="help", help="show every option, and exit")
    parser.add_argument("--config", metavar="FILE",
                        help="YAML file of option: value lines (e.g. configs/sample.yaml); command-line flags override "
                             "it")
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="data", metavar="DIR",
                      help="folder holding train/<class>/ and optionally val/<class>/")
    data.add_argument("--val-fraction", type=float, default=0.1,
                      help="stratified share of train/ used as val/ when there is no val/ folder")
    data.add_argument("--fold", metavar="I/K",
                      help="pool train/ and val/, split them into K stratified folds (seeded by --seed) and validate "
                           "on fold I (1..K); the split is stored in the checkpoint. K runs, then predict.py with "
                           "their K best.pt, make a K-fold ensemble; unset: no folds")
    data.add_argument("--train-on-all", action="store_true",
                      help="train on train/ and val/ together with no validation and no early stopping, for the final"
                           " fit once --epochs is known; best.pt holds the last epoch's weights (the moving average "
                           "with --ema)")
    data.add_argument("--img-size", type=int, default=224,
                      help="training crop size, in pixels (and the evaluation size unless --test-size)")
    data.add_argument("--test-size", type=int,
                      help="evaluation and prediction size (resize to size*256/224, centre crop); default: "
                           "--img-size. Stored in the checkpoint for predict.py and evaluate.py")
    data.add_argument("--augment-device", default="auto", choices=("auto", "cpu", "gpu"),
                      help="where training augmentation runs: gpu = batched on the CUDA device (auto on CUDA), cpu = "
                           "PIL in the loader workers")
    data.add_argument("--verify-images", action="store_true",
                      help="decode every image at start (slower) instead of reading headers only, to list all broken "
                           "files up front")
    data.add_argument("--workers", default="auto",
                      help="DataLoader worker processes: a number, or auto (one per CPU core, up to 8)")
    data.add_argument("--cache", default="auto", choices=CACHE_CHOICES,
                      help="on the GPU path, keep the decoded training images (and validation crops) after the first "
                           "epoch, so later epochs decode nothing: gpu = in GPU memory, ram = in host memory, auto = "
                           "on the GPU when they fit in half its free memory, else in RAM when they fit in half of "
                           "it, else none")
    add_max_image_pixels_option(data)
    data.add_argument("--auto-augment", choices=AUTO_AUGMENT_CHOICES, default="none",
                      help="an augmentation policy after the flip: ta_wide (TrivialAugmentWide), ra (RandAugment), aa"
                           " (AutoAugment, ImageNet policy); runs on the CPU path")
    data.add_argument("--random-erase", type=float, default=0.0, metavar="P",
                      help="RandomErasing with this probability at the end of the recipe (e.g. 0.25); 0: off")
    data.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                      help="mixup of each batch with itself rolled by one, lam ~ Beta(ALPHA, ALPHA) (e.g. 0.2); 0: "
                           "off")
    data.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                      help="CutMix, likewise (e.g. 1.0); with --mixup too, each batch uses one of the two; 0: off")
    data.add_argument("--sampler", choices=("uniform", "balanced"), default="uniform",
                      help="balanced draws each class equally often (with replacement), an alternative to "
                           "--class-weights balanced")
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default="resnet50",
                       help=f"one of: {', '.join(SUPPORTED_ARCHS)} (torchvision), or {TIMM_PREFIX}NAME for any timm "
                            f"model (pip install timm), e.g. {TIMM_PREFIX}seresnextaa101d_32x8d.sw_in12k_ft_in1k_288")
    model.add_argument("--max-params", metavar="N",
                       help="refuse a model with more parameters than N (e.g. 100M, 25.6M, 900k), counted before "
                            "anything is downloaded; unset: no limit")
    model.add_argument("--weights", default="imagenet",
                       help="imagenet (torchvision's best weights, or timm's default pretrained tag), none, or a PATH"
                            " to a state dict")
    model.add_argument("--trainable", default=DEFAULT_TRAINABLE,
                       help="blocks to train, comma-separated, or all. Blocks are the model's top-level modules: "
                            "conv1,bn1,layer1..layer4,fc for a ResNet (torchvision's or timm's); the new head always "
                            "trains")
    model.add_argument("--unfreeze-at", metavar="BLOCK:EPOCH,...",
                       help="gradual unfreezing: each block (or all) starts training at the start of the given epoch,"
                            " e.g. layer3:5,all:10 with --trainable layer4,fc; its BatchNorm stays fixed until then "
                            "and it joins the optimizer at --backbone-lr-mult; unset: nothing thaws")
    model.add_argument("--dropout", type=float, default=0.2, help="dropout before the final Linear layer")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=50, metavar="N",
                       help="maximum epochs; the cosine schedule spans them")
    optim.add_argument("--batch-size", type=int, default=128, metavar="N",
                       help="training images per step (lower it if the GPU runs out of memory)")
    optim.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                       help="adamw, or sgd with Nesterov momentum 0.9 (torchvision's references)")
    optim.add_argument("--lr", type=float, default=3e-5,
                       help="learning rate of the new head (and of the backbone, times --backbone-lr-mult)")
    optim.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    optim.add_argument("--warmup-epochs", type=int, default=0,
                       help="epochs of linear warmup (epoch k of W gets lr*k/(W+1)) before the cosine schedule, which"
                            " then spans the other epochs")
    optim.add_argument("--backbone-lr-mult", type=float, default=1.0,
                       help="learning rate of the pretrained blocks relative to the new head's (e.g. 0.1)")
    optim.add_argument("--accum-steps", type=int, default=1,
                       help="batches whose gradients add up before each optimizer step (an effective batch of "
                            "batch-size x this, for small GPUs)")
    optim.add_argument("--label-smoothing", type=float, default=0.05,
                       help="share of each target spread over the other classes")
    optim.add_argument("--class-weights", choices=("balanced", "none"), default="balanced",
                       help="cross-entropy class weights")
    optim.add_argument("--patience", type=int, default=10,
                       help="stop after this many epochs without a better --monitor value; 0 never stops early")
    optim.add_argument("--monitor", choices=MONITOR_CHOICES, default="val_acc",
                       help="what early stopping and best.pt follow: val_acc, val_balanced_acc (mean recall over the "
                            "classes) or val_loss")
    optim.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                       help="also keep an exponential moving average of the weights (e.g. 0.999), validated each "
                            "epoch; best.pt holds the better of it and the raw weights. 0: off")
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default="checkpoints", metavar="DIR",
                     help="where checkpoints, history, plots and config go")
    run.add_argument("--overwrite", action="store_true",
                     help="start a new run in an --output-dir that holds another one, deleting its checkpoints, "
                          "history, plots and report")
    run.add_argument("--epochs-this-run", type=int,
                     help="stop after this many epochs now and resume later (e.g. within a Colab session's time)")
    run.add_argument("--resume", metavar="PATH",
                     help="continue a run exactly: a last.pt, its folder, or auto (the output folder's last.pt, if "
                          "any)")
    add_device_options(run)
    run.add_argument("--channels-last", default=True, action=argparse.BooleanOptionalAction,
                     help="NHWC memory format (faster convolutions on GPUs and CPUs)")
    run.add_argument("--sync-bn", action="store_true",
                     help="under torchrun on CUDA GPUs: the BatchNorm layers that learn normalize with the statistics"
                          " of every process's images (SyncBatchNorm), not only their own")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the model (falls back with a note where it cannot)")
    run.add_argument("--seed", type=int, default=0,
                     help="seeds the split, the data order, every augmentation and the weights of new layers")
    run.add_argument("--no-progress", action="store_true", help="hide the per-batch progress bars")
    run.add_argument("--tensorboard", action="store_true",
                     help="also log to OUTPUT_DIR/tensorboard (needs the tensorboard package)")
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


def parse_args(argv: str | Sequence[str] | None = None) -> TrainConfig:
    """The run's configuration from flags; a ``--config`` file sets the defaults first, so the command line wins."""
    return parse_args_and_resume(argv)[0]


def parse_args_and_resume(argv: str | Sequence[str] | None = None) -> tuple[TrainConfig, Checkpoint | None]:
    """The run's configuration and, with ``--resume``, the checkpoint to continue from.

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
        return build_config(args), None
    checkpoint = load_checkpoint(resume_path, flag="--resume", file_in_folder="last.pt")
    if checkpoint.training_state is None:
        raise UserError(f"--resume {resume_path}: holds no training state (best.pt is for prediction); use last.pt")
    saved = dict(checkpoint.config)
    # A --config file (the same cell re-run in Colab, say) counts like flags: it must agree with the checkpoint.
    parser.set_defaults(**{**saved, "output_dir": str(resume_path.parent), **from_file})
    args = parser.parse_args(argv)
    args.val_fraction_given = False  # the resumed run keeps the split it had
    config = build_config(args)
    changed = differing_options(config.saved_options(), saved, ignore=RESUMABLE_OPTIONS)
    if changed:
        raise UserError(f"--resume: {flag_names(changed)} {'differs' if len(changed) == 1 else 'differ'} from the "
                        "checkpoint's; only --epochs, --patience, --workers, --device, --amp, --data-dir, --output-dir "
                        "and such may change when resuming")
    return config, checkpoint


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Check the parsed options and decide every ``auto`` once (device, precision, workers, each split's data path,
    the blocks that train and when): the run's frozen configuration."""
    check_args(args)
    device = pick_device(args.device)
    check_run_options(args, device)
    skeleton = model_skeleton(args.arch)  # an unknown --arch, or timm missing, is refused here: nothing downloaded
    thaw_schedule = check_model_options(args, skeleton)
    amp_dtype = resolve_amp(args.amp, device)
    train_path, eval_path = choose_data_paths(args.augment_device, args.auto_augment, device)
    spelled_out = {
        "cache": ("auto" if args.cache else "none") if isinstance(args.cache, bool) else args.cache,  # an old run's
        "workers": resolve_workers(args.workers),  # switch --cache, and a YAML number for --max-params, as text
        "max_params": None if args.max_params is None else str(args.max_params),
        "trainable": spelled_out_trainable(args.trainable, skeleton),
    }
    values = {**vars(args), **spelled_out}
    chosen = Chosen(device, amp_dtype, train_path, eval_path,
                    tuple((epoch, tuple(blocks)) for epoch, blocks in thaw_schedule.items()))
    return TrainConfig(**{name: values[name] for name in CONFIG_FIELDS}, chosen=chosen)


CONFIG_FIELDS = tuple(field.name for field in fields(TrainConfig) if field.name != "chosen")


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
        raise UserError(f"--config {path}: unknown option(s) {', '.join(unknown)}{did_you_mean(unknown, actions)}; see "
                        "python train.py --help-all")
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


def check_args(args: argparse.Namespace) -> None:
    """Refuse numbers that would only fail later, deep in the loop (one line naming the flag and the fix); the
    folder, device and model options are checked by :func:`check_run_options` and :func:`check_model_options`."""
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


def check_run_options(args: argparse.Namespace, device: torch.device) -> None:
    """Refuse an --output-dir, --max-image-pixels, --sync-bn (on ``device``) or --fold that cannot work."""
    check_output_dir(args.output_dir)
    check_max_image_pixels(args.max_image_pixels)
    if args.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn: SyncBatchNorm needs CUDA GPUs (torchrun with one process a GPU); without it each "
                        "process's BatchNorm normalizes its own images")
    if args.fold is not None:
        parse_fold(args.fold)
        if args.train_on_all:
            raise UserError(f"--fold {args.fold} with --train-on-all: a fold validates, --train-on-all does not; "
                            "pick one")


def check_model_options(args: argparse.Namespace, skeleton: nn.Module) -> dict[int, list[str]]:
    """Refuse an input size, --max-params, --unfreeze-at or batch size the model (its ``skeleton``: nothing is
    downloaded) cannot take; returns the --unfreeze-at schedule, {epoch: blocks that start training then}."""
    fixed = fixed_input_size(args.arch)
    for flag, size in (("--img-size", args.img_size), ("--test-size", args.test_size)):
        if fixed is not None and size is not None and size != fixed:
            raise UserError(f"{flag} {size}: {args.arch} takes only {fixed}-px images (its pretrained config fixes "
                            f"the input size); use {flag} {fixed}")
    if args.max_params is not None:
        parse_count(str(args.max_params))
    schedule = unfreeze_schedule(args.unfreeze_at, args.trainable, args.epochs, skeleton)
    thawing = [block for blocks in schedule.values() for block in blocks]
    trained = parse_trainable(args.trainable, skeleton) + thawing
    if args.batch_size < 2 and has_trainable_batchnorm(trained, skeleton):
        raise UserError(f"--batch-size {args.batch_size}: the trained blocks ({','.join(trained)}) hold BatchNorm "
                        "layers, which need at least 2 images a batch; use --batch-size 2 or more")
    return schedule


def choose_data_paths(augment_device: str, auto_augment: str, device: torch.device) -> tuple[str, str]:
    """Where training images and validation images are decoded and transformed (``gpu`` or ``cpu`` each):
    ``--augment-device`` for both, except that an ``--auto-augment`` policy runs in the loader workers (torchvision's
    transforms), so training images then take the CPU path."""
    eval_path = choose_data_path(augment_device, device)
    if eval_path == "gpu" and auto_augment != "none":
        print(f"note: --auto-augment {auto_augment} runs in the loader workers: training images take the CPU path "
              "(PIL), validation stays on the device")
        return "cpu", eval_path
    return eval_path, eval_path


def check_output_dir(output_dir: str) -> None:
    """Refuse an --output-dir that is a file, lies inside one (it could never be created), or where nothing can be
    written (a read-only mount): before the data scan and the model, not at the first checkpoint."""
    blocker = file_in_the_way(Path(output_dir), is_folder=True)
    if blocker == Path(output_dir):
        raise UserError(f"--output-dir {output_dir}: is a file; pass a folder (it is created if missing)")
    if blocker is not None:
        raise UserError(f"--output-dir {output_dir}: {blocker} is a file, not a folder; pass another --output-dir")
    refuse_unwritable_folder("--output-dir", Path(output_dir), "pass an --output-dir you can write to")


def unfreeze_schedule(unfreeze_at: str | None, trainable: str, epochs: int, model: nn.Module) -> dict[int, list[str]]:
    """``--unfreeze-at`` as {epoch: blocks that start training then}; refused when an epoch is outside 2..--epochs
    or a named block already trains."""
    if not unfreeze_at:
        return {}
    schedule, trained = {}, parse_trainable(trainable, model)
    for epoch, named in parse_unfreeze_at(unfreeze_at, model).items():
        if not 2 <= epoch <= epochs:
            raise UserError(f"--unfreeze-at {unfreeze_at}: epoch {epoch} is not in 2..{epochs} (--epochs); "
                            "blocks that train from epoch 1 belong in --trainable")
        already = [block for block in named if block in trained]
        if already:
            raise UserError(f"--unfreeze-at {unfreeze_at}: {already[0]} already trains by then (--trainable "
                            f"{trainable}, or an earlier epoch); name only frozen blocks")
        thawing = [block for block in block_names(model) if block not in trained and ("all" in named or block in named)]
        if thawing:
            schedule[epoch] = thawing
            trained += thawing
    return schedule


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


def runtime_record(config: TrainConfig, accel: Accel, world: World) -> dict[str, Any]:
    """What the run's options resolved to on this machine ("auto" included), the process count, and the software
    versions."""
    return {"device": describe_device(accel.device), "device_type": accel.device.type, "processes": world.world_size,
            "processes_per_node": processes_per_node() if world.distributed else 1,
            "precision": accel.precision_name, "workers": config.workers,
            "augment_device": config.chosen.eval_path, "train_data_path": config.chosen.train_path,
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
    header = (f"{CONFIG_HEADER_START}{runtime['device']} in {runtime['precision']}, "
              f"{counted(runtime['workers'], 'loader worker')}, "
              + data_paths_text(runtime)
              + (f", {processes} processes (torchrun)" if processes > 1 else "") + ";\n"
              f"# torch {runtime['torch']}, torchvision {runtime['torchvision']}, Python {runtime['python']}. "
              "Options given as auto are written as what\n"
              f"# they chose, so `{launcher} train.py --config THIS_FILE --output-dir NEW_FOLDER` repeats the run.\n")
    written = {key: value for key, value in as_run.items() if value is not None}  # unset: off (--fold, --max-params)
    return header + yaml.safe_dump(written, sort_keys=True)


CONFIG_HEADER_START = "# Ran on "


def data_paths_text(runtime: dict[str, Any]) -> str:
    """Where the run decoded and augmented its images, for config.yaml's header."""
    train = runtime.get("train_data_path", runtime["augment_device"])
    if train == runtime["augment_device"]:
        return f"augmentation on the {train}"
    return f"training images on the {train} (--auto-augment), validation on the {runtime['augment_device']}"


def resolve_resume_path(resume: str, output_dir: str) -> Path | None:
    """``--resume auto``: the output folder's last.pt if there is one; otherwise the given last.pt (or the last.pt
    in the given run folder), which must exist."""
    if resume == "auto":
        path = Path(output_dir) / "last.pt"
        if not path.is_file():
            print(f"note: --resume auto: no {path} yet, starting a new run")
            return None
        return path
    path = Path(resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UserError(f"--resume {resume}: file not found; pass a last.pt written by train.py (or its folder), "
                        "or auto")
    return path


def script_parser(prog: str, description: str, add_help: bool = True) -> argparse.ArgumentParser:
    """The parser predict.py, evaluate.py and export.py start from: their name and job, every default in --help, and
    utils.ArgumentParser's one-line refusals (a notebook's ``--help`` returns)."""
    return ArgumentParser(prog=prog, description=description, add_help=add_help,
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_device_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--device`` and ``--amp``, shared by train.py, predict.py and evaluate.py."""
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="auto = CUDA, then Apple MPS, then the CPU")
    parser.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="mixed precision: auto = bf16 where the "
                        "hardware has it, fp16 on older CUDA GPUs, else fp32 (off)")


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """The options predict.py and evaluate.py share: batch size, workers, device, precision, progress bar."""
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass (lower it if the GPU "
                        "runs out of memory)")
    parser.add_argument("--workers", default="auto", help="DataLoader worker processes: a number, or auto (one per "
                        "CPU core, up to 8)")
    parser.add_argument("--augment-device", default="auto", choices=("auto", "cpu", "gpu"),
                        help="where images are decoded, resized and cropped: gpu = batched on the CUDA device (auto on "
                             "CUDA), cpu = PIL in the loader workers")
    add_device_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def parse_fold(text: str) -> tuple[int, int]:
    """``--fold 2/5`` as (2, 5): fold I of K, with 1 <= I <= K and K >= 2."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None or not 2 <= int(match.group(2)) or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise UserError(f"--fold {text}: write I/K, fold I of K folds, with 1 <= I <= K and K >= 2 (e.g. 1/5)")
    return int(match.group(1)), int(match.group(2))
