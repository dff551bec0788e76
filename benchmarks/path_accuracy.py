"""Accuracy of the two data paths: the CPU path (PIL in the loader workers) against the GPU path (decoding and
augmentation batched on the device), a few seeds each, on the same data and recipe.

    python benchmarks/path_accuracy.py                                   # the bundled sample, seeds 0-2
    python benchmarks/path_accuracy.py --data-dir /tmp/longtail --epochs 15
    python benchmarks/path_accuracy.py --device cuda --jobs 6           # on a GPU, every run at once

Each run is ``python train.py --config CONFIG --augment-device PATH --seed S --device DEVICE`` in a temporary
folder (on a CPU the GPU path's code runs there too, batched in the main process), then, where the data folder has
``test/`` and ``test_labels.csv`` (the bundled sample has), ``predict.py --labels`` on the test images with the run's
best.pt. The table gives each run's final and best validation accuracy and its test accuracy, and each path's mean
and range; it is printed and appended to benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from bench import machine_description, publish

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import load_yaml_config

PATHS = ("cpu", "gpu")


def train_once(args: argparse.Namespace, path: str, seed: int, output: Path) -> list[dict[str, str]]:
    """One training run; returns its history rows."""
    command = [sys.executable, str(ROOT / "train.py"), "--config", args.config, "--augment-device", path,
               "--device", args.device, "--seed", str(seed), "--output-dir", str(output), "--no-progress"]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    if args.epochs:
        command += ["--epochs", str(args.epochs)]
    run_or_exit(command, f"train.py --augment-device {path} --seed {seed}")
    with (output / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def run_or_exit(command: list[str], what: str) -> str:
    """Run ``command`` in the repository; its output, or exit naming ``what`` with the end of its errors."""
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"error: {what} failed:\n" + completed.stderr[-2000:])
    return completed.stdout


def test_split(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """The data folder's ``test/`` and ``test_labels.csv``, when it has both."""
    data_dir = Path(args.data_dir) if args.data_dir else ROOT / config_value(args.config, "data_dir")
    folder, labels = data_dir / "test", data_dir / "test_labels.csv"
    return (folder, labels) if folder.is_dir() and labels.is_file() else None


def config_value(config: str, key: str) -> str:
    """One top-level value of a YAML config file."""
    return str(load_yaml_config(config)[key])


def test_accuracy(args: argparse.Namespace, run_dir: Path, split: tuple[Path, Path]) -> float:
    """predict.py's accuracy on the labeled test images with the run's best.pt."""
    stdout = run_or_exit([sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(run_dir / "best.pt"),
                          "--test-dir", str(split[0]), "--labels", str(split[1]), "--device", args.device,
                          "--output", str(run_dir / "prediction.csv"), "--no-progress"], f"predict.py for {run_dir}")
    return float(re.search(r"accuracy ([0-9.]+)%", stdout).group(1)) / 100


def one_run(args: argparse.Namespace, path: str, seed: int, scratch: Path) -> tuple[list[dict[str, str]], float | None]:
    """Train one (path, seed) pair; its history, and its test accuracy where the data has labeled test images."""
    print(f"--augment-device {path} --seed {seed} ...", flush=True)
    run_dir = scratch / f"{path}-{seed}"
    history = train_once(args, path, seed, run_dir)
    split = test_split(args)
    return history, (test_accuracy(args, run_dir, split) if split else None)


def accuracy_table(results: dict[tuple[str, int], tuple[list[dict[str, str]], float | None]],
                   seeds: list[int]) -> str:
    """Markdown: per seed the final and best val accuracy (and the test accuracy) of each path, then each path's
    mean and range."""
    tested = all(test is not None for _, test in results.values())
    columns = ("final val", "best val", "test") if tested else ("final val", "best val")
    figures = {(path, column): [] for path in PATHS for column in columns}
    for path in PATHS:
        for seed in seeds:
            history, test = results[path, seed]
            figures[path, "final val"].append(float(history[-1]["val_acc"]))
            figures[path, "best val"].append(max(float(row["val_acc"]) for row in history))
            if tested:
                figures[path, "test"].append(test)
    keys = [(path, column) for path in PATHS for column in columns]
    lines = ["| seed | " + " | ".join(f"{path} {column}" for path, column in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for index, seed in enumerate(seeds):
        lines.append(f"| {seed} | " + " | ".join(f"{figures[key][index]:.1%}" for key in keys) + " |")
    lines.append("| mean | " + " | ".join(f"{sum(figures[key]) / len(seeds):.1%}" for key in keys) + " |")
    lines.append("| range | " + " | ".join(f"{min(figures[key]):.1%}-{max(figures[key]):.1%}" for key in keys) + " |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    """The script's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "sample.yaml"), help="train.py --config")
    parser.add_argument("--data-dir", help="train.py --data-dir (default: the config's)")
    parser.add_argument("--epochs", type=int, help="train.py --epochs (default: the config's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.py --seed values")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="train.py and predict.py --device")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (on a GPU every run fits at once)")
    parser.add_argument("--no-save", action="store_true", help="print the table without appending to results.md")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Train every (path, seed) pair and report the accuracies."""
    args = get_args_parser().parse_args(argv)
    pairs = [(path, seed) for path in PATHS for seed in args.seeds]
    with tempfile.TemporaryDirectory(prefix="path-accuracy-") as scratch, \
            ThreadPoolExecutor(max(1, args.jobs)) as pool:
        outcomes = pool.map(lambda pair: one_run(args, *pair, Path(scratch)), pairs)
        results = dict(zip(pairs, outcomes, strict=True))
    config = Path(args.config).resolve()
    setup = (f"`train.py --config {config.relative_to(ROOT) if config.is_relative_to(ROOT) else config}"
             + (f" --data-dir {args.data_dir}" if args.data_dir else "")
             + (f" --epochs {args.epochs}" if args.epochs else "") + f" --device {args.device}`")
    text = (f"## {datetime.date.today().isoformat()} - accuracy of the CPU and GPU data paths "
            f"(benchmarks/path_accuracy.py)\n\n{machine_description(torch.device(args.device))}  \n{setup}, "
            f"--augment-device cpu or gpu, seeds {', '.join(map(str, args.seeds))}\n\n"
            f"{accuracy_table(results, args.seeds)}\n")
    publish(text, save=not args.no_save)


if __name__ == "__main__":
    main()
