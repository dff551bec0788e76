"""model.py: choosing trainable blocks, freezing (gradients and BatchNorm statistics), loading weight files,
timm models (``timm:NAME``), parameter counts without a download."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from conftest import FROZEN_BY_DEFAULT, block_of, go_offline, torchvision_state_dict
from model import (
    BLOCK_NAMES,
    DEFAULT_TRAINABLE,
    block_names,
    build_model,
    classifier_name,
    freeze_blocks,
    has_trainable_batchnorm,
    head_block,
    model_skeleton,
    parameter_count,
    parse_count,
    parse_trainable,
)
from utils import UserError

# Every function timm's builder fetches pretrained weights with (from the Hugging Face hub or a URL).
TIMM_DOWNLOADERS = (
    "load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file", "load_custom_from_hf",
)


@pytest.fixture(autouse=True)
def no_timm_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if a test asks timm for pretrained weights (conftest does the same for torchvision)."""
    refuse_timm_downloads(monkeypatch, RuntimeError("a test tried to download timm weights; use weights='none'"))


def refuse_timm_downloads(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Make every way timm fetches pretrained weights raise ``error`` (nothing to do when timm is absent)."""
    try:
        import timm.models._builder as timm_builder
    except ImportError:
        return

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise error

    for name in TIMM_DOWNLOADERS:
        monkeypatch.setattr(timm_builder, name, refuse, raising=False)


def needs_timm(arch: str = "timm:") -> None:
    """Skip the test when ``arch`` is a timm model and timm is not installed (it is an optional dependency)."""
    if arch.startswith("timm:"):
        pytest.importorskip("timm", reason="timm is optional: pip install timm (requirements-dev.txt has it)")


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


@pytest.mark.parametrize("arch", ["resnet18", "timm:resnet18"])  # timm's ResNets have torchvision's block names
def test_freeze_blocks_turns_off_gradients_exactly_for_frozen_blocks(arch: str) -> None:
    needs_timm(arch)
    model = build_model(arch, num_classes=5, weights="none")
    assert block_names(model) == list(BLOCK_NAMES) and head_block(model) == "fc"
    freeze_blocks(model, parse_trainable(DEFAULT_TRAINABLE, model))

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


# --------------------------------------------------------------------------- plain torchvision networks


def test_resnet_is_plain_torchvision_and_trains_like_it() -> None:
    """The frozen trunk needs no special forward: frozen parameters and inputs without grad record no graph."""
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=5, weights="none", dropout=0.0)
    assert type(model) is torchvision.models.ResNet
    reference = torchvision.models.resnet18(weights=None)
    reference.fc = nn.Sequential(nn.Dropout(0.0), nn.Linear(512, 5))
    reference.load_state_dict(model.state_dict())
    freeze_blocks(model, parse_trainable("layer3,layer4,fc"))
    trained = ("layer3", "layer4", "fc")
    for name, parameter in reference.named_parameters():
        parameter.requires_grad_(block_of(name) in trained)
    reference.train()
    for name, module in reference.named_modules():
        if isinstance(module, nn.BatchNorm2d) and block_of(name) not in trained:
            module.eval()
    trunk_output_needs_grad: list[bool] = []
    model.layer3.register_forward_pre_hook(lambda _, inputs: trunk_output_needs_grad.append(inputs[0].requires_grad))
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])

    model.train()
    logits, expected = model(images), reference(images)
    F.cross_entropy(logits, targets).backward()
    F.cross_entropy(expected, targets).backward()

    assert trunk_output_needs_grad == [False]  # no graph, so no activations kept, for the frozen front
    assert torch.equal(logits, expected)
    gradients = {name: parameter.grad for name, parameter in reference.named_parameters() if parameter.requires_grad}
    assert [name for name, parameter in model.named_parameters() if parameter.requires_grad] == list(gradients)
    for name, parameter in model.named_parameters():
        assert parameter.grad is None if name not in gradients else torch.equal(parameter.grad, gradients[name]), name
    for (name, buffer), expected_buffer in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(buffer, expected_buffer), name  # running statistics moved the same way


# --------------------------------------------------------------------------- timm models


@pytest.mark.parametrize("arch, head", [("timm:resnet18", "fc"), ("timm:convnext_atto", "head.fc"),
                                        ("timm:efficientnet_b0", "classifier")])
def test_timm_model_gets_a_dropout_linear_head(arch: str, head: str) -> None:
    needs_timm(arch)
    model = build_model(arch, num_classes=7, weights="none", dropout=0.3)

    assert classifier_name(model) == head
    dropout, linear = model.get_submodule(head)
    assert isinstance(dropout, nn.Dropout) and dropout.p == 0.3
    assert isinstance(linear, nn.Linear) and linear.out_features == 7
    assert f"{head}.1.weight" in model.state_dict()
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_timm_blocks_are_the_top_level_children() -> None:
    needs_timm()
    model = build_model("timm:convnext_atto", num_classes=3, weights="none")

    assert block_names(model) == ["stem", "stages", "head"] and head_block(model) == "head"
    assert parse_trainable("stages", model) == ["stages", "head"]  # the head always trains
    assert parse_trainable("all", model) == ["stem", "stages", "head"]
    with pytest.raises(UserError, match="--trainable layer4: layer4 is not a block; use 'all' or a comma list of "
                                        "stem, stages, head"):
        parse_trainable("layer4", model)


def test_freezing_a_timm_model_freezes_its_batchnorm_and_keeps_the_head_training() -> None:
    needs_timm()
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = build_model("timm:efficientnet_b0", num_classes=3, weights="none", dropout=0.0)
    images = torch.randn(2, 3, 32, 32)
    expected = model.eval()(images)
    trainable = parse_trainable("bn2", model)
    assert trainable == ["bn2", "classifier"]
    assert has_trainable_batchnorm(trainable, model) and not has_trainable_batchnorm(["classifier"], model)

    freeze_blocks(model, trainable)
    model.train()

    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (block_of(name) in trainable), name
    batchnorms = {name: module for name, module in model.named_modules() if isinstance(module, BatchNormAct2d)}
    assert all(module.training == (name == "bn2") for name, module in batchnorms.items())
    # bn2 still learns; without it, the frozen layers (activation included) give the eval-mode output in train mode
    model.bn2.eval()
    torch.testing.assert_close(model(images), expected)


def test_timm_checkpoint_round_trip_rebuilds_the_same_network(tmp_path: Path) -> None:
    needs_timm()
    torch.manual_seed(0)
    config = {"arch": "timm:efficientnet_b0", "dropout": 0.1, "trainable": "bn2,classifier", "img_size": 32}
    model = build_model(config["arch"], num_classes=3, weights="none", dropout=config["dropout"])
    freeze_blocks(model, parse_trainable(config["trainable"], model))
    model.train()
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()  # moves bn2's stats
    path = tmp_path / "best.pt"
    save_checkpoint(make_checkpoint(model, ["a", "b", "c"], config, epoch=1, metrics={}, mean=(0.5,) * 3,
                                    std=(0.2,) * 3), path)

    rebuilt = model_from_checkpoint(load_checkpoint(path))

    assert [type(module) for module in rebuilt.modules()] == [type(module) for module in model.modules()]
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(images), model.eval()(images))


def test_timm_weights_file_keeps_the_trunk_and_drops_only_the_classifier(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    timm = pytest.importorskip("timm", reason="timm is optional")
    torch.manual_seed(0)
    state = timm.create_model("convnext_atto", pretrained=False).state_dict()  # timm's layout: 1000-class head.fc
    path = tmp_path / "convnext_atto.pth"
    torch.save(state, path)

    model = build_model("timm:convnext_atto", num_classes=4, weights=str(path))

    assert "its classification head (head.fc.bias, head.fc.weight) does not fit this model's 4 classes" in \
        capsys.readouterr().out
    own = model.state_dict()
    assert torch.equal(own["head.norm.weight"], state["head.norm.weight"])  # the head's norm is trunk, kept
    assert torch.equal(own["stages.3.blocks.0.conv_dw.weight"], state["stages.3.blocks.0.conv_dw.weight"])


def test_timm_imagenet_weights_offline_are_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    needs_timm()
    refuse_timm_downloads(monkeypatch, OSError("[Errno -3] Temporary failure in name resolution"))

    with pytest.raises(UserError) as error:
        build_model("timm:resnet18", num_classes=3, weights="imagenet")

    message = str(error.value)
    assert message.startswith("--weights imagenet: could not download timm's pretrained weights for resnet18")
    assert "name resolution" in message and "--weights none" in message and "\n" not in message


def test_unknown_timm_model_suggests_close_names() -> None:
    needs_timm()
    with pytest.raises(UserError, match=r"--arch timm:resnet5o: timm has no model named resnet5o; did you mean "
                                        r"timm:resnet50\b"):
        build_model("timm:resnet5o", num_classes=3, weights="none")


def test_timm_arch_without_timm_installed_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # "import timm" now raises ImportError

    for build in (lambda: build_model("timm:resnet18", 3, weights="none"), lambda: parameter_count("timm:resnet18", 3)):
        with pytest.raises(UserError) as error:
            build()
        assert str(error.value) == "--arch timm:resnet18: needs the timm package: pip install timm"


def test_timm_model_without_pretrained_weights_is_a_clean_error(monkeypatch: pytest.MonkeyPatch) -> None:
    timm = pytest.importorskip("timm", reason="timm is optional")
    monkeypatch.setattr(timm.models, "is_model_pretrained", lambda name: False)

    with pytest.raises(UserError, match="--weights imagenet: timm has no pretrained weights for resnet18; use "
                                        "--weights none or --weights PATH"):
        build_model("timm:resnet18", num_classes=3, weights="imagenet")


# --------------------------------------------------------------------------- sizes, without a download


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "timm:resnet18", "timm:convnext_atto"])
def test_parameter_count_is_the_built_models_without_a_download(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    needs_timm(arch)

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("parameter_count downloaded weights")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_download)
    refuse_timm_downloads(monkeypatch, AssertionError("parameter_count downloaded weights"))

    count = parameter_count(arch, num_classes=12)

    assert all(parameter.is_meta for parameter in model_skeleton(arch, 12).parameters())  # no memory, no init
    assert count == sum(parameter.numel() for parameter in build_model(arch, 12, weights="none").parameters())


def test_parameter_count_matches_torchvisions_published_size() -> None:
    assert parameter_count("resnet50", num_classes=1000) == 25_557_032  # torchvision's ResNet50_Weights meta
    with pytest.raises(UserError, match="--arch resnet9000"):
        parameter_count("resnet9000", 10)


@pytest.mark.parametrize("text, count", [("100M", 100_000_000), ("25.6M", 25_600_000), ("900k", 900_000),
                                         ("900K", 900_000), ("23508032", 23_508_032), (" 1.5G ", 1_500_000_000),
                                         ("2B", 2_000_000_000), (".5k", 500)])
def test_parse_count_reads_plain_and_suffixed_counts(text: str, count: int) -> None:
    assert parse_count(text) == count


@pytest.mark.parametrize("text", ["", "M", "abc", "-5M", "0", "0.0001k", "1e6", "12 parameters", "25.6MB", "1_000",
                                  "25.6"])
def test_parse_count_rejects_other_text_naming_the_flag(text: str) -> None:
    with pytest.raises(UserError, match=r"^--max-params .*25\.6M"):
        parse_count(text)

