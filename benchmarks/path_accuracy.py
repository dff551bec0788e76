"""Accuracy of the two data paths: the CPU path (PIL in the loader workers) against the GPU path (decoding and
augmentation batched on the device), a few seeds each, on the same data and recipe.

    python benchmarks/path_accuracy.py                                   # the bundled sample, seeds 0-2
    python benchmarks/path_accuracy.py --data-dir /tmp/longtail --epochs 15

Each run is ``python train.py --config CONFIG --augment-device PATH --seed S`` on the CPU (the GPU path's code
runs there too, batched in the main process), in a temporary folder. The table gives each run's final and best
validation accuracy, and each path's mean and range; it is printed and appended to benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench import machine_description, publish

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("cpu", "gpu")


def train_once(args: argparse.Namespace, path: str, seed: int, output: Path) -> list[dict[str, str]]:
    """One training run; returns its history rows."""
    command = [sys.executable, str(ROOT / "train.py"), "--config", args.config, "--augment-device", path,
               "--device", "cpu", "--seed", str(seed), "--output-dir", str(output), "--no-progress"]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    if args.epochs:
        command += ["--epochs", str(args.epochs)]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"error: train.py failed for --augment-device {path} --seed {seed}:\n"
                         + completed.stderr[-2000:])
    with (output / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def accuracy_table(results: dict[tuple[str, int], list[dict[str, str]]], seeds: list[int]) -> str:
    """Markdown: per seed the final and best val accuracy of each path, then each path's mean and range."""
    lines = ["| seed | " + " | ".join(f"{path} final val | {path} best val" for path in PATHS) + " |",
             "|---|" + "---:|" * (2 * len(PATHS))]
    finals = {path: [float(results[path, seed][-1]["val_acc"]) for seed in seeds] for path in PATHS}
    bests = {path: [max(float(row["val_acc"]) for row in results[path, seed]) for seed in seeds] for path in PATHS}
    for index, seed in enumerate(seeds):
        cells = [f"{finals[path][index]:.1%} | {bests[path][index]:.1%}" for path in PATHS]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    means = [f"{sum(finals[path]) / len(seeds):.1%} | {sum(bests[path]) / len(seeds):.1%}" for path in PATHS]
    lines.append("| mean | " + " | ".join(means) + " |")
    spans = [f"{min(finals[path]):.1%}-{max(finals[path]):.1%} | {min(bests[path]):.1%}-{max(bests[path]):.1%}"
             for path in PATHS]
    lines.append("| range | " + " | ".join(spans) + " |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    """The script's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "sample.yaml"), help="train.py --config")
    parser.add_argument("--data-dir", help="train.py --data-dir (default: the config's)")
    parser.add_argument("--epochs", type=int, help="train.py --epochs (default: the config's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.py --seed values")
    parser.add_argument("--no-save", action="store_true", help="print the table without appending to results.md")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Train every (path, seed) pair and report the accuracies."""
    args = get_args_parser().parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="path-accuracy-") as scratch:
        for path in PATHS:
            for seed in args.seeds:
                print(f"--augment-device {path} --seed {seed} ...", flush=True)
                results[path, seed] = train_once(args, path, seed, Path(scratch) / f"{path}-{seed}")
    config = Path(args.config).resolve()
    setup = (f"`train.py --config {config.relative_to(ROOT) if config.is_relative_to(ROOT) else config}"
             + (f" --data-dir {args.data_dir}" if args.data_dir else "")
             + (f" --epochs {args.epochs}" if args.epochs else "") + " --device cpu`")
    text = (f"## {datetime.date.today().isoformat()} - accuracy of the CPU and GPU data paths "
            f"(benchmarks/path_accuracy.py)\n\n{machine_description(torch.device('cpu'))}  \n{setup}, "
            f"--augment-device cpu or gpu, seeds {', '.join(map(str, args.seeds))}\n\n"
            f"{accuracy_table(results, args.seeds)}\n")
    publish(text, save=not args.no_save)


if __name__ == "__main__":
    main()
