"""Contract tests for the epoch plan (DESIGN contract 2): a permutation of the population drawn
from (seed, epoch), cut into batches; the same everywhere it is computed."""

from __future__ import annotations

import numpy as np
import pytest

from augsvc import InvalidInputError, epoch_batches


def _flat(batches: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(batches) if batches else np.zeros(0, np.int64)


@pytest.mark.parametrize(("size", "batch_size"), [(0, 4), (1, 4), (10, 3), (12, 4), (1000, 64), (97, 1)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_covers_population_exactly_once(size: int, batch_size: int, shuffle: bool) -> None:
    batches = epoch_batches(size, batch_size, seed=3, epoch=5, shuffle=shuffle)
    flat = _flat(batches)
    assert flat.size == size
    np.testing.assert_array_equal(np.sort(flat), np.arange(size))
    assert len(batches) == -(-size // batch_size)
    assert all(b.size == batch_size for b in batches[:-1])
    assert all(np.issubdtype(b.dtype, np.integer) for b in batches)


def test_deterministic_in_seed_and_epoch() -> None:
    a = epoch_batches(500, 32, seed=11, epoch=2)
    b = epoch_batches(500, 32, seed=11, epoch=2)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_shuffles_and_differs_across_epochs_and_seeds() -> None:
    base = _flat(epoch_batches(500, 32, seed=11, epoch=2))
    assert not np.array_equal(base, np.arange(500))
    others = [_flat(epoch_batches(500, 32, seed=11, epoch=e)) for e in (0, 1, 3)]
    others += [_flat(epoch_batches(500, 32, seed=s, epoch=2)) for s in (0, 12)]
    for other in others:
        assert not np.array_equal(base, other)
        # Not a rotation or a near copy either: most positions move.
        assert np.mean(base == other) < 0.05


def test_permutation_does_not_depend_on_batch_size() -> None:
    # One permutation per (seed, epoch), then cut: changing batch_size only moves the cuts.
    a = _flat(epoch_batches(300, 7, seed=1, epoch=4))
    b = _flat(epoch_batches(300, 64, seed=1, epoch=4))
    np.testing.assert_array_equal(a, b)


def test_shuffle_false_keeps_order() -> None:
    batches = epoch_batches(10, 4, seed=1, epoch=9, shuffle=False)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    subset = np.array([40, 3, 17, 8])
    batches = epoch_batches(subset, 3, seed=1, epoch=0, shuffle=False)
    assert [b.tolist() for b in batches] == [[40, 3, 17], [8]]


def test_drop_last() -> None:
    full = epoch_batches(10, 4, seed=2, epoch=1)
    dropped = epoch_batches(10, 4, seed=2, epoch=1, drop_last=True)
    assert [b.size for b in full] == [4, 4, 2]
    assert [b.size for b in dropped] == [4, 4]
    for x, y in zip(dropped, full, strict=False):
        np.testing.assert_array_equal(x, y)
    assert epoch_batches(3, 4, seed=0, epoch=0, drop_last=True) == []
    assert len(epoch_batches(12, 4, seed=0, epoch=0, drop_last=True)) == 3


@pytest.mark.parametrize("as_list", [False, True])
def test_subset_population(as_list: bool) -> None:
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(10_000, size=300, replace=False))
    population = subset.tolist() if as_list else subset
    batches = epoch_batches(population, 16, seed=5, epoch=0)
    flat = _flat(batches)
    np.testing.assert_array_equal(np.sort(flat), subset)
    assert not np.array_equal(flat, subset)
    again = _flat(epoch_batches(subset.astype(np.uint64), 16, seed=5, epoch=0))
    np.testing.assert_array_equal(flat, again)


def test_plan_does_not_touch_the_population_array() -> None:
    subset = np.arange(100, 0, -1)
    before = subset.copy()
    epoch_batches(subset, 8, seed=0, epoch=0)
    np.testing.assert_array_equal(subset, before)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_below_one_raises(batch_size: int) -> None:
    with pytest.raises(InvalidInputError, match="batch_size"):
        epoch_batches(10, batch_size, seed=0, epoch=0)
    with pytest.raises(ValueError):
        epoch_batches(10, batch_size, seed=0, epoch=0)


@pytest.mark.parametrize("population", [-1, np.zeros((2, 3), np.int64), np.array([0.5, 1.5])])
def test_bad_population_raises(population: object) -> None:
    with pytest.raises(InvalidInputError, match="population"):
        epoch_batches(population, 4, seed=0, epoch=0)  # type: ignore[arg-type]
