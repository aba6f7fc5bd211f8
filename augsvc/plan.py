"""The epoch plan: which samples form batch k of epoch e (DESIGN contract 2).

`epoch_batches` is the single definition of an epoch, shared by client and server: a
permutation of the population drawn from (seed, epoch), cut into batches. Any server can
produce batch k of epoch e, so a batch is an idempotent unit of work.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InvalidInputError
from .rng import stream_key

# Draw-slot namespace of the plan; augmentation draws use other keys (augsvc.rng).
_PLAN_SLOT = 0x504C414E  # "PLAN"


def _population(population: int | Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(population, (int, np.integer)):
        if population < 0:
            raise InvalidInputError(f"population: {population} is negative; expected a count >= 0")
        return np.arange(int(population), dtype=np.int64)
    ids = np.asarray(population)
    if ids.ndim != 1:
        raise InvalidInputError(f"population: expected a 1-D array of sample ids, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise InvalidInputError(f"population: sample ids must be integers, got dtype {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def epoch_permutation(population: int | Sequence[int] | np.ndarray, *, seed: int, epoch: int,
                      shuffle: bool = True) -> np.ndarray:
    """The population in the order epoch `epoch` visits it."""
    ids = _population(population)
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
