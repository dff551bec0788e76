"""pipeline.py and cache.py: files to device batches. The device path runs here with the CPU as the device:
the same batched code that decodes with nvJPEG and augments on a GPU."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cache
import common
import device_decode
import engine
import loader_items
import pipeline
from accel import Accel
from images import decode_rgb, load_rgb
from model import build_model
from recipe import train_decode_side
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


def read_all(paths: list[str], decode_min_side: int | None = None) -> loader_items.EncodedBatch:
    files = loader_items.FileBytes(paths, list(range(len(paths))), decode_min_side, 10**9)
    return loader_items.collate_encoded([files[position] for position in range(len(paths))])


# --------------------------------------------------------------------------- workers: bytes, or pixels


def test_workers_send_bytes_for_the_jpegs_the_device_decodes_and_pixels_for_the_rest(files):
    kinds = ["jpeg", "grey jpeg", "png", "cmyk jpeg", "rotated jpeg"]
    batch = read_all([files[kind] for kind in kinds])

    routed = {kind: item.encoded for kind, item in zip(kinds, batch.items, strict=True)}
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

    decoded, failed = device_decode.DeviceDecoder(torch.device("cpu"), None, None)(batch.items)

    assert failed == [] and [item.position for item, _ in decoded] == list(range(len(kinds)))
    for kind, (_, image) in zip(kinds, decoded, strict=True):
        expected = loader_items.pixels_of(load_rgb(files[kind]))
        assert image.dtype == torch.uint8 and image.shape == expected.shape, kind
        assert (image.float() - expected.float()).abs().mean() < 1.0, kind  # same libjpeg: equal or nearly


def test_a_bad_file_in_a_batch_fails_alone_with_its_reason(files, capsys):
    batch = read_all([files["jpeg"], files["truncated"], files["big jpeg"]])

    decoded, failed = device_decode.DeviceDecoder(torch.device("cpu"), None, None)(batch.items)

    assert [item.position for item, _ in decoded] == [0, 2]
    [failure] = failed
    assert failure.position == 1 and failure.path == files["truncated"] and "truncated" in failure.reason
    assert capsys.readouterr().err == ""  # said once per run by the batches (SkipWarnings), not by the decoder


def test_training_images_are_scaled_down_once_to_the_decode_side(files):
    batch = read_all([files["big jpeg"], files["jpeg"]])
    decoded, _ = device_decode.DeviceDecoder(torch.device("cpu"), 100, 100)(batch.items)
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


class FakeStream:
    """A CUDA stream that writes down what is asked of it."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(f"{self.name} waits for {other.name}")


def test_on_cuda_jpegs_decode_on_a_stream_of_their_own_between_the_compute_streams_work(files, monkeypatch):
    log: list[str] = []
    compute, created, current = FakeStream("compute", log), [], []

    def new_stream(device):
        created.append(FakeStream("decode", log))
        return created[-1]

    @contextlib.contextmanager
    def use(stream):
        current.append(stream)
        yield
        current.pop()

    def decode(data, device):
        log.append(f"decode {len(data)} on {current[-1].name if current else 'compute'}")
        return cpu_decode(data, torch.device("cpu"))

    cpu_decode = device_decode.decode_jpeg
    monkeypatch.setattr(torch.cuda, "Stream", new_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(device_decode, "decode_jpeg", decode)
    monkeypatch.setattr(device_decode, "record_on",
                        lambda image, stream: log.append(f"{stream.name} uses {image.shape[1:]}"))
    decoder = device_decode.DeviceDecoder(torch.device("cuda"), None, None)
    items = read_all([files["jpeg"], files["grey jpeg"]]).items

    for _ in range(2):
        decoded, _ = decoder(items)

    assert len(created) == 1 and [image.shape[1:] for _, image in decoded] == [(60, 80), (80, 60)]
    # The decode stream never waits for the compute stream (see device_decode.DecodeStream): nvJPEG's own waits would
    # then wait for the training step queued before it (measured on an H200: first epoch 1,181 img/s).
    assert log == ["decode 2 on decode", "compute waits for decode",
                   "compute uses torch.Size([60, 80])", "compute uses torch.Size([80, 60])"] * 2


def test_off_cuda_decoding_uses_no_streams(files, monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: pytest.fail("asked for a CUDA stream"))
    decoded, _ = device_decode.DeviceDecoder(torch.device("cpu"), None, None)(read_all([files["jpeg"]]).items)
    assert len(decoded) == 1


@pytest.mark.parametrize("fails", ["the batched call", "the one-by-one call"])
def test_running_out_of_gpu_memory_is_raised_not_taken_for_a_bad_file(files, monkeypatch, fails):
    def decode(data, device):
        if isinstance(data, list) and fails == "the one-by-one call":
            raise RuntimeError("nvjpeg: bad huffman table")  # a bad file: then each alone
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(device_decode, "decode_jpeg", decode)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="Tried to allocate"):
        device_decode.DeviceDecoder(torch.device("cpu"), None, None)(read_all([files["jpeg"]]).items)


def test_a_batch_is_decoded_in_calls_within_the_memory_budget(files, monkeypatch):
    calls: list[int] = []

    def counting(data, device):
        images = real(data, device)
        calls.append(sum(image.numel() for image in images))  # decoded bytes of this call
        return images

    real = device_decode.decode_jpeg
    monkeypatch.setattr(device_decode, "decode_jpeg", counting)
    items = read_all([files["jpeg"], files["grey jpeg"], files["big jpeg"], files["jpeg"]]).items
    assert [item.size for item in items] == [(80, 60), (60, 80), (400, 200), (80, 60)]  # from the headers

    chunked, _ = device_decode.DeviceDecoder(torch.device("cpu"), None, None, budget=30_000)(items)
    assert calls == [2 * 14_400, 240_000, 14_400]  # 80x60x3 bytes each; the big one (over the budget) alone
    whole, _ = device_decode.DeviceDecoder(torch.device("cpu"), None, None)(items)
    assert calls[3:] == [2 * 14_400 + 240_000 + 14_400]  # the default budget takes them in one call
    assert all(torch.equal(one, two) for (_, one), (_, two) in zip(chunked, whole, strict=True))


def test_the_jpeg_decoder_is_torchcodecs_when_it_is_installed():
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception:
        assert device_decode.jpeg_decoder_name() == "torchvision"
    else:
        assert device_decode.jpeg_decoder_name() == "torchcodec"


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


def holds_every_image(store: cache.DecodedImages) -> bool:
    """True when every position of ``store`` holds an image or a failure."""
    return all(store.has(position) for position in range(len(store)))


def test_images_kept_in_host_memory_come_back_unchanged():
    store = cache.DecodedImages(3, torch.device("cpu"))
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((5, 7), (6, 6), (9, 4))]
    for position, image in enumerate(images[:2]):
        store.put(position, image)
    assert not holds_every_image(store)
    store.fail(2, "cannot identify image file")
    assert holds_every_image(store)
    fetched = store.fetch([0, 1], torch.device("cpu"))
    assert all(torch.equal(got, image) for got, image in zip(fetched, images[:2], strict=True))


# --------------------------------------------------------------------------- batches


def test_only_the_cpu_paths_batches_are_pinned(tmp_path, monkeypatch):
    noise(40, 30, 0).save(tmp_path / "a.jpg")
    paths, labels = [str(tmp_path / "a.jpg")] * 3, [0, 1, 2]
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: self)  # no GPU to move modules to
    cuda = Accel(torch.device("cuda"))
    for on_device, pinned in ((False, True), (True, False)):  # the device path's file bytes: pinned for nothing
        train = pipeline.train_batches(paths, labels, IMG, 2, 0, 0, cuda, on_device)
        evaluation = pipeline.eval_batches(paths, labels, IMG, (0.5,) * 3, (0.25,) * 3, 2, 0, cuda, on_device)
        assert train.loader.pin_memory is pinned and evaluation.loader.pin_memory is pinned
    assert not pipeline.train_batches(paths, labels, IMG, 2, 0, 0, CPU, on_device=False).loader.pin_memory


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
    assert holds_every_image(cached.cache) and cached.cache.failures == {10: "cannot identify image file"}
    second_cached, second_files = epoch_images(cached, 2), epoch_images(uncached, 2)

    assert sum(len(targets) for _, targets in first) == 10  # the broken file left out
    for (images, targets), (file_images, file_targets) in zip(second_cached, second_files, strict=True):
        assert torch.equal(images, file_images) and torch.equal(targets, file_targets)
    assert not torch.equal(first[0][0], second_cached[0][0])  # another epoch, another order and augmentation


def test_an_epoch_with_half_the_images_cached_reads_the_others_and_equals_one_from_the_files(training_files,
                                                                                              monkeypatch):
    """Under torchrun each process meets a part of the images an epoch: the cache serves what it holds."""
    paths, labels = training_files
    full = cache.DecodedImages(len(paths), torch.device("cpu"))
    epoch_images(pipeline.train_batches(paths, labels, IMG, 4, 0, 0, CPU, on_device=True, cache=full), 1)
    half = cache.DecodedImages(len(paths), torch.device("cpu"))
    for position in range(0, len(paths), 2):  # the broken file (10) among them: remembered as a failure
        if position in full.failures:
            half.fail(position, full.failures[position])
        else:
            half.put(position, full.images[position])
    read = []

    def reading(path, *args):
        read.append(path)
        return read_for_device(path, *args)

    read_for_device = loader_items.read_for_device
    monkeypatch.setattr(loader_items, "read_for_device", reading)
    partly = pipeline.train_batches(paths, labels, IMG, 4, 0, 0, CPU, on_device=True, cache=half)
    partly.set_epoch(2)
    from_both = list(partly)

    assert sorted(read) == sorted(paths[1::2])  # the workers read only the files not cached
    assert holds_every_image(half) and [failure.position for batch in from_both for failure in batch.failed] == [10]
    from_files = epoch_images(pipeline.train_batches(paths, labels, IMG, 4, 0, 0, CPU, on_device=True), 2)
    assert len(from_both) == len(from_files) == 3
    for batch, (file_images, file_targets) in zip(from_both, from_files, strict=True):
        assert torch.equal(batch.images, file_images) and torch.equal(batch.targets, file_targets)


def test_validation_crops_from_the_cache_equal_fresh_ones(training_files):
    paths, labels = training_files
    kept = pipeline.eval_batches(paths, labels, IMG, (0.5,) * 3, (0.25,) * 3, 4, 0, CPU, on_device=True,
                                 cache=cache.DecodedImages(len(paths), torch.device("cpu")))
    first, second = list(kept), list(kept)
    assert holds_every_image(kept.cache)
    assert [batch.positions for batch in first] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [failure.position for batch in first for failure in batch.failed] == [10]
    for one, two in zip(first, second, strict=True):
        assert torch.equal(one.images, two.images) and torch.equal(one.targets, two.targets)


def test_both_paths_give_the_eval_recipe_on_the_same_images(training_files):
    paths, labels = training_files
    on_cpu = list(pipeline.eval_batches(paths, labels, IMG, (0.5,) * 3, (0.25,) * 3, 4, 0, CPU, on_device=False))
    on_device = list(pipeline.eval_batches(paths, labels, IMG, (0.5,) * 3, (0.25,) * 3, 4, 0, CPU, on_device=True))
    for cpu_batch, device_batch in zip(on_cpu, on_device, strict=True):
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
    batches = [common.Batch(images, torch.tensor([0, 1]), [0, 1], []) for _ in range(6)]
    batches[2] = common.Batch(images * float("nan"), torch.tensor([0, 1]), [0, 1], [])
    before = [parameter.detach().clone() for parameter in model.parameters()]

    with pytest.raises(engine.NonFiniteLossError, match="loss is nan in one of batches 1 to 4"):
        engine.train_one_epoch(model, batches, torch.nn.CrossEntropyLoss(), optimizer, CPU, show_progress=False)

    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())  # the NaN step was skipped
    # the finite ones were taken
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))



@pytest.mark.parametrize("version, takes", [("0.19.1+cu121", False), ("0.20.0", True), ("0.26.0+cu130", True),
                                            ("0.29.1", True), ("1.0.0a0", True)])
def test_torchvision_takes_lists_of_jpegs_from_0_20(version, takes):
    assert device_decode.takes_jpeg_lists(version) is takes


def test_before_torchvision_0_20_a_batch_is_decoded_one_jpeg_at_a_time(files, monkeypatch):
    """torchvision 0.19 (the floor) rejects a list: simulated here, the decoder then decodes each JPEG alone."""
    import torchvision.io

    real = torchvision.io.decode_jpeg
    calls = []

    def decode_0_19(data, mode, device):
        if isinstance(data, list):
            raise RuntimeError("Expected a value of type 'Tensor' for argument 'input' but instead found type 'list'")
        calls.append(data)
        return real(data, mode=mode, device=device)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_0_19)
    data = [item.data for item in read_all([files["jpeg"], files["grey jpeg"]]).items]
    images = device_decode.torchvision_jpeg_decoder(takes_lists=False)(data, torch.device("cpu"))
    assert len(calls) == 2 and [image.shape for image in images] == [(3, 60, 80), (3, 80, 60)]
