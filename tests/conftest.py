"""Shared fixtures: a generated, trivially separable 12-class colour dataset, one trained run, CLI helpers.

Everything here is small and deterministic so the whole suite runs on a 2-core CPU in a few minutes:
32 px images, ResNet-18 and 2 epochs for the shared end-to-end run, one thread per process.

pytest.ini runs the tests on two pytest-xdist workers, one test file per worker at a time (``-n 0``: in one process),
the slowest files first: see :func:`pytest_collection_modifyitems`.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import os
import random
import subprocess
import sys
import urllib.error
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

# Tiny tensors gain nothing from a second thread, and OpenMP threads that spin while another process holds
# the other core make a run many times slower. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Python keeps the modules it compiles in __pycache__/ unless PYTHONDONTWRITEBYTECODE is set (some sandboxes set it):
# then each interpreter the suite starts compiles the project's modules again (0.3 s a start on an AMD EPYC), and
# pytest rewrites every test file again in each worker.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    import torch

    from checkpoint import Checkpoint

# The xdist controller process loads this file too, and runs no test: torch, torchvision and the project's modules
# are imported by the helpers that use them, which spares it the 4 s their import takes before any worker starts.
if "torch" in sys.modules:  # imported before this file (by a plugin): the variable came too late for it
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
NUM_CLASSES = 12

# One solid colour per class folder 0..11: primaries, secondaries, greys and dark primaries.
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (255, 255, 255),
    (128, 128, 128),
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (128, 0, 0),
    (0, 128, 0),
    (0, 0, 128),
)

# Flags that keep a run small and repeatable: no worker processes, no progress bars, full fp32 precision
# (--amp auto would pick bf16 on CPUs that have it, and the accuracy thresholds were checked in fp32).
PREDICT_FLAGS: tuple[str, ...] = ("--workers", "0", "--no-progress", "--amp", "off")
FAST_FLAGS: tuple[str, ...] = ("--img-size", str(IMAGE_SIZE), *PREDICT_FLAGS)

# The shared end-to-end recipe: ResNet-18 from scratch, the default --trainable layer4,fc. Checked on 52 runs
# (training seeds 0-15, data seeds 0-2): 92-100% test accuracy after 2 epochs, 100% in most.
E2E_TRAIN_FLAGS: tuple[str, ...] = (
    "--arch", "resnet18", "--weights", "none", "--lr", "5e-4", "--batch-size", "6", "--epochs", "2", "--seed", "0",
    *FAST_FLAGS,
)


# A tiny run for the small_data fixture (3 classes, 12 training images): three batches of 4 an epoch, under a
# second an epoch on one CPU thread. Add --data-dir, --output-dir and --epochs.
TINY_TRAIN_FLAGS: tuple[str, ...] = (
    "--arch", "resnet18", "--weights", "none", "--lr", "5e-4", "--batch-size", "4", "--seed", "0", *FAST_FLAGS,
)


# --------------------------------------------------------------------------- the order of the files


# The slowest files, slowest first (whole suite on two workers, AMD EPYC, 2 cores, 2026-12-06 evening): xdist hands a
# worker its next file in collection order, so these go first and the two workers run out of small files together.
SLOWEST_FILES: tuple[str, ...] = (
    "test_torchrun.py", "test_recipes.py", "test_train_predict.py", "test_ablate.py", "test_resume.py",
    "test_report_html.py", "test_new_user_runs.py", "test_errors.py", "test_new_user_round3.py", "test_distributed.py",
    "test_benchmarks.py", "test_export.py", "test_predict_extras.py", "test_train_batch_picture.py",
    "test_op_counts.py", "test_bad_files.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files of SLOWEST_FILES first, in that order; the others keep their order, as does each file's tests."""
    position = {name: index for index, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: position.get(item.path.name, len(SLOWEST_FILES)))


# --------------------------------------------------------------------------- generated data


def colour_image(colour: Sequence[int], rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """A ``size`` x ``size`` RGB image of one solid colour plus a little Gaussian noise."""
    noise = rng.normal(0.0, 8.0, (size, size, 3))
    pixels = np.clip(np.asarray(colour, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def write_colour_dataset(
    root: Path,
    num_classes: int = NUM_CLASSES,
    train_per_class: int = 6,
    val_per_class: int = 2,
    test_per_class: int = 2,
    seed: int = 0,
) -> dict[str, str]:
    """Write ``root/train/<class>/``, ``root/val/<class>/`` (skipped when ``val_per_class`` is 0) and a flat
    ``root/test/`` of uuid-named JPEGs, plus ``root/test_labels.csv``; returns the test labels by name (no extension).

    Class folders are ``0``..``num_classes - 1`` and class ``k`` is solid ``CLASS_COLOURS[k]``.
    """
    rng = np.random.default_rng(seed)
    names = random.Random(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label in range(num_classes):
            folder = root / split / str(label)
            for index in range(per_class):
                folder.mkdir(parents=True, exist_ok=True)
                colour_image(CLASS_COLOURS[label], rng).save(folder / f"{label}_{index}.jpg", quality=95)
    test_dir = root / "test"
    test_dir.mkdir(parents=True, exist_ok=True)
    labels: dict[str, str] = {}
    for label in range(num_classes):
        for _ in range(test_per_class):
            name = str(uuid.UUID(int=names.getrandbits(128), version=4))
            colour_image(CLASS_COLOURS[label], rng).save(test_dir / f"{name}.jpg", quality=95)
            labels[name] = str(label)
    write_labels_csv(root / "test_labels.csv", labels)
    return labels


def write_labels_csv(path: Path, labels: dict[str, str]) -> None:
    """Write ``image_name,label`` rows, the format ``predict.py --labels`` reads."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image_name", "label"])
        writer.writerows(sorted(labels.items()))


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file as dicts keyed by its header."""
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@dataclass(frozen=True)
class ColourData:
    """A generated dataset: its root folder and the true label of each test image (keyed by name, no extension)."""

    root: Path
    test_labels: dict[str, str]

    @property
    def test_dir(self) -> Path:
        return self.root / "test"


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> ColourData:
    """The 12-class dataset with train/, val/ and test/, plus the clutter real folders have.

    test/ also holds ``.DS_Store`` and ``notes.txt`` (to be ignored); train/3/ holds two files named .jpg that
    cannot be decoded (an empty file and a text file), which training must skip and list.
    Treat it as read-only: several tests share it.
    """
    root = tmp_path_factory.mktemp("colours")
    labels = write_colour_dataset(root)
    (root / "test" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "test" / "notes.txt").write_text("not an image\n")
    (root / "train" / "3" / "empty.jpg").write_bytes(b"")
    (root / "train" / "3" / "not-really.jpg").write_text("this is text, not a JPEG\n")
    return ColourData(root, labels)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> ColourData:
    """A tiny clean 3-class dataset (4 train, 1 val, 1 test image a class) for quick runs and error cases."""
    root = tmp_path_factory.mktemp("small")
    return ColourData(root, write_colour_dataset(root, num_classes=3, train_per_class=4, val_per_class=1,
                                                 test_per_class=1, seed=1))


# --------------------------------------------------------------------------- running the scripts


@dataclass
class CliResult:
    """What a script run produced: exit code, captured output, and ``main``'s return value when run in-process."""

    returncode: int
    stdout: str
    stderr: str
    value: Any = None


def run_script(script: str, *args: str | Path, cwd: Path = REPO_ROOT) -> CliResult:
    """Run ``python <repo>/<script> ARGS`` in a subprocess, as a user would from a shell."""
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return CliResult(completed.returncode, completed.stdout, completed.stderr)


def load_script(relative_path: str) -> ModuleType:
    """A script of the repository (``scripts/ablate.py``) as a module named after its file, loaded once, for its
    helpers or to call its ``main`` in this process."""
    path = REPO_ROOT / relative_path
    if path.stem not in sys.modules:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        sys.modules[path.stem] = importlib.util.module_from_spec(spec)  # its dataclasses look their module up
        spec.loader.exec_module(sys.modules[path.stem])
    return sys.modules[path.stem]


def call_main(main: Callable[[list[str]], Any], *args: str | Path) -> CliResult:
    """Call a script's ``main(argv)`` in this process, as from a notebook, capturing its output and exit code.

    A ``SystemExit`` ends it as it would end the interpreter: a message (``SystemExit("error: ...")``) goes to
    stderr with code 1, ``None`` is code 0."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            value, code = main([str(arg) for arg in args]), 0
        except SystemExit as exit_:
            value, code = None, exit_.code
            if code is None:
                code = 0
            elif not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
    return CliResult(code, stdout.getvalue(), stderr.getvalue(), value)


def assert_user_error(result: CliResult, *fragments: str | Path) -> str:
    """A clean user error: exit code 2, no traceback, one ``error: ...`` line on stderr containing ``fragments``."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- tiny in-process runs, compared


def tiny_train(data: ColourData, output: Path, *flags: str | Path) -> CliResult:
    """``train.main`` in this process with TINY_TRAIN_FLAGS on ``data``; asserts it succeeded."""
    import train

    result = call_main(train.main, "--data-dir", data.root, "--output-dir", output, *TINY_TRAIN_FLAGS, *flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def redirect_output(stdout_path: str | Path, stderr_path: str | Path) -> None:
    """In a forked child: file descriptors 1 and 2 (what C++ code writes too) and ``sys.stdout``/``sys.stderr`` to
    these files, line-buffered, for the rest of the process."""
    for descriptor, path in ((1, stdout_path), (2, stderr_path)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), descriptor)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # lives as long as the process
    sys.stderr = open(2, "w", buffering=1, closefd=False)


@pytest.fixture
def no_final_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the end-of-run plots and evaluation report (a second a run) in tests that only compare checkpoints."""
    monkeypatch.setattr("train.save_final_plots", lambda *args, **kwargs: None)
    monkeypatch.setattr("train.write_best_report", lambda *args, **kwargs: None)


def history_without_seconds(path: Path) -> list[dict[str, str]]:
    """history.csv rows, without the wall-time column (the one thing that differs between identical runs)."""
    return [{key: value for key, value in row.items() if key != "seconds"} for row in read_csv_rows(path)]


def assert_same(first: Any, second: Any, where: str = "") -> None:
    """Equal nested structures; tensors bitwise equal (same dtype, same values)."""
    import torch

    if isinstance(first, torch.Tensor):
        assert isinstance(second, torch.Tensor) and first.dtype == second.dtype, where
        assert torch.equal(first, second), f"{where} differs"
    elif isinstance(first, dict):
        assert isinstance(second, dict) and first.keys() == second.keys(), where
        for key in first:
            assert_same(first[key], second[key], f"{where}.{key}")
    elif isinstance(first, (list, tuple)):
        assert isinstance(second, (list, tuple)) and len(first) == len(second), where
        for index, (left, right) in enumerate(zip(first, second, strict=True)):
            assert_same(left, right, f"{where}[{index}]")
    else:
        assert first == second, (where, first, second)


def weightless_checkpoint(class_names: Sequence[str], **fields: Any) -> Checkpoint:
    """A checkpoint without weights, for code that reads only what a checkpoint says (reports, batches): ResNet-18
    at 32 px with ImageNet's normalization unless ``fields`` say otherwise."""
    from checkpoint import Checkpoint

    defaults = {"model": {}, "arch": "resnet18", "img_size": 32, "test_size": 32, "mean": (0.485, 0.456, 0.406),
                "std": (0.229, 0.224, 0.225), "config": {}}
    return Checkpoint(class_names=list(class_names), **{**defaults, **fields})


def save_as_version_1(checkpoint: Checkpoint, path: Path, leave_out: Sequence[str] = ()) -> Path:
    """``checkpoint`` stored as format 1 wrote it, without the keys ``leave_out`` (those older files lacked)."""
    import torch

    stored = {key: value for key, value in checkpoint.to_dict().items() if key not in leave_out}
    torch.save({**stored, "format": "imagefolder-resnet-checkpoint/1"}, path)
    return path


def assert_same_training(first: Path, second: Path) -> None:
    """Two last.pt files hold bitwise the same weights, optimizer, random states and progress (but wall times)."""
    from checkpoint import load_checkpoint

    a, b = load_checkpoint(first), load_checkpoint(second)
    assert a.epoch == b.epoch
    assert_same(a.model, b.model, "model")
    state_a, state_b = a.training_state, b.training_state
    assert_same(state_a.optimizer, state_b.optimizer, "optimizer")
    assert_same(state_a.rng, state_b.rng, "rng")
    progress_a, progress_b = dict(state_a.progress), dict(state_b.progress)
    for progress in (progress_a, progress_b):
        progress["history"] = [{key: value for key, value in row.items() if key != "seconds"}
                               for row in progress["history"]]
    assert_same(progress_a, progress_b, "progress")


# --------------------------------------------------------------------------- the shared trained run


@dataclass(frozen=True)
class TrainedRun:
    """The shared end-to-end training run: its data, output folder and console output."""

    data: ColourData
    output_dir: Path
    result: CliResult


@pytest.fixture(scope="session")
def trained_run(colour_data: ColourData, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """``python train.py`` once, for 2 epochs on the colour dataset; shared by every test that needs a model.

    With a loader worker: that the command returns at all says its worker went with it (``run_script`` waits until
    the output pipes close, and a worker left behind would hold them open)."""
    output_dir = tmp_path_factory.mktemp("run") / "out"
    result = run_script("train.py", "--data-dir", colour_data.root, "--output-dir", output_dir, *E2E_TRAIN_FLAGS,
                        "--workers", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return TrainedRun(colour_data, output_dir, result)


# --------------------------------------------------------------------------- weights files


FROZEN_BY_DEFAULT = ("conv1", "bn1", "layer1", "layer2", "layer3")


def torchvision_state_dict(arch: str = "resnet18", seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict shaped like torchvision's ImageNet file (1000-class ``fc``), random but reproducible.

    BatchNorm running statistics are made non-trivial so that "unchanged" means something.
    """
    import torch
    import torchvision

    torch.manual_seed(seed)
    state = torchvision.models.get_model(arch, weights=None, num_classes=1000).state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.copy_(torch.randn_like(value) * 0.1)
        elif key.endswith("running_var"):
            value.copy_(torch.rand_like(value) + 0.5)
    return state


def block_of(key: str) -> str:
    """The top-level block a state-dict key belongs to (``layer3.1.bn2.weight`` -> ``layer3``)."""
    return key.split(".")[0]


# --------------------------------------------------------------------------- safety


@pytest.fixture(autouse=True)
def no_weight_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if an in-process test tries to fetch pretrained weights (tests must pass --weights none/PATH)."""

    def refuse(url: str, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"a test tried to download {url}; use --weights none or a weights file")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", refuse)


def go_offline(monkeypatch: pytest.MonkeyPatch, torch_home: Path) -> None:
    """Make torchvision weight downloads fail as they do without network, with ``torch_home`` as an empty cache."""

    def no_network(url: str, *args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", no_network)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))


@pytest.fixture
def processes() -> Iterator[list[Any]]:
    """Processes a test starts (test_resume.TrainingProcess and the like); any still running at its end are killed."""
    started: list[Any] = []
    yield started
    for process in started:
        process.kill()
