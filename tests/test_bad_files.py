"""Every kind of odd or broken file a real image folder holds, through train.py and predict.py.

One training run (in-process, one epoch) goes over a class folder holding all of them at once; each behaviour is
then its own test against that run. Odd but valid images (CMYK, palette with transparency, RGBA, LA, L, 16-bit,
EXIF-rotated, 1x1, 3x2, non-ASCII and space-containing names) must be decoded and trained on; unreadable ones
(empty, text named .jpg, no permission, above the decompression-bomb limit) skipped with a reason and written to
skipped_files.txt; a truncated JPEG skipped when training meets it (or up front with --verify-images);
non-image files and hidden files ignored and listed once (a symbolic link loop named .jpg is an image that cannot be
read: skipped and listed); class folders without images left out.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import batch_iterables
import device_decode
import evaluate
import images
import loader_items
import options
import pipeline
import predict
import train
from accel import Accel
from checkpoint import load_checkpoint
from conftest import (
    CLASS_COLOURS,
    PREDICT_FLAGS,
    TINY_TRAIN_FLAGS,
    CliResult,
    ColourData,
    assert_user_error,
    call_main,
    colour_image,
    read_csv_rows,
)
from images import load_rgb

# --max-image-pixels, lowered for these tests so the "huge" image can stay small. Every other test image is at most
# 32 x 32 = 1024 pixels.
TEST_MAX_IMAGE_PIXELS = 4000
HUGE_SIDE = 100  # 10,000 pixels: over TEST_MAX_IMAGE_PIXELS
LIMIT_FLAGS = ("--max-image-pixels", str(TEST_MAX_IMAGE_PIXELS))


# --------------------------------------------------------------------------- the files


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(sum(map(ord, name)))


def _save_rgb(path: Path, colour=CLASS_COLOURS[3], size: int = 32, **options) -> None:
    colour_image(colour, _rng(path.name), size).save(path, **options)


def cmyk_jpeg(path: Path) -> None:
    colour_image(CLASS_COLOURS[3], _rng(path.name)).convert("CMYK").save(path, format="JPEG")


def palette_png_with_transparency(path: Path) -> None:
    image = colour_image(CLASS_COLOURS[3], _rng(path.name)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    image.save(path, transparency=0)


def rgba_png(path: Path) -> None:
    image = colour_image(CLASS_COLOURS[3], _rng(path.name)).convert("RGBA")
    image.putalpha(200)
    image.save(path)


def la_png(path: Path) -> None:
    colour_image(CLASS_COLOURS[3], _rng(path.name)).convert("LA").save(path)


def l_png(path: Path) -> None:
    colour_image(CLASS_COLOURS[3], _rng(path.name)).convert("L").save(path)


def grey16_png(path: Path) -> None:
    Image.fromarray(np.full((32, 32), 50_000, dtype=np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")  # really 16 bits a pixel


def exif_rotated_jpeg(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to display
    Image.new("RGB", (40, 20), CLASS_COLOURS[3]).save(path, exif=exif.tobytes())


def one_pixel_png(path: Path) -> None:
    Image.new("RGB", (1, 1), CLASS_COLOURS[3]).save(path)


def three_by_two_jpeg(path: Path) -> None:
    Image.new("RGB", (3, 2), CLASS_COLOURS[3]).save(path)


def plain_jpeg(path: Path) -> None:
    _save_rgb(path, format="JPEG", quality=95)


def plain_png(path: Path) -> None:
    _save_rgb(path, format="PNG")


def truncated_jpeg(path: Path) -> None:
    """A JPEG whose header is intact but whose data stops at 60%: opens fine, fails when decoded."""
    buffer = io.BytesIO()
    Image.fromarray(_rng(path.name).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 6 // 10])


def empty_file(path: Path) -> None:
    path.write_bytes(b"")


def text_file(path: Path) -> None:
    path.write_text("this is a text file, not a JPEG\n")


def huge_png(path: Path) -> None:
    Image.new("RGB", (HUGE_SIDE, HUGE_SIDE), CLASS_COLOURS[3]).save(path)


# Valid images that must be decoded and trained on, by file name.
GOOD_FILES: dict[str, Callable[[Path], None]] = {
    "cmyk.jpg": cmyk_jpeg,
    "palette-transparent.png": palette_png_with_transparency,
    "rgba.png": rgba_png,
    "la.png": la_png,
    "grey.png": l_png,
    "grey16.png": grey16_png,
    "exif-rotated.jpg": exif_rotated_jpeg,
    "one-pixel.png": one_pixel_png,
    "three-by-two.jpg": three_by_two_jpeg,
    "café ü.jpg": plain_jpeg,
    "with space.jpg": plain_jpeg,
    "日本語 画像.png": plain_png,
}
# Files whose header already fails, with a fragment of the reason given for each.
UNREADABLE_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty.jpg": (empty_file, "cannot identify image file"),
    "text.jpg": (text_file, "cannot identify image file"),
    "huge.png": (huge_png, "100x100 pixels (10,000) is above the limit of 4,000 (--max-image-pixels"),
    "locked.jpg": (plain_jpeg, "Permission denied"),  # reading is refused (see deny_reading)
}
IGNORED_NAMES = (".DS_Store", "Thumbs.db", "notes.txt", ".hidden.jpg")
LOOP_NAMES = ("loop-a.jpg", "loop-b.jpg")  # named as images, and unreadable: skipped and listed, not ignored


def write_clutter(folder: Path, loop: bool = True) -> None:
    """Non-image files, a hidden image and (``loop``) a symlink loop (loop-a.jpg -> loop-b.jpg -> loop-a.jpg)."""
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1\0")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + b"\0" * 60)
    (folder / "notes.txt").write_text("labels checked on Monday\n")
    plain_jpeg(folder / ".hidden.jpg")
    if loop:
        os.symlink("loop-b.jpg", folder / "loop-a.jpg")
        os.symlink("loop-a.jpg", folder / "loop-b.jpg")


def deny_reading(monkeypatch: pytest.MonkeyPatch, denied: set[str]) -> None:
    """Opening these paths fails as with no read permission (chmod 000 does not stop root, who runs CI)."""
    real_open = Image.open

    def guarded_open(fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)) and os.fspath(fp) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", guarded_open)


def write_plain_classes(root: Path, split: str, per_class: int) -> None:
    for label in range(3):
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            colour_image(CLASS_COLOURS[label], np.random.default_rng(label * 10 + index)).save(
                folder / f"{label}_{index}.jpg", quality=95)


# --------------------------------------------------------------------------- the run over all of them


@dataclass(frozen=True)
class BadRun:
    train_dir: Path
    output: Path
    result: CliResult
    decoded: dict[str, tuple[int, int]]  # path -> RGB size, for every image decoded during the run

    def path(self, name: str) -> str:
        return str(self.train_dir / "3" / name)

    def skipped(self) -> dict[str, str]:
        lines = (self.output / "skipped_files.txt").read_text(encoding="utf-8").splitlines()
        return dict(line.split("\t", 1) for line in lines)


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory: pytest.TempPathFactory) -> BadRun:
    """train.py for one epoch on classes 0-2 (plain) and 3 (every odd and broken file), plus empty classes 4, 5."""
    root = tmp_path_factory.mktemp("bad") / "data"
    write_plain_classes(root, "train", per_class=3)
    write_plain_classes(root, "val", per_class=1)
    odd = root / "train" / "3"
    odd.mkdir()
    plain_jpeg(odd / "plain.jpg")
    for name, make in GOOD_FILES.items():
        make(odd / name)
    for name, (make, _) in UNREADABLE_FILES.items():
        make(odd / name)
    truncated_jpeg(odd / "truncated.jpg")
    write_clutter(odd)
    (root / "val" / "3").mkdir()
    plain_jpeg(root / "val" / "3" / "v.jpg")
    (root / "train" / "4").mkdir()  # an empty class folder
    (root / "train" / "5").mkdir()  # one with no image in it
    (root / "train" / "5" / "readme.txt").write_text("to do\n")

    output = root.parent / "out"
    decoded: dict[str, tuple[int, int]] = {}
    real_load_rgb = images.load_rgb

    def recording_load_rgb(path, *args, **kwargs):
        image = real_load_rgb(path, *args, **kwargs)
        decoded[str(path)] = image.size
        return image

    with pytest.MonkeyPatch.context() as monkeypatch:
        deny_reading(monkeypatch, {str(odd / "locked.jpg")})
        monkeypatch.setattr(loader_items, "load_rgb", recording_load_rgb)
        # 3 x 3 plain + 14 in class 3 = 23 training images: batches of 8 leave no lone image to drop
        result = call_main(train.main, "--data-dir", root, "--output-dir", output, "--epochs", "1",
                           *TINY_TRAIN_FLAGS, "--batch-size", "8", *LIMIT_FLAGS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return BadRun(root / "train", output, result, decoded)


def test_training_over_every_kind_of_file_completes(bad_run: BadRun) -> None:
    checkpoint = load_checkpoint(bad_run.output / "best.pt")
    assert checkpoint.class_names == ["0", "1", "2", "3"]
    assert "Traceback" not in bad_run.result.stderr
    assert f"data: 4 classes; train {9 + 1 + len(GOOD_FILES) + 1} images" in bad_run.result.stdout


@pytest.mark.parametrize("name", sorted(GOOD_FILES))
def test_odd_but_valid_images_are_decoded_and_trained_on(bad_run: BadRun, name: str) -> None:
    path = bad_run.path(name)
    assert path in bad_run.decoded, f"{name} was never decoded"
    assert path not in bad_run.skipped()
    assert path not in bad_run.result.stdout + bad_run.result.stderr  # never named in a warning or note


@pytest.mark.parametrize("name, size", [("exif-rotated.jpg", (20, 40)), ("one-pixel.png", (1, 1)),
                                        ("three-by-two.jpg", (3, 2)), ("grey16.png", (32, 32))])
def test_decoded_sizes_follow_the_orientation(bad_run: BadRun, name: str, size: tuple[int, int]) -> None:
    assert bad_run.decoded[bad_run.path(name)] == size


@pytest.mark.parametrize("name", sorted(UNREADABLE_FILES))
def test_unreadable_files_are_skipped_up_front_with_the_reason(bad_run: BadRun, name: str) -> None:
    path, reason = bad_run.path(name), UNREADABLE_FILES[name][1]
    assert reason in bad_run.skipped()[path]
    start = bad_run.result.stdout.split("\nepoch ")[0]  # what was said before the first epoch
    assert f"  {path}: " in start and reason in start.split(f"  {path}: ")[1].splitlines()[0]
    assert path not in bad_run.decoded


def test_the_up_front_list_counts_the_unreadable_files(bad_run: BadRun) -> None:
    assert f"warning: skipped {len(UNREADABLE_FILES) + len(LOOP_NAMES)} image file(s) that cannot be read or are " \
        "too large:" in bad_run.result.stdout


@pytest.mark.parametrize("name", LOOP_NAMES)
def test_a_symlink_loop_named_as_an_image_is_skipped_and_listed_not_ignored(bad_run: BadRun, name: str) -> None:
    path = bad_run.path(name)
    assert "Too many levels of symbolic links" in bad_run.skipped()[path]
    assert "non-image" not in next(line for line in bad_run.result.stdout.splitlines() if path in line)


def test_truncated_jpeg_is_skipped_when_training_meets_it_and_listed(bad_run: BadRun) -> None:
    path = bad_run.path("truncated.jpg")
    assert bad_run.skipped()[path].startswith("image file is truncated")
    assert f"warning: skipping {path}: cannot decode (image file is truncated" in bad_run.result.stderr
    assert path not in bad_run.result.stdout.split("\nepoch ")[0]  # its header was fine: not caught up front
    assert path not in bad_run.decoded


def test_the_epoch_line_counts_the_training_images_skipped(bad_run: BadRun) -> None:
    """The truncated JPEG is warned about once a run; each epoch's line counts what that epoch left out."""
    epoch_lines = [line for line in bad_run.result.stdout.splitlines() if line.startswith("epoch ")]
    assert epoch_lines and all("  1 skipped" in line for line in epoch_lines)


@pytest.mark.parametrize("name", IGNORED_NAMES)
def test_non_image_and_hidden_entries_are_ignored_and_listed_once(bad_run: BadRun, name: str) -> None:
    path = bad_run.path(name)
    output = bad_run.result.stdout + bad_run.result.stderr
    assert output.count(path) == 1, output[-3000:]
    [note] = [line for line in bad_run.result.stdout.splitlines() if path in line]
    # and train/5/readme.txt, in the class folder left out for having no images
    assert note.startswith(f"note: ignored {len(IGNORED_NAMES) + 1} non-image entries in {bad_run.train_dir}: ")
    assert path not in bad_run.skipped() and path not in bad_run.decoded


def test_class_folders_without_images_are_left_out_with_a_note(bad_run: BadRun) -> None:
    assert f"note: left out 2 class folder(s) of {bad_run.train_dir} with no images: 4, 5" in bad_run.result.stdout


def test_verify_images_catches_a_truncated_jpeg_up_front(small_data: ColourData, tmp_path: Path,
                                                         no_final_outputs: None) -> None:
    root = tmp_path / "data"
    shutil.copytree(small_data.root / "train", root / "train")
    shutil.copytree(small_data.root / "val", root / "val")
    truncated = root / "train" / "0" / "truncated.jpg"
    truncated_jpeg(truncated)

    result = call_main(train.main, "--data-dir", root, "--output-dir", tmp_path / "out", "--epochs", "1",
                       "--verify-images", *TINY_TRAIN_FLAGS)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    start = result.stdout.split("\nepoch ")[0]
    assert "warning: skipped 1 image file(s) that cannot be read or are too large:" in start
    assert f"  {truncated}: image file is truncated" in start
    assert "truncated" in (tmp_path / "out" / "skipped_files.txt").read_text().split(f"{truncated}\t")[1]
    assert "warning: skipping" not in result.stderr  # training never met it


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_real_unreadable_permissions_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "locked.jpg"
    plain_jpeg(path)
    path.chmod(0)
    try:
        assert images.find_unreadable([path]) == [(str(path), "[Errno 13] Permission denied")]
    finally:
        path.chmod(0o644)


def test_the_device_path_decodes_every_kind_of_file_as_the_cpu_path(bad_run: BadRun,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path's workers read bytes (or decode on the CPU what the device cannot take) and the device decodes
    the rest: run here with the CPU as the device, it gives the CPU path's pixels and failures."""
    deny_reading(monkeypatch, {bad_run.path("locked.jpg")})
    names = sorted(GOOD_FILES) + sorted(UNREADABLE_FILES) + ["truncated.jpg"]
    paths = [bad_run.path(name) for name in names]
    files = loader_items.FileBytes(paths, [3] * len(paths), None, TEST_MAX_IMAGE_PIXELS)
    batch = loader_items.collate_encoded([files[position] for position in range(len(paths))])

    decoded, failed = device_decode.DeviceDecoder(torch.device("cpu"), None, None, TEST_MAX_IMAGE_PIXELS)(batch.items)

    images = {item.path: image for item, image in decoded}
    for name in GOOD_FILES:
        expected = loader_items.pixels_of(load_rgb(bad_run.path(name)))
        got = images[bad_run.path(name)]
        assert got.dtype == torch.uint8 and got.shape == expected.shape, name
        assert (got.float() - expected.float()).abs().mean() < 1.0, name  # decoders may differ in the last bit
    assert images[bad_run.path("exif-rotated.jpg")].shape[-2:] == (40, 20)  # EXIF applied: 20 wide, 40 high
    reasons = {failure.path: failure.reason for failure in batch.failed + failed}
    assert sorted(reasons) == sorted(bad_run.path(name) for name in [*UNREADABLE_FILES, "truncated.jpg"])
    for name, (_, reason) in UNREADABLE_FILES.items():
        assert reason in reasons[bad_run.path(name)], name
    assert {failure.position for failure in batch.failed + failed} == \
        {names.index(name) for name in [*UNREADABLE_FILES, "truncated.jpg"]}


# --------------------------------------------------------------------------- predict.py


def test_predict_names_rows_by_file_name_whatever_the_characters_and_format(bad_run: BadRun,
                                                                            tmp_path: Path) -> None:
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    for name, make in GOOD_FILES.items():
        make(test_dir / name)
    write_clutter(test_dir, loop=False)  # an unreadable image refuses the submission (test_new_user_round3.py)
    output = tmp_path / "prediction.csv"

    result = call_main(predict.main, "--checkpoint", bad_run.output / "best.pt", "--test-dir", test_dir,
                       "--output", output, *PREDICT_FLAGS)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_csv_rows(output)
    assert sorted(row["image_name"] for row in rows) == sorted(Path(name).stem for name in GOOD_FILES)
    assert {row["pred_label"] for row in rows} <= {"0", "1", "2", "3"}
    assert "café ü" in output.read_text(encoding="utf-8")


@pytest.fixture
def test_dir_with_broken_images(tmp_path: Path) -> tuple[Path, list[Path]]:
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    for name in ("a.jpg", "b.png", "z.jpg"):
        (plain_jpeg if name.endswith("jpg") else plain_png)(test_dir / name)
    broken = [test_dir / "cut.jpg", test_dir / "empty.jpg", test_dir / "huge.png", test_dir / "text.jpg"]
    for path, make in zip(broken, (truncated_jpeg, empty_file, huge_png, text_file), strict=True):
        make(path)
    return test_dir, broken


def test_predict_refuses_to_write_a_submission_with_missing_rows(
    bad_run: BadRun, test_dir_with_broken_images, tmp_path: Path
) -> None:
    test_dir, broken = test_dir_with_broken_images
    output = tmp_path / "prediction.csv"

    result = call_main(predict.main, "--checkpoint", bad_run.output / "best.pt", "--test-dir", test_dir,
                       "--output", output, *PREDICT_FLAGS, *LIMIT_FLAGS)

    # Every unreadable file is refused in one run, before any inference, each with its reason: those whose headers
    # fail, and (since the submission is refused anyway) the one truncated after its header.
    line = assert_user_error(result, "4 test image(s) could not be decoded", "--allow-missing",
                             test_dir / "empty.jpg", test_dir / "huge.png", test_dir / "text.jpg")
    assert not output.exists()
    assert f"{test_dir / 'huge.png'} (100x100 pixels (10,000) is above the limit of 4,000" in line
    assert f"{test_dir / 'empty.jpg'} (cannot identify image file" in line
    assert f"{test_dir / 'cut.jpg'} (image file is truncated" in line
    for path in broken[1:]:
        path.unlink()
    # Alone, a file truncated after its header is found when it is decoded for the inference.
    result = call_main(predict.main, "--checkpoint", bad_run.output / "best.pt", "--test-dir", test_dir,
                       "--output", output, *PREDICT_FLAGS, *LIMIT_FLAGS)
    line = assert_user_error(result, "1 test image(s) could not be decoded", f"{test_dir / 'cut.jpg'} (image file is "
                             "truncated")
    assert not output.exists()


def test_predict_allow_missing_writes_the_other_rows_and_names_the_missing(
    bad_run: BadRun, test_dir_with_broken_images, tmp_path: Path
) -> None:
    test_dir, broken = test_dir_with_broken_images
    output = tmp_path / "submission.csv"

    result = call_main(predict.main, "--checkpoint", bad_run.output / "best.pt", "--test-dir", test_dir,
                       "--output", output, "--allow-missing", *PREDICT_FLAGS, *LIMIT_FLAGS)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [row["image_name"] for row in read_csv_rows(output)] == ["a", "b", "z"]
    [warning] = [line for line in result.stderr.splitlines() if "--allow-missing" in line]
    assert "submission.csv lacks 4 row(s)" in warning and all(str(path) in warning for path in broken)
    assert "prediction.csv" not in warning


def test_max_image_pixels_0_lifts_the_limit_and_the_default_is_at_least_pillows(
    bad_run: BadRun, test_dir_with_broken_images, tmp_path: Path
) -> None:
    test_dir, _ = test_dir_with_broken_images
    huge = test_dir / "huge.png"
    assert images.DEFAULT_MAX_IMAGE_PIXELS >= 2 * Image.MAX_IMAGE_PIXELS  # never below where Pillow refuses
    assert loader_items.decode_or_failure(str(huge), max_pixels=0).size == (HUGE_SIDE, HUGE_SIDE)
    assert loader_items.decode_or_failure(str(huge)).size == (HUGE_SIDE, HUGE_SIDE)
    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3  # Pillow's own setting is left as it was
    for broken in ("cut.jpg", "empty.jpg", "text.jpg"):
        (test_dir / broken).unlink()

    result = call_main(predict.main, "--checkpoint", bad_run.output / "best.pt", "--test-dir", test_dir,
                       "--output", tmp_path / "p.csv", "--max-image-pixels", "0", *PREDICT_FLAGS)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "huge" in [row["image_name"] for row in read_csv_rows(tmp_path / "p.csv")]


@pytest.mark.parametrize("script", ["train.py", "predict.py", "evaluate.py"])
def test_every_script_takes_max_image_pixels_and_refuses_a_negative_one(script: str, tmp_path: Path) -> None:
    module = {"train.py": train, "predict.py": predict, "evaluate.py": evaluate}[script]
    parser = options.get_args_parser() if script == "train.py" else module.get_args_parser()
    [option] = [action for action in parser._actions if "--max-image-pixels" in action.option_strings]
    assert option.default == images.DEFAULT_MAX_IMAGE_PIXELS and "0 = no limit" in option.help
    result = call_main(module.main, "--max-image-pixels", "-1", "--output-dir" if script == "train.py" else
                       "--batch-size", tmp_path if script == "train.py" else "8")
    assert_user_error(result, "--max-image-pixels -1")


# --------------------------------------------------------------------------- large images, and warnings once


def solid_png(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    """A PNG of one colour: huge in pixels, small on disk (a 2000 x 2000 one takes 12 KB)."""
    Image.new(mode, size, 90).save(path)
    return path


def test_a_large_png_under_the_pixel_limit_trains_on_both_paths_without_a_warning(tmp_path: Path, monkeypatch,
                                                                                  recwarn) -> None:
    """Pillow's own limit (lowered here, so that a 2000 x 2000 PNG plays a 30000 x 30000 one) no longer fails the
    CPU path's crop, nor warns each epoch: the image is scaled down right after decoding."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # a crop above 200,000 pixels raised, above 100,000 warned
    big = str(solid_png(tmp_path / "poster.png", (2000, 2000)))
    plain = tmp_path / "plain.jpg"
    plain_jpeg(plain)
    paths, labels = [big, str(plain)], [0, 1]
    cpu = Accel(torch.device("cpu"), channels_last=False)
    for on_device in (False, True):
        batches = pipeline.train_batches(paths, labels, 32, 2, 0, 0, cpu, on_device, max_pixels=10**9)
        for epoch in (1, 2):
            batches.set_epoch(epoch)
            [batch] = list(batches)
            assert batch.failed == [] and batch.images.shape == (2, 3, 32, 32)
    assert not [warning for warning in recwarn if issubclass(warning.category, Image.DecompressionBombWarning)]


@pytest.mark.parametrize("mode", ["RGB", "P", "I;16"])
def test_a_large_image_is_decoded_scaled_down_to_what_the_recipe_needs(tmp_path: Path, mode: str) -> None:
    path = solid_png(tmp_path / "big.png", (1300, 900), mode)
    image, size = images.decode_rgb(path, min_side=100)
    assert size == (1300, 900) and image.mode == "RGB"
    assert image.size == (145, 100)  # divided by 9, the largest factor keeping the shorter side at least 100
    assert images.decode_rgb(path)[0].size == (1300, 900)  # nothing asked: full size


PEAK_SCRIPT = """
import resource, sys
import loader_items
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data, encoded, size = loader_items.read_for_device(sys.argv[1], 113, 10**9)
print(tuple(data.shape), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_the_device_paths_worker_keeps_at_most_one_full_size_copy_of_a_large_png(tmp_path: Path) -> None:
    """A 6000 x 6000 PNG (one full-size copy in Pillow: 144 MB) grew the worker's peak by 483 MiB (four copies)
    before it was scaled down right after decoding; a fresh process measures its peak (ru_maxrss)."""
    path = solid_png(tmp_path / "scan.png", (6000, 6000))
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True,
                            cwd=Path(pipeline.__file__).parent, check=True)
    shape, grown = result.stdout.split(")")
    assert shape == "(3, 114, 114"
    assert int(grown) < 1.3 * 6000 * 6000 * 4


def test_an_image_that_would_not_fit_in_memory_is_skipped_with_the_reason(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(images, "available_ram_bytes", lambda: 1_000_000)  # half of it: 500 KB to decode in
    big = str(solid_png(tmp_path / "big.png", (400, 400)))  # 640 KB as RGB in Pillow's memory
    plain = tmp_path / "plain.jpg"
    plain_jpeg(plain)
    cpu = Accel(torch.device("cpu"), channels_last=False)
    for on_device in (False, True):
        batches = pipeline.train_batches([big, str(plain)], [0, 1], 32, 2, 0, 0, cpu, on_device)
        batches.set_epoch(1)
        [batch] = list(batches)
        [failure] = batch.failed
        assert failure.path == big and batch.positions == [1]
        assert failure.reason == "400x400 pixels need 0.6 MB of memory to decode, more than 50% of the 1.0 MB available"


def test_predict_refuses_an_image_that_would_not_fit_in_memory_by_name(bad_run: BadRun, tmp_path: Path,
                                                                       monkeypatch) -> None:
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    plain_jpeg(test_dir / "a.jpg")
    solid_png(test_dir / "scan.png", (400, 400))
    monkeypatch.setattr(images, "available_ram_bytes", lambda: 1_000_000)

    result = call_main(predict.main, "--checkpoint", bad_run.output / "best.pt", "--test-dir", test_dir,
                       "--output", tmp_path / "p.csv", *PREDICT_FLAGS)

    assert_user_error(result, "1 test image(s) could not be decoded", f"{test_dir / 'scan.png'} (400x400 pixels need "
                      "0.6 MB of memory to decode")


@pytest.mark.parametrize("on_device", [False, True], ids=["cpu path", "device path"])
def test_a_truncated_training_image_is_warned_about_once_per_run_and_counted_each_epoch(tmp_path: Path, capsys,
                                                                                       on_device: bool) -> None:
    """It was warned about again every epoch (100 lines over 50 epochs); each epoch's failures still name it, for
    skipped_files.txt and the epoch line's count (``batch_iterables.skip_count``)."""
    truncated, plain = tmp_path / "cut.jpg", tmp_path / "plain.jpg"
    truncated_jpeg(truncated)
    plain_jpeg(plain)
    cpu = Accel(torch.device("cpu"), channels_last=False)
    batches = pipeline.train_batches([str(truncated), str(plain)], [0, 1], 32, 2, 0, 0, cpu, on_device)
    failures = []
    for epoch in (1, 2, 3):
        batches.set_epoch(epoch)
        failures.append([failure for batch in batches for failure in batch.failed])

    assert capsys.readouterr().err.count(f"warning: skipping {truncated}: cannot decode (image file is truncated") == 1
    assert [[failure.path for failure in epoch] for epoch in failures] == [[str(truncated)]] * 3
    assert batch_iterables.skip_count(failures[0] + failures[1]) == 1


def test_the_default_pixel_limit_follows_the_total_memory_the_same_on_every_call(monkeypatch) -> None:
    """It followed the memory available at import, so it changed from one run (and --help) to the next."""
    assert images.total_ram_bytes() == images.total_ram_bytes() > 0
    assert images.DEFAULT_MAX_IMAGE_PIXELS == images.machine_pixel_limit(images.total_ram_bytes())
    [option] = [action for action in options.get_args_parser()._actions
                if "--max-image-pixels" in action.option_strings]
    assert "total physical memory" in option.help and f"{images.DEFAULT_MAX_IMAGE_PIXELS:,} pixels" in option.help
    assert "in bytes" not in option.help and "available memory" not in option.help
