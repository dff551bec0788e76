"""The batches the loop iterates, on the device: what the main process makes of the loader's batches.

:class:`HostBatches` (the CPU path) move the workers' transformed images to the device. On the device path,
:class:`DeviceTrainBatches` and :class:`DeviceEvalBatches` decode each loader batch (``device_decode``), take from
the cache what it holds and keep what was decoded, then augment (or resize and centre-crop) and normalize, in a
producer thread a few batches ahead (``batch_producer``). Each image left out is said once per run
(:class:`SkipWarnings`) and travels with its batch's failures.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

import gpu_augment
from accel import Accel
from batch_producer import PREFETCH_BATCHES, SideStream, produced
from cache import DecodedImages
from common import Batch, DecodeFailure
from device_decode import DeviceDecoder
from loader_items import Cached, Encoded, EncodedBatch
from samplers import epoch_seed

DecodedBatch = tuple[list[Tensor], list[int], list[DecodeFailure]]

# --------------------------------------------------------------------------- the CPU path


class HostBatches:
    """The CPU path: batches decoded and transformed by the loader's workers, moved to the device. ``warn``: say
    each image left out on the console, once per run."""

    def __init__(self, loader: DataLoader, accel: Accel, labeled: bool, warn: bool = False) -> None:
        self.loader, self.accel, self.labeled = loader, accel, labeled
        self.warnings = SkipWarnings(warn)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation to produce (training)."""
        set_epoch(self.loader, epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        return self.warnings.passing(self.moved())

    def moved(self) -> Iterator[Batch]:
        """The loader's batches, on the device."""
        device = self.accel.device
        for batch in self.loader:
            if batch.images is None:
                yield batch
                continue
            targets = batch.targets.to(device, non_blocking=True) if self.labeled else None
            yield Batch(self.accel.images_to_device(batch.images), targets, batch.positions, batch.failed)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's :class:`EpochSampler` (if it has one) which epoch comes next."""
    sampler = getattr(loader.batch_sampler, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


# --------------------------------------------------------------------------- the device path


class ProducedOnOneStream:
    """For the device path's batch iterables: the producer thread's :class:`SideStream`, made once and used every
    epoch (a new stream each epoch would leave the caching allocator's freed blocks on the old ones)."""

    accel: Accel
    _side: SideStream | None = None

    def side_stream(self) -> SideStream:
        """The producer's stream for this iterable."""
        if self._side is None:
            self._side = SideStream(self.accel.device)
        return self._side


class DeviceTrainBatches(ProducedOnOneStream):
    """The device path's training batches: decoded on the device (or read from ``cache``) and augmented there, by
    a producer thread ``prefetch`` batches ahead of the model's step (0: in the caller's thread, for debugging).

    Batch ``n`` of an epoch draws its augmentation from seed ``epoch_seed(seed, epoch) + n``: the batches are the
    same whether their images come from the files, from the cache or from both, and with or without the producer.
    ``warn``: say each image left out on the console, once per run.
    """

    def __init__(self, loader: DataLoader, decoder: DeviceDecoder, augment: gpu_augment.TrainAugment,  # noqa: PLR0913
                 labels: Sequence[int], cache: DecodedImages | None, seed: int, accel: Accel,
                 warn: bool = True, prefetch: int = PREFETCH_BATCHES) -> None:
        self.loader, self.decoder, self.augment, self.cache = loader, decoder, augment, cache
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.seed, self.accel, self.epoch = seed, accel, 0
        self.warnings, self.prefetch = SkipWarnings(warn), prefetch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation to produce."""
        self.epoch = epoch
        set_epoch(self.loader, epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        # The loader's iterator is made here, in the caller's thread: its workers start (fork) from it.
        batches = self.augmented(iter(self.loader), self.epoch)
        return self.warnings.passing(produced(batches, self.accel.device, self.prefetch, self.side_stream()))

    def augmented(self, loaded: Iterator[EncodedBatch], epoch: int) -> Iterator[Batch]:
        """The epoch's batches, decoded (or taken from the cache) and augmented."""
        device, paths = self.accel.device, self.loader.dataset.paths
        for number, batch in enumerate(loaded):
            items = batch.items
            decoded, failed = self.decoder(to_decode(items))
            images, positions, failed = with_cached(items, decoded, batch.failed + failed, self.cache, device, paths)
            if not images:
                yield Batch(None, None, [], failed)
                continue
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch) + number)
            targets = self.labels[positions].to(device, non_blocking=True)
            yield Batch(self.accel.images_to_device(self.augment(images, generator)), targets, positions, failed)


class DeviceEvalBatches(ProducedOnOneStream):
    """The device path's evaluation batches, in order: decoded on the device, resized and centre-cropped there
    by a producer thread ``prefetch`` batches ahead (0: in the caller's thread); the crops kept in ``cache``
    (validation, across epochs) when given. ``warn``: say each image left out on the console, once per run."""

    def __init__(self, loader: DataLoader, decoder: DeviceDecoder, transform: gpu_augment.EvalTransform,
                 labels: Sequence[int] | None, cache: DecodedImages | None, accel: Accel,
                 warn: bool = False, prefetch: int = PREFETCH_BATCHES) -> None:
        self.loader, self.decoder, self.transform, self.cache, self.accel = loader, decoder, transform, cache, accel
        self.labels = None if labels is None else torch.tensor(labels, dtype=torch.int64)
        self.warnings, self.prefetch = SkipWarnings(warn), prefetch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        batches = self.normalized(iter(self.loader))
        return self.warnings.passing(produced(batches, self.accel.device, self.prefetch, self.side_stream()))

    def normalized(self, loaded: Iterator[EncodedBatch]) -> Iterator[Batch]:
        """The batches, decoded and cropped (or taken from the cache), and normalized."""
        device, paths = self.accel.device, self.loader.dataset.paths
        for batch in loaded:
            items = batch.items
            decoded, failed = self.decoder(to_decode(items))
            crops, positions, failed = with_cached(items, self.cropped(decoded), batch.failed + failed, self.cache,
                                                   device, paths)
            if not crops:
                yield Batch(None, None, [], failed)
                continue
            targets = None if self.labels is None else self.labels[positions].to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, enabled=False):
                images = self.transform.normalize_crops(crops)
            yield Batch(self.accel.images_to_device(images), targets, positions, failed)

    def cropped(self, decoded: list[tuple[Encoded, Tensor]]) -> list[tuple[Encoded, Tensor]]:
        """The decoded items' images resized and centre-cropped (what the cache keeps)."""
        if not decoded:
            return []
        crops = self.transform.crops([image for _, image in decoded]).unbind(0)  # one batched resize, not one a crop
        return [(item, crop) for (item, _), crop in zip(decoded, crops, strict=True)]


def to_decode(items: Sequence[Encoded | Cached]) -> list[Encoded]:
    """The items of a loader batch that the workers read, for the device to decode (not those the cache holds)."""
    return [item for item in items if isinstance(item, Encoded)]


def with_cached(items: Sequence[Encoded | Cached], decoded: list[tuple[Encoded, Tensor]], failed: list[DecodeFailure],
                cache: DecodedImages | None, device: torch.device, paths: Sequence[str]) -> DecodedBatch:
    """A loader batch's ``(images on device, their positions, failures)``, images in the order of its ``items``: the
    ``decoded`` ones (kept in ``cache`` with the batch's ``failed``) and the :class:`Cached` ones taken from
    ``cache``. ``paths``: the dataset's, by position."""
    if cache is not None:
        keep(cache, decoded, failed)
    images = {item.position: image for item, image in decoded}
    held = [item.position for item in items if isinstance(item, Cached)]
    if held:
        images.update(cached_images(cache, held, device))
        failed = failed + cached_failures(cache, held, paths)
    positions = [item.position for item in items if item.position in images]
    return [images[position] for position in positions], positions, failed


def keep(cache: DecodedImages, decoded: list[tuple[Encoded, Tensor]], failed: list[DecodeFailure]) -> None:
    """Put a batch's decoded images and failures in ``cache``."""
    for item, image in decoded:
        cache.put(item.position, image)
    for failure in failed:
        cache.fail(failure.position, failure.reason)


def cached_images(cache: DecodedImages, positions: Sequence[int], device: torch.device) -> dict[int, Tensor]:
    """The images ``cache`` holds for ``positions`` (not the failures), on ``device``, in one fetch."""
    kept = [position for position in dict.fromkeys(positions) if position not in cache.failures]
    return dict(zip(kept, cache.fetch(kept, device), strict=True))


def cached_failures(cache: DecodedImages, positions: Sequence[int], paths: Sequence[str]) -> list[DecodeFailure]:
    """The failures ``cache`` remembers among ``positions``."""
    return [DecodeFailure(paths[position], cache.failures[position], position)
            for position in positions if position in cache.failures]


class SkipWarnings:
    """The console line for each image left out, said once per run (not once per epoch) when ``enabled``: the
    epoch's failures still come with its batches, for skipped_files.txt and the counts."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.said: set[str] = set()

    def passing(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """``batches`` as they are, saying each new failure first."""
        for batch in batches:
            for failure in batch.failed:
                self.say(failure)
            yield batch

    def say(self, failure: DecodeFailure) -> None:
        """Warn about ``failure`` unless its file was warned about already."""
        if self.enabled and failure.path not in self.said:
            self.said.add(failure.path)
            print(f"\nwarning: skipping {failure.path}: cannot decode ({failure.reason})", file=sys.stderr)


def skip_count(failed: Iterable[DecodeFailure]) -> int:
    """How many files ``failed`` (a pass's failures, as ``engine.EpochResult.failed``) names: the epoch line's
    count of images left out."""
    return len({failure.path for failure in failed})
