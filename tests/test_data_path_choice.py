"""The data path (``--augment-device``) is chosen once a run and followed everywhere: train.py's loaders and its final
report of best.pt, and predict.py and evaluate.py take the flag too (issue 25, item 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import evaluate
import pipeline
import predict
import train
from conftest import PREDICT_FLAGS, ColourData, call_main, read_csv_rows, tiny_train

GPU_PATH_NOTE = "note: --augment-device gpu on a cpu run"


def record_data_paths(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[str]:
    """The path (``gpu`` or ``cpu``) of every ``inference_batches`` call ``module`` makes (the call still runs)."""
    seen: list[str] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append("gpu" if kwargs.get("on_device", args[5] if len(args) > 5 else None) else "cpu")
        return pipeline.inference_batches(*args, **kwargs)

    monkeypatch.setattr(module, "inference_batches", recording)
    return seen


def test_a_gpu_path_run_reports_on_best_pt_through_the_path_its_validation_took(
        small_data: ColourData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_data_paths(monkeypatch, train)

    result = tiny_train(small_data, tmp_path / "run", "--epochs", "1", "--augment-device", "gpu")

    assert seen == ["gpu"]  # was "auto": the CPU path on this machine, not the one best.pt was chosen on
    assert result.stdout.count(GPU_PATH_NOTE) == 1  # chosen once (it was said twice)


@pytest.mark.parametrize("flag", ["cpu", "gpu"])
def test_predict_and_evaluate_take_augment_device(trained_checkpoint: Path, small_data: ColourData, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, flag: str) -> None:
    seen_predict, seen_evaluate = record_data_paths(monkeypatch, predict), record_data_paths(monkeypatch, evaluate)
    predicted = call_main(predict.main, "--checkpoint", trained_checkpoint, "--test-dir", small_data.root / "test",
                          "--output", tmp_path / "p.csv", "--augment-device", flag, *PREDICT_FLAGS)
    evaluated = call_main(evaluate.main, "--checkpoint", trained_checkpoint, "--data-dir", small_data.root,
                          "--report-dir", tmp_path / "report", "--augment-device", flag, *PREDICT_FLAGS)

    assert predicted.returncode == 0 and evaluated.returncode == 0, predicted.stderr + evaluated.stderr
    assert seen_predict == seen_evaluate == [flag]
    assert len(read_csv_rows(tmp_path / "p.csv")) == len(list((small_data.root / "test").iterdir()))
    assert (GPU_PATH_NOTE in predicted.stdout) == (flag == "gpu")


def test_the_classifier_takes_augment_device_as_predict_does(trained_checkpoint: Path, small_data: ColourData) -> None:
    files = sorted(str(path) for path in (small_data.root / "test").iterdir())
    on_cpu = predict.Classifier(trained_checkpoint, workers=0, augment_device="cpu").predict(files)
    on_gpu_path = predict.Classifier(trained_checkpoint, workers=0, augment_device="gpu").predict(files)

    assert list(on_cpu["name"]) == list(on_gpu_path["name"]) == files
    assert (on_cpu["probability"] - on_gpu_path["probability"]).abs().max() < 0.05  # the paths agree to 8-bit rounding


@pytest.fixture(scope="module")
def trained_checkpoint(small_data: ColourData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("run")
    tiny_train(small_data, output, "--epochs", "1")
    return output / "best.pt"
