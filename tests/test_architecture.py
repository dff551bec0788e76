"""The module map of docs/ARCHITECTURE.md, kept: who may import whom; and what importing a script does."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

DATA_PART = {"dataset", "images", "recipe", "gpu_augment", "samplers", "cache", "pipeline", "loader_items",
             "device_decode", "batch_iterables", "batch_producer", "augment_params", "batch_resize"}
OURS = {path.stem for path in REPO_ROOT.glob("*.py")}


def imports_of(path: Path) -> set[str]:
    """The modules of ours that a file imports (at any depth of the file, TYPE_CHECKING blocks included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & OURS


@pytest.mark.parametrize("module", ["model", "engine", "checkpoint", "distributed", "accel"])
def test_the_model_and_the_loop_import_no_data_module(module: str) -> None:
    assert imports_of(REPO_ROOT / f"{module}.py") & DATA_PART == set()


@pytest.mark.parametrize("module", sorted(DATA_PART))
def test_the_data_part_does_not_import_distributed(module: str) -> None:
    assert "distributed" not in imports_of(REPO_ROOT / f"{module}.py")


def test_common_is_a_leaf_and_nothing_imports_train() -> None:
    assert imports_of(REPO_ROOT / "common.py") == set()
    files = [*REPO_ROOT.glob("*.py"), *REPO_ROOT.glob("benchmarks/*.py"), *REPO_ROOT.glob("scripts/*.py")]
    assert [path.name for path in files if "train" in imports_of(path)] == []


def test_every_module_is_on_the_map() -> None:
    text = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert [name for name in sorted(OURS) if f"`{name}.py`" not in text] == []


def test_the_readme_layout_names_every_module_once() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    layout = "\n".join(line for line in section.splitlines() if line.startswith("|"))  # the table
    named = [name for name in sorted(OURS) for _ in range(layout.count(f"`{name}.py`"))]
    assert sorted(set(named)) == sorted(OURS) and len(named) == len(OURS)  # each module in one part, once


# Run in a new interpreter: what this one has imported for other tests must not count.
IMPORT_EVERY_SCRIPT = """
import json, sys
import device_decode, evaluate, export, predict, train
loaded = sorted(name for name in ("sklearn", "scipy", "tqdm.auto", "tqdm.autonotebook", "tqdm.notebook")
                if name in sys.modules)
chosen = device_decode.jpeg_decoder.cache_info().currsize
device_decode.DeviceDecoder(__import__("torch").device("cpu"), None, None)
print(json.dumps({"loaded": loaded, "decoders": [chosen, device_decode.jpeg_decoder.cache_info().currsize]}))
"""


def test_importing_the_scripts_does_nothing_but_define() -> None:
    """No notebook progress bar (it would print widgets' text in a terminal), scikit-learn and SciPy not until a
    metric or a fold needs them (a second of every start), no JPEG decoder chosen until a device decoder is built."""
    done = subprocess.run([sys.executable, "-c", IMPORT_EVERY_SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {"loaded": [], "decoders": [0, 1]}
