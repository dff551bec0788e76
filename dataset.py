"""Finding the images of an ImageFolder tree and splitting them: classes, train/val (a held-out share, folds)."""

from __future__ import annotations

import random
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import Sample
from images import (
    COMMON_EXTENSIONS,
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTENSIONS,
    check_images,
    is_image_content,
    is_image_name,
)
from utils import UserError, printable, some_names

# --------------------------------------------------------------------------- finding files


def sort_class_names(names: Sequence[str]) -> list[str]:
    """Order class names numerically when all are integers (``2`` before ``10``), else alphabetically."""
    if names and all(re.fullmatch(r"[+-]?\d+", name) for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files in ``folder`` and its sub-folders (as torchvision's ImageFolder reads a class folder), in path
    order, and the entries that were ignored: other files, hidden files and folders (``.DS_Store``,
    ``.ipynb_checkpoints/``), a folder met a second time through a symbolic link, and a link to a folder that holds
    ``folder`` (which would pull in other classes' images).

    A broken link named as an image (``img.jpg`` -> a file gone) is listed as an image: reading it fails, so it is
    skipped and listed like any unreadable image, never dropped unseen as a non-image.
    """
    images: list[Path] = []
    ignored: list[Path] = []
    root = folder.resolve()
    _collect_images(folder, images, ignored, {root} | set(root.parents))
    return images, ignored


def _collect_images(folder: Path, images: list[Path], ignored: list[Path], visited: set[Path]) -> None:
    try:
        entries = sorted(folder.iterdir(), key=lambda path: path.name)
    except OSError:  # no permission to list it
        ignored.append(folder)
        return
    for entry in entries:
        if entry.name.startswith("."):
            ignored.append(entry)
        elif entry.is_dir():
            real = entry.resolve()
            if real in visited:  # a link back up the tree, or to a folder already read
                ignored.append(entry)
                continue
            visited.add(real)
            _collect_images(entry, images, ignored, visited)
        elif is_image_name(entry) and (entry.is_file() or is_broken_link(entry)):
            images.append(entry)
        else:
            ignored.append(entry)


def is_broken_link(path: Path) -> bool:
    """True for a symbolic link whose target does not exist."""
    return path.is_symlink() and not path.exists()


def visible_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` whose names do not start with a dot, sorted by name."""
    return sorted((entry for entry in folder.iterdir() if not entry.name.startswith(".")), key=lambda path: path.name)


def same_name(name: str) -> str:
    """``name`` in Unicode's composed form (NFC), so that ``café`` as macOS writes it (NFD) matches other copies."""
    return unicodedata.normalize("NFC", name)


def class_folders(split_dir: Path) -> list[str]:
    """Names of the (visible) sub-folders of ``split_dir``, in class order."""
    return sort_class_names([entry.name for entry in visible_entries(split_dir) if entry.is_dir()])


def require_no_loose_images(split_dir: Path) -> None:
    """Refuse images lying directly in a labeled split folder: they belong to no class, so they would be lost."""
    loose = [entry for entry in visible_entries(split_dir) if entry.is_file() and is_image_name(entry)]
    if loose:
        raise UserError(f"{split_dir}: {len(loose)} image(s) lie directly in it ({_first_names(loose)}) rather than "
                        f"in a class folder; move them into {split_dir}/<class>/ (or pass the folder above the "
                        "class folders)")


def require_not_nested(split_dir: Path, flag: str | None = None) -> None:
    """Refuse a Kaggle-style ``train/train/<class>/``: one folder whose sub-folders hold the images.

    ``flag`` names the option that would point one level down instead (``--data-dir`` for ``train/``).
    """
    entries = visible_entries(split_dir)
    if len(entries) != 1 or not entries[0].is_dir():
        return
    inner = entries[0]
    if not any(entry.is_file() and is_image_name(entry) for entry in inner.iterdir()) and \
            sum(entry.is_dir() for entry in visible_entries(inner)) >= 2:
        instead = f", or pass {flag} {split_dir}" if flag else ""
        raise UserError(f"{split_dir}: its only folder, {inner.name}/, holds the class folders ({inner}/<class>/); "
                        f"move them up into {split_dir}/{instead}")


def _first_names(paths: Sequence[Path], limit: int = 3) -> str:
    return some_names([path.name for path in paths], limit)


def scan_labeled_split(split_dir: Path, class_names: Sequence[str]) -> tuple[list[Sample], list[Path]]:
    """Samples ``(path, class index)`` of each class folder present in ``split_dir`` (sub-folders included), and
    the entries ignored. Images lying directly in ``split_dir`` are refused (see :func:`require_no_loose_images`).
    """
    require_no_loose_images(split_dir)
    samples: list[Sample] = []
    ignored: list[Path] = []
    folders = {same_name(name): split_dir / name for name in class_folders(split_dir)}
    for index, name in enumerate(class_names):
        folder = folders.get(same_name(name))
        if folder is None:
            continue
        images, skipped = list_images(folder)
        samples.extend((str(path), index) for path in images)
        ignored.extend(skipped)
    ignored.extend(entry for entry in split_dir.iterdir() if not entry.is_dir() or entry.name.startswith("."))
    return samples, ignored


def find_test_images(test_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """Every image file in ``test_dir`` and its sub-folders (in path order) and the entries ignored.

    Errors when there are none, or when the folder holds nothing but one sub-folder (``test/test/*.jpg``): that
    sub-folder is what to pass.
    """
    test_dir = Path(test_dir)
    if not test_dir.is_dir():
        raise UserError(f"--test-dir {test_dir}: folder not found; point it at the folder of unlabeled test images")
    entries = visible_entries(test_dir)
    if len(entries) == 1 and entries[0].is_dir():
        raise UserError(f"--test-dir {test_dir}: holds only the folder {entries[0].name}/; pass --test-dir "
                        f"{entries[0]}")
    images, ignored = list_images(test_dir)
    images, ignored = _add_images_by_content(test_dir, images, ignored)
    if not images:
        raise UserError(f"--test-dir {test_dir}: no image files found (looked for {', '.join(COMMON_EXTENSIONS)} and "
                        f"the {len(IMAGE_EXTENSIONS) - len(COMMON_EXTENSIONS)} other extensions Pillow reads)")
    nested = sorted({path.parent.relative_to(test_dir).as_posix() for path in images} - {"."})
    if nested:
        print(f"note: {test_dir}: also predicting the images in its sub-folder(s) {', '.join(nested)}")
    return images, ignored


def _add_images_by_content(
    folder: Path, images: list[Path], ignored: list[Path]
) -> tuple[list[Path], list[Path]]:
    """Move the ignored visible files whose content is an image (``photo``, ``a.jpg_large``) to ``images``, with a
    note: a test image is never left out of the submission for its name alone."""
    found = [path for path in ignored if not path.name.startswith(".") and path.is_file() and is_image_content(path)]
    if not found:
        return images, ignored
    print(f"note: {folder}: {len(found)} file(s) without an image extension hold images and are predicted too: "
          f"{_first_names(found, limit=10)}")
    named = set(found)
    rest = [path for path in ignored if path not in named]
    return sorted(images + found, key=lambda path: path.relative_to(folder).parts), rest


def report_ignored(label: str, paths: Sequence[Path], limit: int = 20) -> None:
    """Print once which files of ``label`` were ignored as not being images."""
    if not paths:
        return
    shown = ", ".join(printable(str(path)) for path in paths[:limit])  # a name may not be UTF-8
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    print(f"note: ignored {len(paths)} non-image entr{'y' if len(paths) == 1 else 'ies'} in {label}: {shown}{more}")


# --------------------------------------------------------------------------- splits and weights


@dataclass
class TrainValData:
    """What training needs to know about the data: samples of both splits and the class names in order.

    ``held_out`` lists the validation images split off ``train/`` (paths relative to it), to be stored with the
    run so that resuming and evaluating use exactly these; it is None when the data has a ``val/`` folder.
    ``sizes`` are the images' stored sizes from their headers (what the decoded-image cache will need).
    """

    class_names: list[str]
    train_samples: list[Sample]
    val_samples: list[Sample]
    val_source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    held_out: list[str] | None = None
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # (width, height) of each readable image


def stratified_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split samples into (train, val) keeping ``fraction`` of each class for val (at least one if it has two)."""
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        members = sorted(by_class[label])
        rng.shuffle(members)
        count = int(round(len(members) * fraction))
        count = min(max(count, 1 if len(members) > 1 else 0), len(members) - 1)
        val.extend(members[:count])
        train.extend(members[count:])
    return sorted(train), sorted(val)


def split_by_list(samples: Sequence[Sample], root: Path, held_out: Sequence[str]) -> tuple[list[Sample], list[Sample],
                                                                                           list[str]]:
    """(train, val, missing): the samples whose path relative to ``root`` is in ``held_out`` are val, the others
    train; ``missing`` are the listed paths no sample has any more."""
    listed = set(held_out)
    val = [sample for sample in samples if relative_name(sample[0], root) in listed]
    train = [sample for sample in samples if relative_name(sample[0], root) not in listed]
    found = {relative_name(path, root) for path, _ in val}
    return train, val, [name for name in held_out if name not in found]


def relative_name(path: str | Path, root: Path) -> str:
    """``path`` relative to ``root``, with forward slashes (how a held-out list stores it on every OS)."""
    return Path(path).relative_to(root).as_posix()


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """How many samples each class index has."""
    counts = Counter(label for _, label in samples)
    return [counts.get(index, 0) for index in range(num_classes)]


def load_train_val(  # noqa: PLR0913
    data_dir: str | Path, val_fraction: float, seed: int, verify_images: bool = False, workers: int = 0,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, held_out: Sequence[str] | None = None,
    fold: tuple[int, int] | None = None, train_on_all: bool = False, val_fraction_given: bool = False,
) -> TrainValData:
    """Scan ``data_dir/train`` and ``data_dir/val`` (or split train) into samples; report what was left out.

    Unreadable files are found by their headers, or by decoding every image with ``verify_images``. Without
    ``val/``, ``held_out`` (a run's stored list) decides the validation images; without it, a stratified
    ``val_fraction`` of train/ drawn with ``seed``. With ``fold`` (I, K), train/ and val/ are pooled and fold I
    of a stratified K-fold split validates (``held_out`` then lists paths relative to ``data_dir``); with
    ``train_on_all`` every image trains and nothing validates. ``val_fraction_given``: the user set
    ``--val-fraction``, so a note says when it goes unused.
    """
    data_dir = Path(data_dir)
    train_dir = _require_train_dir(data_dir)
    class_names, train_samples = _scan_train(train_dir)

    val_dir = data_dir / "val"
    if val_fraction_given:
        note_unused_val_fraction(val_fraction, val_dir, fold, train_on_all)
    val_samples = _scan_val(val_dir, class_names) if val_dir.is_dir() else []
    # Drop unreadable files before any split, so the split's guarantees hold for the images actually used.
    check = check_images([path for path, _ in train_samples + val_samples], verify_images, workers, max_pixels)
    skipped = check.unreadable
    bad = {path for path, _ in skipped}
    train_samples = [sample for sample in train_samples if sample[0] not in bad]
    val_samples = [sample for sample in val_samples if sample[0] not in bad]
    _require_readable_images(train_dir, class_names, train_samples)

    if fold is not None or train_on_all:
        pooled = TrainValData(class_names, sorted(train_samples + val_samples), [], "", skipped, sizes=check.sizes)
        if train_on_all:
            pooled.val_source = "nothing (--train-on-all: " + ("train/ and val/ both train)" if val_samples else
                                                              "all of train/ trains)")
        else:
            _validate_on_fold(pooled, data_dir, fold, seed, held_out)
            _note_classes_without_val_images(pooled)
        return pooled
    data = TrainValData(class_names, train_samples, val_samples, str(val_dir), skipped, sizes=check.sizes)
    if not val_dir.is_dir():
        _hold_out_val(data, train_dir, val_fraction, seed, held_out)
    _note_classes_without_val_images(data)
    return data


def note_unused_val_fraction(val_fraction: float, val_dir: Path, fold: tuple[int, int] | None,
                             train_on_all: bool) -> None:
    """Say so when a given ``--val-fraction`` will not be used: --train-on-all, --fold or a val/ folder decides."""
    if train_on_all:
        reason = "--train-on-all validates on nothing"
    elif fold is not None:
        reason = f"--fold {fold[0]}/{fold[1]} validates on its fold"
    elif val_dir.is_dir():
        reason = f"{val_dir} exists and is the validation set (remove it to split train/ instead)"
    else:
        return
    print(f"note: --val-fraction {val_fraction} is not used: {reason}")


def fold_split(samples: Sequence[Sample], fold: int, folds: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, val): fold ``fold`` (1-based) of scikit-learn's StratifiedKFold over ``samples``, shuffled with
    ``seed``, is val. The same samples, fold count and seed give the same folds, which together cover each sample
    exactly once."""
    from sklearn.model_selection import StratifiedKFold  # here: the import takes a second (metrics.py)

    samples = sorted(samples)
    labels = np.array([label for _, label in samples])
    with warnings.catch_warnings():  # classes with fewer images than folds: noted by the caller
        warnings.simplefilter("ignore", UserWarning)
        splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(labels, labels))
    train_indices, val_indices = splits[fold - 1]
    return [samples[index] for index in train_indices], [samples[index] for index in val_indices]


def _validate_on_fold(data: TrainValData, data_dir: Path, fold: tuple[int, int], seed: int,
                      held_out: Sequence[str] | None) -> None:
    index, folds = fold
    if len(data.train_samples) < folds:
        raise UserError(f"--fold {index}/{folds}: only {len(data.train_samples)} images in {data_dir}; use fewer folds")
    if held_out is not None:
        data.train_samples, data.val_samples, missing = split_by_list(data.train_samples, data_dir, held_out)
        _note_missing_held_out(missing, held_out, data_dir, len(data.val_samples))
    else:
        require_fold_count_possible(data, fold)
        data.train_samples, data.val_samples = fold_split(data.train_samples, index, folds, seed)
        counts = class_counts(data.train_samples + data.val_samples, len(data.class_names))
        few = [name for name, count in zip(data.class_names, counts, strict=True) if count < folds]
        if few:
            print(f"note: --fold {index}/{folds}: {len(few)} class(es) have fewer images than folds "
                  f"({', '.join(few[:5])}"
                  f"{' ...' if len(few) > 5 else ''}); some folds validate without them")
    data.val_source = f"fold {index}/{folds} of {data_dir}'s train/ and val/ pooled (stratified, seed {seed})"
    data.held_out = [relative_name(path, data_dir) for path, _ in data.val_samples]


def require_fold_count_possible(data: TrainValData, fold: tuple[int, int]) -> None:
    """Refuse ``--fold I/K`` when every class has fewer than K images: no stratified K-fold split exists."""
    index, folds = fold
    counts = class_counts(data.train_samples, len(data.class_names))
    fewest, most = min(counts), max(counts)
    if most >= folds:
        return
    instead = f"use at most {most} folds (--fold {min(index, most)}/{most})" if most >= 2 else \
        "add images: a fold split needs a class with at least 2"
    raise UserError(f"--fold {index}/{folds}: every class has fewer than {folds} images (the smallest, "
                    f"{data.class_names[counts.index(fewest)]}, has {fewest}; the largest has {most}); {instead}")


def _note_missing_held_out(missing: Sequence[str], held_out: Sequence[str], root: Path, kept: int) -> None:
    if missing:
        print(f"note: {len(missing)} of the {len(held_out)} validation images this run held out of {root} "
              f"are missing or unreadable now ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
              f"validating on the other {kept}")


def _hold_out_val(data: TrainValData, train_dir: Path, val_fraction: float, seed: int,
                  held_out: Sequence[str] | None) -> None:
    if held_out is not None:
        data.train_samples, data.val_samples, missing = split_by_list(data.train_samples, train_dir, held_out)
        _note_missing_held_out(missing, held_out, train_dir, len(data.val_samples))
        data.val_source = f"the {len(data.val_samples)} images of {train_dir} the run held out as val"
    else:
        if not 0 < val_fraction < 1:
            raise UserError(f"--val-fraction {val_fraction}: must be between 0 and 1 (no {train_dir.parent / 'val'} "
                            "folder exists)")
        data.train_samples, data.val_samples = stratified_split(data.train_samples, val_fraction, seed)
        data.val_source = held_out_share(len(data.val_samples), len(data.train_samples) + len(data.val_samples),
                                         val_fraction, train_dir, seed)
    data.held_out = [relative_name(path, train_dir) for path, _ in data.val_samples]
    if not data.val_samples:
        raise UserError(f"{train_dir}: no image left to validate on; add a val/ folder or more training images")


def held_out_share(held_out: int, total: int, val_fraction: float, train_dir: Path, seed: int) -> str:
    """Where the validation images come from: '10% of data/train (stratified, seed 0)', or, when the share held out
    is not the --val-fraction (few images a class), the real share and why."""
    if abs(held_out / total - val_fraction) < 0.01:
        return f"{val_fraction:.0%} of {train_dir} (stratified, seed {seed})"
    return (f"{train_dir}: {held_out / total:.0%} of its {total}, not the {val_fraction:.0%} of --val-fraction, as "
            f"each class gives its share in whole images and at least one (stratified, seed {seed})")


def _note_classes_without_val_images(data: TrainValData) -> None:
    counts = class_counts(data.val_samples, len(data.class_names))
    absent = [name for name, count in zip(data.class_names, counts, strict=True) if count == 0]
    if absent and data.val_samples:
        shown = ", ".join(absent[:10]) + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
        print(f"note: {len(absent)} class(es) have no validation images ({shown}); validation accuracy cannot "
              "tell how well the model knows them")


def _require_readable_images(train_dir: Path, class_names: list[str], train_samples: list[Sample]) -> None:
    counts = class_counts(train_samples, len(class_names))
    unlearnable = [str(train_dir / name) for name, count in zip(class_names, counts, strict=True) if count == 0]
    if unlearnable:
        raise UserError(
            f"no image in {', '.join(unlearnable)} can be decoded; replace the unreadable files or remove the folder"
        )


def _require_train_dir(data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir}: folder not found; it should hold train/<class>/*.jpg")
    train_dir = data_dir / "train"
    if not train_dir.is_dir() and data_dir.name in ("train", "val", "test"):
        raise UserError(f"--data-dir {data_dir}: is the {data_dir.name}/ folder itself; pass the folder that holds "
                        f"it: --data-dir {data_dir.parent}")
    if not train_dir.is_dir():
        raise UserError(f"--data-dir {data_dir}: no train/ folder inside; expected {train_dir}/<class>/*.jpg")
    return train_dir


def has_images(folder: Path) -> bool:
    """True when ``folder`` or one of its sub-folders holds a file with an image extension."""
    return bool(list_images(folder)[0])


def unknown_class_folders(split_dir: Path, class_names: Sequence[str]) -> list[str]:
    """Class folders of ``split_dir`` that hold images but are not among ``class_names``."""
    known = {same_name(name) for name in class_names}
    return [name for name in class_folders(split_dir)
            if same_name(name) not in known and has_images(split_dir / name)]


def _scan_train(train_dir: Path) -> tuple[list[str], list[Sample]]:
    """The class names (folders with images, in class order) and the samples of ``train_dir``."""
    require_not_nested(train_dir, flag="--data-dir")
    names = class_folders(train_dir)
    require_distinct_class_names(train_dir, names)
    samples, ignored = scan_labeled_split(train_dir, names)
    report_ignored(str(train_dir), ignored)
    counts = class_counts(samples, len(names))
    kept = [name for name, count in zip(names, counts, strict=True) if count]
    empty = [name for name, count in zip(names, counts, strict=True) if not count]
    if empty:
        print(f"note: left out {len(empty)} class folder(s) of {train_dir} with no images: {', '.join(empty)}")
    if not kept:
        raise UserError(f"{train_dir}: no class folders with images; expected {train_dir}/<class>/*.jpg")
    if len(kept) == 1:
        raise UserError(f"{train_dir}: only one class folder with images ({kept[0]}); a classifier needs at least "
                        f"two classes, as {train_dir}/<class>/*.jpg folders")
    new_index = {names.index(name): index for index, name in enumerate(kept)}
    return kept, [(path, new_index[label]) for path, label in samples]


def require_distinct_class_names(split_dir: Path, names: Sequence[str]) -> None:
    """Refuse two class folders whose names differ only in Unicode normalization (``café`` twice): they look alike
    and would be one class in every other folder."""
    first_with: dict[str, str] = {}
    for name in names:
        other = first_with.setdefault(same_name(name), name)
        if other != name:
            raise UserError(f"{split_dir}: the class folders {other!r} and {name!r} have the same name written with "
                            "different Unicode characters (composed and decomposed accents); merge them into one")


def _scan_val(val_dir: Path, class_names: list[str]) -> list[Sample]:
    require_not_nested(val_dir)
    unknown = unknown_class_folders(val_dir, class_names)
    if unknown:
        raise UserError(
            f"{val_dir}: class folder(s) {', '.join(unknown)} have no images in train/; "
            "add training images for them or remove them from val/"
        )
    samples, ignored = scan_labeled_split(val_dir, class_names)
    report_ignored(str(val_dir), ignored)
    if not samples:
        raise UserError(f"{val_dir}: no images; add val/<class>/*.jpg or remove val/ to split train/ instead")
    return samples


def describe_data(data: TrainValData) -> None:
    """Print the class count, split sizes, imbalance and any skipped files."""
    counts = class_counts(data.train_samples, len(data.class_names))
    print(f"data: {len(data.class_names)} classes; train {len(data.train_samples)} images "
          f"({min(counts)} to {max(counts)} a class); {describe_val(data)}")
    if data.skipped:
        print(f"warning: skipped {len(data.skipped)} image file(s) that cannot be read or are too large:")
        for path, reason in data.skipped:
            print(f"  {path}: {reason}")


def describe_val(data: TrainValData) -> str:
    """'val 40 images from data/val', or 'no val (--train-on-all: ...)' when nothing validates."""
    if data.val_samples:
        return f"val {len(data.val_samples)} images from {data.val_source}"
    if data.val_source.startswith("nothing "):
        return f"no val {data.val_source.removeprefix('nothing ')}"
    return f"no val images from {data.val_source}"
