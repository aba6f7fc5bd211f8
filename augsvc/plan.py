"""The epoch plan: which samples form batch k of epoch e (DESIGN contract 2).

`epoch_batches` is the single definition of an epoch, shared by client and server: a
permutation of the population drawn from (seed, epoch), cut into batches. Any server can
produce batch k of epoch e, so a batch is an idempotent unit of work. A server keeps the
permutations of recent epochs in a `PlanCache`: a trainer asks for one epoch in many calls.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import numpy as np

from .errors import InvalidInputError
from .rng import stream_key
from .validation import population_ids

__all__ = ["PlanCache", "epoch_batches", "epoch_permutation", "num_batches"]

# Draw-slot namespace of the plan; augmentation draws use other keys (augsvc.rng).
_PLAN_SLOT = 0x504C414E  # "PLAN"


def epoch_permutation(population: int | Sequence[int] | np.ndarray, *, seed: int, epoch: int,
                      shuffle: bool = True) -> np.ndarray:
    """The population in the order epoch `epoch` visits it."""
    ids = population_ids(population)
    if not shuffle or ids.size < 2:
        return ids.copy()
    # A Generator per epoch (not per sample) is cheap, and its key comes from (seed, epoch) only.
    rng = np.random.Generator(np.random.Philox(key=stream_key(seed, epoch, _PLAN_SLOT)))
    return ids[rng.permutation(ids.size)]


def num_batches(size: int, batch_size: int, *, drop_last: bool = False) -> int:
    """How many batches an epoch of `size` samples has."""
    if batch_size < 1:
        raise InvalidInputError(f"batch_size: {batch_size} is not allowed; expected an integer >= 1")
    return size // batch_size if drop_last else -(-size // batch_size)


def epoch_batches(population: int | Sequence[int] | np.ndarray, batch_size: int, *, seed: int,
                  epoch: int, shuffle: bool = True, drop_last: bool = False) -> list[np.ndarray]:
    """Batches of sample ids (int64 arrays) that make epoch `epoch`, in batch-index order.

    population: an int N (ids 0..N-1) or an array of sample ids (a split or subset).
    The last batch is partial unless drop_last.
    """
    order = epoch_permutation(population, seed=seed, epoch=epoch, shuffle=shuffle)
    count = num_batches(order.size, batch_size, drop_last=drop_last)
    return [order[k * batch_size:(k + 1) * batch_size] for k in range(count)]


class PlanCache:
    """Recent epoch permutations, keyed by (dataset, encoded population, seed, epoch, shuffle), so
    that the many calls of one epoch decode and permute its population once."""

    def __init__(self, max_bytes: int = 64 << 20, max_entry_bytes: int = 16 << 20, max_entries: int = 8) -> None:
        self._entries: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._bytes = 0
        # A few entries are enough: a trainer's calls all ask for its current epoch (all ranks
        # alike); more would only hold old epochs' permutations.
        self._max_bytes, self._max_entry, self._max_entries = max_bytes, max_entry_bytes, max_entries
        self._pending: dict[tuple[Any, ...], futures.Future[np.ndarray]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _size(key: tuple[Any, ...], order: np.ndarray) -> int:
        return int(order.nbytes) + len(key[1])

    def get(self, key: tuple[Any, ...], make: Callable[[], np.ndarray]) -> np.ndarray:
        """The plan for `key`, made by `make()` once: concurrent callers of a missing key (every
        stream at an epoch's start) wait for the first one's result, or its error."""
        with self._lock:
            order = self._entries.get(key)
            if order is not None:
                self._entries.move_to_end(key)
                return order
            pending = self._pending.get(key)
            mine = pending is None
            if pending is None:
                pending = self._pending[key] = futures.Future()
        if not mine:
            return pending.result()
        try:
            order = make()
            order.setflags(write=False)
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            pending.set_exception(exc)
            raise
        size = self._size(key, order)
        with self._lock:
            del self._pending[key]
            if size <= self._max_entry:
                self._entries[key] = order
                self._bytes += size
                while self._bytes > self._max_bytes or len(self._entries) > self._max_entries:
                    old_key, old = self._entries.popitem(last=False)
                    self._bytes -= self._size(old_key, old)
        pending.set_result(order)
        return order
