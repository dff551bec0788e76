"""pipeline.py and cache.py: files to device batches. The device path runs here with the CPU as the device:
the same batched code that decodes with nvJPEG and augments on a GPU."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cache
import engine
import pipeline
from accel import Accel
from dataset import decode_rgb, load_rgb, train_decode_side
from model import build_model
from utils import UserError

CPU = Accel(torch.device("cpu"), channels_last=False)
IMG = 32


def noise(width: int, height: int, seed: int) -> Image.Image:
    """An RGB image of smooth noise (compresses like a photo, not like random bytes)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """One file of each kind the device path routes differently, by kind."""
    paths = {}

    def save(kind: str, image: Image.Image, name: str, **options) -> None:
        paths[kind] = str(tmp_path / name)
        image.save(paths[kind], **options)

    save("jpeg", noise(80, 60, 0), "rgb.jpg", quality=92)
    save("grey jpeg", noise(60, 80, 1).convert("L"), "grey.jpg", quality=92)
    save("big jpeg", noise(400, 200, 2), "big.jpg", quality=92)
    save("png", noise(50, 40, 3), "rgb.png")
    save("cmyk jpeg", noise(64, 48, 4).convert("CMYK"), "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    save("rotated jpeg", noise(40, 20, 5), "rotated.jpg", exif=exif.tobytes())
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    paths["broken"] = str(tmp_path / "broken.jpg")
    buffer = io.BytesIO()
    noise(80, 60, 6).save(buffer, "JPEG", quality=92)
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    paths["truncated"] = str(tmp_path / "truncated.jpg")
    return paths


def read_all(paths: list[str], decode_min_side: int | None = None) -> pipeline.EncodedBatch:
    files = pipeline.FileBytes(paths, list(range(len(paths))), decode_min_side, 10**9, warn=False)
    return pipeline.collate_encoded([files[position] for position in range(len(paths))])


# --------------------------------------------------------------------------- workers: bytes, or pixels


def test_workers_send_bytes_for_the_jpegs_the_device_decodes_and_pixels_for_the_rest(files):
    kinds = ["jpeg", "grey jpeg", "png", "cmyk jpeg", "rotated jpeg"]
    batch = read_all([files[kind] for kind in kinds])

    routed = {kind: item.encoded for kind, item in zip(kinds, batch.items)}
    assert routed == {"jpeg": True, "grey jpeg": True, "png": False, "cmyk jpeg": False, "rotated jpeg": False}
    encoded = batch.items[0].data
    assert encoded.dtype == torch.uint8 and encoded.dim() == 1 and bytes(encoded[:2].tolist()) == b"\xff\xd8"
    rotated = batch.items[4].data
    assert rotated.shape == (3, 40, 20)  # decoded on the CPU with its EXIF orientation applied
    assert batch.failed == []


def test_unreadable_files_fail_in_the_worker_with_their_reason_and_position(files):
    batch = read_all([files["jpeg"], files["broken"]])
    assert [item.position for item in batch.items] == [0]
    [failure] = batch.failed
    assert failure.path == files["broken"] and failure.position == 1 and "cannot identify image file" in failure.reason


# --------------------------------------------------------------------------- decoding on the device


def test_the_device_decodes_a_batch_as_pil_does(files):
    kinds = ["jpeg", "grey jpeg", "png", "cmyk jpeg", "rotated jpeg"]
    batch = read_all([files[kind] for kind in kinds])

    decoded, failed = pipeline.DeviceDecoder(torch.device("cpu"), None, None, warn=False)(batch.items)

    assert failed == [] and [item.position for item, _ in decoded] == list(range(len(kinds)))
    for kind, (_, image) in zip(kinds, decoded):
        expected = pipeline.pixels_of(load_rgb(files[kind]))
        assert image.dtype == torch.uint8 and image.shape == expected.shape, kind
        assert (image.float() - expected.float()).abs().mean() < 1.0, kind  # same libjpeg: equal or nearly


def test_a_bad_file_in_a_batch_fails_alone_with_its_reason(files, capsys):
    batch = read_all([files["jpeg"], files["truncated"], files["big jpeg"]])

    decoded, failed = pipeline.DeviceDecoder(torch.device("cpu"), None, None)(batch.items)

    assert [item.position for item, _ in decoded] == [0, 2]
    [failure] = failed
    assert failure.position == 1 and failure.path == files["truncated"] and "truncated" in failure.reason
    assert f"warning: skipping {files['truncated']}: cannot decode (image file is truncated" in capsys.readouterr().err


def test_training_images_are_scaled_down_once_to_the_decode_side(files):
    batch = read_all([files["big jpeg"], files["jpeg"]])
    decoded, _ = pipeline.DeviceDecoder(torch.device("cpu"), 100, 100)(batch.items)
    (_, big), (_, small) = decoded
    assert big.shape == (3, 100, 200) and big.dtype == torch.uint8  # 400x200 -> shorter side 100
    assert small.shape == (3, 60, 80)  # already below the bound: untouched
    assert cache.bounded_size(400, 200, 100) == (200, 100) and cache.bounded_size(80, 60, 100) == (80, 60)


def test_the_decode_side_keeps_the_smallest_crop_at_the_training_size():
    assert train_decode_side(224) == 792  # 224 / sqrt(0.08) = 791.96
    assert train_decode_side(IMG) * 0.08 ** 0.5 >= IMG


def test_the_cpu_path_drafts_training_jpegs_no_smaller_than_the_decode_side(tmp_path):
    path = tmp_path / "huge.jpg"
    noise(3200, 2400, 7).save(path, quality=90)
    batches = pipeline.train_batches([str(path)], [0], 224, 1, 0, 0, CPU, on_device=False)
    assert batches.loader.dataset.decode_min_side == 792
    image, size = decode_rgb(path, min_side=792)
    assert min(image.size) >= 792 and size == (3200, 2400)  # drafted to 1/2 (1600x1200), not to 1/8 (400x300)


def test_the_jpeg_decoder_is_torchcodecs_when_it_is_installed():
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception:  # noqa: BLE001
        assert pipeline.JPEG_DECODER_NAME == "torchvision"
    else:
        assert pipeline.JPEG_DECODER_NAME == "torchcodec"


# --------------------------------------------------------------------------- the cache


GB = 10**9


@pytest.mark.parametrize("request_, gpu_free, ram_free, place", [
    ("auto", 80 * GB, 100 * GB, "gpu"),    # 12 GB fit in half of 80 GB
    ("auto", 20 * GB, 100 * GB, "ram"),    # not in half of 20 GB: host memory
    ("auto", None, 100 * GB, "ram"),       # no GPU
    ("auto", 20 * GB, 16 * GB, "none"),    # nowhere: decode every epoch
    ("ram", 80 * GB, 100 * GB, "ram"),
    ("none", 80 * GB, 100 * GB, "none"),
])
def test_auto_keeps_decoded_images_where_they_fit(request_, gpu_free, ram_free, place):
    choice = cache.choose_cache(request_, 12 * GB, gpu_free, ram_free, device_path=True)
    assert choice.place == place
    if request_ == "auto":
        assert "12.00 GB of decoded images" in choice.reason


def test_an_explicit_cache_place_that_cannot_hold_them_is_refused():
    with pytest.raises(UserError, match="--cache gpu: 12.00 GB of decoded images do not fit in 50% of the "
                                        "GPU's 20.0 GB free"):
        cache.choose_cache("gpu", 12 * GB, 20 * GB, 100 * GB, device_path=True)
    with pytest.raises(UserError, match="--cache ram: only the device path"):
        cache.choose_cache("ram", 12 * GB, None, 100 * GB, device_path=False)
    assert cache.choose_cache("auto", 12 * GB, None, 100 * GB, device_path=False).place == "none"


def test_cache_bytes_count_the_bounded_images():
    assert cache.cache_bytes([(500, 375), (4000, 3000)], 792) == 3 * 500 * 375 + 3 * 1056 * 792


def test_images_kept_in_host_memory_come_back_unchanged():
    store = cache.DecodedImages(3, torch.device("cpu"))
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((5, 7), (6, 6), (9, 4))]
    for position, image in enumerate(images[:2]):
        store.put(position, image)
    assert not store.complete
    store.fail(2, "cannot identify image file")
    assert store.complete
    assert all(torch.equal(got, image) for got, image in zip(store.fetch([0, 1], torch.device("cpu")), images))


# --------------------------------------------------------------------------- batches


@pytest.fixture
def training_files(tmp_path: Path) -> tuple[list[str], list[int]]:
    paths = []
    for index in range(10):
        path = tmp_path / f"{index}.{'png' if index == 3 else 'jpg'}"
        noise(40 + 4 * index, 30 + 3 * (index % 4), 10 + index).save(path)
        paths.append(str(path))
    (tmp_path / "broken.jpg").write_text("not an image\n")
    return paths + [str(tmp_path / "broken.jpg")], [index % 3 for index in range(11)]


def epoch_images(batches, epoch: int) -> list[torch.Tensor]:
    batches.set_epoch(epoch)
    return [(batch.images, batch.targets) for batch in batches]


def test_an_epoch_from_the_cache_equals_one_from_the_files(training_files):
    paths, labels = training_files
    cached = pipeline.train_batches(paths, labels, IMG, 4, 0, 0, CPU, on_device=True,
                                    cache=cache.DecodedImages(len(paths), torch.device("cpu")))
    uncached = pipeline.train_batches(paths, labels, IMG, 4, 0, 0, CPU, on_device=True)

    first = epoch_images(cached, 1)
    assert cached.cache.complete and cached.cache.failures == {10: "cannot identify image file"}
    second_cached, second_files = epoch_images(cached, 2), epoch_images(uncached, 2)

    assert sum(len(targets) for _, targets in first) == 10  # the broken file left out
    for (images, targets), (file_images, file_targets) in zip(second_cached, second_files):
        assert torch.equal(images, file_images) and torch.equal(targets, file_targets)
    assert not torch.equal(first[0][0], second_cached[0][0])  # another epoch, another order and augmentation


def test_validation_crops_from_the_cache_equal_fresh_ones(training_files):
    paths, labels = training_files
    kept = pipeline.eval_batches(paths, labels, IMG, (0.5,) * 3, (0.25,) * 3, 4, 0, CPU, on_device=True,
                                 cache=cache.DecodedImages(len(paths), torch.device("cpu")))
    first, second = list(kept), list(kept)
    assert kept.cache.complete
    assert [batch.positions for batch in first] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [failure.position for batch in first for failure in batch.failed] == [10]
    for one, two in zip(first, second):
        assert torch.equal(one.images, two.images) and torch.equal(one.targets, two.targets)


def test_both_paths_give_the_eval_recipe_on_the_same_images(training_files):
    paths, labels = training_files
    on_cpu = list(pipeline.eval_batches(paths, labels, IMG, (0.5,) * 3, (0.25,) * 3, 4, 0, CPU, on_device=False))
    on_device = list(pipeline.eval_batches(paths, labels, IMG, (0.5,) * 3, (0.25,) * 3, 4, 0, CPU, on_device=True))
    for cpu_batch, device_batch in zip(on_cpu, on_device):
        assert cpu_batch.positions == device_batch.positions and torch.equal(cpu_batch.targets, device_batch.targets)
        # PIL's and torch's antialiased resizes differ in rounding only: measured 0.003 (normalized units).
        assert (cpu_batch.images - device_batch.images).abs().mean() < 0.02


# --------------------------------------------------------------------------- the loop without waiting


def test_reading_the_sums_back_less_often_changes_nothing(training_files, monkeypatch):
    paths, labels = training_files
    results = []
    for interval in (1, 3):
        monkeypatch.setattr(engine, "readback_interval", lambda device, interval=interval: interval)
        torch.manual_seed(0)
        model = build_model("resnet18", 3, weights="none")
        optimizer = engine.make_optimizer(list(model.parameters()), 1e-3, 1e-4, CPU.device)
        batches = pipeline.train_batches(paths, labels, IMG, 4, 0, 0, CPU, on_device=False)
        batches.set_epoch(1)
        result = engine.train_one_epoch(model, batches, torch.nn.CrossEntropyLoss(), optimizer, CPU,
                                        show_progress=False)
        results.append((result.loss, result.accuracy, result.images, model.state_dict()))
    (loss_1, acc_1, count_1, state_1), (loss_3, acc_3, count_3, state_3) = results
    assert (loss_1, acc_1, count_1) == (loss_3, acc_3, count_3) and count_1 == 10
    assert all(torch.equal(state_1[key], state_3[key]) for key in state_1)


def test_a_non_finite_loss_between_readbacks_names_the_batches(monkeypatch):
    monkeypatch.setattr(engine, "readback_interval", lambda device: 4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    optimizer = engine.make_optimizer(list(model.parameters()), 1e-3, 0.0, CPU.device)
    images = torch.randn(2, 3, 2, 2)
    batches = [pipeline.Batch(images, torch.tensor([0, 1]), [0, 1], []) for _ in range(6)]
    batches[2] = pipeline.Batch(images * float("nan"), torch.tensor([0, 1]), [0, 1], [])
    before = [parameter.detach().clone() for parameter in model.parameters()]

    with pytest.raises(engine.NonFiniteLossError, match="loss is nan in one of batches 1 to 4"):
        engine.train_one_epoch(model, batches, torch.nn.CrossEntropyLoss(), optimizer, CPU, show_progress=False)

    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())  # the NaN step was skipped
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the finite ones were taken

