"""The device path's producer thread: a batch decoded and augmented ahead, in a thread of its own, while the model
steps on the one before.

:func:`produced` runs an iterator of batches in a :class:`BatchProducer`; on CUDA its work is issued on a
:class:`SideStream` that the consumer's stream waits on, batch by batch.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from common import Batch
from device_decode import record_on

PREFETCH_BATCHES = 2  # batches the producer prepares ahead of the one the model steps on
POLL_S = 0.1  # seconds between looks at a stop request while waiting on the other thread


class SideStream:
    """Where the producer thread issues a CUDA ``device``'s work: a stream of its own, and an event after each
    batch that the consumer's stream waits on before using it. Off CUDA there is none and nothing waits."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream: Any = None
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)  # the thread's current device is not the caller's
            self.stream = torch.cuda.Stream(self.device)

    def issuing(self) -> contextlib.AbstractContextManager:
        """The producer's context: its device and stream current (in its thread) while it issues a batch."""
        if self.stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def ready(self) -> Any:
        """An event recorded on the stream once a batch's work is queued (None off CUDA)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def received(self, batch: Batch, event: Any) -> Batch:
        """``batch`` made safe on the consumer's current stream: it waits for ``event``, and the caching allocator
        is told that stream uses the batch's tensors (they were allocated on the producer's)."""
        if event is None:
            return batch
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(event)
        for tensor in (batch.images, batch.targets):
            if tensor is not None:
                record_on(tensor, consumer)
        return batch


class ProducerFailed(NamedTuple):
    """What the producer hands over when making a batch raised: the exception, raised again by the consumer."""

    error: BaseException


PRODUCER_DONE = None  # handed over once every batch has been


class BatchProducer:
    """Makes ``batches`` (decoding, cache writes, augmentation) in a thread of its own while the caller's thread
    steps on the previous ones, at most ``depth`` batches ahead (plus the one in hand), its CUDA work on a
    :class:`SideStream`. Iterate it once; an exception in the thread is raised in the caller's; :meth:`stop` (when
    the caller's iteration ends, finishes early, or is interrupted) ends the thread after its current batch."""

    def __init__(self, batches: Iterator[Batch], device: torch.device, depth: int = PREFETCH_BATCHES,
                 side: SideStream | None = None) -> None:
        self.side = side or SideStream(device)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.produce, args=(batches,), name="batch-producer", daemon=True)
        self.thread.start()

    def produce(self, batches: Iterator[Batch]) -> None:
        """The thread: each batch made and handed over with its event, then the end (or the exception)."""
        try:
            with self.side.issuing(), torch.no_grad():
                for batch in batches:
                    if not self.hand_over((batch, self.side.ready())):
                        return
        except BaseException as error:  # every kind goes to the caller's thread, raised there
            self.hand_over(ProducerFailed(error))
            return
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        self.hand_over(PRODUCER_DONE)

    def hand_over(self, item: Any) -> bool:
        """Put ``item`` in the queue once there is room; False when the caller stopped meanwhile."""
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=POLL_S)
                return not self.stopping.is_set()  # a stop that made room for this put: make no further batch
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self.take()
            if item is PRODUCER_DONE:
                return
            if isinstance(item, ProducerFailed):
                raise item.error
            yield self.side.received(*item)

    def take(self) -> Any:
        """The next item; waits in short slices, so Ctrl-C reaches the caller's thread promptly."""
        while True:
            try:
                return self.queue.get(timeout=POLL_S)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError("the batch producer thread ended without handing over its batches") from None

    def stop(self) -> None:
        """End the thread: it finishes the batch in hand, sees the request and returns; waits for it."""
        self.stopping.set()
        while True:  # make room, so a thread blocked on a full queue sees the request at once
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join()


def produced(batches: Iterator[Batch], device: torch.device, depth: int,
             side: SideStream | None = None) -> Iterator[Batch]:
    """``batches``, made by a :class:`BatchProducer` ``depth`` batches ahead (0: made here, as they are taken), on
    ``side`` (pass the same one every epoch: the caching allocator reuses a block only on the stream it came from)."""
    if depth <= 0:
        yield from batches
        return
    producer = BatchProducer(batches, device, depth, side)
    try:
        yield from producer
    finally:
        producer.stop()
