"""model.py: choosing trainable blocks, freezing (gradients and BatchNorm statistics), loading weight files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from conftest import FROZEN_BY_DEFAULT, block_of, go_offline, torchvision_state_dict
from model import BLOCK_NAMES, DEFAULT_TRAINABLE, build_model, freeze_blocks, parse_trainable
from utils import UserError

# --------------------------------------------------------------------------- --trainable


def test_parse_trainable_orders_names_and_accepts_all() -> None:
    assert DEFAULT_TRAINABLE == "layer4,fc"
    assert parse_trainable("fc, layer4") == ["layer4", "fc"]
    assert parse_trainable("all") == list(BLOCK_NAMES)


@pytest.mark.parametrize("spec", ["layer9", "layer4,head", "", " , "])
def test_parse_trainable_rejects_unknown_names(spec: str) -> None:
    with pytest.raises(UserError, match="--trainable") as error:
        parse_trainable(spec)
    assert "layer4" in str(error.value)  # the message lists the valid names


# --------------------------------------------------------------------------- freezing


def test_freeze_blocks_turns_off_gradients_exactly_for_frozen_blocks() -> None:
    model = build_model("resnet18", num_classes=5, weights="none")
    freeze_blocks(model, parse_trainable(DEFAULT_TRAINABLE))

    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (block_of(name) in ("layer4", "fc")), name


def test_frozen_batchnorm_statistics_survive_train_mode() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=5, weights="none")
    freeze_blocks(model, ["layer4", "fc"])
    model.train()
    before = {key: value.clone() for key, value in model.state_dict().items()}

    model(torch.randn(4, 3, 64, 64) * 3 + 1)

    after = model.state_dict()
    stats = [key for key in before if key.endswith(("running_mean", "running_var"))]
    frozen_stats = [key for key in stats if block_of(key) in FROZEN_BY_DEFAULT]
    assert frozen_stats and all(torch.equal(before[key], after[key]) for key in frozen_stats)
    assert any(not torch.equal(before[key], after[key]) for key in stats if block_of(key) == "layer4")


def test_freeze_blocks_keeps_the_output_of_a_frozen_network_in_train_mode() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=5, weights="none", dropout=0.0)
    freeze_blocks(model, ["fc"])
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    expected = model(images)

    model.train()  # frozen BatchNorm keeps using running statistics, so nothing changes

    torch.testing.assert_close(model(images), expected)


# --------------------------------------------------------------------------- --weights PATH


def test_torchvision_state_dict_loads_with_its_1000_class_head_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    state = torchvision_state_dict()
    path = tmp_path / "resnet18-imagenet-like.pth"
    torch.save(state, path)

    model = build_model("resnet18", num_classes=12, weights=str(path))

    note = capsys.readouterr().out
    assert "its classification head (fc.bias, fc.weight) does not fit" in note
    own = model.state_dict()
    trunk = [key for key in state if not key.startswith("fc.")]
    assert all(torch.equal(own[key], state[key]) for key in trunk)
    assert own["fc.1.weight"].shape == (12, 512)


def test_state_dict_saved_from_data_parallel_loads(tmp_path: Path) -> None:
    state = torchvision_state_dict(seed=1)
    path = tmp_path / "wrapped.pth"
    torch.save({f"module.{key}": value for key, value in state.items()}, path)

    model = build_model("resnet18", num_classes=3, weights=str(path))

    assert torch.equal(model.state_dict()["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])


def test_checkpoint_dict_holding_model_weights_loads(tmp_path: Path) -> None:
    state = torchvision_state_dict(seed=2)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": state, "epoch": 7, "note": "from another project"}, path)

    model = build_model("resnet18", num_classes=3, weights=str(path))

    assert torch.equal(model.state_dict()["bn1.running_var"], state["bn1.running_var"])


@pytest.mark.parametrize("other_arch", ["resnet34", "resnet50"])
def test_weights_of_another_architecture_are_a_clean_error(tmp_path: Path, other_arch: str) -> None:
    path = tmp_path / f"{other_arch}.pth"
    torch.save(torchvision.models.get_model(other_arch, weights=None).state_dict(), path)

    with pytest.raises(UserError, match=f"weights are for another architecture than this model .they fit "
                       f"{other_arch}.; pass the --arch") as error:
        build_model("resnet18", num_classes=3, weights=str(path))
    assert str(path) in str(error.value)
    assert "head" not in str(error.value) and "layer1" not in str(error.value)  # not "dropped N head weights"


@pytest.mark.parametrize("content", [b"", b"definitely not a torch file"])
def test_unreadable_weights_file_is_a_clean_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match="--weights"):
        build_model("resnet18", num_classes=3, weights=str(path))
    with pytest.raises(UserError, match="file not found"):
        build_model("resnet18", num_classes=3, weights=str(tmp_path / "missing.pth"))


# --------------------------------------------------------------------------- --weights imagenet, offline


def test_offline_imagenet_weights_name_the_file_and_the_alternatives(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    go_offline(monkeypatch, tmp_path)

    with pytest.raises(UserError) as error:
        build_model("resnet50", num_classes=10, weights="imagenet")

    message = str(error.value)
    assert "resnet50-11ad3fa6.pth" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in message
    assert "hub/checkpoints" in message and "--weights none" in message
    assert "\n" not in message


def test_model_is_a_resnet_with_a_dropout_linear_head() -> None:
    model = build_model("resnet18", num_classes=7, weights="none", dropout=0.3)
    assert isinstance(model.fc, nn.Sequential)
    dropout, linear = model.fc
    assert isinstance(dropout, nn.Dropout) and dropout.p == 0.3
    assert isinstance(linear, nn.Linear) and linear.out_features == 7
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(UserError, match="--arch"):
        build_model("resnet9000", num_classes=7, weights="none")
