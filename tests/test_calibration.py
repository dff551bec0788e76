"""Calibrated confidences: the temperature fit and the expected calibration error (calibration.py), best.pt's
temperature written by train.py, and what evaluate.py reports of it (metrics.json, reliability.png)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import plots
from calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    apply_temperature,
    calibration_error,
    expected_calibration_error,
    fit_temperature,
    log_probabilities,
    reliability_bins,
    supported_temperature,
)
from checkpoint import Checkpoint, load_checkpoint
from conftest import PREDICT_FLAGS, ColourData, call_main, save_as_version_1, tiny_train

# --------------------------------------------------------------------------- the temperature


def sampled_targets(logits: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Classes drawn from ``softmax(logits)``: targets for which those logits are perfectly calibrated (``seed``
    other than the logits': draws from one seed are correlated)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator).squeeze(1)


def true_logits(images: int = 4000, classes: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randn(images, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


@pytest.mark.parametrize("scale", [3.0, 0.5])
def test_fit_temperature_recovers_how_much_the_logits_were_scaled(scale: float) -> None:
    logits = true_logits()
    targets = sampled_targets(logits)
    assert fit_temperature(logits * scale, targets) == pytest.approx(scale, rel=0.05)


def test_softmax_probabilities_stand_in_for_the_logits() -> None:
    """predict_samples keeps only float32 probabilities: their log gives the same temperature as the logits."""
    logits = true_logits() * 3
    targets = sampled_targets(logits / 3)
    probabilities = torch.softmax(logits, dim=1).float().numpy()
    assert fit_temperature(log_probabilities(probabilities), targets) == pytest.approx(
        fit_temperature(logits, targets), rel=1e-6)
    np.testing.assert_allclose(apply_temperature(probabilities, 2.5), torch.softmax(logits / 2.5, dim=1).numpy(),
                               atol=1e-6)


def test_fit_temperature_is_deterministic_and_bounded() -> None:
    logits, targets = true_logits(500) * 2, sampled_targets(true_logits(500))
    assert fit_temperature(logits, targets) == fit_temperature(logits.clone(), targets.clone())
    # Every prediction right: the likelihood keeps rising as T falls, so no temperature is supported (a fit at the
    # bound would make every later prediction about 100% confident); likewise every one wrong, or no images.
    assert supported_temperature(torch.eye(3) * 5, torch.arange(3)) is None
    assert fit_temperature(torch.eye(3) * 5, torch.arange(3)) == 1.0
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)) == 1.0
    assert fit_temperature(torch.eye(3) * 5, torch.tensor([1, 2, 0])) == 1.0  # every one wrong
    assert fit_temperature(torch.full((3, 3), float("nan")), torch.arange(3)) == 1.0


def test_no_temperature_on_a_fine_grid_has_a_lower_loss() -> None:
    logits, targets = true_logits(1000, seed=3) * 1.7, sampled_targets(true_logits(1000, seed=3))
    fitted = fit_temperature(logits, targets)

    def loss(temperature: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / temperature, targets))

    assert all(loss(fitted) <= loss(grid) + 1e-12 for grid in np.linspace(0.5, 4.0, 701))


def test_a_checkpoint_without_a_temperature_means_one() -> None:
    checkpoint = Checkpoint({}, "resnet18", ["a", "b"], 32, 32, (0.5,) * 3, (0.25,) * 3, {})
    assert replace(checkpoint, temperature=1.7).logit_temperature == 1.7
    assert replace(checkpoint, temperature=None).logit_temperature == 1.0


# --------------------------------------------------------------------------- the expected calibration error


def test_ece_matches_a_hand_computed_example() -> None:
    # Top probabilities 0.95 (right), 0.95 (wrong), 0.55 (right), 0.58 (right), 0.78 (wrong), in 15 bins:
    # (14/15, 1]: 2 images, accuracy 0.5, confidence 0.95 -> gap 0.45
    # (8/15, 9/15]: 2 images, accuracy 1, confidence 0.565 -> gap 0.435
    # (11/15, 12/15]: 1 image, accuracy 0, confidence 0.78 -> gap 0.78
    # ECE = (2 * 0.45 + 2 * 0.435 + 1 * 0.78) / 5 = 0.51
    probabilities = np.array([[0.95, 0.05], [0.05, 0.95], [0.55, 0.45], [0.42, 0.58], [0.78, 0.22]])
    targets = np.array([0, 0, 0, 1, 1])
    assert expected_calibration_error(probabilities, targets) == pytest.approx(0.51)
    bins = reliability_bins(probabilities, targets)
    assert bins.counts.tolist() == [0] * 8 + [2, 0, 0, 1, 0, 0, 2]
    assert bins.accuracy[14] == 0.5 and bins.confidence[8] == pytest.approx(0.565)
    assert np.isnan(bins.accuracy[0])  # an empty bin has no accuracy


def test_a_confidence_on_a_bin_edge_belongs_to_the_lower_bin() -> None:
    """Guo et al.'s bins are ((m-1)/M, m/M]: with 4 bins, 0.75 is in the third."""
    bins = reliability_bins(np.array([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]]), np.array([0, 0, 0]), bins=4)
    assert bins.counts.tolist() == [0, 1, 1, 1]


def synthetic_binary(confidence_gap: float, images: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """Two-class probabilities whose top class is right ``confidence - confidence_gap`` of the time."""
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, images)
    right = rng.uniform(size=images) < confidence - confidence_gap
    return np.stack([confidence, 1 - confidence], axis=1), np.where(right, 0, 1)


def test_ece_of_calibrated_data_is_small_and_of_over_confident_data_is_the_gap() -> None:
    assert expected_calibration_error(*synthetic_binary(0.0)) < 0.01
    assert expected_calibration_error(*synthetic_binary(0.2)) == pytest.approx(0.2, abs=0.01)


def test_temperature_scaling_lowers_the_ece_of_over_confident_logits() -> None:
    logits = true_logits()
    targets = sampled_targets(logits)
    over_confident = torch.softmax(logits * 3, dim=1).numpy()
    temperature = fit_temperature(log_probabilities(over_confident), targets)
    before = expected_calibration_error(over_confident, targets)
    after = expected_calibration_error(apply_temperature(over_confident, temperature), targets)
    assert before > 0.15 and after < 0.03


def test_reliability_diagram_with_and_without_a_calibrated_curve(tmp_path: Path) -> None:
    probabilities, targets = synthetic_binary(0.2, images=500)
    before = reliability_bins(probabilities, targets)
    after = reliability_bins(apply_temperature(probabilities, 2.0), targets)
    assert calibration_error(before) == pytest.approx(expected_calibration_error(probabilities, targets))
    plots.plot_reliability_diagram(before, after, 2.0, tmp_path / "both.png")
    plots.plot_reliability_diagram(before, None, 1.0, tmp_path / "one.png")
    assert (tmp_path / "both.png").stat().st_size > 0 and (tmp_path / "one.png").stat().st_size > 0


# --------------------------------------------------------------------------- train.py and evaluate.py


@pytest.fixture(scope="module")
def calibrated_run(small_data: ColourData, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny 2-epoch run (with its report): its output folder and console output."""
    output = tmp_path_factory.mktemp("calibrated") / "run"
    return output, tiny_train(small_data, output, "--epochs", "2").stdout


def test_training_stores_a_fitted_temperature_in_best_pt(calibrated_run: tuple[Path, str]) -> None:
    output, stdout = calibrated_run
    best = load_checkpoint(output / "best.pt")
    assert isinstance(best.temperature, float) and MIN_TEMPERATURE <= best.temperature <= MAX_TEMPERATURE
    assert load_checkpoint(output / "last.pt").temperature is None  # the resume state, not the calibrated model
    [line] = [line for line in stdout.splitlines() if line.startswith(("calibration: ", "note: no temperature fits"))]
    if line.startswith("note: "):  # the 3 val images all right: no temperature is supported, best.pt keeps 1.0
        assert best.temperature == 1.0 and "fits the 3 val images (every one right, or none)" in line
    else:
        assert f"temperature {best.temperature:.3f} fitted on 3 val images" in line
        assert "expected calibration error" in line and "->" in line and line.endswith("(noisy on 3 images)")
    summary = json.loads((output / "report" / "metrics.json").read_text())
    assert summary["temperature"] == best.temperature
    assert (output / "report" / "reliability.png").is_file()
    assert "](reliability.png)" in (output / "report" / "report.md").read_text()


def test_train_on_all_stores_temperature_one_and_says_so(small_data: ColourData, tmp_path: Path) -> None:
    result = tiny_train(small_data, tmp_path / "run", "--epochs", "1", "--train-on-all")
    assert load_checkpoint(tmp_path / "run" / "best.pt").temperature == 1.0
    assert "no validation split to fit a temperature on" in result.stdout
    assert "calibration: " not in result.stdout


def run_evaluate(checkpoint: Path, data: ColourData, report_dir: Path) -> tuple[dict, str]:
    result = call_main(evaluate.main, "--checkpoint", checkpoint, "--data-dir", data.root, "--report-dir", report_dir,
                       *PREDICT_FLAGS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads((report_dir / "metrics.json").read_text()), result.stdout


def test_evaluate_reports_the_ece_before_and_after_the_checkpoints_temperature(
        calibrated_run: tuple[Path, str], small_data: ColourData, tmp_path: Path) -> None:
    output, _ = calibrated_run
    summary, stdout = run_evaluate(output / "best.pt", small_data, tmp_path / "report")
    checkpoint = load_checkpoint(output / "best.pt")
    assert summary["temperature"] == checkpoint.temperature
    assert 0.0 <= summary["ece"] <= 1.0 and 0.0 <= summary["ece_calibrated"] <= 1.0
    assert (tmp_path / "report" / "reliability.png").is_file()
    assert "has no temperature" not in stdout


def test_an_older_checkpoint_is_evaluated_with_temperature_one_and_a_note(
        calibrated_run: tuple[Path, str], small_data: ColourData, tmp_path: Path) -> None:
    output, _ = calibrated_run
    older = load_checkpoint(output / "best.pt")
    save_as_version_1(older, tmp_path / "older.pt", leave_out=["temperature"])  # from before train.py stored one
    summary, stdout = run_evaluate(tmp_path / "older.pt", small_data, tmp_path / "report")
    assert summary["temperature"] == 1.0 and summary["ece_calibrated"] == summary["ece"]
    [note] = [line for line in stdout.splitlines() if "has no temperature" in line]
    assert note.startswith(f"note: {tmp_path / 'older.pt'} has no temperature") and "T = 1.0" in note
    assert "has no temperature (written before calibration was stored)" in (tmp_path / "report" / "report.md"
                                                                           ).read_text()

