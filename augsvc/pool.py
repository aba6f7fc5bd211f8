"""Worker processes with a shared-memory hand-off (DESIGN contract 5).

`WorkerPool.start()` runs before any gRPC server exists. Workers come from a forkserver, so a
replacement for a dead worker is forked from that clean server process, never from the gRPC
process. Each worker owns two slots of ``max_batch_bytes`` (input, output) that the parent
creates; pixels cross only through them, the pipe carries the typed jobs of `augsvc.jobs` and
the worker's typed replies (`augsvc.worker`).

One feeder thread per worker takes jobs from one shared queue, writes the input slot, sends
the job and waits on both the reply and the process sentinel: a worker that dies mid-job fails
only that job (`WorkerUnavailableError`, retryable) and is replaced. `map_ordered` is how a
stream of jobs runs: a bounded window of them in flight, results in order.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing as mp
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from .datasets import Dataset
from .errors import CancelledError, LimitExceededError, WorkerUnavailableError
from .jobs import Augmentation, ClientSegment, Job, Payload, client_pixels, dataset_batch
from .shm import create_segment, release_segment
from .validation import DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_SIDE, Limits
from .worker import SLEEP_HOOK_ENV, Done, Failed, WorkerConfig, launch_worker, wait_ready

__all__ = ["WorkerPool", "default_workers", "wait_result"]

log = logging.getLogger("augsvc.pool")

_PRELOAD = ["augsvc.worker", "augsvc.engine", "augsvc.datasets", "augsvc.spec", "cv2", "PIL.Image"]
_HEALTH_INTERVAL_S = 0.5
_POLL_S = 0.2  # how often a waiting call checks that its caller is still there
T = TypeVar("T")
R = TypeVar("R")


def default_workers(cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup") -> int:
    """The CPUs this process may use: the cgroup CPU quota (v2 ``cpu.max``, else v1
    ``cpu.cfs_quota_us / cpu.cfs_period_us``) rounded up, capped by the CPU affinity; at least 1.
    A container's quota is what it gets, whatever ``os.cpu_count()`` says about the host."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(Path(cgroup_root))
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, cpus)


def _cgroup_quota(root: Path) -> int | None:
    try:
        fields = (root / "cpu.max").read_text().split()
    except OSError:
        pass
    else:  # cgroup v2: "max 100000" or "200000 100000"
        try:
            return None if fields[0] == "max" else math.ceil(int(fields[0]) / int(fields[1]))
        except (IndexError, ValueError, ZeroDivisionError):
            return None
    for sub in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):  # cgroup v1
        try:
            quota = int((root / sub / "cpu.cfs_quota_us").read_text())
            period = int((root / sub / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return math.ceil(quota / period) if quota > 0 and period > 0 else None
    return None


#: Called in the feeder thread with (a view of the output slot, None) while the slot is held, or
#: with (a zero-strided array of the output's shape, the client segment's name) when the worker
#: wrote into the job's client segment; its return value becomes the future's result (lets the
#: server serialize straight from shared memory).
Finish = Callable[[np.ndarray, str | None], Any]


@dataclass
class _Queued:
    job: Job
    payload: Payload | None
    future: Future[Any]
    finish: Finish | None


def _copy_out(view: np.ndarray, _segment: str | None) -> np.ndarray:
    return view.copy()


def _map_known(items: Sequence[T], submit: Callable[[T], Future[R]], is_active: Callable[[], bool],
               limit: int) -> Iterator[R]:
    """`WorkerPool.map_ordered` over items known up front, submitted from the caller's thread."""
    pending: deque[Future[R] | Exception] = deque()
    source = iter(items)
    try:
        while True:
            while len(pending) < limit and not (pending and isinstance(pending[-1], Exception)):
                if not is_active():
                    raise CancelledError("the call was cancelled or its deadline passed")
                item = next(source, _END)
                if item is _END:
                    break
                try:
                    pending.append(submit(cast(T, item)))
                except Exception as exc:  # noqa: BLE001 - reported in order, below
                    pending.append(exc)
            if not pending:
                return
            entry = pending.popleft()
            if isinstance(entry, Exception):
                raise entry
            yield wait_result(entry, is_active)
    finally:
        for entry in pending:
            if isinstance(entry, Future):
                entry.cancel()


_END = object()


def wait_result(future: Future[T], is_active: Callable[[], bool]) -> T:
    """The future's result, giving up (and cancelling queued work) when `is_active()` turns false:
    the caller went away or its deadline passed."""
    while True:
        try:
            return future.result(timeout=_POLL_S)
        except FutureTimeout:
            if not is_active():
                future.cancel()
                raise CancelledError("the call was cancelled or its deadline passed") from None


@dataclass
class _Slot:
    """One worker position: its shm slots outlive the processes that fill it."""

    index: int
    in_shm: SharedMemory
    out_shm: SharedMemory
    process: BaseProcess | None = None
    conn: Connection | None = None
    pid: int | None = None
    alive: bool = False
    start_failed: bool = False  # the last try to start a process here failed
    feeder: threading.Thread | None = field(default=None, repr=False)


class _Closing(Exception):
    pass


class WorkerPool:
    """A fixed number of worker processes that augment batches; every submit returns a Future.

    Limits (all raise `LimitExceededError`, RESOURCE_EXHAUSTED on the wire): a batch of the
    caller's images or an output batch over ``max_batch_bytes``; a dataset batch's images once
    read, or a step's output before the last, over 16 times that (`Limits.max_work_bytes`); an
    image side over ``max_image_side``; more than ``max_inflight`` jobs queued or running
    (default: 4 per worker, at least 8).
    """

    def __init__(self, workers: int, *, datasets: Mapping[str, Dataset] | None = None,
                 max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES, max_inflight: int | None = None,
                 max_image_side: int = DEFAULT_MAX_SIDE, start_timeout_s: float = 120.0) -> None:
        inflight = 1 if max_inflight is None else max_inflight
        for name, value in [("workers", workers), ("max_inflight", inflight)]:
            if value < 1:
                raise ValueError(f"{name}: {value} is not allowed; expected >= 1")
        self.limits = Limits(max_image_side=max_image_side, max_batch_bytes=max_batch_bytes)
        self._n = workers
        self._datasets = dict(datasets or {})
        self.max_inflight = max_inflight if max_inflight is not None else max(8, 4 * workers)
        self._start_timeout_s = start_timeout_s
        self._ctx = mp.get_context("forkserver")
        self._cond = threading.Condition()
        self._queue: deque[_Queued] = deque()
        self._slots: list[_Slot] = []
        self._inflight = 0
        self._counts = {"restarts": 0, "completed": 0, "failed": 0, "cancelled": 0}
        self._started = False
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> WorkerPool:
        """Start the workers (and the forkserver). Call before any gRPC server exists."""
        if self._closing:
            raise RuntimeError("this WorkerPool was closed; create a new one")
        if self._started:
            return self
        self._started = True
        self._ctx.set_forkserver_preload(_PRELOAD)
        atexit.register(self.close)
        try:
            for i in range(self._n):
                in_shm = create_segment(self.limits.max_batch_bytes, f"in{i}", reserve=False)
                try:
                    out_shm = create_segment(self.limits.max_batch_bytes, f"out{i}", reserve=False)
                except BaseException:
                    release_segment(in_shm, unlink=True)
                    raise
                self._slots.append(_Slot(i, in_shm, out_shm))
            for slot in self._slots:
                self._spawn(slot)
        except BaseException:
            self.close()
            raise
        for slot in self._slots:
            slot.feeder = threading.Thread(target=self._feed, args=(slot,), daemon=True,
                                           name=f"augsvc-feeder-{slot.index}")
            slot.feeder.start()
        return self

    def close(self) -> None:
        """Fail what is running, cancel what is queued, stop the workers, unlink every slot."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
            procs = [s.process for s in self._slots]
            self._cond.notify_all()
        atexit.unregister(self.close)
        for job in queued:
            job.future.cancel()
        for p in procs:
            if p is not None and p.pid is not None:
                try:
                    p.terminate()
                except (OSError, ValueError):
                    pass
        for slot in self._slots:
            if slot.feeder is not None:
                slot.feeder.join(timeout=30)
        for slot in self._slots:
            self._reap(slot)
            release_segment(slot.in_shm, unlink=True)
            release_segment(slot.out_shm, unlink=True)

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- introspection -------------------------------------------------------------------------
    @property
    def worker_count(self) -> int:
        return self._n

    @property
    def datasets(self) -> Mapping[str, Dataset]:
        return self._datasets

    def pids(self) -> list[int | None]:
        """Process id per worker position (for tests and logs)."""
        return [s.pid for s in self._slots]

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"workers": self._n, "alive": sum(s.alive for s in self._slots),
                    "inflight": self._inflight, "queued": len(self._queue), **self._counts}

    def unable_to_start(self) -> bool:
        """True while no worker is alive and the last start of every one failed (the dataset's
        shared memory removed under the server, say): calls are refused UNAVAILABLE meanwhile."""
        with self._cond:
            return self._unable_to_start()

    def _unable_to_start(self) -> bool:
        return bool(self._slots) and all(s.start_failed and not s.alive for s in self._slots)

    # -- submitting ----------------------------------------------------------------------------
    def submit(self, job: Job, payload: Payload | None = None, finish: Finish | None = None) -> Future[Any]:
        """Queue a job (built by `augsvc.jobs`, which checked it); `payload` is a ClientPixels
        job's input. The Future's result is finish(view of the output, segment), or a copy of the
        output without `finish`."""
        return self._submit(_Queued(job, payload, Future(), finish))

    def submit_augment(self, images: np.ndarray | Sequence[bytes], spec: Any, *, seed: int, epoch: int,
                       sample_ids: Any, backend: str = "fused", finish: Finish | None = None) -> Future[Any]:
        """Augment an (N, H, W, C) uint8 array, or N encoded PNG/JPEG images (decoded in the worker);
        `spec` is a Spec, its wire bytes, or anything `load_spec` takes."""
        augmentation = Augmentation.of(spec, seed=seed, epoch=epoch, backend=backend)
        job, payload = client_pixels(images, augmentation, sample_ids, self.limits)
        return self.submit(job, payload, finish)

    def submit_batch(self, dataset: str, sample_ids: Any, spec: Any, *, seed: int, epoch: int,
                     backend: str = "fused", finish: Finish | None = None,
                     out_segment: ClientSegment | None = None) -> Future[Any]:
        """Augment samples of a served dataset; the worker reads them from shared memory. The
        Future's result is (images, labels), or finish(...) as for `submit`. out_segment: a client
        segment (`augsvc.shm.create_client_segment`) the worker writes the pixels into when it can;
        `finish` learns whether it did."""
        augmentation = Augmentation.of(spec, seed=seed, epoch=epoch, backend=backend)
        job = dataset_batch(self._datasets, dataset, sample_ids, augmentation, self.limits, out_segment)
        if finish is None:
            labels = self._datasets[job.dataset].labels[job.sample_ids]

            def finish(view: np.ndarray, _segment: str | None) -> tuple[np.ndarray, np.ndarray]:
                return view.copy(), labels

        return self.submit(job, None, finish)

    def map_ordered(self, items: Iterable[T], submit: Callable[[T], Future[R]], *, is_active: Callable[[], bool],
                    window: int | None = None) -> Iterator[R]:
        """Results of `submit(item)` for each item, in item order, with at most `window` (default:
        two per worker, so each worker has its next job queued while the last is being sent)
        submitted and not yet yielded. Items in a Sequence (known up front) are submitted by the
        caller's thread as room frees up (the one being waited for counts); any other iterable is
        pulled by a reader thread, which may submit one more while a result is being sent, so a
        source that blocks (a client's request stream that waits for replies) never holds back a
        ready result. An item whose submit raises ends
        the map with that error, in its place. Leaving early, or the caller going away
        (`is_active()` false), cancels the work still queued."""
        limit = window or 2 * self._n
        if isinstance(items, Sequence):
            # No hand-off to another thread: a woken thread waits for the GIL (up to the 5 ms switch
            # interval while gRPC's threads run), which starves the workers on small batches.
            yield from _map_known(items, submit, is_active, limit)
            return
        pending: deque[Future[R] | Exception] = deque()
        cond = threading.Condition()
        state = {"read_all": False, "stop": False}

        def room() -> bool:
            return len(pending) < limit or state["stop"] or not is_active()

        def read() -> None:
            try:
                for item in items:
                    with cond:
                        while not cond.wait_for(room, timeout=_POLL_S):
                            pass
                        if state["stop"] or not is_active():
                            return
                    try:
                        entry: Future[R] | Exception = submit(item)
                    except Exception as exc:  # noqa: BLE001 - reported in order, below
                        entry = exc
                    with cond:
                        if state["stop"]:  # the map ended while this one was submitted
                            if isinstance(entry, Future):
                                entry.cancel()
                            return
                        pending.append(entry)
                        cond.notify_all()
                    if isinstance(entry, Exception):
                        return
            except Exception:  # noqa: BLE001 - the source broke (a client's stream): nothing more to read
                pass
            finally:
                with cond:
                    state["read_all"] = True
                    cond.notify_all()

        threading.Thread(target=read, name="augsvc-map-reader", daemon=True).start()
        try:
            while True:
                with cond:
                    while not pending and not state["read_all"]:
                        cond.wait(_POLL_S)
                        if not is_active():
                            raise CancelledError("the call was cancelled or its deadline passed")
                    if not pending:
                        return
                    entry = pending.popleft()
                    cond.notify_all()
                if isinstance(entry, Exception):
                    raise entry
                yield wait_result(entry, is_active)
        finally:
            with cond:
                state["stop"] = True
                left = list(pending)
                pending.clear()
                cond.notify_all()
            for entry in left:
                if isinstance(entry, Future):
                    entry.cancel()

    def _submit(self, job: _Queued) -> Future[Any]:
        with self._cond:
            if not self._started or self._closing:
                raise WorkerUnavailableError("the worker pool is not running; retry on another server")
            if self._unable_to_start():
                raise WorkerUnavailableError("no worker process of this server can start (see its log); retry on "
                                             "another server")
            if self._inflight >= self.max_inflight:
                raise LimitExceededError(f"the server has {self._inflight} batches in flight; the limit "
                                         f"(max_inflight) is {self.max_inflight}; retry later")
            self._inflight += 1
            self._queue.append(job)
            self._cond.notify()
        # A weak reference: job -> future -> callback -> job would be a cycle that keeps every
        # result (a batch of pixels) alive until the cyclic GC happens to run.
        job_ref = weakref.ref(job)
        job.future.add_done_callback(lambda fut: self._job_done(fut, job_ref()))
        return job.future

    def _job_done(self, fut: Future[Any], job: _Queued | None) -> None:
        with self._cond:
            self._inflight -= 1
            if fut.cancelled():
                self._counts["cancelled"] += 1
                try:  # a queued job that was cancelled leaves the queue now, not when a feeder gets to it
                    if job is not None:
                        self._queue.remove(job)
                except ValueError:
                    pass
            elif fut.exception() is not None:
                self._counts["failed"] += 1
            else:
                self._counts["completed"] += 1

    # -- feeding (one thread per worker) -------------------------------------------------------
    def _feed(self, slot: _Slot) -> None:
        backoff = 0.5
        while True:
            if slot.process is None or slot.process.exitcode is not None:
                try:
                    self._replace(slot)
                    backoff = 0.5
                except _Closing:
                    return
                except Exception:
                    log.exception("worker %d: a replacement failed to start; trying again in %.1fs",
                                  slot.index, backoff)
                    self._fail_queue_if_unable()
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
            with self._cond:
                if self._closing:
                    return
                if not self._queue:
                    self._cond.wait(_HEALTH_INTERVAL_S)
                    continue
                job = self._queue.popleft()
            if job.future.set_running_or_notify_cancel():
                try:
                    self._run(slot, job)
                except Exception as exc:  # never lose the feeder; never leave a future hanging
                    log.exception("worker %d: dispatch failed", slot.index)
                    if not job.future.done():
                        job.future.set_exception(RuntimeError(f"internal error: {type(exc).__name__}"))

    def _run(self, slot: _Slot, queued: _Queued) -> None:
        assert slot.conn is not None and slot.process is not None
        payload, queued.payload = queued.payload, None
        if isinstance(payload, np.ndarray):
            np.copyto(np.ndarray(payload.shape, np.uint8, buffer=slot.in_shm.buf), payload)
        elif payload is not None:
            buf, pos = cast(memoryview, slot.in_shm.buf), 0
            for blob in payload:
                buf[pos:pos + len(blob)] = blob
                pos += len(blob)
        del payload
        reply = None
        try:
            slot.conn.send(queued.job)
            ready = wait([slot.conn, slot.process.sentinel])
            if slot.conn in ready or slot.conn.poll(0):
                reply = slot.conn.recv()
        except (EOFError, OSError):
            pass
        if isinstance(reply, Done):
            if reply.segment is not None:  # the pixels are in the client's segment: pass their shape
                view = np.broadcast_to(np.zeros((), np.uint8), reply.shape)
            else:
                view = np.ndarray(reply.shape, np.uint8, buffer=slot.out_shm.buf)
            try:
                result = (queued.finish or _copy_out)(view, reply.segment)
            except Exception as exc:  # noqa: BLE001 - the caller's hook; reported to the caller
                queued.future.set_exception(exc)
                return
            queued.future.set_result(result)
        elif isinstance(reply, Failed):
            queued.future.set_exception(reply.exception())
        else:
            self._worker_died(slot, queued)

    def _worker_died(self, slot: _Slot, job: _Queued) -> None:
        assert slot.process is not None
        slot.process.join(timeout=5)
        if slot.process.exitcode is None:  # its pipe broke but it lives on: not to be trusted
            slot.process.kill()
            slot.process.join(timeout=5)
        code = slot.process.exitcode
        slot.alive = False
        if self._closing:
            job.future.set_exception(WorkerUnavailableError(
                f"worker {slot.index} stopped: the pool is shutting down; retry"))
            return
        log.warning("worker %d (pid %s) died with exit code %s during a job; replacing it",
                    slot.index, slot.pid, code)
        job.future.set_exception(WorkerUnavailableError(
            f"worker {slot.index} died (exit code {code}) while working on this batch; retry"))
        # the feeder loop sees the dead process and replaces it before taking the next job

    # -- processes -----------------------------------------------------------------------------
    def _spawn(self, slot: _Slot) -> None:
        config = WorkerConfig(
            index=slot.index, in_slot=slot.in_shm.name, out_slot=slot.out_shm.name, limits=self.limits,
            datasets={name: ds.handle() for name, ds in self._datasets.items()},
            sleep_hook=os.environ.get(SLEEP_HOOK_ENV, ""))
        with self._cond:
            if self._closing:
                raise _Closing
            proc, conn = launch_worker(self._ctx, config)
            slot.process, slot.conn, slot.pid = proc, conn, proc.pid
        wait_ready(proc, conn, config.index, self._start_timeout_s)
        slot.alive = True

    def _replace(self, slot: _Slot) -> None:
        """Start a process in a slot whose process is gone; a restart is counted once it is ready."""
        with self._cond:
            if self._closing:  # close() stopped it: nothing to replace, nothing to warn about
                raise _Closing
        if not slot.start_failed:
            log.warning("worker %d is gone; starting a replacement", slot.index)
        self._reap(slot)
        try:
            self._spawn(slot)
        except _Closing:
            raise
        except BaseException:
            slot.start_failed = True
            raise
        with self._cond:
            slot.start_failed = False
            self._counts["restarts"] += 1

    def _fail_queue_if_unable(self) -> None:
        """When no worker can start, the queued jobs would wait for one forever: fail them
        UNAVAILABLE (retryable elsewhere); `_submit` refuses new ones until a worker starts."""
        with self._cond:
            if not self._unable_to_start():
                return
            queued = list(self._queue)
            self._queue.clear()
        for job in queued:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(WorkerUnavailableError(
                    "no worker process of this server can start (see its log); retry on another server"))

    def _reap(self, slot: _Slot) -> None:
        slot.alive = False
        proc, conn = slot.process, slot.conn
        slot.process = slot.conn = None
        if conn is not None:
            conn.close()
        if proc is None or proc.pid is None:
            return
        proc.join(timeout=5)
        if proc.exitcode is None:
            proc.kill()
            proc.join(timeout=5)
        try:
            proc.close()
        except ValueError:
            pass
