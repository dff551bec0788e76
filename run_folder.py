"""The run's folder (--output-dir): continuing the run there or refusing another, clearing it for a new run, and
what a run writes there besides checkpoints and history.csv (skipped_files.txt) and says about it (resume
hints)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from checkpoint import Checkpoint, load_checkpoint
from common import REPORT_FILES, SINGLE_PROCESS, World, processes_per_node
from dataset import class_folders, has_images
from distributed import launch_command
from lr_schedule import learning_rate
from options import (
    CONFIG_HEADER_START,
    RESUMABLE_OPTIONS,
    SAME_RUN_MAY_DIFFER,
    differing_options,
    flag_names,
    resolve_resume_path,
)
from resume import Progress
from run_config import TrainConfig
from tb_logger import TensorBoardLogger, summary_writer_class
from utils import UserError, atomic_write_bytes, atomic_write_text, command_hint, some_names


def prepare_output_dir(config: TrainConfig, resume: Checkpoint | None, skipped: Sequence[tuple[str, str]],
                       config_text: str) -> TensorBoardLogger | None:
    """Clear a fresh run's folder (only now: every check has passed), write config.yaml and the skip list; the
    TensorBoard logger when asked."""
    output_dir = Path(config.output_dir)
    if config.tensorboard:
        summary_writer_class()  # a missing package is refused before anything in the folder changes
    if resume is None or (config.overwrite and config.resume not in (None, "auto")):
        refuse_foreign_config(output_dir)
        clear_run_outputs(output_dir, config.config)
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.resume not in (None, "auto"):
        carry_over_best_checkpoint(resolve_resume_path(config.resume, config.output_dir), output_dir)
    atomic_write_text(output_dir / "config.yaml", config_text)
    if skipped:
        write_skipped(skipped, output_dir)
    return TensorBoardLogger(output_dir / "tensorboard") if config.tensorboard else None


def write_skipped(skipped: Sequence[tuple[str, str]], output_dir: Path) -> None:
    """``skipped_files.txt``: one ``path<TAB>reason`` line per image left out of training or validation."""
    atomic_write_text(output_dir / "skipped_files.txt", "".join(f"{path}\t{reason}\n" for path, reason in skipped))


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


def resume_hint(output_dir: Path, world: World = SINGLE_PROCESS) -> str:
    """The command (or, in a notebook, the ``train.main`` call) that continues the run in ``output_dir``; under
    torchrun, the torchrun command (resuming with another process count changes the global batch)."""
    if not world.distributed:
        return command_hint("train.py", ["--resume", str(output_dir / "last.pt")])
    launcher = launch_command(world.world_size, processes_per_node())
    return f"{launcher} train.py --resume {output_dir / 'last.pt'}"


# Their presence means a run lives in the folder.
RUN_FILES = ("last.pt", "best.pt", "history.csv")


# The files train.py writes there by these names (config.yaml, report/ and tensorboard/ are checked more closely).
RUN_OUTPUTS = (*RUN_FILES, "loss_curve.png", "accuracy_curve.png", "confusion_matrix.png", "skipped_files.txt",
               "train_batch.png")


def run_to_continue(config: TrainConfig) -> Checkpoint | None:
    """The last.pt of the run in --output-dir when this command is that run's own (a re-run cell, a re-submitted
    job); None when there is no run there, or --overwrite. Any other run there is refused, never replaced."""
    output_dir = Path(config.output_dir)
    if config.overwrite or not holds_a_run(output_dir):
        return None
    checkpoint = run_checkpoint(output_dir)
    changed = differing_options(config.saved_options(), checkpoint.config, ignore=SAME_RUN_MAY_DIFFER)
    if changed:
        resumable = all(key in RESUMABLE_OPTIONS for key in changed)
        choices = "continue it with --resume auto, start over" if resumable else "start over"
        raise UserError(f"--output-dir {output_dir}: holds another run ({describe_run(checkpoint)}; other "
                        f"{flag_names(changed)}); {choices} with --overwrite, or pass another --output-dir")
    return checkpoint


def holds_a_run(output_dir: Path) -> bool:
    """True when ``output_dir`` holds a run's checkpoints or history."""
    return any((output_dir / name).exists() for name in RUN_FILES)


# load_checkpoint's fixes that mend the run's own last.pt (newer code wrote it; Git LFS holds it): never start over.
FIXES_OF_THE_FILE = ("update the code", "git lfs pull")


def run_checkpoint(output_dir: Path) -> Checkpoint:
    """The last.pt of the run in ``output_dir``; a folder without a readable one is refused with the choices."""
    found = [name for name in RUN_FILES if (output_dir / name).exists()]
    choices = "start over there with --overwrite, or pass another --output-dir"
    if not (output_dir / "last.pt").is_file():
        raise UserError(f"--output-dir {output_dir}: holds {', '.join(found)} of an earlier run but no last.pt to "
                        f"continue it; {choices}")
    try:
        checkpoint = load_checkpoint(output_dir / "last.pt", flag="--output-dir")
    except UserError as error:
        reason, _, fix = str(error).partition("; ")
        if any(words in fix for words in FIXES_OF_THE_FILE):  # the file is fine, the code or the copy is not
            raise UserError(f"{reason} (the last.pt of the run there); {fix}") from None
        raise UserError(f"{reason} (the last.pt of the run there); {choices}") from None
    if checkpoint.training_state is None:
        raise UserError(f"--output-dir {output_dir}: its last.pt holds no training state; {choices}")
    return checkpoint


def refuse_resume_into_other_run(config: TrainConfig) -> None:
    """``--resume`` of a run into an --output-dir that holds a different run would mix the two: refused, unless
    ``--overwrite`` replaces that run; ``--overwrite`` of the very run being resumed is a contradiction."""
    source = resolve_resume_path(config.resume, config.output_dir) if config.resume not in (None, "auto") else None
    output_dir = Path(config.output_dir)
    same_folder = config.resume == "auto" or (source is not None and source.parent.resolve() == output_dir.resolve())
    if config.overwrite and config.resume and same_folder:
        raise UserError("--overwrite with --resume of the run in --output-dir: --resume continues that run, "
                        "--overwrite replaces it; pass one of them")
    if source is None or source.parent.resolve() == output_dir.resolve() or not holds_a_run(output_dir):
        return
    if not config.overwrite:
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


def refuse_changed_classes(config: TrainConfig, saved: Sequence[str],
                           found: Sequence[str] | None = None) -> None:
    """A run keeps the classes it started with: refuse to continue it when --data-dir's train/ has other classes
    (``found``; by default as :func:`class_folders_now` tells) than the run's (``saved``), naming those added and
    missing, before anything says it continues."""
    found = class_folders_now(config.data_dir, saved) if found is None else found
    if found is None or list(found) == list(saved):
        return
    added, missing = [name for name in found if name not in saved], [name for name in saved if name not in found]
    changes = "; ".join(f"{label}: {some_names(names)}" for label, names in (("new", added), ("missing", missing))
                        if names) or "in another order"
    if config.resume:
        where = f"--resume {config.resume}"
        fix = "start a new run with --overwrite in place of --resume, or with another --output-dir"
    else:
        where = f"--output-dir {config.output_dir}"
        fix = "start a new run there with --overwrite, or pass another --output-dir"
    raise UserError(f"{where}: {Path(config.data_dir) / 'train'} has other classes than the {len(saved)} the run "
                    f"learned ({changes}); a run keeps its classes: {fix}")


def describe_run(checkpoint: Checkpoint) -> str:
    """'epoch 7 of 50, best val accuracy 81.20% at epoch 6' for a last.pt."""
    progress, config = checkpoint.training_state.run_progress(), checkpoint.config
    best = describe_best(progress.best_val_acc, progress.best_epoch, config.get("monitor", "val_acc"),
                         progress.best_score)
    return f"epoch {progress.epoch} of {config.get('epochs', '?')}, {best}"


def clear_run_outputs(output_dir: Path, config_file: str | None) -> None:
    """Delete what an earlier run of train.py wrote into ``output_dir``, so none of it outlives it: its checkpoints,
    history, plots, skip list, the report's files, TensorBoard's event files, and a config.yaml that train.py wrote
    (never the ``--config`` file in use). Anything else in the folder is left alone."""
    removed = [name for name in RUN_OUTPUTS if _remove_file(output_dir / name)]
    if _is_written_config(output_dir / "config.yaml", config_file) and _remove_file(output_dir / "config.yaml"):
        removed.append("config.yaml")
    for folder, names in (("report", lambda path: path.name in REPORT_FILES),
                          ("tensorboard", lambda path: path.name.startswith("events.out.tfevents."))):
        found = (output_dir / folder).glob("*") if (output_dir / folder).is_dir() else []
        inside = [path for path in found if names(path)]
        if [path for path in inside if _remove_file(path)]:
            removed.append(f"{folder}/")
            with contextlib.suppress(OSError):
                (output_dir / folder).rmdir()  # only when nothing else is in it
    if removed:
        print(f"note: removed the earlier run's {', '.join(removed)} from {output_dir}")


def refuse_foreign_config(output_dir: Path) -> None:
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


def run_is_complete(config: TrainConfig, progress: Progress) -> bool:
    """True when the run has trained all --epochs, or early stopping has ended it."""
    early_stopped = bool(config.patience) and progress.epochs_without_improvement() >= config.patience
    return progress.epoch >= config.epochs or early_stopped


def say_complete(config: TrainConfig, progress: Progress) -> None:
    """Tell that the run is already complete, and how to train it further."""
    output_dir = Path(config.output_dir)
    trained = f"all {config.epochs} epochs trained" if config.epochs > 1 else "its 1 epoch trained"
    how = (trained if progress.epoch >= config.epochs
           else f"early stopping after epoch {progress.epoch} of {config.epochs}")
    longer = command_hint("train.py", ["--resume", str(output_dir / "last.pt"), "--epochs", str(config.epochs + 10)])
    print(f"the run in {output_dir} is complete ({how}; "
          f"{describe_best(progress.best_val_acc, progress.best_epoch, config.monitor, progress.best_score)}); "
          f"to train longer: {longer}"
          + (" (with a larger --patience)" if progress.epoch < config.epochs else ""))


def note_schedule_change(config: TrainConfig, checkpoint: Checkpoint, progress: Progress) -> None:
    """Say so when --epochs differs from the run's: the cosine schedule is re-stretched over the new count."""
    before = int(checkpoint.config.get("epochs", config.epochs))
    if before == config.epochs or progress.epoch >= config.epochs:
        return
    last_lr = learning_rate(config.lr, progress.epoch, before, config.warmup_epochs)
    next_lr = learning_rate(config.lr, progress.epoch + 1, config.epochs, config.warmup_epochs)
    print(f"note: --epochs {config.epochs} (the run had {before}): the cosine schedule is re-stretched over "
          f"{config.epochs} epochs, so the learning rate goes from {last_lr:.2e} at epoch {progress.epoch} to "
          f"{next_lr:.2e} at epoch {progress.epoch + 1}" + (" (it rises)" if next_lr > last_lr else ""))


def carry_over_best_checkpoint(resume_path: Path | None, output_dir: Path) -> None:
    """A run resumed into another --output-dir takes the best.pt beside its last.pt along (the report needs it)."""
    if resume_path is None:
        return
    source, target = resume_path.parent / "best.pt", output_dir / "best.pt"
    if source.is_file() and not target.exists():
        atomic_write_bytes(target, source.read_bytes())
