"""Build the small bundled sample dataset ``data/sample/`` from Fashion-MNIST.

The source is the Debian package ``dataset-fashion-mnist`` (gzipped IDX files
in ``/usr/share/datasets/fashion-mnist/``), read with torchvision's MNIST
readers. The result is a tiny, long-tailed image-classification dataset laid
out for ``torchvision.datasets.ImageFolder``::

    data/sample/
        train/<class>/<source index>.jpg   long-tailed, 60 down to 12 per class
        val/<class>/<source index>.jpg     balanced, disjoint from train
        test/<uuid>.jpg                    unlabeled, from the t10k set
        test_labels.csv                    image_name,label (answers for test/)
        LICENSE                            Fashion-MNIST copyright + MIT licence
        README.md                          what it is and how it was built

Class folders are the Fashion-MNIST label numbers ``0``..``9``. Everything is
drawn from one seeded RNG, so two runs with the same arguments produce
byte-identical files.

Usage::

    python scripts/make_sample.py [--source DIR] [--output data/sample] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import random
import shutil
import sys
import tempfile
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.mnist import read_image_file, read_label_file

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUTPUT = Path("data/sample")
SOURCE_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IDX_READERS = {"images": read_image_file, "labels": read_label_file}
# What torchvision's readers raise on a file that is not a uint8 IDX file of the expected kind (images 3-D, labels 1-D).
IDX_ERRORS = (AssertionError, IndexError, KeyError, RuntimeError, TypeError, ValueError)
INSTALL_HINT = "apt-get install dataset-fashion-mnist"

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
TRAIN_MAX = 60
TRAIN_MIN = 12
DEFAULT_VAL_PER_CLASS = 6
DEFAULT_TEST_PER_CLASS = 8
JPEG_QUALITY = 90

SPLIT_DIRS = ("train", "val", "test")
README_NAME = "README.md"
LICENSE_NAME = "LICENSE"
TEST_LABELS_NAME = "test_labels.csv"
OWNED_NAMES = frozenset(SPLIT_DIRS + (README_NAME, LICENSE_NAME, TEST_LABELS_NAME))
README_TITLE = "# Fashion-MNIST long-tailed sample"

LICENSE_TEXT = """\
Fashion-MNIST
Copyright (c) 2017 Zalando SE, https://tech.zalando.com
https://github.com/zalandoresearch/fashion-mnist

The images in this folder are a small subset of Fashion-MNIST, re-encoded
as JPEG. They are distributed under the MIT License:

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in
all copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


class SampleError(Exception):
    """A user-facing problem that ends the script with a one-line message."""


@dataclass(frozen=True)
class LabeledImage:
    """One labeled source image, named by its index in the source set."""

    index: int
    label: int


@dataclass(frozen=True)
class TestImage:
    """One unlabeled test image, named by a seeded UUID."""

    index: int
    label: int
    name: str


@dataclass(frozen=True)
class SamplePlan:
    """Which source images go into which split."""

    train_sizes: dict[int, int]
    train: list[LabeledImage]
    val: list[LabeledImage]
    test: list[TestImage]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Build the long-tailed Fashion-MNIST sample dataset "
        "(train/val/test JPEG folders) from the Debian package "
        "dataset-fashion-mnist.",
    )
    parser.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE,
        help=f"folder with the Fashion-MNIST .gz files (default: {DEFAULT_SOURCE})",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT,
        help=f"folder to (re)create (default: {DEFAULT_OUTPUT})",
    )
    parser.add_argument("--seed", type=int, default=0, help="RNG seed (default: 0)")
    parser.add_argument("--train-max", type=int, default=TRAIN_MAX,
                        help=f"training images of the largest class (default: {TRAIN_MAX})")
    parser.add_argument("--train-min", type=int, default=TRAIN_MIN,
                        help=f"training images of the smallest class (default: {TRAIN_MIN})")
    parser.add_argument(
        "--val-per-class", type=int, default=DEFAULT_VAL_PER_CLASS,
        help=f"validation images per class (default: {DEFAULT_VAL_PER_CLASS})",
    )
    parser.add_argument(
        "--test-per-class", type=int, default=DEFAULT_TEST_PER_CLASS,
        help=f"test images per class (default: {DEFAULT_TEST_PER_CLASS})",
    )
    return parser.parse_args(argv)


def source_paths(source: Path) -> dict[str, Path]:
    """Return the four source file paths, or raise if any is missing."""
    paths = {key: source / name for key, name in SOURCE_FILES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise SampleError(
            f"Fashion-MNIST files not found in {source} ({', '.join(missing)}); "
            f"run: {INSTALL_HINT}"
        )
    return paths


def gunzip(path: Path, target: Path) -> None:
    """Decompress the gzipped file ``path`` into the file ``target``."""
    try:
        with gzip.open(path, "rb") as source, target.open("wb") as sink:
            shutil.copyfileobj(source, sink)
    except (OSError, EOFError, zlib.error) as exc:
        raise SampleError(f"cannot read {path}: {exc}; try: {INSTALL_HINT}") from exc


def read_idx(path: Path, kind: str) -> np.ndarray:
    """Read a gzipped IDX file of ``kind`` ("images" or "labels") with torchvision's MNIST reader."""
    with tempfile.TemporaryDirectory(prefix="make_sample-") as tmp:
        plain = Path(tmp) / path.stem
        gunzip(path, plain)
        try:
            tensor = IDX_READERS[kind](str(plain))
        except IDX_ERRORS as exc:
            raise SampleError(f"{path} is not a valid IDX file of {kind}; try: {INSTALL_HINT}") from exc
    return tensor.numpy()


def load_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load matching image and label arrays of one Fashion-MNIST split."""
    images = read_idx(images_path, "images")
    labels = read_idx(labels_path, "labels")
    if len(images) != len(labels):
        raise SampleError(f"{images_path} and {labels_path} differ in length")
    return images, labels


def geometric_sizes(largest: int, smallest: int, count: int) -> list[int]:
    """Return ``count`` rounded sizes falling geometrically from largest to smallest."""
    ratio = (smallest / largest) ** (1 / (count - 1))
    return [round(largest * ratio**i) for i in range(count)]


def assign_train_sizes(rng: random.Random, n_classes: int, largest: int = TRAIN_MAX,
                       smallest: int = TRAIN_MIN) -> dict[int, int]:
    """Map each class to a long-tailed train size, in a seeded random order."""
    classes = list(range(n_classes))
    rng.shuffle(classes)
    sizes = geometric_sizes(largest, smallest, n_classes)
    return dict(sorted(zip(classes, sizes, strict=True)))


def class_indices(labels: np.ndarray, label: int) -> list[int]:
    """Return the (sorted) source indices of all images with the given label."""
    return np.flatnonzero(labels == label).tolist()


def pick_train_val(
    rng: random.Random, labels: np.ndarray, train_sizes: dict[int, int], val_per_class: int
) -> tuple[list[LabeledImage], list[LabeledImage]]:
    """Draw disjoint train and val images per class from the source train set."""
    train: list[LabeledImage] = []
    val: list[LabeledImage] = []
    for label, n_train in train_sizes.items():
        drawn = rng.sample(class_indices(labels, label), n_train + val_per_class)
        train += [LabeledImage(i, label) for i in sorted(drawn[:n_train])]
        val += [LabeledImage(i, label) for i in sorted(drawn[n_train:])]
    return train, val


def seeded_uuid(rng: random.Random) -> str:
    """Return a version-4 style UUID string drawn from the seeded RNG."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def pick_test(
    rng: random.Random, labels: np.ndarray, per_class: int
) -> list[TestImage]:
    """Draw a balanced, shuffled, UUID-named test set from the t10k set."""
    chosen = [
        (index, label)
        for label in range(len(CLASS_NAMES))
        for index in rng.sample(class_indices(labels, label), per_class)
    ]
    rng.shuffle(chosen)
    return [TestImage(index, label, seeded_uuid(rng)) for index, label in chosen]


def make_plan(
    seed: int, train_labels: np.ndarray, test_labels: np.ndarray,
    val_per_class: int, test_per_class: int, train_max: int = TRAIN_MAX, train_min: int = TRAIN_MIN,
) -> SamplePlan:
    """Decide, from one seeded RNG, which images go into each split."""
    rng = random.Random(seed)
    train_sizes = assign_train_sizes(rng, len(CLASS_NAMES), train_max, train_min)
    train, val = pick_train_val(rng, train_labels, train_sizes, val_per_class)
    test = pick_test(rng, test_labels, test_per_class)
    return SamplePlan(train_sizes, train, val, test)


def check_output_is_ours(output: Path) -> None:
    """Refuse an output path that is not missing, empty, or a previous sample."""
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise SampleError(f"refusing to use {output}: not a plain folder")
    if not output.exists():
        return
    names = {p.name for p in output.iterdir()}
    unexpected = sorted(names - OWNED_NAMES)
    if unexpected:
        raise SampleError(
            f"refusing to overwrite {output}: unexpected entries {unexpected[:5]}"
        )
    if names and not is_our_readme(output / README_NAME):
        raise SampleError(
            f"refusing to overwrite {output}: no {README_NAME} written by this script"
        )


def is_our_readme(path: Path) -> bool:
    """Tell whether ``path`` is a README.md this script wrote (by its title)."""
    if not path.is_file():
        return False
    with path.open(encoding="utf-8") as handle:
        return handle.readline().rstrip("\n") == README_TITLE


def reset_split_dirs(output: Path) -> None:
    """Delete and recreate the train/, val/ and test/ folders."""
    for name in SPLIT_DIRS:
        split_dir = output / name
        if split_dir.is_symlink() or split_dir.is_file():
            split_dir.unlink()
        elif split_dir.exists():
            shutil.rmtree(split_dir)
        split_dir.mkdir(parents=True)


def save_jpeg(pixels: np.ndarray, path: Path) -> None:
    """Save a 28x28 uint8 array as a grayscale JPEG, byte-for-byte reproducibly."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("L").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    path.write_bytes(buffer.getvalue())


def write_labeled(images: np.ndarray, items: list[LabeledImage], split_dir: Path) -> None:
    """Write labeled images as ``<split>/<label>/<index>.jpg``."""
    for item in items:
        class_dir = split_dir / str(item.label)
        class_dir.mkdir(exist_ok=True)
        save_jpeg(images[item.index], class_dir / f"{item.index:05d}.jpg")


def write_test(images: np.ndarray, items: list[TestImage], test_dir: Path) -> None:
    """Write unlabeled test images as ``test/<uuid>.jpg``."""
    for item in items:
        save_jpeg(images[item.index], test_dir / f"{item.name}.jpg")


def write_test_labels(items: list[TestImage], path: Path) -> None:
    """Write the test answers as ``image_name,label`` rows, sorted by name."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image_name", "label"])
        for item in sorted(items, key=lambda t: t.name):
            writer.writerow([item.name, item.label])


def count_per_class(labels: list[int]) -> list[int]:
    """Count how many of ``labels`` fall into each class."""
    return [labels.count(c) for c in range(len(CLASS_NAMES))]


def split_counts(plan: SamplePlan) -> dict[str, list[int]]:
    """Return per-class image counts for each split."""
    return {
        "train": count_per_class([i.label for i in plan.train]),
        "val": count_per_class([i.label for i in plan.val]),
        "test": count_per_class([i.label for i in plan.test]),
    }


def train_sizes_flags(args: argparse.Namespace) -> str:
    """The --train-max/--train-min flags of a build that did not use the defaults (else nothing)."""
    if (args.train_max, args.train_min) == (TRAIN_MAX, TRAIN_MIN):
        return ""
    return f" --train-max {args.train_max} --train-min {args.train_min}"


def readme_text(plan: SamplePlan, args: argparse.Namespace) -> str:
    """Compose the README.md describing the sample and how it was built."""
    counts = split_counts(plan)
    rows = "\n".join(
        f"| {c} | {name} | {counts['train'][c]} | {counts['val'][c]} | {counts['test'][c]} |"
        for c, name in enumerate(CLASS_NAMES)
    )
    totals = {split: sum(n) for split, n in counts.items()}
    command = (f"python scripts/make_sample.py --seed {args.seed} --val-per-class {args.val_per_class} "
               f"--test-per-class {args.test_per_class}{train_sizes_flags(args)}")
    return f"""{README_TITLE}

A tiny, long-tailed subset of [Fashion-MNIST](https://github.com/zalandoresearch/fashion-mnist)
(28x28 grayscale JPEGs, quality {JPEG_QUALITY}) bundled for quick tests and demos.
Licence: MIT, Copyright (c) 2017 Zalando SE -- see `LICENSE`.

- `train/<class>/*.jpg` -- long-tailed: class sizes fall geometrically from
  {args.train_max} to {args.train_min}; which class gets which size is a seeded shuffle.
- `val/<class>/*.jpg` -- {args.val_per_class} per class, from the Fashion-MNIST
  train set, disjoint from `train/`.
- `test/*.jpg` -- {args.test_per_class} per class from the Fashion-MNIST test
  (t10k) set, unlabeled and named by UUID; answers are in `test_labels.csv`
  (`image_name,label`, name without `.jpg`).

Train/val file names are the image's index in the Fashion-MNIST train set.

## How it was built

From the Debian package `dataset-fashion-mnist`:

```
{command}
```

The script is deterministic: rerunning it gives byte-identical files.

## Classes and counts

| Folder | Class | train | val | test |
|---|---|---|---|---|
{rows}
| | **Total** | **{totals['train']}** | **{totals['val']}** | **{totals['test']}** |
"""


def write_dataset(plan: SamplePlan, args: argparse.Namespace,
                  train_images: np.ndarray, test_images: np.ndarray) -> None:
    """Write the README, LICENSE, all images and the test answers."""
    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    (output / README_NAME).write_text(readme_text(plan, args), encoding="utf-8")
    (output / LICENSE_NAME).write_text(LICENSE_TEXT, encoding="utf-8")
    reset_split_dirs(output)
    write_labeled(train_images, plan.train, output / "train")
    write_labeled(train_images, plan.val, output / "val")
    write_test(test_images, plan.test, output / "test")
    write_test_labels(plan.test, output / TEST_LABELS_NAME)


def disk_usage(root: Path) -> tuple[int, int, int]:
    """Return (file count, total file bytes, allocated KiB incl. folders) under root."""
    paths = [root, *root.rglob("*")]
    files = [p for p in paths if p.is_file()]
    total_bytes = sum(p.stat().st_size for p in files)
    allocated_kib = sum(p.lstat().st_blocks for p in paths) * 512 // 1024
    return len(files), total_bytes, allocated_kib


def print_mapping(train_sizes: dict[int, int]) -> None:
    """Print which class got which train size, largest first."""
    print("Train class sizes (class -> images):")
    for label, size in sorted(train_sizes.items(), key=lambda kv: -kv[1]):
        print(f"  {label} {CLASS_NAMES[label]:<12} -> {size}")


def print_summary(plan: SamplePlan, output: Path) -> None:
    """Print per-class counts per split and the totals on disk."""
    counts = split_counts(plan)
    print("class  " + "  ".join(f"{split:>5}" for split in counts))
    for c in range(len(CLASS_NAMES)):
        print(f"{c:>5}  " + "  ".join(f"{counts[s][c]:>5}" for s in counts))
    print("total  " + "  ".join(f"{sum(n):>5}" for n in counts.values()))
    n_files, n_bytes, kib = disk_usage(output)
    print(f"{output}: {n_files} files, {n_bytes} bytes, {kib} KiB allocated (du -sk)")


def check_counts(args: argparse.Namespace) -> None:
    """Reject per-class counts that are negative, and a long tail that does not fall."""
    if args.val_per_class < 0 or args.test_per_class < 0:
        raise SampleError("--val-per-class and --test-per-class must be >= 0")
    if not 1 <= args.train_min <= args.train_max:
        raise SampleError("--train-min and --train-max: need 1 <= --train-min <= --train-max")


def run(args: argparse.Namespace) -> None:
    """Build the sample dataset described by the parsed arguments."""
    check_counts(args)
    paths = source_paths(args.source)
    check_output_is_ours(args.output)
    train_images, train_labels = load_split(paths["train_images"], paths["train_labels"])
    test_images, test_labels = load_split(paths["test_images"], paths["test_labels"])
    plan = make_plan(args.seed, train_labels, test_labels,
                     args.val_per_class, args.test_per_class, args.train_max, args.train_min)
    print_mapping(plan.train_sizes)
    write_dataset(plan, args, train_images, test_images)
    print_summary(plan, args.output)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run and turn expected failures into a one-line error."""
    args = parse_args(argv)
    try:
        run(args)
    except SampleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
