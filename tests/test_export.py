"""export.py: a checkpoint to ONNX with its metadata, checked against PyTorch on real images; predict.py and
Classifier running the .onnx with onnxruntime; the optional packages missing."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_predict_extras import probabilities_by_label

import export
import onnx_model
import predict
from checkpoint import make_checkpoint, save_checkpoint
from common import IMAGENET_MEAN, IMAGENET_STD
from conftest import PREDICT_FLAGS, assert_user_error, call_main, read_csv_rows, write_colour_dataset
from model import model_from_config

CLASSES = ["0", "1", "2"]


def write_checkpoint(path: Path, data_dir: Path | None, temperature: float | None = 1.5) -> Path:
    """An untrained ResNet-18 checkpoint as train.py writes it; its config names ``data_dir`` when given."""
    torch.manual_seed(0)
    config = {"arch": "resnet18", "img_size": 32, "dropout": 0.0, "trainable": "all", "epochs": 3,
              "val_fraction": 0.25, "seed": 0, **({"data_dir": str(data_dir)} if data_dir else {})}
    state = make_checkpoint(model_from_config(config, len(CLASSES)), CLASSES, config, 2, {"val_acc": 0.5},
                            IMAGENET_MEAN, IMAGENET_STD)
    state = replace(state, temperature=temperature)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, object]:
    """A dataset with val/ (2 images a class), its checkpoint, and that checkpoint exported: (data, .pt, .onnx, the
    export's result)."""
    pytest.importorskip("onnxruntime", reason="the ONNX tests need onnx, onnxruntime and onnxscript (dev requirements)")
    root = tmp_path_factory.mktemp("export")
    write_colour_dataset(root / "data", num_classes=3, train_per_class=1, val_per_class=2, test_per_class=2, seed=5)
    checkpoint = write_checkpoint(root / "run" / "best.pt", root / "data")
    result = call_main(export.main, "--checkpoint", checkpoint, "--output", root / "model.onnx")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return root / "data", checkpoint, root / "model.onnx", result


@pytest.fixture
def quick_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The TorchScript exporter (under a second; the default dynamo one takes 3 s) for tests about what export.py does
    around the export; ``exported`` and the tests of the export itself keep the default."""
    monkeypatch.setattr(export, "onnx_exporter", lambda: "torchscript")


def test_export_writes_the_model_with_its_metadata_after_checking_parity(exported) -> None:
    data, checkpoint, model_path, result = exported
    assert f"parity on 6 images of {data / 'val'}" in result.stdout
    assert "top-1 agreement 6/6 (100.00%)" in result.stdout
    assert result.value["agreeing"] == result.value["images"] == 6
    assert result.value["max_difference"] < 1e-4
    import onnx

    model = onnx.load(str(model_path))
    metadata = {prop.key: json.loads(prop.value) for prop in model.metadata_props}
    assert metadata == {"format": onnx_model.ONNX_FORMAT, "class_names": CLASSES, "img_size": 32,
                        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "temperature": 1.5,
                        "arch": "resnet18", "epoch": 2, "checkpoint": str(checkpoint)}
    [images] = model.graph.input
    dims = images.type.tensor_type.shape.dim
    assert dims[0].dim_param and [dim.dim_value for dim in dims[1:]] == [3, 32, 32]  # any batch, the eval size
    assert sorted(path.name for path in model_path.parent.glob("model*")) == ["model.onnx"]  # nothing left beside it


def test_predict_runs_the_onnx_model_like_its_checkpoint(exported, tmp_path: Path) -> None:
    data, checkpoint, model_path, _ = exported
    runs = {}
    for name, model in (("pt", checkpoint), ("onnx", model_path)):
        result = call_main(predict.main, "--checkpoint", model, "--test-dir", data / "test", "--output",
                           tmp_path / name / "prediction.csv", "--topk", "3", "--tta", "flip", *PREDICT_FLAGS)
        assert result.returncode == 0, result.stderr
        runs[name] = probabilities_by_label(tmp_path / name / "prediction_probabilities.csv")
    assert "(onnxruntime)" in result.stdout and "no temperature" not in result.stdout
    assert read_csv_rows(tmp_path / "pt" / "prediction.csv") == read_csv_rows(tmp_path / "onnx" / "prediction.csv")
    for image, probabilities in runs["pt"].items():
        for label, value in probabilities.items():
            assert runs["onnx"][image][label] == pytest.approx(value, abs=1e-5)

    table = predict.Classifier(model_path, tta="flip").predict(sorted((data / "test").glob("*.jpg")), topk=3)
    assert table["top1_probability"].tolist() == pytest.approx(
        [max(runs["pt"][Path(name).stem].values()) for name in table["name"]], abs=1e-5)


def test_an_export_beyond_the_tolerance_is_refused_and_set_aside(exported, tmp_path: Path, quick_exporter: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _, checkpoint, _, _ = exported
    reference = export.pytorch_logits
    monkeypatch.setattr(export, "pytorch_logits", lambda model, images: reference(model, images) + 0.01)
    result = call_main(export.main, "--checkpoint", checkpoint, "--output", tmp_path / "model.onnx")
    assert_user_error(result, "differ from PyTorch's by up to 1.00e-02", "above the limit",
                      f"not written to {tmp_path / 'model.onnx'}", f"kept as {tmp_path / 'model.parity-failed.onnx'}")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.parity-failed.onnx"]


def test_without_the_validation_images_images_dir_is_needed(exported, tmp_path: Path, quick_exporter: None) -> None:
    data, _, _, _ = exported
    checkpoint = write_checkpoint(tmp_path / "best.pt", data_dir=None, temperature=None)
    assert_user_error(call_main(export.main, "--checkpoint", checkpoint), "--images DIR", "config has no data_dir")
    assert not (tmp_path / "best.onnx").exists()

    result = call_main(export.main, "--checkpoint", checkpoint, "--images", data / "test", "--max-images", "4")
    assert result.returncode == 0, result.stderr
    assert f"parity on 4 images of {data / 'test'}" in result.stdout and "temperature none" in result.stdout
    assert (tmp_path / "best.onnx").is_file()  # the default name: the checkpoint's, with .onnx


def test_torch_24s_exporter_works_too(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch 2.4 (the floor) has no dynamo= parameter: export.py uses the TorchScript exporter there
    _, checkpoint, _, _ = exported
    monkeypatch.setattr(export, "onnx_exporter", lambda: "torchscript")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # which that exporter does not need
    result = call_main(export.main, "--checkpoint", checkpoint, "--output", tmp_path / "model.onnx")
    assert result.returncode == 0, result.stderr
    assert "torchscript exporter" in result.stdout and result.value["agreeing"] == 6


@pytest.mark.parametrize("package", ["onnx", "onnxruntime", "onnxscript"])
def test_a_missing_package_is_one_line_naming_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          package: str) -> None:
    monkeypatch.setattr(export, "onnx_exporter", lambda: "dynamo")
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    checkpoint = write_checkpoint(tmp_path / "best.pt", data_dir=None)
    assert_user_error(call_main(export.main, "--checkpoint", checkpoint), f"needs the {package} package",
                      "pip install onnx onnxruntime onnxscript")


def test_predict_without_onnxruntime_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    Image.new("RGB", (32, 32)).save(test_dir / "a.jpg")
    result = call_main(predict.main, "--checkpoint", tmp_path / "model.onnx", "--test-dir", test_dir, *PREDICT_FLAGS)
    assert_user_error(result, f"--checkpoint {tmp_path / 'model.onnx'} needs the onnxruntime package",
                      "pip install onnx onnxruntime onnxscript")


def test_an_ensemble_of_onnx_and_pytorch_models_is_refused(exported, tmp_path: Path) -> None:
    data, checkpoint, model_path, _ = exported
    result = call_main(predict.main, "--checkpoint", model_path, checkpoint, "--test-dir", data / "test", "--output",
                       tmp_path / "prediction.csv", *PREDICT_FLAGS)
    assert_user_error(result, str(model_path), str(checkpoint), "ONNX and PyTorch models is not supported")


def test_an_onnx_model_without_our_metadata_is_refused(exported, tmp_path: Path) -> None:
    import onnx

    data, _, model_path, _ = exported
    model = onnx.load(str(model_path))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    result = call_main(predict.main, "--checkpoint", tmp_path / "bare.onnx", "--test-dir", data / "test",
                       "--output", tmp_path / "prediction.csv", *PREDICT_FLAGS)
    assert_user_error(result, "without export.py's metadata")
