"""dataset.py: class order, finding images, decoding any PIL mode to RGB, splits, class weights, transforms."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ColourData
from dataset import find_test_images, list_images, load_train_val, sort_class_names, stratified_split
from images import find_unreadable, load_rgb, to_rgb
from loader_items import transform_seeded
from recipe import build_train_transform
from utils import UserError

# --------------------------------------------------------------------------- class order


def test_numeric_class_names_sort_as_numbers_not_strings() -> None:
    assert sort_class_names(["10", "2", "0", "11", "1"]) == ["0", "1", "2", "10", "11"]
    assert sort_class_names([str(index) for index in range(12)][::-1]) == [str(index) for index in range(12)]


def test_other_class_names_sort_alphabetically() -> None:
    assert sort_class_names(["dog", "cat", "bird"]) == ["bird", "cat", "dog"]
    assert sort_class_names(["10", "2", "cat"]) == ["10", "2", "cat"]  # not all numbers: plain string order
    assert sort_class_names([]) == []


def test_training_classes_come_in_numeric_order(colour_data: ColourData) -> None:
    data = load_train_val(colour_data.root, val_fraction=0.1, seed=0)
    assert data.class_names == [str(index) for index in range(12)]
    assert {label for _, label in data.val_samples} == set(range(12))


# --------------------------------------------------------------------------- finding files


def test_find_test_images_sorts_by_name_and_ignores_other_entries(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "c.jpeg"):
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG" if name.endswith("png") else "JPEG")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".hidden.jpg").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()  # a folder, however named, is looked into: here it holds nothing

    images, ignored = find_test_images(tmp_path)

    assert [path.name for path in images] == ["a.JPG", "b.png", "c.jpeg"]
    assert sorted(path.name for path in ignored) == [".DS_Store", ".hidden.jpg", "notes.txt"]


def test_find_test_images_errors_on_missing_or_imageless_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="folder not found"):
        find_test_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="no image files found"):
        find_test_images(tmp_path)


def test_find_unreadable_lists_empty_and_fake_images(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    Image.new("RGB", (4, 4)).save(good)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")

    problems = find_unreadable([good, empty, text])

    assert [path for path, _ in problems] == [str(empty), str(text)]
    assert all(reason for _, reason in problems)


def test_unreadable_train_files_are_left_out_and_reported(colour_data: ColourData) -> None:
    data = load_train_val(colour_data.root, val_fraction=0.1, seed=0)
    skipped = sorted(Path(path).name for path, _ in data.skipped)
    assert skipped == ["empty.jpg", "not-really.jpg"]
    assert len(data.train_samples) == 12 * 6
    assert not any(Path(path).name in skipped for path, _ in data.train_samples)


def test_unreadable_files_are_dropped_before_the_split(small_data: ColourData, tmp_path: Path) -> None:
    shutil.copytree(small_data.root / "train", tmp_path / "train")  # no val/: train is split
    class_0 = sorted((tmp_path / "train" / "0").iterdir())
    for path in class_0[2:]:
        path.unlink()
    class_0[1].write_bytes(b"")  # class 0: one good image, one broken

    for seed in range(6):
        data = load_train_val(tmp_path, val_fraction=0.5, seed=seed)
        assert [Path(path).name for path, label in data.train_samples if label == 0] == [class_0[0].name]
        assert not any(label == 0 for _, label in data.val_samples)


# --------------------------------------------------------------------------- decoding


def pixel(image: Image.Image) -> tuple[int, int, int]:
    """The top-left pixel of an RGB image."""
    assert image.mode == "RGB"
    return image.getpixel((0, 0))


def test_to_rgb_flattens_transparency_onto_white() -> None:
    assert pixel(to_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 0)))) == (255, 255, 255)
    assert pixel(to_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 255)))) == (255, 0, 0)
    half = pixel(to_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 128))))
    assert half[0] == 255 and 120 <= half[1] == half[2] <= 135
    assert pixel(to_rgb(Image.new("LA", (2, 2), (0, 0)))) == (255, 255, 255)
    assert pixel(to_rgb(Image.new("LA", (2, 2), (40, 255)))) == (40, 40, 40)


def test_to_rgb_greyscale_palette_and_cmyk() -> None:
    assert pixel(to_rgb(Image.new("L", (2, 2), 77))) == (77, 77, 77)

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red, index 1 blue
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1  # blue is the transparent index
    rgb = to_rgb(palette)
    assert rgb.getpixel((0, 0)) == (255, 0, 0)
    assert rgb.getpixel((1, 0)) == (255, 255, 255)

    assert pixel(to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0)))) == (255, 0, 0)


def test_load_rgb_scales_16_bit_png_to_8_bits(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 6), 32768, dtype=np.uint16)).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file

    red, green, blue = pixel(load_rgb(path))

    assert red == green == blue and 126 <= red <= 130  # mid grey, not clipped to white


def test_load_rgb_reads_palette_png_with_transparency(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    image = Image.new("P", (2, 1))
    image.putpalette([0, 128, 0, 0, 0, 0])
    image.putpixel((1, 0), 1)
    image.save(path, transparency=1)

    rgb = load_rgb(path)

    assert rgb.getpixel((0, 0)) == (0, 128, 0)
    assert rgb.getpixel((1, 0)) == (255, 255, 255)


def test_load_rgb_applies_exif_orientation(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (10, 200, 30)).save(path, exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (40, 20)

    assert load_rgb(path).size == (20, 40)


# --------------------------------------------------------------------------- stratified split


def make_samples(counts: dict[int, int]) -> list[tuple[str, int]]:
    """Fake ``(path, label)`` samples, ``counts[label]`` of each class."""
    return [(f"{label}/{index:03d}.jpg", label) for label, count in counts.items() for index in range(count)]


def test_stratified_split_keeps_the_fraction_of_every_class() -> None:
    samples = make_samples({0: 40, 1: 20, 2: 10})

    train_part, val_part = stratified_split(samples, fraction=0.2, seed=0)

    assert Counter(label for _, label in val_part) == {0: 8, 1: 4, 2: 2}
    assert Counter(label for _, label in train_part) == {0: 32, 1: 16, 2: 8}
    assert sorted(train_part + val_part) == sorted(samples)


def test_stratified_split_leaves_every_class_a_train_image() -> None:
    samples = make_samples({0: 1, 1: 2, 2: 3, 3: 50})

    train_part, val_part = stratified_split(samples, fraction=0.9, seed=0)

    train_counts = Counter(label for _, label in train_part)
    assert all(train_counts[label] >= 1 for label in range(4))
    assert Counter(label for _, label in val_part) == {1: 1, 2: 2, 3: 45}  # a lone image stays in train


def test_stratified_split_is_deterministic_for_a_seed() -> None:
    samples = make_samples({0: 30, 1: 30})
    assert stratified_split(samples, 0.3, seed=7) == stratified_split(list(reversed(samples)), 0.3, seed=7)
    assert stratified_split(samples, 0.3, seed=7) != stratified_split(samples, 0.3, seed=8)


def test_without_val_folder_train_is_split(small_data: ColourData, tmp_path: Path) -> None:
    shutil.copytree(small_data.root / "train", tmp_path / "train")  # train/ only, no val/

    data = load_train_val(tmp_path, val_fraction=0.25, seed=0)

    assert len(data.val_samples) == 3 and len(data.train_samples) == 9
    assert sorted(label for _, label in data.val_samples) == [0, 1, 2]
    assert "stratified" in data.val_source
    with pytest.raises(UserError, match="--val-fraction"):
        load_train_val(tmp_path, val_fraction=1.5, seed=0)


def test_the_held_out_list_decides_validation_whatever_changed_in_train(small_data: ColourData,
                                                                        tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    shutil.copytree(small_data.root / "train", tmp_path / "train")
    first = load_train_val(tmp_path, val_fraction=0.25, seed=0)
    assert first.held_out == sorted(str(Path(path).relative_to(tmp_path / "train").as_posix())
                                    for path, _ in first.val_samples)
    # Files change: one held-out image is deleted, new images arrive, one of them named so it sorts first.
    gone = Path(first.val_samples[0][0])
    gone.unlink()
    for name in ("0/000-new.jpg", "1/zzz-new.jpg"):
        shutil.copy(first.train_samples[0][0], tmp_path / "train" / name)

    again = load_train_val(tmp_path, val_fraction=0.25, seed=0, held_out=first.held_out)

    assert again.val_samples == [sample for sample in first.val_samples if sample[0] != str(gone)]
    assert not set(again.val_samples) & set(again.train_samples)
    assert {str(tmp_path / "train" / "0" / "000-new.jpg"), str(tmp_path / "train" / "1" / "zzz-new.jpg")} <= \
        {path for path, _ in again.train_samples}
    assert (f"1 of the 3 validation images this run held out of {tmp_path / 'train'} are missing or unreadable now "
            f"({gone.relative_to(tmp_path / 'train').as_posix()})") in capsys.readouterr().out


# --------------------------------------------------------------------------- folders inside folders


def write_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_class_folders_take_images_from_their_sub_folders(tmp_path: Path) -> None:
    for path in ("train/cat/a.jpg", "train/cat/more/b.jpg", "train/cat/more/deeper/c.png", "train/dog/d.jpg",
                 "train/dog/.ipynb_checkpoints/d-checkpoint.jpg"):
        write_image(tmp_path / path)

    data = load_train_val(tmp_path, val_fraction=0.5, seed=0)

    samples = sorted(data.train_samples + data.val_samples)
    assert [(Path(path).relative_to(tmp_path / "train").as_posix(), label) for path, label in samples] == [
        ("cat/a.jpg", 0), ("cat/more/b.jpg", 0), ("cat/more/deeper/c.png", 0), ("dog/d.jpg", 1)]


def test_test_images_in_sub_folders_are_predicted_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for path in ("a.jpg", "extra/b.jpg", "extra/more/c.jpg"):
        write_image(tmp_path / path)

    images, _ = find_test_images(tmp_path)

    assert [path.relative_to(tmp_path).as_posix() for path in images] == ["a.jpg", "extra/b.jpg", "extra/more/c.jpg"]
    assert f"note: {tmp_path}: also predicting the images in its sub-folder(s) extra, extra/more" in \
        capsys.readouterr().out


def test_a_folder_linked_into_itself_is_read_once(tmp_path: Path) -> None:
    write_image(tmp_path / "cat" / "a.jpg")
    (tmp_path / "cat" / "loop").symlink_to(tmp_path / "cat")

    images, ignored = list_images(tmp_path / "cat")

    assert images == [tmp_path / "cat" / "a.jpg"] and ignored == [tmp_path / "cat" / "loop"]


def test_a_link_back_up_the_tree_does_not_pull_in_other_classes(tmp_path: Path) -> None:
    write_image(tmp_path / "train" / "red" / "r.jpg")
    write_image(tmp_path / "train" / "blue" / "b.jpg")
    (tmp_path / "train" / "red" / "up").symlink_to(tmp_path / "train")

    images, ignored = list_images(tmp_path / "train" / "red")

    assert images == [tmp_path / "train" / "red" / "r.jpg"] and ignored == [tmp_path / "train" / "red" / "up"]


def test_a_single_class_is_refused(tmp_path: Path) -> None:
    write_image(tmp_path / "train" / "cat" / "a.jpg")
    write_image(tmp_path / "train" / "cat" / "b.jpg")
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(UserError, match=r"only one class folder with images \(cat\); a classifier needs at least two"):
        load_train_val(tmp_path, val_fraction=0.5, seed=0)


# --------------------------------------------------------------------------- seeded augmentation


def test_a_seeded_transform_leaves_the_cuda_generator_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reseeding CUDA per image (as torch.manual_seed does) would repeat the dropout masks of a GPU run."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    image = Image.new("RGB", (8, 8), (10, 200, 30))
    crop = build_train_transform(8)

    first, second = transform_seeded(crop, image, 123), transform_seeded(crop, image, 123)

    assert torch.equal(first, second)  # the seed still decides the augmentation
    assert reseeded == []
