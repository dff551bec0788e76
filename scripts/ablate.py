"""Compare training recipes on one dataset: each recipe is one train.py run; the results land in one table.

    python scripts/ablate.py configs/sample.yaml "configs/sample.yaml --trainable layer4,fc" \\
        "configs/sample.yaml --img-size 48" --output-dir runs/ablation

A recipe is one argument (quote it): a YAML config file, optionally followed by train.py flags, or flags alone
(train.py's defaults then apply). ``name=LABEL`` as its first word names it; otherwise its name is the config's
stem followed by its flags (``sample --img-size 48``). A recipe that is a single flag without a value goes after
``--`` (``-- --compile``) or gets a name (``"name=compiled --compile"``).

Each recipe runs as
``python train.py [--config FILE] [--data-dir D] [--epochs N] [--seed S] [EXTRA...] FLAGS --output-dir
OUTPUT/SLUG --no-progress``, where SLUG is the name in lowercase letters, digits, dots and dashes
(``sample-img-size-48``). Past 60 characters it keeps the config's stem and as many whole flags with their values
as fit, the last ones first (``reference--label-smoothing-0.1-batch-size-64``, ``--`` where flags are left out),
and ends in a short hash of the full name, as does a name whose SLUG an earlier recipe (or ``logs``) took: every
folder says what its recipe is and stays the same each time. Flags given to this script apply to every run, and a
recipe's own flags win over them. train.py's console output goes to ``OUTPUT/logs/SLUG.log`` (follow it with
``tail -f``). Then this script writes:

- ``OUTPUT/ablation.md``: the machine, date, dataset and exact commands, and one table row per recipe: best
  val accuracy (history.csv), balanced accuracy and macro-F1 of best.pt on val (report/metrics.json), the best
  epoch and the epochs run, wall time, and the trained and total parameter counts (every ``nn.Parameter`` of
  the model rebuilt from best.pt, as train.py counts them: frozen ones included, BatchNorm running statistics
  and counters excluded);
- ``OUTPUT/ablation.csv``: the same at full precision, with each run's status, folder and command;
- ``OUTPUT/ablation.png``: val accuracy and balanced accuracy of each recipe as horizontal bars.

Running the same command again reuses each complete run (train.py returns a complete run's summary without
training when its own command runs again into its folder); its wall time is the one recorded when it trained.
``--fresh`` retrains every recipe (train.py ``--overwrite``). A failed run gets a row with train.py's last
error line and the others go on; the exit code is then 1 (130 after Ctrl-C, which lets the current run save
its last.pt and skips the rest). Mistakes in the command itself (a missing config file, no recipes, an output
folder that cannot be written) end with one ``error:`` line and exit code 2 before anything trains.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint
from history_csv import read_history
from model import parameter_summary
from utils import (
    UserError,
    argument_list,
    atomic_write_bytes,
    atomic_write_text,
    cpu_model,
    csv_text,
    exit_on_user_error,
    format_count,
    load_yaml_config,
)

TRAIN_SCRIPT = ROOT / "train.py"
LOGS_FOLDER = "logs"
NAME_PREFIX = "name="
# Flags this script sets for every run itself; a recipe or --extra giving them would fight it.
OWNED_FLAGS = {
    "--output-dir": "the script gives each run OUTPUT/SLUG",
    "--overwrite": "use the script's --fresh",
    "--resume": "running the same command again continues a run",
    "--config": "give the config file as the recipe's first word",
}
MAX_SLUG_CHARS = 60
SLUG_HASH_CHARS = 6  # hex digits of the name's hash that end a shortened or shared folder name
LABEL_WRAP_CHARS = 36  # chart labels wrap here, so long recipe names stay readable
INTERRUPTED = 130
VAL_COLOR = "tab:blue"
BALANCED_COLOR = "tab:orange"
CSV_HEADER = ("recipe", "status", "val_acc", "best_epoch", "epochs_run", "accuracy", "balanced_accuracy", "macro_f1",
              "wall_seconds", "trainable_params", "total_params", "run_dir", "command", "error")


@dataclass(frozen=True)
class Recipe:
    """One line of the comparison: a name, an optional config file, train.py flags, and its run folder's name."""

    text: str  # as given on the command line
    name: str
    config: str | None
    flags: tuple[str, ...]
    slug: str = ""


@dataclass
class Result:
    """What one recipe's run gave. ``status`` is trained, reused, failed, interrupted or not run."""

    recipe: Recipe
    run_dir: Path
    command: list[str]
    status: str = "not run"
    error: str = ""
    wall_seconds: float | None = None
    val_acc: float | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    report: dict[str, Any] = field(default_factory=dict)  # report/metrics.json of best.pt on val
    trainable_params: int | None = None
    total_params: int | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the run's config.yaml (effective options)

    @property
    def succeeded(self) -> bool:
        """True when the run finished (trained now, or complete from an earlier call)."""
        return self.status in ("trained", "reused")


# --------------------------------------------------------------------------- recipes


def parse_recipe(text: str) -> Recipe:
    """A recipe argument (``[name=LABEL] [CONFIG] [FLAGS...]``) as a :class:`Recipe` without its slug."""
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise UserError(f"recipe {text!r}: {error}") from None
    label = None
    if words and words[0].startswith(NAME_PREFIX):
        label = words.pop(0)[len(NAME_PREFIX):].strip()
        if not label:
            raise UserError(f"recipe {text!r}: empty name=; write name=LABEL")
    if not words:
        raise UserError(f"recipe {text!r} is empty: give a config file, train.py flags, or both")
    config, flags = (words[0], words[1:]) if not words[0].startswith("-") else (None, words)
    refuse_owned_flags(flags, f"recipe {text!r}")
    if config is not None:
        check_config(config, text)
    return Recipe(text, label or default_name(config, flags), config, tuple(flags))


def default_name(config: str | None, flags: Sequence[str]) -> str:
    """The config file's stem followed by the flags, e.g. ``sample --img-size 48``."""
    return " ".join(([Path(config).stem] if config else []) + ([shlex.join(flags)] if flags else []))


def check_config(config: str, recipe_text: str) -> None:
    """Refuse a config file that is missing or not valid YAML, naming the recipe (train.py would refuse it later)."""
    try:
        load_yaml_config(config)
    except UserError as error:
        raise UserError(f"recipe {recipe_text!r}: {error}") from None


def refuse_owned_flags(flags: Sequence[str], where: str) -> None:
    """Refuse the flags this script sets itself, saying what to do instead."""
    for flag in flags:
        name = flag.split("=", 1)[0]
        if name in OWNED_FLAGS:
            raise UserError(f"{where}: {name} is not allowed here ({OWNED_FLAGS[name]})")


def slug_words(text: str) -> str:
    """``text`` in lowercase letters, digits and dots, other runs of characters as ``-``, without end dashes."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")


def name_hash(name: str) -> str:
    """A short, stable hash of a recipe name: it tells apart folders whose readable part is the same."""
    return hashlib.sha1(name.encode("utf-8")).hexdigest()[:SLUG_HASH_CHARS]


def flag_groups(flags: Sequence[str]) -> list[str]:
    """Each flag with the values after it, as one string: ``["--trainable layer4,fc", "--lr=1e-3"]``."""
    groups: list[str] = []
    for word in flags:
        starts_flag = word.startswith("-") and not re.fullmatch(r"-[0-9.]+(e-?[0-9]+)?", word)  # not "-1", "-0.5"
        if starts_flag or not groups:
            groups.append(word)
        else:
            groups[-1] += f" {word}"
    return groups


def name_parts(recipe: Recipe) -> list[str]:
    """The pieces a folder name keeps whole: the config's stem and each flag with its values, or the label."""
    if recipe.name != default_name(recipe.config, recipe.flags):
        return [recipe.name]
    return ([Path(recipe.config).stem] if recipe.config else []) + flag_groups(recipe.flags)


def cut_slug(parts: Sequence[str], room: int) -> str:
    """The slug of ``parts`` in at most ``room`` characters, whole parts only: all when they fit, else the first,
    as many of the last as fit (ablation recipes tend to differ in the flags added last) and then more from the
    front, with ``--`` where parts are left out. A first part too long alone is cut at its last dash that fits."""
    words = [word for word in (slug_words(part) for part in parts) if word]
    if len("-".join(words)) <= room:
        return "-".join(words)
    if len(words[0]) > room:
        cut = words[0][:room + 1]
        return (cut.rsplit("-", 1)[0] if "-" in cut else cut[:room]).rstrip("-.")
    head, tail, rest = words[:1], [], words[1:]
    while rest and len("-".join(head) + "--" + "-".join([rest[-1], *tail])) <= room:
        tail.insert(0, rest.pop())
    while rest and len("-".join([*head, rest[0]]) + "--" + "-".join(tail)) <= room:
        head.append(rest.pop(0))
    return "--".join(filter(None, ["-".join(head), "-".join(tail)]))


def slug_of(recipe: Recipe, shared: bool = False) -> str:
    """The run folder name of ``recipe``: its name as :func:`slug_words`; when that is over ``MAX_SLUG_CHARS``
    characters, or ``shared`` (another recipe's is the same), its whole parts that fit (:func:`cut_slug`) and a
    hash of its name.

    It depends on the recipe alone (and on ``shared``), so the same recipe always runs in the same folder.
    """
    slug = slug_words(recipe.name) or "run"
    if len(slug) <= MAX_SLUG_CHARS and not shared:
        return slug
    readable = cut_slug(name_parts(recipe), MAX_SLUG_CHARS - SLUG_HASH_CHARS - 1)
    return f"{readable}-{name_hash(recipe.name)}" if readable else name_hash(recipe.name)


def parse_recipes(texts: Sequence[str]) -> list[Recipe]:
    """Every recipe with a unique name and a unique run folder (a hash of the name appended where slugs collide)."""
    if not texts:
        raise UserError("no recipes: give at least one config file or flag set, e.g. "
                        "python scripts/ablate.py configs/sample.yaml \"configs/sample.yaml --img-size 48\"")
    recipes, taken = [], {LOGS_FOLDER}
    for text in texts:
        recipe = parse_recipe(text)
        if any(other.name == recipe.name for other in recipes):
            raise UserError(f"recipe {recipe.name!r} is given twice; give one of them another name with name=LABEL")
        slug = slug_of(recipe)
        if slug in taken:
            slug = slug_of(recipe, shared=True)
        taken.add(slug)
        recipes.append(Recipe(recipe.text, recipe.name, recipe.config, recipe.flags, slug))
    return recipes


# --------------------------------------------------------------------------- running


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` and its logs folder, or refuse with one line when that or writing there fails."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir}: is a file; pass a folder")
    try:
        (output_dir / LOGS_FOLDER).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise UserError(f"--output-dir {output_dir}: cannot write there ({error.strerror or error}); "
                        "pass another folder") from None


def train_command(recipe: Recipe, options: argparse.Namespace, run_dir: Path) -> list[str]:
    """The train.py command of one recipe: shared options first, so that the recipe's own flags win."""
    command = [sys.executable, str(TRAIN_SCRIPT)]
    if recipe.config:
        command += ["--config", recipe.config]
    for flag, value in (("--data-dir", options.data_dir), ("--epochs", options.epochs), ("--seed", options.seed)):
        if value is not None:
            command += [flag, str(value)]
    command += [*options.extra_flags, *recipe.flags, "--output-dir", str(run_dir), "--no-progress"]
    return command + (["--overwrite"] if options.fresh else [])


def shown_path(path: Path) -> str:
    """``path`` relative to the working folder when it lies inside it, else absolute."""
    path = path.resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def display_command(command: Sequence[str]) -> str:
    """A command as a user would type it: ``python train.py ...`` (the interpreter as ``python``)."""
    return shlex.join(["python", shown_path(Path(command[1])), *command[2:]])


def run_logged(command: Sequence[str], log_path: Path) -> tuple[int, float]:
    """Run ``command`` with its output going to ``log_path``; returns its exit code and wall seconds.

    On Ctrl-C train.py (which gets the signal too) finishes its batch, keeps its last.pt and exits with 130;
    this waits for that instead of killing it. A second Ctrl-C stops waiting.
    """
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            returncode = process.wait()
        except KeyboardInterrupt:
            print("interrupted: waiting for train.py to keep its last.pt (Ctrl-C again to stop waiting)", flush=True)
            process.wait()
            returncode = INTERRUPTED
    return returncode, time.perf_counter() - start


def last_error_line(log_text: str) -> str:
    """The line that says why a run failed: its last ``error:`` line, else its last line (a traceback's end)."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def failure_reason(returncode: int, log_path: Path, run_dir: Path) -> str:
    """Why a run did not finish, from its log, with what to do about it where this script can help."""
    if returncode == INTERRUPTED:
        return "stopped (Ctrl-C or SIGTERM) with its last.pt kept; running the same command again continues it"
    error = last_error_line(log_path.read_text(encoding="utf-8", errors="replace"))
    if "--overwrite" in error:  # train.py refused a folder that holds a run of other options
        error += f" (here: --fresh retrains every recipe, or delete {run_dir})"
    return error


def file_digest(path: Path) -> str | None:
    """SHA-256 of a file's bytes, or None when it does not exist."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def recorded_wall_seconds(record_path: Path, history_digest: str | None) -> float | None:
    """The wall time recorded when this very history.csv was trained, or None when there is no such record."""
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("wall_seconds") if record.get("history_sha256") == history_digest else None


def write_record(record_path: Path, history_digest: str | None, wall_seconds: float, command: str) -> None:
    """Keep a trained run's wall time beside its log, tied to its history.csv, for a later call that reuses it."""
    record = {"history_sha256": history_digest, "wall_seconds": wall_seconds, "command": command}
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")


def run_recipe(recipe: Recipe, options: argparse.Namespace, output_dir: Path) -> Result:
    """Train one recipe (or reuse its complete run) and read what it gave."""
    run_dir = output_dir / recipe.slug
    result = Result(recipe, run_dir, train_command(recipe, options, run_dir))
    log_path = output_dir / LOGS_FOLDER / f"{recipe.slug}.log"
    record_path = log_path.with_suffix(".json")
    history_before = file_digest(run_dir / "history.csv")
    returncode, seconds = run_logged(result.command, log_path)
    if returncode != 0:
        result.status, result.wall_seconds = "interrupted" if returncode == INTERRUPTED else "failed", seconds
        result.error = failure_reason(returncode, log_path, run_dir)
        return result
    history_after = file_digest(run_dir / "history.csv")
    if not options.fresh and history_after is not None and history_after == history_before:
        result.status, result.wall_seconds = "reused", recorded_wall_seconds(record_path, history_after)
    else:
        result.status, result.wall_seconds = "trained", seconds
        write_record(record_path, history_after, seconds, display_command(result.command))
    read_run(result)
    return result


# --------------------------------------------------------------------------- reading a run


def best_of_history(rows: Sequence[dict[str, Any]], best: Checkpoint | None) -> tuple[float | None, int, int]:
    """(val accuracy of best.pt's epoch and weights, that epoch, epochs run). best.pt is the epoch --monitor chose
    (with --ema, the averaged weights when they won: their accuracy then); without it, the epoch of the highest val
    accuracy. A run that validated nothing (--train-on-all) has no accuracy."""
    epochs_run = int(rows[-1]["epoch"])
    if best is not None and best.epoch:
        row = next((row for row in rows if int(row["epoch"]) == best.epoch), {})
        accuracy = row.get("ema_val_acc" if best.weights == "ema" else "val_acc")
        return (None if accuracy in (None, "") else float(accuracy)), best.epoch, epochs_run
    if not any(row.get("val_acc") not in (None, "") for row in rows):
        return None, epochs_run, epochs_run
    accuracies = [float(row["val_acc"]) for row in rows]
    index = int(np.argmax(accuracies))
    return accuracies[index], int(rows[index]["epoch"]), epochs_run


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, or an empty dict when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def read_run_config(path: Path) -> dict[str, Any]:
    """The effective options a run wrote to its config.yaml, or an empty dict."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def read_best_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The run's best.pt (else last.pt), or None when neither can be read."""
    for name in ("best.pt", "last.pt"):
        if (run_dir / name).is_file():
            try:
                return load_checkpoint(run_dir / name)
            except UserError:
                return None
    return None


def count_parameters(checkpoint: Checkpoint | None) -> tuple[int, int] | None:
    """(trainable, total) ``nn.Parameter`` counts of the checkpoint's model, as train.py prints them.

    The model is rebuilt from the checkpoint with its frozen blocks, so frozen weights count in the total and
    not as trainable; BatchNorm running statistics and counters are buffers, not parameters.
    """
    if checkpoint is None:
        return None
    try:
        return parameter_summary(model_from_checkpoint(checkpoint))
    except (UserError, KeyError, RuntimeError):
        return None


def read_run(result: Result) -> None:
    """Fill ``result`` with what the finished run wrote: history, report metrics, parameters, config."""
    rows = read_history(result.run_dir / "history.csv")
    best = read_best_checkpoint(result.run_dir)
    if rows:
        result.val_acc, result.best_epoch, result.epochs_run = best_of_history(rows, best)
    result.report = read_json(result.run_dir / "report" / "metrics.json")
    result.trainable_params, result.total_params = count_parameters(best) or (None, None)
    result.config = read_run_config(result.run_dir / "config.yaml")


# --------------------------------------------------------------------------- tables


def format_percent(value: float | None) -> str:
    """``0.7333`` -> ``73.3%``; ``-`` for no value."""
    return "-" if value is None else f"{value:.1%}"


def format_seconds(seconds: float | None) -> str:
    """``45 s``, ``12.5 min`` or ``2.3 h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 600:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3 * 3600 else f"{seconds / 3600:.1f} h"


def format_parameters(result: Result) -> str:
    """``11.2M / 11.2M``: trained of total parameters."""
    if result.total_params is None:
        return "-"
    return f"{format_count(result.trainable_params)} / {format_count(result.total_params)}"


def table_row(result: Result) -> list[str]:
    """One Markdown table row's cells."""
    name = f"`{result.recipe.name}`".replace("|", "\\|")
    if not result.succeeded:
        return [name, f"**{result.status}**", "-", "-", "-", "-", format_seconds(result.wall_seconds), "-"]
    macro_f1 = result.report.get("macro_f1")
    return [name, format_percent(result.val_acc), format_percent(result.report.get("balanced_accuracy")),
            "-" if macro_f1 is None else f"{macro_f1:.3f}", str(result.best_epoch or "-"),
            str(result.epochs_run or "-"), format_seconds(result.wall_seconds), format_parameters(result)]


def markdown_table(results: Sequence[Result]) -> str:
    """The comparison as a Markdown table, one row per recipe in the order given."""
    header = ["recipe", "val acc", "balanced acc", "macro-F1", "best epoch", "epochs", "wall time",
              "params trained / total"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(table_row(result)) + " |" for result in results]
    return "\n".join(lines)


def table_notes(results: Sequence[Result]) -> list[str]:
    """What the columns mean, and which runs failed or were reused."""
    notes = ["val acc: the validation accuracy of best.pt, the epoch --monitor chose (history.csv; with --ema, of "
             "the weights best.pt holds); balanced acc and macro-F1: best.pt "
             "on val (report/metrics.json); best epoch / epochs: the epoch of best.pt / epochs run (early stopping "
             "may end a run before --epochs); wall time: the whole train.py run (start-up, training, report); "
             "params: nn.Parameters trained / in the model (BatchNorm statistics are buffers, not counted)."]
    reused = [f"`{result.recipe.name}`" for result in results if result.status == "reused"]
    if reused:
        notes.append(f"Reused complete runs of an earlier call (wall time as recorded then): {', '.join(reused)}.")
    notes += [f"`{result.recipe.name}` {result.status}: {result.error}" for result in results if result.error]
    notes += [f"`{result.recipe.name}`: not run (stopped before it)" for result in results
              if result.status == "not run"]
    return notes


def dataset_line(results: Sequence[Result]) -> str:
    """The data folders and validation splits the runs used, from their config.yaml and report."""
    seen = []
    for result in results:
        if result.config.get("data_dir") is not None:
            split = result.report.get("split")
            text = f"{result.config['data_dir']}" + (
                f" (val: {split}, {result.report.get('images')} images)" if split else "")
            if text not in seen:
                seen.append(text)
    return "; ".join(seen) or "unknown (no run finished)"


def machine_description() -> str:
    """CPU model and core count, GPU names (or none), torch and torchvision versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return (f"CPU {cpu_model()} ({cores} cores); {'GPU ' + ', '.join(gpus) if gpus else 'no GPU'}; "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}")


def command_lines(results: Sequence[Result]) -> list[str]:
    """Each recipe's exact train.py command, with the device and precision its run resolved to."""
    lines = []
    for result in results:
        ran = (f" ({result.config.get('device')}, amp {result.config.get('amp')})"
               if result.config.get("device") else "")
        lines.append(f"- `{result.recipe.name}`{ran}: `{display_command(result.command)}`")
    return lines


def markdown_report(results: Sequence[Result], invocation: str, seconds: float) -> str:
    """ablation.md: what ran where and when, the table, its notes and the exact commands."""
    lines = [f"# Ablation: {len(results)} recipes", "",
             f"- machine: {machine_description()}",
             f"- date: {datetime.date.today().isoformat()} (this call took {format_seconds(seconds)})",
             f"- dataset: {dataset_line(results)}",
             f"- command: `{invocation}`", "",
             markdown_table(results), ""]
    lines.append("  \n".join(table_notes(results)))  # a Markdown line break between notes
    lines += ["", "train.py commands:", "", *command_lines(results)]
    return "\n".join(lines) + "\n"


def csv_row(result: Result) -> list[Any]:
    """One ablation.csv row: numbers at full precision, empty where there is none."""
    values = [result.recipe.name, result.status, result.val_acc, result.best_epoch, result.epochs_run,
              result.report.get("accuracy"), result.report.get("balanced_accuracy"), result.report.get("macro_f1"),
              None if result.wall_seconds is None else round(result.wall_seconds, 2), result.trainable_params,
              result.total_params, str(result.run_dir), display_command(result.command), result.error]
    return ["" if value is None else value for value in values]


# --------------------------------------------------------------------------- chart


def plot_accuracies(results: Sequence[Result], path: Path) -> None:
    """Horizontal bars of val accuracy and balanced accuracy per recipe, written atomically to ``path``."""
    labels = [textwrap.fill(result.recipe.name, LABEL_WRAP_CHARS) for result in results]
    label_lines = sum(label.count("\n") + 1 for label in labels)
    fig = Figure(figsize=(8.0, max(2.5, 1.2 + 0.3 * label_lines + 0.35 * len(results))))
    ax = fig.add_subplot()
    positions = np.arange(len(results))
    series = ((-0.2, "val accuracy (best epoch)", VAL_COLOR, [result.val_acc for result in results]),
              (0.2, "balanced accuracy (best.pt on val)", BALANCED_COLOR,
               [result.report.get("balanced_accuracy") for result in results]))
    for offset, label, color, values in series:
        drawn = [(position + offset, value) for position, value in zip(positions, values, strict=True)
                 if value is not None]
        ax.barh([y for y, _ in drawn], [value for _, value in drawn], height=0.38, color=color, label=label)
        for y, value in drawn:
            ax.text(value + 0.01, y, f"{value:.1%}", va="center", fontsize=8)
    for position, result in zip(positions, results, strict=True):
        if not result.succeeded:
            ax.text(0.01, position, result.status, va="center", color="tab:red", fontsize=9)
    ax.set_yticks(positions, labels, fontsize=9)
    ax.set_ylim(len(results) - 0.5, -0.5)  # first recipe on top; rows without bars keep their room
    ax.set_xlim(0, 1.12)  # room for the value beside a full bar
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Recipes compared on the validation split")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8, frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130, bbox_inches="tight", pad_inches=0.15)
    atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------- options and main


class OneDefaultHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default once: the one its help states, else the value; none for an option without one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        """The help text, with ``(default: ...)`` added unless it says it already or there is no default."""
        help_text = action.help or ""
        if "(default" in help_text or action.default in (None, ""):
            return help_text
        return super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    """The script's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=OneDefaultHelpFormatter)
    parser.add_argument("recipes", nargs="*", metavar="RECIPE",
                        help="'[name=LABEL] [CONFIG.yaml] [train.py flags]', one quoted argument each")
    parser.add_argument("--output-dir", default="runs/ablation",
                        help="gets ablation.md/.csv/.png, one run folder per recipe and logs/")
    parser.add_argument("--data-dir", help="train.py --data-dir for every run (default: each config's)")
    parser.add_argument("--epochs", type=int, help="train.py --epochs for every run (default: each config's)")
    parser.add_argument("--seed", type=int, help="train.py --seed for every run (default: each config's)")
    parser.add_argument("--extra", default="", help="more train.py flags for every run, one quoted string "
                        "(a single flag: --extra=--compile)")
    parser.add_argument("--fresh", action="store_true", help="retrain every recipe (train.py --overwrite) "
                        "instead of reusing complete runs")
    return parser


def parse_options(argv: list[str]) -> argparse.Namespace:
    """The parsed options, with ``extra_flags`` split from --extra and checked."""
    options = get_args_parser().parse_args(argv)
    try:
        options.extra_flags = shlex.split(options.extra)
    except ValueError as error:
        raise UserError(f"--extra {options.extra!r}: {error}") from None
    refuse_owned_flags(options.extra_flags, f"--extra {options.extra!r}")
    if options.epochs is not None and options.epochs < 1:
        raise UserError(f"--epochs {options.epochs}: must be at least 1")
    return options


def describe_outcome(result: Result) -> str:
    """The one-line progress note after a recipe's run."""
    if not result.succeeded:
        return f"{result.status} after {format_seconds(result.wall_seconds)}: {result.error}"
    how = ("reused the complete run" if result.status == "reused"
           else f"trained in {format_seconds(result.wall_seconds)}")
    return (f"{how}: val acc {format_percent(result.val_acc)} (epoch {result.best_epoch} of {result.epochs_run}), "
            f"balanced acc {format_percent(result.report.get('balanced_accuracy'))}")


def run_all(recipes: Sequence[Recipe], options: argparse.Namespace, output_dir: Path) -> list[Result]:
    """Run the recipes in order; after an interrupted run the rest are listed as not run."""
    results: list[Result] = []
    for index, recipe in enumerate(recipes, start=1):
        if results and results[-1].status == "interrupted":
            run_dir = output_dir / recipe.slug
            results.append(Result(recipe, run_dir, train_command(recipe, options, run_dir)))
            continue
        print(f"[{index}/{len(recipes)}] {recipe.name} -> {output_dir / recipe.slug} "
              f"(log: {output_dir / LOGS_FOLDER / recipe.slug}.log)", flush=True)
        results.append(run_recipe(recipe, options, output_dir))
        print(f"    {describe_outcome(results[-1])}", flush=True)
    return results


def write_outputs(results: Sequence[Result], output_dir: Path, invocation: str, seconds: float) -> None:
    """ablation.md, ablation.csv and ablation.png in ``output_dir``."""
    atomic_write_text(output_dir / "ablation.md", markdown_report(results, invocation, seconds))
    atomic_write_text(output_dir / "ablation.csv", csv_text(CSV_HEADER, [csv_row(result) for result in results]))
    plot_accuracies(results, output_dir / "ablation.png")


@exit_on_user_error
def main(argv: str | Sequence[str] | None = None) -> list[Result]:
    """Run every recipe and write the comparison; exits with 1 when a run failed, 130 when interrupted."""
    args = argument_list(argv, "ablate.py")
    options = parse_options(args)
    recipes = parse_recipes(options.recipes)
    output_dir = Path(options.output_dir)
    prepare_output_dir(output_dir)
    start = time.perf_counter()
    results = run_all(recipes, options, output_dir)
    invocation = shlex.join(["python", shown_path(Path(__file__)), *args])
    write_outputs(results, output_dir, invocation, time.perf_counter() - start)
    print("\n" + markdown_table(results))
    print(f"wrote {output_dir}/ablation.md, ablation.csv, ablation.png")
    if any(result.status == "interrupted" for result in results):
        raise SystemExit(INTERRUPTED)
    if any(not result.succeeded for result in results):
        raise SystemExit(1)
    return list(results)


if __name__ == "__main__":
    main(sys.argv[1:])
