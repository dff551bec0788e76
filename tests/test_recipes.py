"""The stronger recipes' options, each on tiny data for what it must change: the warmup schedule, the backbone's
learning rate, gradient accumulation, the weights' moving average, mixup/cutmix, random erasing, auto-augment,
class-balanced sampling, what best.pt follows, the test size, SGD; and an exact resume with all of them on."""

from __future__ import annotations

import importlib.util
import math
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

import common
import dataset as train_set
import engine
import evaluate
import gpu_augment
import options
import pipeline
import predict
import train
from checkpoint import load_checkpoint
from common import IMAGENET_MEAN, IMAGENET_STD, World
from conftest import (
    PREDICT_FLAGS,
    REPO_ROOT,
    TINY_TRAIN_FLAGS,
    ColourData,
    assert_same_training,
    assert_user_error,
    block_of,
    call_main,
    history_without_seconds,
    read_csv_rows,
    tiny_train,
)
from engine import EvalResult, StepOptions, WeightAverage, make_optimizer, train_one_epoch
from model import (
    FrozenBatchNorm,
    build_model,
    freeze_blocks,
    input_normalization,
    parameter_count,
    parse_trainable,
    thaw_blocks,
)
from recipe import build_train_transform
from resume import Progress
from samplers import EpochSampler, balanced_sample_weights
from utils import UserError

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- the schedule


def test_the_backbone_learns_at_its_share_of_the_heads_rate(small_data: ColourData, tmp_path: Path,
                                                            no_final_outputs: None) -> None:
    tiny_train(small_data, tmp_path / "out", "--epochs", "2", "--warmup-epochs", "1", "--backbone-lr-mult", "0.1")

    history = read_csv_rows(tmp_path / "out" / "history.csv")
    assert [float(row["lr"]) for row in history] == pytest.approx([5e-4 / 2, 5e-4])
    groups = load_checkpoint(tmp_path / "out" / "last.pt").training_state.optimizer["param_groups"]
    assert [(group["lr_mult"], group["lr"]) for group in groups] == [(1.0, pytest.approx(5e-4)),
                                                                      (0.1, pytest.approx(5e-5))]
    head, backbone = (len(group["params"]) for group in groups)
    assert head == 2 and backbone > 2  # fc.1.weight and fc.1.bias; the rest of layer4


# --------------------------------------------------------------------------- the step


def linear_batches(count: int, size: int) -> list[common.Batch]:
    torch.manual_seed(1)
    return [common.Batch(torch.randn(size, 6), torch.randint(0, 3, (size,)), list(range(size)), [])
            for _ in range(count)]


def test_accumulated_gradients_make_one_step_of_the_whole_batch() -> None:
    batches = linear_batches(2, 4)
    whole = [common.Batch(torch.cat([b.images for b in batches]), torch.cat([b.targets for b in batches]),
                            list(range(8)), [])]
    states = []
    for data, steps in ((batches, 2), (whole, 1)):
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        optimizer = make_optimizer(list(model.parameters()), 0.1, 0.0, CPU, kind="sgd")
        train_one_epoch(model, data, nn.CrossEntropyLoss(), optimizer, train.Accel(CPU, channels_last=False),
                        show_progress=False, options=StepOptions(accum_steps=steps))
        states.append(model.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key])


def test_an_optimizer_step_updates_the_moving_average_and_sgd_keeps_momentum() -> None:
    model = nn.Linear(6, 3)
    average = WeightAverage(model, 0.5)
    optimizer = make_optimizer(list(model.parameters()), 0.5, 0.0, CPU, kind="sgd")
    train_one_epoch(model, linear_batches(3, 4), nn.CrossEntropyLoss(), optimizer,
                    train.Accel(CPU, channels_last=False), show_progress=False,
                    options=StepOptions(after_step=lambda: average.update(model)))
    assert average.updates == 3
    assert not torch.equal(average.module.weight, model.weight)  # the average lags behind the raw weights
    assert all("momentum_buffer" in state for state in optimizer.state.values())
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]


def fake_evaluation(accuracy: float, loss: float) -> EvalResult:
    return EvalResult(loss, accuracy, 4, 0.1, torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]))


@pytest.mark.parametrize("raw_acc, ema_acc, kept", [(0.5, 0.75, "ema"), (0.75, 0.5, "raw")])
def test_best_pt_holds_the_better_of_the_raw_and_averaged_weights(tmp_path: Path, raw_acc: float, ema_acc: float,
                                                                  kept: str) -> None:
    model = nn.Linear(6, 3)
    average = WeightAverage(model, 0.9)
    with torch.no_grad():
        average.module.weight.add_(1.0)
    config = SimpleNamespace(monitor="val_acc", arch="resnet18",
                             saved_options=lambda: {"arch": "resnet18", "img_size": 32})
    run = SimpleNamespace(model=model, ema=average, data=SimpleNamespace(class_names=["a", "b", "c"], held_out=None),
                          config=config, runtime={},
                          output_dir=tmp_path, optimizer=make_optimizer(list(model.parameters()), 0.1, 0.0, CPU),
                          scaler=None, world=World())
    row = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": raw_acc, "lr": 0.1,
           "ema_val_acc": ema_acc, "seconds": 1.0}
    outcome = train.EpochOutcome(row, fake_evaluation(raw_acc, 1.0), fake_evaluation(ema_acc, 1.0), 10.0)

    assert train.record_epoch(run, Progress(), outcome)

    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert best.weights == kept
    expected = average.module if kept == "ema" else model
    assert torch.equal(best.model["weight"], expected.weight)
    assert torch.equal(last.model["weight"], model.weight) and last.ema_model is not None


def test_what_best_pt_follows_is_the_monitor() -> None:
    better_loss, better_acc = fake_evaluation(0.5, 0.2), fake_evaluation(0.75, 0.9)
    assert engine.monitored(better_loss, "val_loss", 3) > engine.monitored(better_acc, "val_loss", 3)
    assert engine.monitored(better_acc, "val_acc", 3) > engine.monitored(better_loss, "val_acc", 3)
    # predictions [0, 1, 1, 2] of [0, 1, 2, 2]: recalls 1, 1, 1/2 -> balanced accuracy 5/6
    assert engine.monitored(better_acc, "val_balanced_acc", 3) == pytest.approx(5 / 6)


def test_with_the_average_on_the_history_and_last_pt_carry_it(small_data: ColourData, tmp_path: Path,
                                                              no_final_outputs: None) -> None:
    result = tiny_train(small_data, tmp_path / "out", "--epochs", "2", "--ema", "0.5", "--monitor", "val_loss")

    history = read_csv_rows(tmp_path / "out" / "history.csv")
    assert {"ema_val_loss", "ema_val_acc", "ema_val_balanced_acc"} <= set(history[0])
    scores = [(-min(float(row["val_loss"]), float(row["ema_val_loss"])), int(row["epoch"])) for row in history]
    best = load_checkpoint(tmp_path / "out" / "best.pt")
    assert best.epoch == max(scores, key=lambda item: (item[0], -item[1]))[1]  # the lowest loss, first if tied
    row = history[best.epoch - 1]
    assert best.weights == ("ema" if float(row["ema_val_loss"]) < float(row["val_loss"]) else "raw")
    assert " (ema " in result.stdout
    lowest = min(float(row["val_loss"]), float(row["ema_val_loss"]))
    assert f"best val_loss {lowest:.4f} at epoch {best.epoch} (val accuracy " in result.stdout  # what chose it


# --------------------------------------------------------------------------- regularisation


def test_mixed_targets_sum_to_one_and_follow_the_pasted_area() -> None:
    images = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).reshape(4, 3, 8, 8)
    targets = torch.tensor([0, 1, 2, 3])
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0), (0.4, 1.0)):
        mixed = gpu_augment.BatchMix(mixup, cutmix, seed=5)(images, targets, batch_number=2)
        soft = (mixed.lam * F.one_hot(mixed.targets_a, 4).float()
                + (1 - mixed.lam) * F.one_hot(mixed.targets_b, 4).float())  # the mixed labels as probabilities
        torch.testing.assert_close(soft.sum(dim=1), torch.ones(4))
        assert torch.equal(mixed.targets_b, targets.roll(1))
        kept = (mixed.images == images).all(dim=1).float().mean().item()  # pixels left as they were
        if cutmix and not mixup:
            assert mixed.lam == pytest.approx(kept)  # lam is the share of each image not pasted over
    only_mixup = gpu_augment.BatchMix(0.4, 0.0, seed=5)(images, targets, 0)
    torch.testing.assert_close(only_mixup.images, images * only_mixup.lam + images.roll(1, 0) * (1 - only_mixup.lam))
    again = gpu_augment.BatchMix(0.4, 0.0, seed=5)(images, targets, 0)
    assert again.lam == only_mixup.lam  # the seed and batch number decide


def test_a_mixed_run_trains_and_reports_accuracy_against_the_dominant_label(small_data: ColourData, tmp_path: Path,
                                                                            no_final_outputs: None) -> None:
    tiny_train(small_data, tmp_path / "out", "--epochs", "1", "--mixup", "0.4", "--cutmix", "1.0")
    row = read_csv_rows(tmp_path / "out" / "history.csv")[0]
    assert 0 <= float(row["train_acc"]) <= 1 and math.isfinite(float(row["train_loss"]))


def test_random_erasing_on_both_paths() -> None:
    transform = build_train_transform(32, random_erase=0.5)
    assert any(type(step).__name__ == "RandomErasing" and step.p == 0.5 for step in transform.transforms)
    boxes = gpu_augment.sample_erase_boxes(2000, 32, 0.5, torch.Generator().manual_seed(3))
    assert 0.42 < len({sample for sample, *_ in boxes}) / 2000 < 0.58
    assert all(0 < height < 32 and 0 < width < 32 and top + height <= 32 and left + width <= 32
               for _, top, left, height, width in boxes)
    areas = [height * width / 32 / 32 for _, _, _, height, width in boxes]
    assert 0.015 < min(areas) and max(areas) < 0.36  # RandomErasing's scale (0.02, 0.33), up to rounding
    erased = gpu_augment.erase(torch.ones(2, 3, 32, 32), [(1, 2, 3, 4, 5)])
    assert erased[1, :, 2:6, 3:8].eq(0).all() and erased.sum() == 2 * 3 * 32 * 32 - 3 * 4 * 5


def test_auto_augment_runs_on_the_cpu_path_with_a_note(small_data: ColourData, tmp_path: Path,
                                                       no_final_outputs: None) -> None:
    transform = build_train_transform(32, auto_augment="ta_wide")
    assert type(transform.transforms[2]).__name__ == "TrivialAugmentWide"  # after the flip
    result = tiny_train(small_data, tmp_path / "out", "--epochs", "1", "--augment-device", "gpu",
                        "--auto-augment", "ta_wide")
    assert "note: --auto-augment ta_wide runs in the loader workers" in result.stdout


def test_the_balanced_sampler_draws_every_class_about_equally_often() -> None:
    labels = [0] * 80 + [1] * 15 + [2] * 5
    sampler = EpochSampler(len(labels), seed=0, weights=balanced_sample_weights(labels))
    drawn = Counter()
    for epoch in range(1, 51):
        sampler.set_epoch(epoch)
        drawn.update(labels[index] for index, _ in sampler)
    assert sum(drawn.values()) == 50 * 100
    assert all(abs(count / 5000 - 1 / 3) < 0.03 for count in drawn.values())
    sampler.set_epoch(7)
    assert list(sampler) == list(sampler)  # (seed, epoch) decides


# --------------------------------------------------------------------------- the test size


def test_the_test_size_is_stored_and_used_by_predict_and_evaluate(small_data: ColourData, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  no_final_outputs: None) -> None:
    tiny_train(small_data, tmp_path / "out", "--epochs", "1", "--test-size", "40")
    checkpoint = load_checkpoint(tmp_path / "out" / "best.pt")
    assert checkpoint.img_size == 32 and checkpoint.test_size == 40
    sizes = []
    real = pipeline.eval_batches

    def recording(paths, labels, img_size, *args, **kwargs):
        sizes.append(img_size)
        return real(paths, labels, img_size, *args, **kwargs)

    monkeypatch.setattr(pipeline, "eval_batches", recording)  # what predict.py and evaluate.py both call
    assert call_main(predict.main, "--checkpoint", tmp_path / "out", "--test-dir", small_data.test_dir, "--output",
                     tmp_path / "p.csv", *PREDICT_FLAGS).returncode == 0
    assert call_main(evaluate.main, "--checkpoint", tmp_path / "out" / "best.pt", "--data-dir", small_data.root,
                     "--report-dir", tmp_path / "r", *PREDICT_FLAGS).returncode == 0
    assert sizes == [40, 40]


# --------------------------------------------------------------------------- backbones


def test_max_params_refuses_an_over_budget_model_before_any_download(small_data: ColourData, tmp_path: Path) -> None:
    # conftest turns any weights download into an error: the refusal must come first
    result = call_main(train.main, "--data-dir", small_data.root, "--output-dir", tmp_path / "out", *TINY_TRAIN_FLAGS,
                       "--arch", "resnet50", "--weights", "imagenet", "--max-params", "20M")

    assert_user_error(result, "--max-params 20M: --arch resnet50 has 23,514,179 parameters with 3 classes (23.5M), "
                              "over the budget")
    assert not (tmp_path / "out").exists()


def test_max_params_lets_a_model_within_budget_train_and_checks_its_spelling(small_data: ColourData, tmp_path: Path,
                                                                             no_final_outputs: None) -> None:
    tiny_train(small_data, tmp_path / "out", "--epochs", "1", "--max-params", "11.2M")  # resnet18: 11,178,051
    assert_user_error(call_main(train.main, "--data-dir", small_data.root, "--output-dir", tmp_path / "other",
                                *TINY_TRAIN_FLAGS, "--max-params", "lots"), "--max-params lots: not a parameter count")


def test_a_timm_model_with_a_fixed_input_size_refuses_another(small_data: ColourData, tmp_path: Path) -> None:
    pytest.importorskip("timm", reason="timm is optional")
    result = call_main(train.main, "--data-dir", small_data.root, "--output-dir", tmp_path / "out", *TINY_TRAIN_FLAGS,
                       "--arch", "timm:vit_tiny_patch16_224")
    assert_user_error(result, "--img-size 32: timm:vit_tiny_patch16_224 takes only 224-px images")


def test_a_timm_backbone_trains_resumes_and_predicts(small_data: ColourData, tmp_path: Path) -> None:
    pytest.importorskip("timm", reason="timm is optional: pip install timm (requirements-dev.txt has it)")
    output = tmp_path / "out"
    result = tiny_train(small_data, output, "--epochs", "2", "--epochs-this-run", "1", "--arch", "timm:resnet18",
                        "--trainable", "layer4")

    assert "the new head (fc) starts from random weights, so it always trains; training layer4,fc" in result.stdout
    assert call_main(train.main, "--resume", output / "last.pt").returncode == 0
    checkpoint = load_checkpoint(output / "best.pt")
    assert checkpoint.arch == "timm:resnet18" and "fc.1.weight" in checkpoint.model
    assert call_main(predict.main, "--checkpoint", output, "--test-dir", small_data.test_dir, "--output",
                     tmp_path / "p.csv", *PREDICT_FLAGS).returncode == 0
    assert len(read_csv_rows(tmp_path / "p.csv")) == len(list(small_data.test_dir.iterdir()))


def test_a_model_is_fed_the_normalization_its_weights_were_pretrained_with(
        small_data: ColourData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_final_outputs: None) -> None:
    assert input_normalization("resnet50") == (IMAGENET_MEAN, IMAGENET_STD)
    if importlib.util.find_spec("timm"):  # timm's pretrained configs say, without a download
        assert input_normalization("timm:vit_base_patch16_224.augreg_in21k") == ((0.5,) * 3, (0.5,) * 3)
    monkeypatch.setattr(train, "input_normalization", lambda arch: ((0.5,) * 3, (0.25,) * 3))
    used: list[tuple] = []
    build = pipeline.build_train_transform
    monkeypatch.setattr(pipeline, "build_train_transform",
                        lambda size, mean, std, *rest: used.append((mean, std)) or build(size, mean, std, *rest))

    tiny_train(small_data, tmp_path / "out", "--epochs", "1")

    assert used == [((0.5,) * 3, (0.25,) * 3)]
    best = load_checkpoint(tmp_path / "out" / "best.pt")
    assert (best.mean, best.std) == ((0.5,) * 3, (0.25,) * 3)  # predict.py and evaluate.py read them here


BUNDLED_CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", BUNDLED_CONFIGS, ids=lambda path: path.name)
def test_every_bundled_config_is_valid_and_within_the_course_budget(config: Path) -> None:
    values = yaml.safe_load(config.read_text(encoding="utf-8"))
    if str(values.get("arch", "")).startswith("timm:"):
        pytest.importorskip("timm", reason="timm is optional: pip install timm (requirements-dev.txt has it)")

    args = options.parse_args(["--config", str(config)])  # every value checked as its flag is; nothing downloaded

    written = {**values, **({"amp": "off"} if values.get("amp") is False else {})}  # YAML reads off as False
    assert {key: vars(args)[key] for key in values} == written
    assert parameter_count(args.arch, 100) <= 100_000_000  # the course's rule, with the reference's 100 classes


def test_help_with_a_config_shows_the_configs_values_as_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("timm", reason="timm is optional")
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps as in a shell without a terminal

    result = call_main(train.main, "--config", REPO_ROOT / "configs" / "strong.yaml", "--help")

    text = re.sub(r"\s+", " ", result.stdout)
    assert result.returncode == 0
    for shown in ("(default: timm:seresnextaa101d_32x8d.sw_in12k_ft_in1k_288)", "(default: 288)", "(default: 320)",
                  "(default: ta_wide)", "(default: 0.999)", "(default: 100M)", "(default: all)"):
        assert shown in text, shown


# --------------------------------------------------------------------------- gradual unfreezing


def test_a_thawed_block_trains_again_and_its_batchnorm_learns() -> None:
    model = build_model("resnet18", num_classes=3, weights="none")
    freeze_blocks(model, parse_trainable("layer4,fc"))
    model.train()

    thawed = thaw_blocks(model, ["layer3"])

    assert {block_of(name) for name, parameter in model.named_parameters() if parameter.requires_grad} == \
        {"layer3", "layer4", "fc"}
    assert len(thawed) == sum(1 for name, _ in model.named_parameters() if block_of(name) == "layer3")
    assert all(type(module) is nn.BatchNorm2d and module.training for module in model.layer3.modules()
               if isinstance(module, nn.BatchNorm2d))
    assert all(isinstance(module, FrozenBatchNorm) and not module.training for module in model.layer2.modules()
               if isinstance(module, nn.BatchNorm2d))
    assert thaw_blocks(model, ["layer3"]) == []  # nothing left to thaw


def test_blocks_thaw_at_their_epochs_with_the_optimizer_holding_exactly_the_trainable_parameters(
        small_data: ColourData, tmp_path: Path, no_final_outputs: None) -> None:
    output = tmp_path / "out"
    tiny_train(small_data, output, "--epochs", "3", "--epochs-this-run", "1", "--unfreeze-at", "layer3:2,all:3")
    states, outputs = [load_checkpoint(output / "last.pt")], []
    for _ in range(2):  # one epoch a call: each resume rebuilds the thawed blocks and the optimizer's groups
        resumed = call_main(train.main, "--resume", output / "last.pt", "--epochs-this-run", "1")
        assert resumed.returncode == 0, resumed.stdout[-3000:]
        states.append(load_checkpoint(output / "last.pt"))
        outputs.append(resumed.stdout)

    assert "epoch 2: layer3 start(s) training (--unfreeze-at); now " in outputs[0]
    assert "epoch 3: conv1,bn1,layer1,layer2 start(s) training" in outputs[1]
    names = [name for name, _ in build_model("resnet18", num_classes=3, weights="none").named_parameters()]
    group_blocks = [{"layer4", "fc"}, {"layer3"}, {"conv1", "bn1", "layer1", "layer2"}]  # one group per thaw
    for epoch, state in enumerate(states, start=1):
        groups = state.training_state.optimizer["param_groups"]
        assert [len(group["params"]) for group in groups] == \
            [sum(block_of(name) in blocks for name in names) for blocks in group_blocks[:epoch]]
        assert sum(len(group["params"]) for group in groups) == len(set().union(*(g["params"] for g in groups)))
    # a block's BatchNorm statistics stay at their initial values until it thaws (random init: mean 0)
    running_means = [[state.model[f"{block}.0.bn1.running_mean"].abs().sum().item() for block in
                      ("layer1", "layer2", "layer3")] for state in states]
    assert [[mean > 0 for mean in epoch] for epoch in running_means] == [[False, False, False], [False, False, True],
                                                                         [True, True, True]]


@pytest.mark.parametrize("spec, message", [
    ("layer4:2", "layer4 already trains by then"),
    ("layer3:2,layer3:3", "layer3 already trains by then"),
    ("layer3:1", "epoch 1 is not in 2..3 (--epochs)"),
    ("layer3:4", "epoch 4 is not in 2..3"),
    ("layer9:2", "layer9 is not a block; use all or one of conv1, bn1, layer1"),
    ("layer3", "'layer3' is not BLOCK:EPOCH"),
    (",", "no BLOCK:EPOCH in it"),
])
def test_unfreeze_at_mistakes_are_one_line(small_data: ColourData, tmp_path: Path, spec: str, message: str) -> None:
    result = call_main(train.main, "--data-dir", small_data.root, "--output-dir", tmp_path / "out",
                       *TINY_TRAIN_FLAGS, "--epochs", "3", "--unfreeze-at", spec)
    assert_user_error(result, f"--unfreeze-at {spec if spec != ',' else repr(spec)}: {message}")


# --------------------------------------------------------------------------- folds and the final fit


def test_the_folds_partition_the_pooled_images_class_by_class() -> None:
    samples = [(f"{label}/{index}.jpg", label) for label, count in enumerate([7, 12, 5]) for index in range(count)]

    vals = [train_set.fold_split(samples, fold, 5, seed=3)[1] for fold in range(1, 6)]

    assert sorted(sample for val in vals for sample in val) == sorted(samples)  # each image validates exactly once
    for val in vals:
        counts = Counter(label for _, label in val)
        assert [counts[label] for label in range(3)] in ([1, 2, 1], [1, 3, 1], [2, 2, 1], [2, 3, 1], [1, 2, 0],
                                                          [2, 2, 0], [1, 3, 0], [2, 3, 0])  # 7/5, 12/5, 5/5 a fold
        train, _ = train_set.fold_split(samples, vals.index(val) + 1, 5, seed=3)
        assert sorted(train + val) == sorted(samples)
    assert train_set.fold_split(samples, 2, 5, seed=3) == train_set.fold_split(list(reversed(samples)), 2, 5, seed=3)
    assert train_set.fold_split(samples, 2, 5, seed=4) != train_set.fold_split(samples, 2, 5, seed=3)


@pytest.mark.parametrize("text", ["3", "0/5", "6/5", "1/1", "a/b", "1/5/2"])
def test_a_fold_is_written_i_of_k(text: str) -> None:
    with pytest.raises(UserError, match=rf"^--fold {re.escape(text)}: write I/K"):
        options.parse_fold(text)


def test_a_fold_run_validates_on_its_fold_of_train_and_val_pooled(small_data: ColourData, tmp_path: Path,
                                                                  no_final_outputs: None) -> None:
    output = tmp_path / "out"
    result = tiny_train(small_data, output, "--epochs", "1", "--fold", "2/5")

    checkpoint = load_checkpoint(output / "best.pt")
    held_out = checkpoint.held_out_val_files
    pooled = [f"{split}/{path.parent.name}/{path.name}" for split in ("train", "val")
              for path in sorted((small_data.root / split).rglob("*.jpg"))]
    assert len(held_out) == 3 and set(held_out) <= set(pooled)  # 15 images, 5 folds: one image of each class
    assert sorted({name.split("/")[1] for name in held_out}) == ["0", "1", "2"]
    assert "train 12 images" in result.stdout and "val 3 images from fold 2/5" in result.stdout
    evaluated = call_main(evaluate.main, "--checkpoint", output / "best.pt", "--data-dir", small_data.root,
                          "--report-dir", tmp_path / "report", *PREDICT_FLAGS)
    assert evaluated.returncode == 0 and "evaluating fold 2/5" in evaluated.stdout
    assert evaluated.value["images"] == 3
    other_split = call_main(evaluate.main, "--checkpoint", output / "best.pt", "--split-dir", small_data.root / "val",
                            "--report-dir", tmp_path / "report-val", *PREDICT_FLAGS)
    assert "outside its fold 2/5 (--fold; evaluate without --split-dir to score that fold)" in other_split.stdout
    other = tiny_train(small_data, tmp_path / "other", "--epochs", "1", "--fold", "3/5")
    assert set(load_checkpoint(tmp_path / "other" / "best.pt").held_out_val_files).isdisjoint(held_out)
    assert "val 3 images" in other.stdout


def test_train_on_all_trains_on_every_image_without_validating(small_data: ColourData, tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = tiny_train(small_data, output, "--epochs", "2", "--train-on-all", "--ema", "0.5")

    assert "train 15 images" in result.stdout and "no validation (--train-on-all); best.pt holds epoch 2" in \
        result.stdout
    history = read_csv_rows(output / "history.csv")
    assert [row["val_acc"] for row in history] == ["", ""] and all(row["train_loss"] for row in history)
    best = load_checkpoint(output / "best.pt")
    assert (best.epoch, best.weights) == (2, "ema")  # the final fit keeps the moving average
    assert (output / "accuracy_curve.png").is_file()
    assert not (output / "confusion_matrix.png").exists() and not (output / "report").exists()
    assert call_main(predict.main, "--checkpoint", output, "--test-dir", small_data.test_dir, "--output",
                     tmp_path / "p.csv", *PREDICT_FLAGS).returncode == 0
    evaluated = call_main(evaluate.main, "--checkpoint", output / "best.pt", "--data-dir", small_data.root,
                          "--report-dir", tmp_path / "report", *PREDICT_FLAGS)
    assert evaluated.returncode == 0
    assert "which this run trained on all of train/ and val/ (--train-on-all): accuracy here overstates" in \
        evaluated.stdout
    again = call_main(train.main, "--data-dir", small_data.root, "--output-dir", output, *TINY_TRAIN_FLAGS, "--epochs",
                      "2", "--train-on-all", "--ema", "0.5")
    assert again.returncode == 0 and "is complete" in again.stdout
    assert_user_error(call_main(train.main, "--data-dir", small_data.root, "--output-dir", tmp_path / "x",
                                *TINY_TRAIN_FLAGS, "--train-on-all", "--fold", "1/5"),
                      "--fold 1/5 with --train-on-all")


# --------------------------------------------------------------------------- exact resume with all of it


ALL_OPTIONS = ("--fold", "2/5", "--unfreeze-at", "layer3:2,layer2:3", "--warmup-epochs", "1",
               "--backbone-lr-mult", "0.5", "--accum-steps", "2", "--ema", "0.9",
               "--mixup", "0.2", "--cutmix", "1.0", "--random-erase", "0.25", "--sampler", "balanced",
               "--monitor", "val_balanced_acc", "--optimizer", "sgd", "--test-size", "36")


def test_resume_is_exact_with_every_new_option_on(small_data: ColourData, tmp_path: Path,
                                                  no_final_outputs: None) -> None:
    tiny_train(small_data, tmp_path / "straight", "--epochs", "3", *ALL_OPTIONS)
    tiny_train(small_data, tmp_path / "stopped", "--epochs", "3", "--epochs-this-run", "2", *ALL_OPTIONS)

    resumed = call_main(train.main, "--resume", tmp_path / "stopped" / "last.pt")

    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert_same_training(tmp_path / "stopped" / "last.pt", tmp_path / "straight" / "last.pt")
    stopped, straight = load_checkpoint(tmp_path / "stopped" / "last.pt"), load_checkpoint(tmp_path / "straight" /
                                                                                              "last.pt")
    for key in straight.ema_model:
        assert torch.equal(stopped.ema_model[key], straight.ema_model[key]), key
    assert history_without_seconds(tmp_path / "stopped" / "history.csv") == \
        history_without_seconds(tmp_path / "straight" / "history.csv")
