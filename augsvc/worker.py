"""The worker-process side of `augsvc.pool`: one loop that augments what the parent hands it,
and the two parent-side helpers that start a worker and wait until it is ready.

A worker is a forkserver child: it inherits no memory from the gRPC process, only what its
arguments name — two shared-memory slots (input, output) and the dataset handles. Control
messages on the pipe are small tuples; pixels only ever cross through the slots.

    parent -> worker   ("augment", meta) | ("batch", meta) | ("stop",)   (the pool stops with SIGTERM)
    worker -> parent   ("ready", pid) | ("fatal", message)          once, at start
                       ("ok", shape, segment) | ("err", class name, message) once per job

A batch job may name a client's segment (meta "out_segment": (name, token), shared-memory reply
path): the pixels then go there instead of the output slot, and "ok" names it; when the segment
cannot be used (gone, too small, a wrong token, not a client segment) they go to the output slot
and "ok" names none.

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

__all__ = ["WorkerConfig", "launch_worker", "remote_error", "wait_ready", "worker_main"]

log = logging.getLogger("augsvc.worker")

#: Test-only hook: "SEED:SECONDS" makes a worker sleep before any job with that seed, so a test
#: can kill it mid-job. Forwarded from the parent's environment at worker start.
SLEEP_HOOK_ENV = "AUGSVC_TEST_WORKER_SLEEP"
_SPEC_CACHE_SIZE = 32
_CLIENT_SEGMENTS_CACHED = 64  # clients cycle through a few segments each: stay attached to them
_IDLE_RELEASE_S = 30.0  # an idle worker lets go of every client segment


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker is started with (pickled once per worker start)."""

    index: int
    in_slot: str
    out_slot: str
    slot_bytes: int
    max_image_side: int
    datasets: dict[str, Any]         # name -> augsvc.datasets.DatasetHandle
    env: dict[str, str]


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
        self.augment_batch = augment_batch
        self.in_shm = attach_segment(config.in_slot)
        self.out_shm = attach_segment(config.out_slot)
        self.datasets = {name: attach(h) for name, h in config.datasets.items()}
        self.specs: OrderedDict[bytes, Any] = OrderedDict()
        self.client_segments: OrderedDict[str, Any] = OrderedDict()
        hook = config.env.get(SLEEP_HOOK_ENV, "")
        seed, _, seconds = hook.partition(":")
        self.sleep_hook = (int(seed), float(seconds)) if hook else None

    def spec(self, spec_bytes: bytes) -> Any:
        """The validated Spec for wire bytes; cached because a stream sends the same spec often."""
        spec = self.specs.get(spec_bytes)
        if spec is not None:
            self.specs.move_to_end(spec_bytes)
            return spec
        from google.protobuf.message import DecodeError

        from .spec import load_spec
        from .v1 import augment_pb2 as pb

        try:
            message = pb.Pipeline.FromString(spec_bytes)
        except DecodeError:
            raise errors.SpecError("spec: not a valid augsvc.v1.Pipeline message") from None
        spec = load_spec(message)
        self.specs[spec_bytes] = spec
        if len(self.specs) > _SPEC_CACHE_SIZE:
            self.specs.popitem(last=False)
        return spec

    def images(self, kind: str, meta: dict[str, Any]) -> Any:
        if kind == "batch":
            reader = self.datasets[meta["dataset"]]
            return reader.gather(meta["sample_ids"], max_side=self.config.max_image_side)
        if "lengths" in meta:
            from .datasets import decode_images

            buf, blobs, pos = cast(memoryview, self.in_shm.buf), [], 0
            for n in meta["lengths"]:
                blobs.append(buf[pos:pos + n])
                pos += n
            try:
                return decode_images(blobs, max_side=self.config.max_image_side,
                                     max_bytes=self.config.slot_bytes)
            finally:
                for b in blobs:
                    b.release()
        return np.ndarray(meta["shape"], np.uint8, buffer=self.in_shm.buf)

    def client_segment(self, name: str, token: bytes, nbytes: int) -> Any:
        """The client's segment `name` attached (cached), or None unless it may take `nbytes` of
        pixels now (`augsvc.shm.usable_client_segment`: checked before every write)."""
        from .shm import attach_segment, is_client_segment, release_segment, usable_client_segment

        self.drop_unlinked_segments()
        shm = self.client_segments.get(name)
        if shm is None:
            if not is_client_segment(name):
                return None
            try:
                shm = attach_segment(name)
            except (OSError, ValueError):  # gone, another user's, or another host's name
                return None
            self.client_segments[name] = shm
            while len(self.client_segments) > _CLIENT_SEGMENTS_CACHED:
                release_segment(self.client_segments.popitem(last=False)[1], unlink=False)
        self.client_segments.move_to_end(name)
        return shm if usable_client_segment(shm, token, nbytes) else None

    def drop_unlinked_segments(self, everything: bool = False) -> None:
        """Let go of client segments whose owners unlinked them (or of all, when idle): the
        mapping would otherwise keep their memory alive."""
        from .shm import is_unlinked, release_segment

        for name in [n for n, shm in self.client_segments.items() if everything or is_unlinked(shm)]:
            release_segment(self.client_segments.pop(name), unlink=False)

    def run(self, kind: str, meta: dict[str, Any]) -> tuple[tuple[int, ...], str | None]:
        if self.sleep_hook is not None and meta["seed"] == self.sleep_hook[0]:
            time.sleep(self.sleep_hook[1])
        spec = self.spec(meta["spec"])
        size, channels = spec.output_size, meta.get("channels")
        if size is not None and channels is not None:  # refuse before the work, when we can
            nbytes = len(meta["sample_ids"]) * size[0] * size[1] * channels
            if nbytes > self.config.slot_bytes:
                raise self._too_big(nbytes)
        images = self.images(kind, meta)
        target, segment = self._out_view(images, size, meta.get("out_segment"))
        out = self.augment_batch(images, spec, seed=meta["seed"], epoch=meta["epoch"],
                                 sample_ids=meta["sample_ids"], backend=meta["backend"],
                                 max_side=self.config.max_image_side, out=target)
        del images
        if target is None:
            if out.nbytes > self.config.slot_bytes:
                raise self._too_big(out.nbytes)
            np.ndarray(out.shape, np.uint8, buffer=self.out_shm.buf)[...] = out
        return tuple(int(s) for s in out.shape), segment

    def _out_view(self, images: Any, size: tuple[int, int] | None, segment: tuple[str, bytes] | None
                  ) -> tuple[np.ndarray | None, str | None]:
        """The output slot (or the client's `segment`, when usable) as an array of the batch's
        output shape, when it is known up front: the engine then writes the pixels straight into
        shared memory."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            h, w = size or images.shape[1:3]
            shape = (images.shape[0], h, w, images.shape[3])
        elif size is not None and len(images) and getattr(images[0], "ndim", 0) == 3:
            shape = (len(images), size[0], size[1], images[0].shape[2])
        else:
            return None, None
        nbytes = shape[0] * shape[1] * shape[2] * shape[3]
        if nbytes > self.config.slot_bytes:
            raise self._too_big(nbytes)
        shm = self.client_segment(segment[0], segment[1], nbytes) if segment else None
        if shm is not None and segment is not None:
            from .shm import client_pixels

            return client_pixels(shm, shape), segment[0]
        return np.ndarray(shape, np.uint8, buffer=self.out_shm.buf), None

    def _too_big(self, nbytes: int) -> errors.LimitExceededError:
        return errors.LimitExceededError(
            f"the augmented batch would be {nbytes} bytes; the limit (max_batch_bytes) is "
            f"{self.config.slot_bytes}; ask for fewer or smaller images")


def worker_main(config: WorkerConfig, conn: Connection) -> None:
    """Entry point of a worker process."""
    os.environ.update(config.env)  # before anything imports albumentations
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    import cv2

    cv2.setNumThreads(0)  # one worker per core already; OpenCV's own threads would oversubscribe
    try:
        worker = _Worker(config)
    except Exception as exc:
        log.exception("worker %d failed to start", config.index)
        conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            while not conn.poll(_IDLE_RELEASE_S):
                worker.drop_unlinked_segments(everything=True)
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg[0] == "stop":
            return
        try:
            reply: tuple[Any, ...] = ("ok", *worker.run(msg[0], msg[1]))
        except errors.AugsvcError as exc:
            reply = ("err", type(exc).__name__, str(exc))
        except Exception as exc:
            log.exception("worker %d: internal error", config.index)
            reply = ("err", "internal", f"internal error in worker {config.index}: {type(exc).__name__}")
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
    if not msg or msg[0] != "ready":
        why = msg[1] if msg else f"it exited or sent no ready message within {timeout_s}s"
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
