"""The worker-process side of `augsvc.pool`: one loop that runs the jobs the parent hands it, the
messages of the pipe between them, and the two parent-side helpers that start a worker and wait
until it is ready.

A worker is a forkserver child: it inherits no memory from the gRPC process, only what its
`WorkerConfig` names — two shared-memory slots (input, output) and the dataset handles. The pipe
carries small typed messages; pixels only ever cross through the slots.

    parent -> worker   a job (`jobs.DatasetBatch` | `jobs.ClientPixels`); the pool stops workers with SIGTERM
    worker -> parent   `Ready` or `Fatal`, once, at start; then `Done` or `Failed` per job

A DatasetBatch may name a client's segment (the shared-memory reply path): the pixels then go
there instead of the output slot, and `Done.segment` names it; when the segment cannot be used
(gone, too small, a wrong token) they go to the output slot and `Done.segment` is None.

augsvc errors travel back as their class name and message; anything else is logged here with
its traceback and reaches the parent as an internal error that names only its type.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any, cast

import numpy as np

from . import errors
from .jobs import ClientSegment, DatasetBatch, Job
from .validation import Limits

__all__ = ["Done", "Failed", "Fatal", "Ready", "WorkerConfig", "launch_worker", "remote_error",
           "wait_ready", "worker_main"]

log = logging.getLogger("augsvc.worker")

#: Test-only hook: "SEED:SECONDS" makes a worker sleep before any job with that seed, so a test
#: can kill it mid-job. Forwarded from the parent's environment at worker start.
SLEEP_HOOK_ENV = "AUGSVC_TEST_WORKER_SLEEP"
_CLIENT_SEGMENTS_CACHED = 64  # clients cycle through a few segments each: stay attached to them
_IDLE_RELEASE_S = 30.0  # an idle worker lets go of every client segment


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker is started with (pickled once per worker start)."""

    index: int
    in_slot: str
    out_slot: str
    limits: Limits                   # max_batch_bytes is also the size of each slot
    datasets: dict[str, Any]         # name -> augsvc.datasets.DatasetHandle
    sleep_hook: str = ""             # SLEEP_HOOK_ENV's value, for tests


# -- the pipe's messages ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Ready:
    """Worker -> parent: started, attached to its slots and datasets."""

    pid: int


@dataclass(frozen=True)
class Fatal:
    """Worker -> parent: could not start."""

    message: str


@dataclass(frozen=True)
class Done:
    """Worker -> parent: the job's output, of `shape`, is in the output slot, or in the client
    segment `segment`."""

    shape: tuple[int, ...]
    segment: str | None


@dataclass(frozen=True)
class Failed:
    """Worker -> parent: the job failed with an augsvc error (`error` is its class name) or an
    internal one (`error` is "internal")."""

    error: str
    message: str

    def exception(self) -> Exception:
        return remote_error(self.error, self.message)


def remote_error(class_name: str, message: str) -> Exception:
    """Rebuild an error a worker reported: augsvc errors keep class and message; anything else
    becomes a RuntimeError, which the gRPC layer maps to INTERNAL without its message."""
    cls = getattr(errors, class_name, None)
    if isinstance(cls, type) and issubclass(cls, errors.AugsvcError):
        return cls(message)
    return RuntimeError(message)


class _Worker:
    def __init__(self, config: WorkerConfig) -> None:
        from .datasets import attach
        from .engine import augment_batch
        from .shm import attach_segment

        self.config = config
        self.limits = config.limits
        self.augment_batch = augment_batch
        self.in_shm = attach_segment(config.in_slot)
        self.out_shm = attach_segment(config.out_slot)
        self.datasets = {name: attach(h) for name, h in config.datasets.items()}
        self.client_segments: OrderedDict[str, Any] = OrderedDict()
        seed, _, seconds = config.sleep_hook.partition(":")
        self.sleep_hook = (int(seed), float(seconds)) if config.sleep_hook else None

    def images(self, job: Job) -> tuple[Any, Any]:
        """The job's input images, and what decodes image i (only the part the augmentation reads)
        when a dataset's are not decoded yet (`DatasetReader.gather_deferred`, for `augment_batch`'s
        read=): read from the dataset, or from the input slot."""
        if isinstance(job, DatasetBatch):  # views used before the next job
            return self.datasets[job.dataset].gather_deferred(job.sample_ids)
        if job.shape is not None:
            return np.ndarray(job.shape, np.uint8, buffer=self.in_shm.buf), None
        from .datasets import decode_images

        buf, blobs, pos = cast(memoryview, self.in_shm.buf), [], 0
        for n in job.encoded_lengths:
            blobs.append(buf[pos:pos + n])
            pos += n
        try:
            return decode_images(blobs, limits=self.limits), None
        finally:
            for b in blobs:
                b.release()

    def client_segment(self, segment: ClientSegment, nbytes: int) -> Any:
        """The client's segment attached (cached), or None unless it may take `nbytes` of pixels
        now (`augsvc.shm.usable_client_segment`: checked before every write)."""
        from .shm import attach_segment, is_client_segment, release_segment, usable_client_segment

        self.drop_unlinked_segments()
        shm = self.client_segments.get(segment.name)
        if shm is None:
            if not is_client_segment(segment.name):
                return None
            try:
                shm = attach_segment(segment.name)
            except (OSError, ValueError):  # gone, another user's, or another host's name
                return None
            self.client_segments[segment.name] = shm
            while len(self.client_segments) > _CLIENT_SEGMENTS_CACHED:
                release_segment(self.client_segments.popitem(last=False)[1], unlink=False)
        self.client_segments.move_to_end(segment.name)
        return shm if usable_client_segment(shm, segment.token, nbytes) else None

    def drop_unlinked_segments(self, everything: bool = False) -> None:
        """Let go of client segments whose owners unlinked them (or of all, when idle): the
        mapping would otherwise keep their memory alive."""
        from .shm import is_unlinked, release_segment

        for name in [n for n, shm in self.client_segments.items() if everything or is_unlinked(shm)]:
            release_segment(self.client_segments.pop(name), unlink=False)

    def run(self, job: Job) -> Done:
        aug = job.augmentation
        if self.sleep_hook is not None and aug.seed == self.sleep_hook[0]:
            time.sleep(self.sleep_hook[1])
        spec = aug.validated_spec
        size = spec.output_size  # fixed by the spec, whatever the input
        channels = job.channels if isinstance(job, DatasetBatch) else (job.shape[3] if job.shape else None)
        if size is not None and channels is not None:  # refuse before the work, when we can
            self._check_output(len(job.sample_ids) * size[0] * size[1] * channels)
        if isinstance(job, DatasetBatch):  # what the samples take once read, before reading any
            reader = self.datasets[job.dataset]
            self.limits.check_work_bytes("sample_ids", reader.nbytes(job.sample_ids),
                                         "the batch's images once read are ")
            side = reader.largest_side(job.sample_ids)
            self.limits.check_side("sample_ids", side, side, what="a sample's decoded side")
        images, read = self.images(job)
        segment = job.out_segment if isinstance(job, DatasetBatch) else None
        target, written_to = self._out_view(images, spec, segment)
        strength = job.strength if isinstance(job, DatasetBatch) else None
        out = self.augment_batch(images, spec, seed=aug.seed, epoch=aug.epoch, sample_ids=job.sample_ids,
                                 backend=aug.backend, max_side=self.limits.max_image_side, out=target,
                                 strength=strength, max_bytes=self.limits.max_batch_bytes, read=read)
        del images, read
        if target is None:
            self._check_output(out.nbytes)
            np.ndarray(out.shape, np.uint8, buffer=self.out_shm.buf)[...] = out
        return Done(tuple(int(s) for s in out.shape), written_to)

    def _out_view(self, images: Any, spec: Any, segment: ClientSegment | None
                  ) -> tuple[np.ndarray | None, str | None]:
        """The output slot (or the client's `segment`, when usable) as an array of the batch's
        output shape, when it is known up front: the engine then writes the pixels straight into
        shared memory."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            size = spec.output_size_for(images.shape[1:3])
            channels = images.shape[3]
        elif len(images) and getattr(images[0], "ndim", 0) == 3:
            size, channels = spec.output_size, images[0].shape[2]
        else:
            size = None
        if size is None:
            return None, None
        shape = (len(images), size[0], size[1], channels)
        nbytes = shape[0] * shape[1] * shape[2] * shape[3]
        self._check_output(nbytes)
        shm = self.client_segment(segment, nbytes) if segment is not None else None
        if shm is not None and segment is not None:
            from .shm import client_pixels

            return client_pixels(shm, shape), segment.name
        return np.ndarray(shape, np.uint8, buffer=self.out_shm.buf), None

    def _check_output(self, nbytes: int) -> None:
        self.limits.check_batch_bytes("output", nbytes, "the augmented batch would be ")


def worker_main(config: WorkerConfig, conn: Connection) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    import cv2

    cv2.setNumThreads(0)  # one worker per core already; OpenCV's own threads would oversubscribe
    try:
        worker = _Worker(config)
    except Exception as exc:
        log.exception("worker %d failed to start", config.index)
        conn.send(Fatal(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(Ready(os.getpid()))
    while True:
        try:
            while not conn.poll(_IDLE_RELEASE_S):
                worker.drop_unlinked_segments(everything=True)
            job = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        try:
            reply: Done | Failed = worker.run(job)
        except errors.AugsvcError as exc:
            reply = Failed(type(exc).__name__, str(exc))
        except Exception as exc:
            log.exception("worker %d: internal error", config.index)
            reply = Failed("internal", f"internal error in worker {config.index}: {type(exc).__name__}")
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


# ---------------------------------------------------------------------------------------------
# parent side: starting a worker
# ---------------------------------------------------------------------------------------------

def launch_worker(ctx: BaseContext, config: WorkerConfig) -> tuple[BaseProcess, Connection]:
    """Start a worker process from ``ctx`` (the forkserver); returns it and the parent's pipe end."""
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=worker_main, args=(config, child_conn), daemon=True,  # type: ignore[attr-defined]
                       name=f"augsvc-worker-{config.index}")
    with _main_not_reimported():
        proc.start()
    child_conn.close()
    return proc, parent_conn


def wait_ready(proc: BaseProcess, conn: Connection, index: int, timeout_s: float) -> None:
    """Block until the worker says it is ready; RuntimeError if it fails, dies or stays silent."""
    msg = None
    try:
        if conn in wait([conn, proc.sentinel], timeout=timeout_s):
            msg = conn.recv()
    except (EOFError, OSError):
        pass
    if not isinstance(msg, Ready):
        why = msg.message if isinstance(msg, Fatal) else f"it exited or sent no ready message within {timeout_s}s"
        raise RuntimeError(f"worker {index} failed to start: {why}")


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """Start a worker without re-running the parent's ``__main__`` in it.

    spawn/forkserver children normally re-import the main script (as ``__mp_main__``) so that
    pickled references to it resolve; workers get only augsvc objects, and re-importing e.g. a
    trainer script would load torch into every worker and re-run unguarded top-level code.
    Hiding ``__file__`` / ``__spec__`` for the few milliseconds of ``Process.start()`` makes
    multiprocessing skip that step (as it does for interactive sessions).
    """
    main = sys.modules.get("__main__")
    keys = ("__file__", "__spec__")
    saved: dict[str, Any] = {k: v for k, v in vars(main).items() if k in keys} if main else {}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__["__spec__"] = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)
