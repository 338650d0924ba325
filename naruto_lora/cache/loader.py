"""Batches for training: a bucket-aware, resumable, shardable sampler and a prefetching loader.

The sampler is a pure function of (seed, epoch): the same batches in the same order on every
run, so resuming at batch k of an epoch (``skip_batches=k``) continues exactly where a run
stopped. The loader collates and reads ahead in a background thread, so while the GPU runs
step n the batch for step n+1 is already being read from the memory-mapped caches.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from naruto_lora.util.errors import UserError


class BucketBatchSampler:
    """Shuffled batches of dataset indices, every batch from one bucket.

    Per epoch: one variant per image group (mirror or not), drawn from (seed, epoch); the
    chosen indices split by bucket, shuffled, cut into batches (a bucket's last, smaller batch is
    kept); then the batches shuffled. With ``num_replicas > 1`` rank r takes every R-th batch;
    the few batches that do not divide evenly are left out of that epoch (with a warning) so
    that every rank runs the same number of steps on disjoint data.
    """

    def __init__(
        self,
        groups: list[list[int]],
        buckets: list[Any],
        batch_size: int,
        seed: int,
        epoch: int,
        skip_batches: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise UserError(f"batch size {batch_size}: must be at least 1.")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} of {num_replicas} replicas")
        if skip_batches < 0:
            raise ValueError(f"skip_batches {skip_batches} < 0")
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.skip_batches, self.num_replicas, self.rank = skip_batches, num_replicas, rank
        all_batches = self._epoch_batches(groups, buckets)
        per_rank = len(all_batches) // num_replicas
        if per_rank == 0:
            raise UserError(
                f"The data set gives {len(all_batches)} batch(es) per epoch, fewer than the "
                f"{num_replicas} processes.",
                hint="Use a smaller batch size or fewer processes.",
            )
        self.dropped = len(all_batches) - per_rank * num_replicas
        if self.dropped:
            warnings.warn(
                f"{self.dropped} batch(es) of epoch {epoch} are left out so that all "
                f"{num_replicas} processes get {per_rank} disjoint batches.",
                stacklevel=2,
            )
        self.batches = all_batches[rank : per_rank * num_replicas : num_replicas]

    def _epoch_batches(self, groups: list[list[int]], buckets: list[Any]) -> list[list[int]]:
        rng = np.random.default_rng([self.seed % 2**63, self.epoch])
        sizes = np.array([len(g) for g in groups], dtype=np.int64)
        picks = rng.integers(0, sizes) if len(groups) else []
        by_bucket: dict[Any, list[int]] = {}
        for group, pick in zip(groups, picks, strict=True):
            index = group[int(pick)]
            by_bucket.setdefault(tuple(buckets[index]), []).append(index)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            members = rng.permutation(np.array(by_bucket[bucket], dtype=np.int64)).tolist()
            batches += [
                members[s : s + self.batch_size] for s in range(0, len(members), self.batch_size)
            ]
        order = rng.permutation(len(batches))
        return [batches[o] for o in order]

    def __len__(self) -> int:
        """Batches per epoch for this rank (iteration yields ``len - skip_batches`` of them)."""
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(b) for b in self.batches[self.skip_batches :])


def make_batch_sampler(
    dataset: Any,
    batch_size: int,
    seed: int,
    epoch: int,
    skip_batches: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
) -> BucketBatchSampler:
    """The batch sampler of one epoch; see :class:`BucketBatchSampler`. Any dataset works: one
    without ``groups``/``buckets`` is treated as one bucket with one variant per item."""
    n = len(dataset)
    groups = getattr(dataset, "groups", None) or [[i] for i in range(n)]
    buckets = getattr(dataset, "buckets", None) or [(0, 0)] * n
    return BucketBatchSampler(
        groups, buckets, batch_size, seed, epoch, skip_batches, num_replicas, rank
    )


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch: tensors stacked, captions as a list, indices as a LongTensor."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key == "caption":
            out[key] = values
        elif key == "index":
            out[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"batch mixes '{key}' shapes {sorted(shapes)}: use one bucket per batch"
                )
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


def _pin(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _read_ahead(make: Callable[[], Iterable[Any]], depth: int) -> Iterator[Any]:
    """Iterate ``make()`` in a background thread, ``depth`` items ahead of the consumer.

    Reading a batch is memcpy from mapped pages and torch ops, which release the GIL, so the
    thread overlaps with the training step. Errors in the thread re-raise in the consumer; a
    consumer that stops early stops the thread.
    """
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                box.put(message, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for value in make():
                if not put(("item", value)):
                    return
            put(("end", None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(("error", exc))

    thread = threading.Thread(target=produce, name="nlora-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = box.get()
            if kind == "item":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        stop.set()
        thread.join(timeout=10)


class PrefetchLoader:
    """Collated batches in the batch sampler's order, read ``prefetch`` batches ahead."""

    def __init__(
        self,
        dataset: Any,
        batch_sampler: Iterable[list[int]],
        workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
    ):
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.workers, self.prefetch, self.pin_memory = workers, prefetch, pin_memory

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def _batches(self) -> Iterator[dict[str, Any]]:
        if self.workers > 0:
            yield from torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=self.batch_sampler,
                num_workers=self.workers,
                collate_fn=collate,
                prefetch_factor=max(1, self.prefetch),
                pin_memory=self.pin_memory,
            )
            return
        get_batch = getattr(self.dataset, "get_batch", None)
        for indices in self.batch_sampler:
            if get_batch is not None:
                batch = get_batch(indices)
            else:
                batch = collate([self.dataset[i] for i in indices])
            yield _pin(batch) if self.pin_memory else batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.prefetch < 1:
            return self._batches()
        return _read_ahead(self._batches, self.prefetch)


def make_loader(
    dataset: Any,
    batch_sampler: Iterable[list[int]],
    workers: int = 0,
    prefetch: int = 2,
    pin_memory: bool = False,
) -> PrefetchLoader:
    """Collated batches with read-ahead (a background thread; DataLoader workers if asked)."""
    return PrefetchLoader(dataset, batch_sampler, workers, prefetch, pin_memory)
