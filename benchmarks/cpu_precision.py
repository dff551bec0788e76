"""What each numeric precision buys the model step on this CPU - the evidence for or against the CPU speed target.

    python benchmarks/cpu_precision.py                        # reference, fp32, bf16: about 4 minutes on 2 cores
    python benchmarks/cpu_precision.py --variants fp32,bf16,fp16,compile  # about 7 minutes

bench.py times whole epochs against the reference loop. This script takes data loading out and asks only how fast
the model step can run here, in one process, on the same random batches:
  reference  the reference notebook's step: fp32, NCHW, every BatchNorm in training mode;
  fp32       our step (frozen trunk: no graph recorded, channels_last) in full precision - what --amp auto picks on a
             CPU without native bfloat16;
  bf16/fp16  the same step under CPU autocast, forced whatever --amp auto would choose;
  compile    the fp32 step through torch.compile (compiling adds about a minute).
For each: the frozen trunk's forward pass, a whole training step (layer4+fc) and a prediction forward pass, in
images per second. The table is printed and appended, with the CPU's instruction set, to benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import machine_description, publish, reference_model, reference_predict, reference_train_epoch

from accel import cpu_has_native_bf16, resolve_amp
from model import build_model, freeze_blocks, trainable_parameters

VARIANTS = ("reference", "fp32", "bf16", "fp16", "compile")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def images_per_second(work: Callable[[], Any], images: int, repeats: int) -> float:
    """Run ``work`` once untimed, then ``repeats`` times; images per second of the timed runs."""
    work()
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    return images * repeats / (time.perf_counter() - started)


def our_model(arch: str, num_classes: int) -> nn.Module:
    """Our network as train.py builds it for the recipe: layer4+fc trainable, frozen trunk, channels_last."""
    model = build_model(arch, num_classes, weights="none")
    freeze_blocks(model, ["layer4", "fc"])
    return model.to(memory_format=torch.channels_last)


def frozen_trunk(model: nn.Module) -> nn.Module:
    """The leading children of ``model`` before its first trainable one, as one module (shared, not copied)."""
    front = []
    for child in model.children():
        if any(parameter.requires_grad for parameter in child.parameters()):
            break
        front.append(child)
    return nn.Sequential(*front).eval()


def measure_reference(args: argparse.Namespace, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Training step and prediction of the reference loop (fp32, NCHW, BatchNorm in training mode)."""
    model = reference_model(args.arch, args.classes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-5, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.05)
    batch = [(images, targets)]
    device = torch.device("cpu")
    return {
        "train": images_per_second(lambda: reference_train_epoch(model, batch, optimizer, criterion, device),
                                   len(images), args.repeats),
        "predict": images_per_second(lambda: reference_predict(model, batch, device), len(images), args.repeats),
    }


def measure_ours(variant: str, args: argparse.Namespace, images: torch.Tensor,
                 targets: torch.Tensor) -> dict[str, float]:
    """Trunk forward, training step and prediction of our step in one precision (or compiled)."""
    model = our_model(args.arch, args.classes)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=3e-5, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.05)
    images = images.contiguous(memory_format=torch.channels_last)
    trunk, network = frozen_trunk(model), model
    if variant == "compile":
        trunk, network = torch.compile(trunk), torch.compile(model)
    autocast = contextlib.nullcontext
    if variant in AUTOCAST:
        autocast = lambda: torch.autocast("cpu", dtype=AUTOCAST[variant])  # noqa: E731

    def train_step() -> None:
        model.train()
        with autocast():
            loss = criterion(network(images).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward(module: nn.Module) -> Callable[[], None]:
        def run() -> None:
            model.eval()
            with torch.inference_mode(), autocast():
                module(images)
        return run

    return {
        "trunk": images_per_second(forward(trunk), len(images), args.repeats),
        "train": images_per_second(train_step, len(images), args.repeats),
        "predict": images_per_second(forward(network), len(images), args.repeats),
    }


def precision_table(rates: dict[str, dict[str, float]]) -> str:
    """Markdown table: images/s of each variant and its training step against fp32 and the reference."""
    lines = ["| variant | trunk forward img/s | train step img/s | predict img/s | train vs fp32 "
             "| train vs reference |",
             "|---|---:|---:|---:|---:|---:|"]
    fp32, reference = rates.get("fp32", {}).get("train"), rates.get("reference", {}).get("train")
    for variant, stage in rates.items():
        cells = [f"{stage[name]:.1f}" if name in stage else "-" for name in ("trunk", "train", "predict")]
        cells += [f"{stage['train'] / base:.2f}x" if base else "-" for base in (fp32, reference)]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_variants(text: str) -> list[str]:
    """The comma-separated ``--variants``, checked; the reference always comes first."""
    variants = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: --variants {text}: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return ["reference"] + [name for name in variants if name != "reference"]


def get_args_parser() -> argparse.ArgumentParser:
    """The script's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="fp32,bf16", help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed batches per measurement (after one untimed)")
    parser.add_argument("--no-save", action="store_true", help="print the table without appending to results.md")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Measure each variant on the same batch, print the table and append it to results.md."""
    args = get_args_parser().parse_args(argv)
    variants = parse_variants(args.variants)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    targets = torch.randint(0, args.classes, (args.batch_size,))
    rates: dict[str, dict[str, float]] = {}
    for variant in variants:
        print(f"{variant} ...", flush=True)
        if variant == "reference":
            rates[variant] = measure_reference(args, images, targets)
        else:
            rates[variant] = measure_ours(variant, args, images, targets)
    auto = resolve_amp("auto", torch.device("cpu"))
    isa = (f"CPU capability {torch.backends.cpu.get_cpu_capability()}; native bf16: "
           f"{'yes' if cpu_has_native_bf16() else 'no'}; --amp auto picks {'fp32' if auto is None else auto}")
    text = (f"## {datetime.date.today().isoformat()} - cpu model step by precision (benchmarks/cpu_precision.py)\n\n"
            f"{machine_description(torch.device('cpu'))}  \n{isa}  \n"
            f"{args.arch} at {args.img_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
            f"data loading excluded\n\n{precision_table(rates)}\n")
    publish(text, save=not args.no_save)


if __name__ == "__main__":
    main()
