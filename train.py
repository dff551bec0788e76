"""Fine-tune an ImageNet-pretrained ResNet on an ImageFolder dataset.

    python train.py                                   # the reference recipe on data/
    python train.py --config configs/sample.yaml      # the bundled sample, on a CPU
    python train.py --trainable all --img-size 320    # a stronger recipe: one flag at a time

Writes into --output-dir: best.pt, last.pt, history.csv, loss_curve.png, accuracy_curve.png,
confusion_matrix.png, config.yaml, report/ and, for a new run, train_batch.png (its first batch as the model sees it).
best.pt gets a ``temperature`` at the end, fitted on the validation split (see calibration.py).

The story, top to bottom: ``main`` (options, and whether the folder holds this run to continue), ``set_up`` (data,
model, optimizer, batches), ``train_epochs`` (the epoch loop with early stopping), ``run_epoch`` (one epoch and its
validation), ``record_epoch`` (best.pt, last.pt, history) and ``finish`` (plots and the report).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import distributed
import engine
import image_grids
import lr_schedule
import options
import run_folder
from accel import Accel, configured, device_peak_memory_mb, host_peak_rss_mb, make_grad_scaler
from batch_iterables import skip_count
from calibration import (
    NOISY_ECE_BELOW,
    apply_temperature,
    expected_calibration_error,
    log_probabilities,
    supported_temperature,
)
from checkpoint import (
    Checkpoint,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    store_temperature,
)
from common import Batch, DecodeFailure, World
from dataset import TrainValData, describe_data, load_train_val
from engine import EvalResult, Predictions, StepOptions, WeightAverage, evaluate, train_one_epoch
from gpu_augment import BatchMix
from history_csv import restore_history, write_history
from losses import make_criterion
from model import describe_model, input_normalization, make_model, parameter_summary, thaw_blocks
from pipeline import Loaders, inference_batches, load_data
from plots import save_final_plots
from report import write_evaluation_report
from resume import Progress, StopRequest, restore_training_state, training_state
from run_config import TrainConfig
from samplers import epoch_seed
from tb_logger import TensorBoardLogger
from utils import UserError, describe_device, exit_on_user_error, format_count, launched_as_script, seed_everything


@exit_on_user_error
def main(argv: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Train with the given arguments (a list, or one string split as a shell would); returns a summary (best
    epoch, accuracy, output folder)."""
    distributed.silence_other_ranks()
    with distributed.errors_on_rank_0():
        config, resume = options.parse_args_and_resume(argv)
        continued_from = Path(config.output_dir) / "last.pt"  # what the same command continues, if anything
        if resume is not None:
            run_folder.refuse_changed_classes(config, resume.class_names)
            continued_from = options.resolve_resume_path(config.resume, config.output_dir)
            print(f"resuming from {continued_from}")
        run_folder.refuse_resume_into_other_run(config)
    same_command = False
    if resume is None:  # no --resume: the folder may hold this very command's run, to continue
        with distributed.errors_on_rank_0():
            resume = run_folder.run_to_continue(config)
            if resume is not None:
                run_folder.refuse_changed_classes(config, resume.class_names)
        same_command = resume is not None
    if resume is None:
        return train_and_finish(config, None, Progress())
    progress = resume.training_state.run_progress()
    run_folder.note_schedule_change(config, resume, progress)
    if run_folder.run_is_complete(config, progress):
        in_place = continued_from.resolve().parent == Path(config.output_dir).resolve()
        return finish_complete_run(config, resume, progress, in_place)
    if same_command:
        print(f"note: {config.output_dir} holds this run ({run_folder.describe_run(resume)}); continuing it "
              "(--overwrite starts over)")
    return train_and_finish(config, resume, progress)


def train_and_finish(config: TrainConfig, resume: Checkpoint | None, progress: Progress) -> dict[str, Any]:
    """Set the run up (as this process's part of the job under torchrun), train the epochs left, and write the final
    plots and report; returns the summary."""
    with distributed.joined_world(config.chosen.device.type) as world:
        run = set_up(config, resume, progress, world)
        with StopRequest(lambda: saved_state(run), exit_after_stop=launched_as_script("train.py")) as stop:
            try:
                stopped_epoch = train_epochs(run, progress, stop)
            except distributed.PeerStoppedError as error:  # another process stopped on request and left: so do we
                print(error, file=sys.stderr)
                raise SystemExit(130) from None
            if stop.requested:  # still within: a second Ctrl-C while this is said quits in one line, too
                distributed.announce_stop(world)  # first: a process still in a collective must not take it for a crash
                report_interruption(run, progress)
                raise SystemExit(130)
        if progress.epoch < config.epochs and stopped_epoch is None:
            print(f"stopped after epoch {progress.epoch} of {config.epochs} (--epochs-this-run); continue with: "
                  f"{run_folder.resume_hint(run.output_dir, run.world)}")
        return finish(run, progress, stopped_epoch)


def finish_complete_run(config: TrainConfig, resume: Checkpoint, progress: Progress,
                        in_place: bool) -> dict[str, Any]:
    """A complete run: its summary, after writing the plots and report only if they are missing (and, ``in_place``:
    continued from --output-dir's own last.pt, history.csv if it is behind)."""
    run_folder.say_complete(config, progress)
    output_dir = Path(config.output_dir)
    if in_place and distributed.is_first_process() and restore_history(progress.history, output_dir / "history.csv"):
        print(f"note: {output_dir / 'history.csv'} was behind last.pt (the run was stopped between writing the two); "
              "wrote it again")
    outputs = ["loss_curve.png"] if config.train_on_all else ["report/metrics.json", "confusion_matrix.png"]
    if all((output_dir / name).is_file() for name in outputs):
        return run_folder.run_summary(progress, output_dir)
    with distributed.joined_world(config.chosen.device.type) as world:
        run = set_up(config, resume, progress, world)
        return finish(run, progress, progress.epoch if progress.epoch < config.epochs else None)


# --------------------------------------------------------------------------- set-up


@dataclass
class Run:
    """The objects one training run works with."""

    config: TrainConfig
    accel: Accel
    data: TrainValData
    loaders: Loaders
    model: nn.Module
    step_model: nn.Module  # what training calls: the model under DDP and/or compiled
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


def set_up(config: TrainConfig, resume: Checkpoint | None, progress: Progress, world: World) -> Run:
    """Device, data, model, loss, optimizer and batches; restored from ``resume`` when given, which stood at
    ``progress``. Under torchrun every process sets up the same way; only rank 0 touches the output folder."""
    accel = configured(Accel(config.chosen.device, config.chosen.amp_dtype, config.channels_last))
    seed_everything(config.seed)  # the same on every process: the new head starts the same everywhere
    data = load_train_val(config.data_dir, config.val_fraction, config.seed, config.verify_images, config.workers,
                          config.max_image_pixels, held_out=resume.held_out_val_files if resume else None,
                          fold=options.parse_fold(config.fold) if config.fold else None,
                          train_on_all=config.train_on_all,
                          val_fraction_given=config.val_fraction_given)
    if resume is not None:  # a folder emptied since: the early check in main() only saw that it is there
        run_folder.refuse_changed_classes(config, resume.class_names, data.class_names)
    print(f"device: {describe_device(accel.device)}, precision {accel.precision_name}"  # what runs, once checked
          + (", channels_last" if accel.channels_last else ""))
    describe_data(data)
    model = make_model(config, len(data.class_names), accel, resume.model if resume is not None else None)
    groups = lr_schedule.parameter_groups(model, config.backbone_lr_mult)
    optimizer = engine.make_optimizer(groups, config.lr, config.weight_decay, accel.device, config.optimizer)
    scaler = make_grad_scaler(accel)
    thaw_schedule = config.thaw_schedule
    thawed = thaw_resumed_blocks(model, optimizer, thaw_schedule, progress.epoch, config.backbone_lr_mult)
    print(describe_model(model, config.arch, config.weights, config.trainable, thawed))
    if resume is not None:
        restore_training_state(resume.training_state, optimizer, scaler)
        processes_before = resume.runtime.get("processes", 1)
        distributed.note_process_count_change(processes_before, config.batch_size * config.accum_steps, world)
        best = run_folder.describe_best(progress.best_val_acc, progress.best_epoch, config.monitor, progress.best_score)
        print(f"resumed after epoch {progress.epoch} ({best})")
    runtime = options.runtime_record(config, accel, world)
    logger = None
    if world.is_main:
        config_text = options.config_yaml(config.saved_options(), runtime)
        logger = run_folder.prepare_output_dir(config, resume, data.skipped, config_text)
    ema = engine.make_ema(model, config.ema, resume.ema_model if resume else None,
                          resume.training_state.ema_updates if resume else 0)
    step_options = StepOptions(config.accum_steps, after_step=(lambda: ema.update(model)) if ema else None)
    if world.distributed:  # every process takes part in every step's collectives, whatever its batch held
        step_options.all_finite = lambda finite: distributed.all_ranks_true(finite, world)
        step_options.empty_images = lambda: engine.empty_input(config.img_size, accel)
    if config.sampler == "balanced" and config.class_weights == "balanced":
        print("note: --sampler balanced and --class-weights balanced both correct the imbalance; with the sampler, "
              "--class-weights none is the usual choice")
    distributed.describe_batch(config.batch_size, config.accum_steps, world)
    loaders = load_data(data, config, accel, *input_normalization(config.arch), world)
    if resume is None and world.is_main:  # a new run: train_batch.png shows its first batch
        loaders.train = FirstBatchPicture(loaders.train, lambda batch: write_batch_picture(batch, config, data))
    if ema is not None:
        steps_per_epoch = engine.optimizer_steps(len(loaders.train), config.accum_steps)
        engine.warn_short_average(config.ema, steps_per_epoch, config.epochs)
    step_model = distributed.model_for_training(model, world, config.sync_bn, config.compile)
    run = Run(config, accel, data, loaders, model, step_model, make_criterion(
        [label for _, label in data.train_samples], len(data.class_names), config.class_weights, config.label_smoothing,
        accel.device, world),
              optimizer, scaler, Path(config.output_dir), runtime, step_options, ema, logger, thaw_schedule, world)
    print(options.describe_config(config.saved_options(), run.output_dir))
    return run


class FirstBatchPicture:
    """The training batches, unchanged, handing the first one with images to ``draw`` as it goes by: no batch of
    its own is loaded, so the run's random streams and results are the same as without it."""

    def __init__(self, batches: Any, draw: Callable[[Batch], None]) -> None:
        self.batches, self.draw = batches, draw

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation to produce."""
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.batches:
            if self.draw is not None and batch.images is not None:
                draw, self.draw = self.draw, None
                draw(batch)
            yield batch


def write_batch_picture(batch: Batch, config: TrainConfig, data: TrainValData) -> None:
    """train_batch.png: the batch's images after augmentation, back in plain colours, under their class names."""
    shown = slice(0, image_grids.BATCH_PICTURE_LIMIT)
    pictures = image_grids.denormalize(batch.images[shown].detach().float().cpu().numpy(),
                                       *input_normalization(config.arch))
    image_grids.plot_training_batch(pictures, batch.targets[shown].tolist(), data.class_names,
                                    Path(config.output_dir) / "train_batch.png", len(batch.images))


def thaw_resumed_blocks(model: nn.Module, optimizer: torch.optim.Optimizer, thaw_schedule: dict[int, list[str]],
                        done: int, lr_mult: float) -> list[str]:
    """Thaw the blocks a resumed run had thawed by its last epoch ``done`` (--unfreeze-at), so the model and the
    optimizer's groups are as saved; returns those blocks (none for a new run: ``done`` 0)."""
    thawed = []
    for epoch in sorted(epoch for epoch in thaw_schedule if epoch <= done):
        lr_schedule.add_group(optimizer, thaw_blocks(model, thaw_schedule[epoch]), lr_mult)
        thawed += thaw_schedule[epoch]
    return thawed


# --------------------------------------------------------------------------- the epoch loop


def train_epochs(run: Run, progress: Progress, stop: StopRequest) -> int | None:
    """The epoch loop, with early stopping; returns the epoch where early stopping fired, if it did."""
    config = run.config
    last_epoch = config.epochs if config.epochs_this_run is None else min(config.epochs,
                                                                      progress.epoch + config.epochs_this_run)
    for epoch in range(progress.epoch + 1, last_epoch + 1):
        try:
            outcome = run_epoch(run, epoch, stop)
        except engine.NonFiniteLossError as error:
            kept = (f"{run.output_dir / 'last.pt'} keeps epoch {progress.epoch}, the last good one" if progress.epoch
                    else "no epoch had finished, so nothing was saved")
            amp_hint = " (or --amp off)" if run.accel.amp_dtype is not None else ""
            raise UserError(f"training diverged in epoch {epoch}: {error}; {kept}; try a lower --lr{amp_hint}"
                            ) from None
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"out of GPU memory at --batch-size {config.batch_size} in epoch {epoch}; try "
                            f"--batch-size {max(1, config.batch_size // 2)} (or a smaller --img-size)") from None
        if outcome is None:
            return None
        is_best = record_epoch(run, progress, outcome)
        print(epoch_line(outcome.row, config.epochs, is_best, outcome.images_per_second, run.accel.device,
                         outcome.skipped), flush=True)
        if run.logger is not None:
            run.logger.log_epoch(epoch, outcome.row, outcome.images_per_second)
        if distributed.stop_agreed(stop, run.world):
            return None
        patience_over = bool(config.patience) and progress.epochs_without_improvement() >= config.patience
        if distributed.broadcast_flag(patience_over and epoch < config.epochs, run.world):  # rank 0 decides for all
            print(f"early stop: no better {config.monitor} for {config.patience} epochs")
            return epoch
    return None


@dataclass
class EpochOutcome:
    """One finished epoch: its history row, the validation of the raw weights and of their moving average (when
    --ema), and the training images/s."""

    row: dict[str, float]
    raw: EvalResult | None  # None with --train-on-all: nothing validates
    ema: EvalResult | None
    images_per_second: float
    skipped: int = 0  # training images left out this epoch (unreadable), by every process


def run_epoch(run: Run, epoch: int, stop: StopRequest) -> EpochOutcome | None:
    """Train and validate one epoch; None when a stop request cut it short."""
    config = run.config
    if epoch in run.thaw_schedule:
        thaw_at_epoch(run, epoch)
    lr = lr_schedule.learning_rate(config.lr, epoch, config.epochs, config.warmup_epochs)
    lr_schedule.set_learning_rate(run.optimizer, lr)
    run.loaders.train.set_epoch(epoch)
    if run.world.distributed:  # each process its own dropout masks, drawn again the same way after a resume
        torch.manual_seed((epoch_seed(config.seed, epoch) + run.world.rank) % 2**63)
    if config.mixup or config.cutmix:
        run.step_options.mix = BatchMix(config.mixup, config.cutmix, epoch_seed(config.seed, epoch))
    with distributed.peer_failures(run.world, f"epoch {epoch}"):
        trained = train_one_epoch(run.step_model, run.loaders.train, run.criterion, run.optimizer, run.accel,
                                  run.scaler,
                                  description=distributed.bar_label(f"epoch {epoch}/{config.epochs}", run.world),
                                  show_progress=not config.no_progress and run.world.is_main,
                                  should_stop=distributed.stop_check(stop, run.world), options=run.step_options)
    trained = distributed.all_reduce_epoch(trained, run.world)
    skipped = record_skipped(run, trained.failed)
    if trained.interrupted:
        return None
    row = {"epoch": epoch, "train_loss": trained.loss, "train_acc": trained.accuracy, "val_loss": None,
           "val_acc": None, "val_balanced_acc": None, "lr": lr}
    images_per_second = trained.images / max(trained.seconds, 1e-9)
    if run.loaders.val is None:  # --train-on-all
        return EpochOutcome({**row, "seconds": trained.seconds}, None, None, images_per_second, skipped)
    raw = validate(run, run.step_model, "val")
    record_skipped(run, raw.failed)  # the EMA's pass meets the same files
    num_classes = len(run.data.class_names)
    row.update(val_loss=raw.loss, val_acc=raw.accuracy, val_balanced_acc=engine.balanced_accuracy(raw, num_classes))
    averaged = None
    if run.ema is not None:
        averaged = validate(run, run.ema.module, "val (ema)")
        row.update(ema_val_loss=averaged.loss, ema_val_acc=averaged.accuracy,
                   ema_val_balanced_acc=engine.balanced_accuracy(averaged, num_classes))
    row["seconds"] = trained.seconds + raw.seconds + (averaged.seconds if averaged else 0.0)
    return EpochOutcome(row, raw, averaged, images_per_second, skipped)


def thaw_at_epoch(run: Run, epoch: int) -> None:
    """--unfreeze-at: the blocks due at ``epoch`` start training (under torchrun, in a new DDP wrapper)."""
    lr_schedule.add_group(run.optimizer, thaw_blocks(run.model, run.thaw_schedule[epoch]), run.config.backbone_lr_mult)
    if run.world.distributed:  # DDP fixes the parameters it reduces when it is built
        run.step_model = distributed.rewrap_model(run.step_model, run.model, run.world, run.config.sync_bn,
                                                  run.config.compile)
    trainable, total = parameter_summary(run.model)
    print(f"epoch {epoch}: {','.join(run.thaw_schedule[epoch])} start(s) training (--unfreeze-at); now "
          f"{format_count(trainable)} of {format_count(total)} parameters")


def validate(run: Run, model: nn.Module, description: str) -> EvalResult:
    """``model`` on the validation images: this process's part, then every process's results put together."""
    distributed.sync_buffers(model, run.world)  # BatchNorm statistics as rank 0's, so every part is judged by one model
    with distributed.peer_failures(run.world, description):
        evaluated = evaluate(model, run.loaders.val, run.criterion, run.accel,
                             description=distributed.bar_label(description, run.world),
                             show_progress=not run.config.no_progress and run.world.is_main)
    return distributed.all_reduce_eval(evaluated, run.world)


def record_skipped(run: Run, failed: Sequence[DecodeFailure]) -> int:
    """Add the images that any process failed to decode (``failed``: this process's) to the run's skip list and to
    skipped_files.txt; returns how many files the processes failed on in this pass."""
    failed = [failure for part in distributed.gather_objects(list(failed), run.world) for failure in part]
    known = {path for path, _ in run.data.skipped}
    new = list({failure.path: (failure.path, failure.reason) for failure in failed
                if failure.path not in known}.values())
    if new:
        run.data.skipped.extend(new)
        if run.world.is_main:
            run_folder.write_skipped(run.data.skipped, run.output_dir)
    return skip_count(failed)


def epoch_line(row: dict[str, float], epochs: int, is_best: bool, images_per_second: float,
               device: torch.device, skipped: int = 0) -> str:
    """One summary line per epoch: metrics, learning rate, time, training throughput, peak memory and the training
    images left out (listed in skipped_files.txt; their warning is printed once a run)."""
    gpu_mb = device_peak_memory_mb(device)
    memory = f"host {host_peak_rss_mb():.0f} MiB" + (f", gpu {gpu_mb:.0f} MiB" if gpu_mb is not None else "")
    averaged = f" (ema {row['ema_val_acc']:.2%})" if "ema_val_acc" in row else ""
    val = "no val" if row["val_acc"] is None else f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}{averaged}"
    return (f"epoch {int(row['epoch']):>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}  "
            f"{val}  lr {row['lr']:.2e}  {row['seconds']:.1f}s  {images_per_second:.0f} img/s  peak {memory}"
            + (f"  {skipped} skipped" if skipped else "") + ("  * best" if is_best else ""))


# --------------------------------------------------------------------------- best model and checkpoints


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
        save_checkpoint(replace(epoch_checkpoint(run, model, outcome.row), weights=weights), run.output_dir / "best.pt")
    ema_model = None if run.ema is None else {key: value.detach().cpu()
                                              for key, value in run.ema.module.state_dict().items()}
    state = training_state(progress, run.optimizer, run.scaler, run.ema.updates if run.ema is not None else 0)
    last = replace(epoch_checkpoint(run, run.model, outcome.row), training_state=state, ema_model=ema_model)
    save_checkpoint(last, run.output_dir / "last.pt")
    write_history(progress.history, run.output_dir / "history.csv")
    return is_best


def choose_best(run: Run, progress: Progress, outcome: EpochOutcome) -> tuple[str, nn.Module, bool]:
    """The better, by --monitor, of the epoch's raw weights and their moving average: (which, model, whether it
    beats the best so far, in which case ``progress`` records it)."""
    num_classes = len(run.data.class_names)
    candidates = [("raw", run.model, outcome.raw)] + ([("ema", run.ema.module, outcome.ema)] if outcome.ema else [])
    def score_of(evaluated: EvalResult) -> float:
        return engine.monitored(evaluated, run.config.monitor, num_classes)

    weights, model, evaluated = max(candidates, key=lambda item: score_of(item[2]))
    score = score_of(evaluated)
    is_best = score > progress.best_score
    if is_best:
        progress.best_score, progress.best_epoch, progress.best_weights = score, progress.epoch, weights
        progress.best_val_acc = evaluated.accuracy
        progress.best_predictions = evaluated.predictions.tolist()
        progress.best_targets = evaluated.targets.tolist()
    return weights, model, is_best


def epoch_checkpoint(run: Run, model: nn.Module, row: dict[str, float]) -> Checkpoint:
    """The checkpoint of ``model`` after the epoch of ``row``."""
    epoch_metrics = {key: value for key, value in row.items() if key != "epoch" and value is not None}
    mean, std = input_normalization(run.config.arch)
    return make_checkpoint(model, run.data.class_names, run.config.saved_options(), int(row["epoch"]), epoch_metrics,
                           mean, std,
                           held_out=run.data.held_out, runtime=run.runtime)


# --------------------------------------------------------------------------- finish


def finish(run: Run, progress: Progress, stopped_epoch: int | None) -> dict[str, Any]:
    """Plots of the whole run, the report of best.pt and a closing line (rank 0); returns the run's summary."""
    if not run.world.is_main:
        return run_folder.run_summary(progress, run.output_dir)
    save_final_plots(progress, stopped_epoch, run.data.class_names, run.output_dir)
    if run.loaders.val is None:
        print("note: --train-on-all: no validation split, so no confusion matrix or report/")
        keep_uncalibrated(run)
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
    best = run_folder.describe_best(progress.best_val_acc, progress.best_epoch, run.config.monitor, progress.best_score)
    written = "confusion_matrix.png, config.yaml, report/" if run.loaders.val is not None else "config.yaml"
    picture = "train_batch.png, " if (run.output_dir / "train_batch.png").is_file() else ""
    print(f"{best}; wrote {run.output_dir}/best.pt, last.pt, history.csv, {picture}loss_curve.png, accuracy_curve.png, "
          + written)
    return run_folder.run_summary(progress, run.output_dir)


def write_best_report(run: Run) -> None:
    """The evaluation report (metrics, per-class table, pictures) of best.pt on the validation split."""
    checkpoint = load_checkpoint(run.output_dir / "best.pt")
    model = run.accel.prepare_model(model_from_checkpoint(checkpoint))
    samples, config = run.data.val_samples, run.config
    batches = inference_batches([path for path, _ in samples], *checkpoint.preprocessing, run.accel,
                                config.chosen.eval_path == "gpu", config.batch_size, config.workers,
                                config.max_image_pixels)  # the path validation took
    predictions = engine.predict_samples(model, batches, samples, run.accel, show_progress=not config.no_progress)
    checkpoint = calibrate_best(run, checkpoint, predictions)
    write_evaluation_report(predictions, checkpoint, run.output_dir / "report", source=run.data.val_source,
                            history_path=run.output_dir / "history.csv", checkpoint_path=run.output_dir / "best.pt")


def calibrate_best(run: Run, checkpoint: Checkpoint, predictions: Predictions) -> Checkpoint:
    """Fit best.pt's temperature on its validation predictions, store it in best.pt and say what it does to the
    expected calibration error; returns the checkpoint as stored."""
    path = run.output_dir / "best.pt"
    if not predictions.paths:  # no val image could be decoded: the report says so
        return store_temperature(checkpoint, path, 1.0)
    temperature = supported_temperature(log_probabilities(predictions.probabilities), predictions.targets)
    images = len(predictions.targets)
    if temperature is None:  # e.g. every val image right: sharpening without end would only look better
        print(f"note: no temperature fits the {images} val images (every one right, or none): {path} keeps "
              "temperature 1.0 (uncalibrated)")
        return store_temperature(checkpoint, path, 1.0)
    before = expected_calibration_error(predictions.probabilities, predictions.targets)
    after = expected_calibration_error(apply_temperature(predictions.probabilities, temperature), predictions.targets)
    noisy = f" (noisy on {images} images)" if images < NOISY_ECE_BELOW else ""
    print(f"calibration: temperature {temperature:.3f} fitted on {images} val images and stored in best.pt; expected "
          f"calibration error {before:.2%} -> {after:.2%}{noisy}")
    return store_temperature(checkpoint, path, temperature)


def keep_uncalibrated(run: Run) -> None:
    """No validation split (--train-on-all): best.pt gets temperature 1.0, and a line says why."""
    path = run.output_dir / "best.pt"
    if path.is_file():
        store_temperature(load_checkpoint(path), path, 1.0)
        print(f"note: no validation split to fit a temperature on, so {path} has temperature 1.0 (uncalibrated)")


def saved_state(run: Run) -> str | None:
    """What a run that quits at once (a second Ctrl-C) keeps, and how to continue it (rank 0; None elsewhere)."""
    if not run.world.is_main:
        return None
    last = run.output_dir / "last.pt"
    if not last.is_file():
        return "no epoch had finished, so nothing was saved"
    return f"{last} holds the last finished epoch; continue with: {run_folder.resume_hint(run.output_dir, run.world)}"


def report_interruption(run: Run, progress: Progress) -> None:
    """Say what an interrupted run kept and how to continue it (rank 0)."""
    if not run.world.is_main:
        return
    if progress.epoch == 0:
        print("interrupted before the first epoch finished; nothing was saved", file=sys.stderr)
    else:
        print(f"interrupted: {run.output_dir / 'last.pt'} holds epoch {progress.epoch}; continue with: "
              f"{run_folder.resume_hint(run.output_dir, run.world)}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
