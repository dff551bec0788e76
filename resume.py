"""Surviving interruptions: the run state an exact resume needs, and stop requests (Ctrl-C, SIGTERM)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

import torch

from utils import capture_rng_state, restore_rng_state


@dataclass
class Progress:
    """Where a run stands after its last completed epoch: what a resume needs beyond the weights and optimizer."""

    epoch: int = 0
    best_val_acc: float = -1.0  # of the best epoch's chosen weights
    best_epoch: int = 0
    best_score: float = float("-inf")  # what --monitor follows, higher is better
    best_weights: str = "raw"  # which weights best.pt holds: "raw" or "ema" (the moving average)
    history: list[dict[str, float]] = field(default_factory=list)
    best_predictions: list[int] = field(default_factory=list)
    best_targets: list[int] = field(default_factory=list)

    def epochs_without_improvement(self) -> int:
        """Epochs since the best val accuracy (what early stopping counts)."""
        return self.epoch - self.best_epoch


@dataclass(frozen=True)
class TrainingState:
    """What last.pt holds beyond the weights for an exact resume, as tensors and plain values."""

    progress: dict[str, Any]  # Progress as plain values
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]
    ema_updates: int = 0  # --ema: the moving average's update count

    def run_progress(self) -> Progress:
        """Where the run stood: its :class:`Progress`."""
        progress = Progress(**self.progress)
        if "best_score" not in self.progress:  # a run from before --monitor followed its val accuracy
            progress.best_score = progress.best_val_acc
        return progress


def training_state(progress: Progress, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   ema_updates: int = 0) -> TrainingState:
    """Everything beyond the weights that an exact resume needs, as tensors and plain values."""
    return TrainingState(asdict(progress), optimizer.state_dict(), scaler.state_dict() if scaler is not None else None,
                         capture_rng_state(), ema_updates)


def restore_training_state(state: TrainingState, optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler | None) -> None:
    """Load the optimizer, scaler and RNG states into ``optimizer``, ``scaler`` and this process."""
    optimizer.load_state_dict(state.optimizer)
    if scaler is not None and state.scaler:
        scaler.load_state_dict(state.scaler)
    restore_rng_state(state.rng)


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a polite request to stop after the batch; a second one quits at
    once, in one line (``quit_note()``: what was kept and how to continue; None prints nothing), with exit code 130.

    Quitting unwinds like ``sys.exit`` (no traceback); a checkpoint being written then is left out whole, as its
    temporary file is removed and the last complete one stays. With ``exit_after_stop`` (the process is the script,
    which exits once stopped), a signal after the stop request was granted, while the process winds down, ends it at
    once rather than raising into the interpreter's exit ("Exception ignored in atexit callback").
    """

    def __init__(self, quit_note: Callable[[], str | None] = lambda: None, exit_after_stop: bool = False) -> None:
        self.requested = False
        self._quit_note = quit_note
        self._exit_after_stop = exit_after_stop
        self._quitting = False
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()  # forked DataLoader workers inherit the handler and must ignore the signal

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        winding_down = self.requested and self._exit_after_stop
        for signum, handler in self._previous.items():
            signal.signal(signum, self._exit_now if winding_down else handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return
        name = signal.Signals(signum).name
        if self.requested:
            self._quit(name)
        self.requested = True
        again = "press Ctrl-C again" if signum == signal.SIGINT else "a second SIGTERM or a Ctrl-C"
        print(f"\n{name}: stopping after this batch ({again} to quit at once)", file=sys.stderr, flush=True)

    def _quit(self, name: str) -> NoReturn:
        if not self._quitting:  # said once, however many signals follow
            self._quitting = True
            note = self._quit_note()
            if note is not None:
                print(f"\n{name} again: quitting at once; {note}", file=sys.stderr, flush=True)
        raise SystemExit(130)

    def _exit_now(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)

    def __call__(self) -> bool:
        return self.requested
