"""WorkerPool.map_ordered, the ordered windowed map both streaming RPCs use: over items known up
front (submitted from the caller's thread) and over a blocking source (a reader thread)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest

from augsvc.errors import CancelledError, InvalidInputError
from augsvc.pool import WorkerPool

TIMEOUT = 10.0


class Jobs:
    """A stand-in for the pool's submit: each item gets a Future the test completes."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.futures: dict[int, Future[int]] = {}
        self.fail_at = fail_at
        self.lock = threading.Lock()
        self.submitted = threading.Condition(self.lock)

    def submit(self, item: int) -> Future[int]:
        if item == self.fail_at:
            raise InvalidInputError(f"item {item} is bad")
        fut: Future[int] = Future()
        with self.lock:
            self.futures[item] = fut
            self.submitted.notify_all()
        return fut

    def wait_for(self, count: int) -> None:
        with self.lock:
            assert self.submitted.wait_for(lambda: len(self.futures) >= count, timeout=TIMEOUT)

    def all_cancelled(self, after: int = -1) -> bool:
        """True once every future past `after` submitted so far is cancelled (the map's reader
        thread may still be inside a submit when the map ends: it cancels that one itself)."""
        with self.lock:
            futures = [f for k, f in self.futures.items() if k > after]
        return bool(futures) and all(f.cancelled() for f in futures)

    def finish(self, item: int) -> None:
        self.futures[item].set_running_or_notify_cancel()
        self.futures[item].set_result(item * 10)


def eventually(cond: Any, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def ordered_map(items: Any, jobs: Jobs, *, window: int = 2, active: Any = lambda: True) -> Iterator[int]:
    pool = SimpleNamespace(_n=1)
    return WorkerPool.map_ordered(pool, items, jobs.submit, is_active=active, window=window)  # type: ignore[arg-type]


def blocking(n: int) -> Iterator[int]:
    """Not a Sequence: the map reads it on a thread."""
    yield from range(n)


@pytest.mark.parametrize("source", [list, blocking], ids=["known", "iterator"])
def test_results_come_in_item_order_within_the_window(source: Any) -> None:
    jobs = Jobs()
    results = ordered_map(source(6) if source is blocking else list(range(6)), jobs, window=2)
    got: list[int] = []
    done = threading.Event()

    def consume() -> None:
        got.extend(results)
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    jobs.wait_for(2)
    assert set(jobs.futures) <= {0, 1, 2}  # the window (2), besides the one being waited for
    for k in (2, 1):  # out of order: nothing is yielded before item 0
        if k in jobs.futures:
            jobs.finish(k)
    assert got == []
    for k in range(6):
        jobs.wait_for(k + 1)
        if not jobs.futures[k].done():
            jobs.finish(k)
    assert done.wait(TIMEOUT)
    assert got == [0, 10, 20, 30, 40, 50]


class Consumer:
    """Runs the map on a thread (a generator starts only when pulled), keeping what it yields and
    how it ended."""

    def __init__(self, results: Iterator[int]) -> None:
        self.got: list[int] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(results,), daemon=True).start()

    def _run(self, results: Iterator[int]) -> None:
        try:
            for r in results:
                self.got.append(r)
        except BaseException as exc:  # noqa: BLE001 - kept for the test
            self.error = exc
        self.done.set()


def source_of(kind: str, n: int) -> Any:
    return list(range(n)) if kind == "known" else blocking(n)


@pytest.mark.parametrize("source", ["known", "iterator"])
def test_a_failing_submit_ends_the_map_in_its_place(source: str) -> None:
    jobs = Jobs(fail_at=2)
    run = Consumer(ordered_map(source_of(source, 5), jobs, window=4))
    jobs.wait_for(2)
    jobs.finish(0)
    jobs.finish(1)
    assert run.done.wait(TIMEOUT)
    assert run.got == [0, 10]
    assert isinstance(run.error, InvalidInputError) and "item 2 is bad" in str(run.error)
    assert set(jobs.futures) == {0, 1}  # nothing after the failed item was submitted


@pytest.mark.parametrize("source", ["known", "iterator"])
def test_leaving_early_cancels_what_is_queued(source: str) -> None:
    jobs = Jobs()
    results = ordered_map(source_of(source, 10), jobs, window=3)
    threading.Thread(target=lambda: (jobs.wait_for(1), jobs.finish(0)), daemon=True).start()
    assert next(results) == 0
    jobs.wait_for(3)
    results.close()
    assert eventually(lambda: jobs.all_cancelled(after=0))


@pytest.mark.parametrize("source", ["known", "iterator"])
def test_a_caller_gone_ends_the_map_with_cancelled(source: str) -> None:
    jobs = Jobs()
    active = threading.Event()
    active.set()
    run = Consumer(ordered_map(source_of(source, 4), jobs, window=2, active=active.is_set))
    jobs.wait_for(2)
    active.clear()  # the map notices within its poll interval
    assert run.done.wait(TIMEOUT)
    assert run.got == [] and isinstance(run.error, CancelledError)
    assert eventually(jobs.all_cancelled)
