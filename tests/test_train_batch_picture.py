"""train_batch.png: a new run's first training batch as the model sees it, drawn without changing the run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import figures
import image_grids
import train
from common import IMAGENET_MEAN, IMAGENET_STD
from conftest import CLASS_COLOURS, ColourData, assert_same_training, history_without_seconds, tiny_train


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[np.ndarray], list[int]]]:
    """The pictures and labels train.py hands image_grids.plot_training_batch, which still draws them."""
    calls: list[tuple[list[np.ndarray], list[int]]] = []
    original = image_grids.plot_training_batch

    def record(pictures: list[np.ndarray], labels: list[int], *args: object, **kwargs: object) -> None:
        calls.append((list(pictures), list(labels)))
        original(pictures, labels, *args, **kwargs)

    monkeypatch.setattr(image_grids, "plot_training_batch", record)
    return calls


def nearest_class(picture: np.ndarray, classes: int) -> int:
    """The class whose solid colour is nearest the picture's median colour (robust to the rotation's black
    corners)."""
    median = np.median(picture.reshape(-1, 3), axis=0)
    return int(np.argmin([np.abs(median - CLASS_COLOURS[label]).sum() for label in range(classes)]))


@pytest.mark.parametrize("path_flags", [("--workers", "2"), ("--augment-device", "gpu")], ids=["cpu", "gpu-path"])
def test_a_new_run_draws_its_first_batch_in_plain_colours_under_its_labels(
        small_data: ColourData, tmp_path: Path, drawn: list, no_final_outputs: None, path_flags: tuple[str, ...]
) -> None:
    """Both data paths: the CPU path's workers, and the GPU path's batched augmentation (here on the CPU)."""
    tiny_train(small_data, tmp_path / "run", "--epochs", "1", "--batch-size", "12", *path_flags)
    [(pictures, labels)] = drawn
    assert len(pictures) == 12 and sorted(labels) == [0] * 4 + [1] * 4 + [2] * 4  # the whole training set
    assert all(picture.dtype == np.uint8 and picture.shape == (32, 32, 3) for picture in pictures)
    # Denormalized: black, white and grey come back as themselves (grey would not, still normalized), each under
    # its own class.
    assert [nearest_class(picture, 3) for picture in pictures] == labels
    with Image.open(tmp_path / "run" / "train_batch.png") as image:
        assert image.width > 300 and image.height > 200


def test_the_picture_changes_nothing_in_the_run(small_data: ColourData, tmp_path: Path, no_final_outputs: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """history.csv (all but the seconds) and last.pt are the same with and without train_batch.png (the head alone
    trained, for speed: a batch or a random number the picture took would still show in its weights)."""
    tiny_train(small_data, tmp_path / "with", "--epochs", "2", "--workers", "2", "--trainable", "fc")
    monkeypatch.setattr(train, "FirstBatchPicture", lambda batches, draw: batches)
    tiny_train(small_data, tmp_path / "without", "--epochs", "2", "--workers", "2", "--trainable", "fc")
    assert (tmp_path / "with" / "train_batch.png").is_file()
    assert not (tmp_path / "without" / "train_batch.png").exists()
    assert history_without_seconds(tmp_path / "with" / "history.csv") == history_without_seconds(
        tmp_path / "without" / "history.csv")
    assert_same_training(tmp_path / "with" / "last.pt", tmp_path / "without" / "last.pt")


def test_a_continued_run_does_not_draw_it_again(small_data: ColourData, tmp_path: Path, drawn: list,
                                                no_final_outputs: None) -> None:
    tiny_train(small_data, tmp_path / "run", "--epochs", "2", "--epochs-this-run", "1")
    (tmp_path / "run" / "train_batch.png").unlink()
    again = tiny_train(small_data, tmp_path / "run", "--epochs", "2", "--epochs-this-run", "1")
    assert "continuing it" in again.stdout
    assert len(drawn) == 1 and not (tmp_path / "run" / "train_batch.png").exists()


def test_denormalize_undoes_the_normalization() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 5, 4), dtype=np.uint8)
    normalized = (pixels / 255 - np.reshape(IMAGENET_MEAN, (1, 3, 1, 1))) / np.reshape(IMAGENET_STD, (1, 3, 1, 1))
    pictures = image_grids.denormalize(normalized.astype(np.float32), IMAGENET_MEAN, IMAGENET_STD)
    assert [picture.shape for picture in pictures] == [(5, 4, 3)] * 2
    assert np.array_equal(np.stack(pictures), pixels.transpose(0, 2, 3, 1))


def test_at_most_32_pictures_each_under_its_shortened_class_name(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    grids: list[tuple] = []
    monkeypatch.setattr(image_grids, "plot_image_grid", lambda *args: grids.append(args))
    names = ["山茶花", "Quercus_robur_subspecies_pedunculiflora_forma_fastigiata"]
    pictures = [np.zeros((8, 8, 3), dtype=np.uint8)] * 40
    image_grids.plot_training_batch(pictures, [0, 1] * 20, names, tmp_path / "b.png", batch_images=40)
    [(shown, captions, _, title)] = grids
    assert len(shown) == len(captions) == image_grids.BATCH_PICTURE_LIMIT
    assert captions[:2] == ["山茶花", figures.shorten_labels(names, image_grids.BATCH_CAPTION_CHARS)[1]]
    assert len(captions[1]) == image_grids.BATCH_CAPTION_CHARS and "32 of 40 images" in title
