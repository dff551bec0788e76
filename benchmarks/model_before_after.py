"""model.py before and after it dropped its own ResNet forward: the same training step and prediction, timed.

    python benchmarks/model_before_after.py                 # against cc58ce1's model.py, about 3 minutes on 2 cores
    python benchmarks/model_before_after.py --ref HEAD~3 --batch 16

The old model ran the frozen leading stages under ``torch.no_grad()`` in a forward of its own; the new one is
torchvision's (or timm's) network as it is, relying on autograd recording nothing for frozen parameters and an
input without grad. Both build resnet50 with ``--trainable layer4,fc``, channels_last, random weights, and are
timed alternately (old, new, then new, old) in bf16 autocast and fp32 on the same random batch.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpu_precision import images_per_second

import model as current_model


def model_module_at(ref: str, folder: Path) -> ModuleType:
    """model.py as it was at git ``ref``, imported under the name ``old_model``."""
    path = folder / "old_model.py"
    path.write_text(subprocess.run(["git", "show", f"{ref}:model.py"], cwd=ROOT, check=True, capture_output=True,
                                   text=True).stdout)
    spec = importlib.util.spec_from_file_location("old_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_model(module: ModuleType) -> nn.Module:
    """resnet50 for 100 classes, layer4 and the head trainable, as train.py builds it."""
    torch.manual_seed(0)
    network = module.build_model("resnet50", 100, weights="none")
    module.freeze_blocks(network, module.parse_trainable("layer4,fc"))
    return network.to(memory_format=torch.channels_last)


def rates(network: nn.Module, images: torch.Tensor, targets: torch.Tensor, bf16: bool,
          repeats: int) -> tuple[float, float]:
    """Images per second of a training step and of a prediction forward pass."""
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=3e-5)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.05)

    def train_step() -> None:
        network.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = criterion(network(images).float(), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def predict() -> None:
        network.eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            network(images)

    return tuple(images_per_second(work, len(images), repeats) for work in (train_step, predict))


def main() -> None:
    """Time both models and print one line per round."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", default="cc58ce1", help="git revision whose model.py is the 'old' one")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        networks = {"old": recipe_model(model_module_at(args.ref, Path(folder))), "new": recipe_model(current_model)}
    images = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 100, (args.batch,))
    for precision in ("bf16", "fp32"):
        for order in (("old", "new"), ("new", "old")):
            for name in order:
                train_rate, predict_rate = rates(networks[name], images, targets, precision == "bf16", args.repeats)
                print(f"{precision} {name}: train {train_rate:.1f} img/s, predict {predict_rate:.1f} img/s", flush=True)


if __name__ == "__main__":
    main()
