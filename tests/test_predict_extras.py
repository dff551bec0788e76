"""predict.py's test-time augmentation, checkpoint ensembles and probabilities.csv."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_evaluate import make_tiny_checkpoint
from torch import nn

import predict
from accel import Accel
from common import Batch
from conftest import PREDICT_FLAGS, assert_user_error, call_main, read_csv_rows, write_colour_dataset
from engine import predict_probabilities

CPU = Accel(torch.device("cpu"), None, channels_last=False)


class EdgePixels(nn.Module):
    """A stub classifier whose three logits are the top-left pixel, the top-right pixel and 0."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([images[:, 0, 0, 0], images[:, 0, 0, -1], torch.zeros(len(images))], dim=1)


class FixedLogits(nn.Module):
    """A stub classifier answering the same logits for every image."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(images), -1)


def edge_batch(left: float, right: float) -> torch.Tensor:
    images = torch.zeros(1, 3, 8, 8)
    images[:, :, :, 0], images[:, :, :, -1] = left, right
    return images


def test_flip_averages_the_softmax_of_both_views() -> None:
    images = edge_batch(2.0, -1.0)
    averaged = predict.AveragedSoftmax([EdgePixels()], predict.tta_views("flip"))(images).exp()
    expected = (torch.tensor([[2.0, -1.0, 0.0]]).softmax(1) + torch.tensor([[-1.0, 2.0, 0.0]]).softmax(1)) / 2
    torch.testing.assert_close(averaged, expected)


def test_ensemble_averages_models_and_survives_predict_probabilities() -> None:
    first, second = [2.0, 0.0, -1.0], [0.0, 3.0, 0.0]
    wrapper = predict.AveragedSoftmax([FixedLogits(first), FixedLogits(second)], predict.tta_views("none"))
    loader = [Batch(torch.zeros(2, 3, 4, 4), None, [0, 1], [])]
    probabilities, failed = predict_probabilities(wrapper, loader, 2, CPU, show_progress=False)
    expected = (torch.tensor(first).softmax(0) + torch.tensor(second).softmax(0)) / 2
    torch.testing.assert_close(probabilities, expected.expand(2, -1))
    assert failed == {}


def test_multi_views_keep_the_batch_shape_and_zoom_into_the_centre() -> None:
    images = torch.arange(2 * 3 * 20 * 20, dtype=torch.float32).reshape(2, 3, 20, 20)
    views = predict.tta_views("multi")
    assert len(views) == 4
    for view in views:
        assert view(images).shape == images.shape
    torch.testing.assert_close(predict.zoom_centre(torch.ones(1, 3, 20, 20)), torch.ones(1, 3, 20, 20))
    # Zooming in shrinks the left-right spread of a horizontal ramp by the zoom factor.
    ramp = torch.linspace(0, 1, 40).expand(1, 3, 40, 40)
    zoomed = predict.zoom_centre(ramp)
    spread = (zoomed[0, 0, 0, -1] - zoomed[0, 0, 0, 0]) / (ramp[0, 0, 0, -1] - ramp[0, 0, 0, 0])
    assert spread == pytest.approx(1 / predict.MULTI_ZOOM, abs=0.03)
    torch.testing.assert_close(views[3](images), views[2](images).flip(-1))


@pytest.fixture(scope="module")
def ensemble_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Test images and two untrained 3-class checkpoints with different input sizes (two decoding passes)."""
    root = tmp_path_factory.mktemp("ensemble")
    write_colour_dataset(root / "data", num_classes=3, train_per_class=1, val_per_class=0, test_per_class=2, seed=3)
    first = make_tiny_checkpoint(root / "a" / "best.pt", ["0", "1", "2"], img_size=32, seed=1)
    second = make_tiny_checkpoint(root / "b" / "best.pt", ["0", "1", "2"], img_size=40, seed=2)
    return root / "data", first, second


def probabilities_by_label(path: Path) -> dict[str, dict[str, float]]:
    """``image_name -> {label: probability}`` from a probabilities.csv."""
    table = {}
    for row in read_csv_rows(path):
        ranks = (len(row) - 1) // 2
        table[row["image_name"]] = {row[f"label_{rank}"]: float(row[f"prob_{rank}"]) for rank in range(1, ranks + 1)}
    return table


def run_predict(data: Path, out: Path, *args: str | Path):
    return call_main(predict.main, "--test-dir", data / "test", "--output", out / "prediction.csv", *args,
                     *PREDICT_FLAGS)


def test_ensemble_of_two_checkpoints_is_the_mean_of_each(ensemble_inputs, tmp_path: Path) -> None:
    data, first, second = ensemble_inputs
    for name, checkpoints in (("a", [first]), ("b", [second]), ("ab", [first, second])):
        result = run_predict(data, tmp_path / name, "--checkpoint", *checkpoints, "--topk", "3", "--tta", "flip")
        assert result.returncode == 0, result.stderr
    alone_a = probabilities_by_label(tmp_path / "a" / "prediction_probabilities.csv")
    alone_b = probabilities_by_label(tmp_path / "b" / "prediction_probabilities.csv")
    together = probabilities_by_label(tmp_path / "ab" / "prediction_probabilities.csv")
    assert together.keys() == alone_a.keys() and len(together) == 6
    for image, probabilities in together.items():
        for label, value in probabilities.items():
            assert value == pytest.approx((alone_a[image][label] + alone_b[image][label]) / 2, abs=2e-6)


def test_topk_file_format(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    result = run_predict(data, tmp_path, "--checkpoint", first, "--topk", "2", "--tta", "multi",
                         "--labels", data / "test_labels.csv")
    assert result.returncode == 0, result.stderr
    assert result.value["probabilities"] == str(tmp_path / "prediction_probabilities.csv")
    assert 0 <= result.value["accuracy"] <= 1  # --labels still scores the (averaged) predictions
    header = (tmp_path / "prediction_probabilities.csv").read_text().splitlines()[0]
    assert header == "image_name,label_1,prob_1,label_2,prob_2"
    submission = {row["image_name"]: row["pred_label"] for row in read_csv_rows(tmp_path / "prediction.csv")}
    rows = read_csv_rows(tmp_path / "prediction_probabilities.csv")
    assert [row["image_name"] for row in rows] == list(submission)
    for row in rows:
        assert row["label_1"] == submission[row["image_name"]] and row["label_1"] != row["label_2"]
        assert 1 >= float(row["prob_1"]) >= float(row["prob_2"]) >= 0


def test_topk_beyond_the_class_count_writes_every_class(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    result = run_predict(data, tmp_path, "--checkpoint", first, "--topk", "9")
    assert result.returncode == 0 and "writing all 3" in result.stdout
    for probabilities in probabilities_by_label(tmp_path / "prediction_probabilities.csv").values():
        assert sorted(probabilities) == ["0", "1", "2"] and sum(probabilities.values()) == pytest.approx(1, abs=1e-5)


def test_no_probabilities_file_without_topk(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    assert run_predict(data, tmp_path, "--checkpoint", first).returncode == 0
    assert not (tmp_path / "prediction_probabilities.csv").exists()


def test_checkpoints_with_different_classes_are_refused(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    other = make_tiny_checkpoint(tmp_path / "other.pt", ["0", "1", "cat"])
    result = run_predict(data, tmp_path, "--checkpoint", first, other)
    assert_user_error(result, str(first), str(other), "different class lists", "cat")
    assert not (tmp_path / "prediction.csv").exists()
    reordered = make_tiny_checkpoint(tmp_path / "reordered.pt", ["2", "1", "0"])
    assert_user_error(run_predict(data, tmp_path, "--checkpoint", first, reordered), "different order")


def test_negative_topk_is_refused(ensemble_inputs, tmp_path: Path) -> None:
    data, first, _ = ensemble_inputs
    assert_user_error(run_predict(data, tmp_path, "--checkpoint", first, "--topk", "-1"), "--topk -1")
