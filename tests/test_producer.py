"""batch_producer.BatchProducer: the device path decodes and augments batch N+1 in a thread of its own while the model
steps on batch N. On the CPU it runs the same thread (no streams); its CUDA side is checked with fake streams."""

from __future__ import annotations

import _thread
import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import batch_producer
import cache
import device_decode
import pipeline
from accel import Accel
from common import Batch
from utils import UserError

CPU = Accel(torch.device("cpu"), channels_last=False)
IMG = 32


@pytest.fixture
def training_files(tmp_path: Path) -> tuple[list[str], list[int]]:
    """Nine JPEGs, a PNG and a broken file, in three classes."""
    paths = []
    for index in range(10):
        rng = np.random.default_rng(index)
        image = Image.fromarray(rng.integers(0, 256, (6 + index % 3, 8, 3), dtype=np.uint8)).resize((48, 40))
        paths.append(str(tmp_path / f"{index}.{'png' if index == 3 else 'jpg'}"))
        image.save(paths[-1])
    (tmp_path / "broken.jpg").write_text("not an image\n")
    return paths + [str(tmp_path / "broken.jpg")], [index % 3 for index in range(11)]


def producer_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "batch-producer"]


def epochs(batches, numbers) -> list[tuple]:
    """Every batch of the epochs ``numbers``, as plain tensors and lists."""
    taken = []
    for epoch in numbers:
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        taken += [(batch.images, batch.targets, batch.positions, batch.failed) for batch in batches]
    return taken


def assert_same_batches(made, expected) -> None:
    assert len(made) == len(expected)
    pairs = zip(made, expected, strict=True)
    for (images, targets, positions, failed), (images_, targets_, positions_, failed_) in pairs:
        assert torch.equal(images, images_) and torch.equal(targets, targets_)  # bitwise
        assert positions == positions_ and failed == failed_


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_bitwise_the_same_with_and_without_the_producer(training_files, workers: int) -> None:
    """Training (two epochs, the second from the cache) and validation; with loader workers, the loader's iterator is
    made in the caller's thread and driven by the producer's."""
    paths, labels = training_files

    def train(prefetch: int):
        batches = pipeline.train_batches(paths, labels, IMG, 4, workers, 0, CPU, on_device=True,
                                         cache=cache.DecodedImages(len(paths), torch.device("cpu")))
        batches.prefetch = prefetch
        return batches

    def evaluation(prefetch: int):
        batches = pipeline.eval_batches(paths, labels, IMG, (0.5,) * 3, (0.25,) * 3, 4, workers, CPU, on_device=True)
        batches.prefetch = prefetch
        return batches

    produced, inline = train(batch_producer.PREFETCH_BATCHES), train(0)
    assert_same_batches(epochs(produced, [1, 2]), epochs(inline, [1, 2]))
    assert_same_batches(epochs(evaluation(2), [0]), epochs(evaluation(0), [0]))
    assert producer_threads() == []


def test_the_producer_decodes_in_its_own_thread_and_prefetch_0_in_the_callers(training_files, monkeypatch) -> None:
    paths, labels = training_files
    threads = []
    decode = device_decode.DeviceDecoder.__call__

    def recording(self, items):
        threads.append(threading.current_thread().name)
        return decode(self, items)

    monkeypatch.setattr(device_decode.DeviceDecoder, "__call__", recording)
    batches = pipeline.train_batches(paths, labels, IMG, 4, 0, 0, CPU, on_device=True)
    list(batches)
    batches.prefetch = 0
    list(batches)
    assert threads == ["batch-producer"] * 3 + ["MainThread"] * 3


class SlowBatches:
    """Batches made slowly (``seconds`` each), counting how many were made; ``fail_at`` raises at that batch."""

    def __init__(self, count: int, seconds: float = 0.0, fail_at: int | None = None) -> None:
        self.count, self.seconds, self.fail_at, self.made = count, seconds, fail_at, 0

    def __iter__(self):
        for number in range(self.count):
            time.sleep(self.seconds)
            if number == self.fail_at:
                raise UserError(f"data/train/cat/{number}.jpg: something the user can fix")
            self.made += 1
            yield Batch(torch.full((1, 3, 2, 2), float(number)), torch.tensor([number]), [number], [])


def test_an_exception_in_the_producer_is_raised_in_the_caller_with_its_message() -> None:
    batches = SlowBatches(5, fail_at=2)
    taken = []
    with pytest.raises(UserError, match=r"^data/train/cat/2.jpg: something the user can fix$"):
        for batch in batch_producer.produced(iter(batches), torch.device("cpu"), depth=2):
            taken.append(batch.positions)
    assert taken == [[0], [1]] and producer_threads() == []


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """Python's own SIGINT handler (KeyboardInterrupt) for the test, whatever an earlier test or plugin left in this
    process: ``_thread.interrupt_main`` does nothing where SIGINT is ignored or left to the system."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_waiting_for_a_batch_stops_the_producer(ctrl_c_raises: None) -> None:
    """The caller waits in short slices: the KeyboardInterrupt reaches it, and the thread is gone when it does."""
    batches = batch_producer.produced(iter(SlowBatches(100, seconds=0.05)), torch.device("cpu"), depth=2)
    next(batches)
    timer = threading.Timer(0.2, _thread.interrupt_main)  # what Ctrl-C does to the main thread
    timer.start()
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        for _ in batches:
            pass
    timer.join()
    # The interrupt lands in the generator (waiting in take()) or, now and then, in this loop's own bytecode: then
    # the generator is only suspended, and letting go of it (close, or its collection) stops the thread.
    batches.close()
    assert time.perf_counter() - started < 2.0 and producer_threads() == []


def test_ctrl_c_in_the_training_step_stops_the_producer_when_the_batches_are_let_go() -> None:
    slow = SlowBatches(100, seconds=0.01)
    batches = batch_producer.produced(iter(slow), torch.device("cpu"), depth=2)
    with pytest.raises(KeyboardInterrupt):
        for _ in batches:
            raise KeyboardInterrupt  # in the caller's loop body: the generator is closed when let go
    batches.close()
    assert producer_threads() == [] and slow.made < 10


def test_the_producer_is_at_most_depth_batches_ahead() -> None:
    slow = SlowBatches(20)
    batches = batch_producer.produced(iter(slow), torch.device("cpu"), depth=2)
    next(batches)
    time.sleep(0.5)  # the producer had the time to make every batch
    assert slow.made <= 1 + 2 + 1  # the one taken, the queue's two, the one in hand
    assert len(list(batches)) == 19 and producer_threads() == []


def test_the_producer_stops_after_an_epoch_abandoned_early(training_files) -> None:
    """A stop request ends an epoch after its batch (train.py): the next epoch starts from its first batch."""
    paths, labels = training_files
    batches = pipeline.train_batches(paths, labels, IMG, 4, 0, 0, CPU, on_device=True)
    batches.set_epoch(3)
    for _batch in batches:
        break
    assert producer_threads() == []
    inline = pipeline.train_batches(paths, labels, IMG, 4, 0, 0, CPU, on_device=True)
    inline.prefetch = 0
    assert_same_batches(epochs(batches, [3]), epochs(inline, [3]))


# --------------------------------------------------------------------------- the CUDA side, with fake streams


class FakeEvent:
    def __init__(self, log: list) -> None:
        self.log = log

    def record(self, stream) -> None:
        self.log.append(("record", stream.name, threading.current_thread().name))


class FakeStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_event(self, event: FakeEvent) -> None:
        self.log.append(("wait", self.name, threading.current_thread().name))


def fake_cuda(monkeypatch: pytest.MonkeyPatch, log: list) -> FakeStream:
    """torch.cuda's stream and event API (as torch 2.4 has it) recording what the producer does; the consumer's
    stream is returned."""
    compute = FakeStream("compute", log)
    current: dict[str, str] = {}

    @contextlib.contextmanager
    def stream(side):
        current[threading.current_thread().name] = side.name
        log.append(("enter stream", side.name, threading.current_thread().name))
        yield

    @contextlib.contextmanager
    def device(which):
        log.append(("enter device", str(which), threading.current_thread().name))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: FakeStream(f"side on {device}", log))
    monkeypatch.setattr(torch.cuda, "Event", lambda: FakeEvent(log))
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: compute)
    monkeypatch.setattr(batch_producer, "record_on", lambda tensor, stream: log.append(
        (f"record_on {tuple(tensor.shape)}", stream.name, threading.current_thread().name)))
    return compute


def test_on_cuda_the_producer_issues_on_its_stream_and_the_consumer_waits_for_each_batch(monkeypatch) -> None:
    log: list = []
    fake_cuda(monkeypatch, log)
    seen = []
    for _batch in batch_producer.produced(iter(SlowBatches(2)), torch.device("cuda"), depth=2):
        seen.append(len(log))
    side = "side on cuda:1"  # "cuda" is resolved in the caller's thread, whose current device is 1
    producer = [entry for entry in log if entry[2] == "batch-producer"]
    assert producer == [("enter device", "cuda:1", "batch-producer"), ("enter stream", side, "batch-producer"),
                        ("record", side, "batch-producer"), ("record", side, "batch-producer")]
    consumer = [entry for entry in log if entry[2] == "MainThread"]
    batch_steps = [("wait", "compute", "MainThread"), ("record_on (1, 3, 2, 2)", "compute", "MainThread"),
                   ("record_on (1,)", "compute", "MainThread")]
    assert consumer == batch_steps * 2
    # each batch is handed to the loop only once its wait is queued and its tensors recorded on the compute stream
    waits = [index for index, entry in enumerate(log) if entry[0] == "wait"]
    assert [index + 3 for index in waits] == seen


def test_off_cuda_the_producer_uses_no_stream(monkeypatch) -> None:
    log: list = []
    fake_cuda(monkeypatch, log)
    assert len(list(batch_producer.produced(iter(SlowBatches(3)), torch.device("cpu"), depth=2))) == 3
    assert log == []


def test_a_stop_makes_no_batch_after_the_one_in_hand() -> None:
    """Stopping empties the queue; the thread's pending put then succeeds, and it must not go on to make another."""
    slow = SlowBatches(100, seconds=0.02)
    batches = batch_producer.produced(iter(slow), torch.device("cpu"), depth=2)
    next(batches)
    time.sleep(0.3)  # the queue is full and the thread waits to put its next batch
    made_before_stop = slow.made
    batches.close()
    assert producer_threads() == [] and slow.made == made_before_stop


def test_every_epoch_of_a_device_iterable_uses_one_producer_stream(monkeypatch, training_files) -> None:
    """The caching allocator reuses a freed block only on the stream that allocated it: one stream, every epoch."""
    made: list = []
    original = batch_producer.SideStream.__init__

    def counting(self, device):
        made.append(device)
        original(self, device)

    monkeypatch.setattr(batch_producer.SideStream, "__init__", counting)
    paths, labels = training_files
    batches = pipeline.train_batches(paths, labels, IMG, 4, 0, 0, CPU, on_device=True)
    for epoch in (1, 2, 3):
        batches.set_epoch(epoch)
        list(batches)
    assert len(made) == 1
