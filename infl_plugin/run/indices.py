"""`BatchIndexRecorder`: the dataset indices of each training batch, read from the training loader.

Streaming attribution needs, for every training micro-batch, the dataset indices of its examples.
A map-style ``DataLoader`` draws them from its batch sampler in the main process and yields the
batches in that same order (also with shuffling, a ``DistributedSampler`` and worker processes),
so recording what the batch sampler yields, in order, and consuming one record per training batch
gives each batch its indices without touching the data, the batches or any random generator.

`BatchIndexRecorder.install` puts a pass-through wrapper around the loader's batch sampler (for an
``accelerate`` loader, around the batch sampler of the ``DataLoader`` it wraps). Every new
iteration of the loader (a new epoch) starts a new record; `pop` hands out the next batch's
indices, or ``None`` when they are unknown:

* the loader's current iteration began before the wrapper was installed. A loader's iterator
  holds the batch sampler it was built with, so a wrapper installed later sees only the next
  iteration; with ``current_iteration=True`` and torch's own ``BatchSampler``, the wrapper goes
  around the batch sampler's *sampler* instead, which that batch sampler only reads when its
  first batch is drawn: an iterator built but not yet drawn from (Lightning builds each fit's
  first epoch iterator before any callback runs, and draws nothing ahead with a single-process
  loader) is recorded too;
* the batch size does not match the record (something else consumed or skipped batches): the
  rest of that iteration is unknown, with a warning;
* `skip_next_iteration` was called without a count (a resumed epoch that skips batches
  consumed before the recorder saw them; with a count, that many records are dropped instead).

Loaders without a batch sampler (an ``IterableDataset``, ``batch_size=None``) cannot be recorded:
`install` returns ``False``. `remove` puts the original batch sampler back.
"""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset


class _RecordingBatchSampler:
    """Yields what the wrapped batch sampler yields, telling the recorder each batch's indices."""

    def __init__(self, inner: Any, recorder: "BatchIndexRecorder") -> None:
        self.inner = inner
        self.recorder = recorder

    def __iter__(self) -> Iterator[Any]:
        self.recorder._begin()
        for batch in self.inner:
            self.recorder._record(batch)
            yield batch

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:  # sampler, batch_size, drop_last, set_epoch, …
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class _RecordingSampler(_RecordingBatchSampler):
    """Yields what the wrapped sampler yields, telling the recorder each index."""

    def __iter__(self) -> Iterator[Any]:
        self.recorder._begin()
        for index in self.inner:
            self.recorder._record_index(index)
            yield index


class BatchIndexRecorder:
    """Records the indices the training loader's batch sampler yields; `pop` one record per batch."""

    def __init__(self) -> None:
        self._queue: deque[list[int]] = deque()
        self._indices: deque[int] = deque()  # sampler-level records: one index each
        self._loader: Optional[DataLoader] = None
        self._wrapper: Optional[_RecordingBatchSampler] = None
        self._batch_sampler: Optional[BatchSampler] = None  # whose sampler `_wrapper` replaces
        self._known = False  # whether the current iteration is recorded and aligned
        self._skip_next = False
        self._drop = 0  # records to drop at the start of the next iteration
        self._dropping = 0
        self.unknown_batches = 0

    @property
    def installed(self) -> bool:
        return self._wrapper is not None

    @property
    def covers_current_iteration(self) -> bool:
        """Whether an iteration built before `install` but not yet drawn from is recorded (the
        ``current_iteration=True`` wrapper around torch's ``BatchSampler``'s sampler)."""
        return self._batch_sampler is not None

    def install(self, loader: Any, current_iteration: bool = False) -> bool:
        """Wrap ``loader``'s batch sampler, or with ``current_iteration`` the sampler of torch's
        ``BatchSampler`` (idempotent; moves to a new loader). Returns whether the loader's indices
        can be recorded (a map-style ``DataLoader`` with a batch sampler)."""
        inner = _innermost_loader(loader)
        if inner is not None and inner is self._loader:
            return True
        self.remove()
        if inner is None or inner.batch_sampler is None or isinstance(inner.dataset, IterableDataset):
            return False
        batch_sampler = inner.batch_sampler
        if current_iteration and type(batch_sampler) is BatchSampler:
            self._wrapper = _RecordingSampler(batch_sampler.sampler, self)
            batch_sampler.sampler, self._batch_sampler = self._wrapper, batch_sampler
        else:
            self._wrapper = _RecordingBatchSampler(batch_sampler, self)
            # DataLoader refuses `batch_sampler` assignments after construction to keep its length
            # and sampler consistent; the wrapper yields the same batches and has the same length.
            object.__setattr__(inner, "batch_sampler", self._wrapper)
        self._loader = inner
        return True

    def remove(self) -> None:
        """Put the original batch sampler (or sampler) back; forget every record."""
        if self._batch_sampler is not None and self._batch_sampler.sampler is self._wrapper:
            self._batch_sampler.sampler = self._wrapper.inner
        elif self._loader is not None and self._loader.batch_sampler is self._wrapper:
            object.__setattr__(self._loader, "batch_sampler", self._wrapper.inner)
        self._loader, self._wrapper, self._batch_sampler = None, None, None
        self._queue.clear()
        self._indices.clear()
        self._known = False

    def skip_next_iteration(self, batches: Optional[int] = None) -> None:
        """The loader's next iteration skips batches before training on any (a resumed epoch):
        drop its first ``batches`` records, or treat it all as unknown when ``None``."""
        self._skip_next, self._drop = batches is None, batches or 0

    def pop(self, batch_size: Optional[int]) -> Optional[torch.Tensor]:
        """Indices ``LongTensor[batch_size]`` of the next training batch, or ``None`` if unknown
        (``batch_size=None``: the batch was not seen; its record is consumed unchecked)."""
        if self._batch_sampler is not None:  # sampler-level records: the batch's share of indices
            size = self._batch_sampler.batch_size if batch_size is None else batch_size
            if self._known and len(self._indices) >= size:
                self._queue.append([self._indices.popleft() for _ in range(size)])
        if not self._known or not self._queue:
            self.unknown_batches += 1
            return None
        indices = self._queue.popleft()
        if batch_size is not None and len(indices) != batch_size:
            warnings.warn(f"infl_plugin: a training batch has {batch_size} examples but the sampler yielded "
                          f"{len(indices)} indices for it; the dataset indices of this epoch's remaining batches "
                          "are unknown (were batches skipped or consumed elsewhere?)", stacklevel=2)
            self._known = False
            self._queue.clear()
            self.unknown_batches += 1
            return None
        return torch.as_tensor(indices, dtype=torch.long)

    def _begin(self) -> None:
        self._queue.clear()
        self._indices.clear()
        self._known = not self._skip_next
        per_record = 1 if self._batch_sampler is None else self._batch_sampler.batch_size
        self._skip_next, self._dropping, self._drop = False, self._drop * per_record, 0

    def _record(self, batch: Any) -> None:
        if self._dropping:
            self._dropping -= 1
        elif self._known:
            self._queue.append([int(i) for i in batch])

    def _record_index(self, index: Any) -> None:
        if self._dropping:
            self._dropping -= 1
        elif self._known:
            self._indices.append(int(index))


def _innermost_loader(loader: Any) -> Optional[DataLoader]:
    """The ``torch.utils.data.DataLoader`` whose batch sampler feeds ``loader`` (``accelerate``'s
    ``DataLoaderShard`` wraps one as ``base_dataloader``); ``None`` when there is none."""
    seen = 0
    while loader is not None and seen < 8:
        base = loader.__dict__.get("base_dataloader") if hasattr(loader, "__dict__") else None
        if base is None:
            return loader if isinstance(loader, DataLoader) else None
        loader, seen = base, seen + 1
    return None


__all__ = ["BatchIndexRecorder"]
