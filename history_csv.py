"""``history.csv``, the run's per-epoch history: written after each epoch and read back (report.md, ablate.py)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from utils import atomic_write_text

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "lr", "seconds")
EMA_FIELDS = ("ema_val_loss", "ema_val_acc", "ema_val_balanced_acc")  # in the history when --ema is on


def history_text(history: list[dict[str, float]]) -> str:
    """The per-epoch history as CSV text."""
    buffer = io.StringIO()
    fields = [*HISTORY_FIELDS, *(field for field in EMA_FIELDS if history and field in history[0])]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def write_history(history: list[dict[str, float]], path: Path) -> None:
    """Write the per-epoch history as CSV."""
    atomic_write_text(path, history_text(history))


def restore_history(history: list[dict[str, float]], path: Path) -> bool:
    """Complete ``path`` with ``history`` when the file is missing or holds only its first rows; True if written.
    last.pt is saved before history.csv, so a run killed between the two at its last epoch leaves the file an epoch
    behind, and no later epoch writes it again. A file that differs otherwise is left alone."""
    text = history_text(history)
    try:
        written = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        written = ""
    except (OSError, UnicodeDecodeError):
        return False
    if written == text or not text.startswith(written):
        return False
    atomic_write_text(path, text)
    return True


def read_history(path: str | Path | None) -> list[dict[str, float]]:
    """The rows of a ``history.csv`` as numbers; empty when there is none or it cannot be read."""
    if path is None or not Path(path).is_file():
        return []
    try:
        with Path(path).open(newline="", encoding="utf-8") as handle:
            return [{key: float(value) for key, value in row.items() if value not in ("", None)}
                    for row in csv.DictReader(handle)]
    except (OSError, ValueError):
        return []
