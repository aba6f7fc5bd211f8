"""The client's shared-memory segments for the same-host reply path: one per batch of a call,
offered to a server on this host, which writes the augmented pixels into it (augsvc.shm makes
and releases them; this module keeps them: free, offered, or under a delivered batch)."""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from augsvc.errors import StreamError
from augsvc.shm import client_pixels, create_client_segment, release_segment
from augsvc.v1 import augment_pb2 as pb

__all__ = ["ClientSegment", "SegmentPool"]


@dataclass(frozen=True)
class ClientSegment:
    """One of this client's segments and the token in its header (`augsvc.shm`)."""

    shm: SharedMemory
    token: bytes

    @property
    def name(self) -> str:
        return self.shm.name

    def offer(self) -> pb.ShmSegment:
        return pb.ShmSegment(name=self.shm.name, token=self.token)


class SegmentPool:
    """Shared-memory segments for `nbytes` of pixels that this client offers a server on its
    host, one per batch of a call. A segment is free, offered to a call, or owned by a delivered
    batch (until its tensor is freed). A segment offered to a call that failed may still be
    written by a worker that was mid-batch, so it is never reused: `discard` unlinks it.

    Segments come back from garbage collection (a freed batch): that path only puts them on a
    SimpleQueue (safe in GC callbacks, unlike the lock), and `acquire` takes them from there.

    Every segment made here and not yet discarded is kept in `_owned`, whatever its state, so
    that `close()` (also run at interpreter exit) unlinks all of them: a batch still referenced
    when the script ends keeps its mapping, but its name is gone and the resource tracker has
    nothing left to warn about."""

    def __init__(self, nbytes: int, keep: int) -> None:
        self.nbytes, self.keep = nbytes, keep
        self._free: list[ClientSegment] = []
        self._owned: dict[str, ClientSegment] = {}
        self._returned: queue.SimpleQueue[ClientSegment] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False

    def _take_returned(self) -> list[ClientSegment]:
        """Move returned segments to the free list (under the lock); the surplus to discard."""
        surplus: list[ClientSegment] = []
        while True:
            try:
                seg = self._returned.get_nowait()
            except queue.Empty:
                return surplus
            (self._free if not self._closed and len(self._free) < self.keep else surplus).append(seg)

    def acquire(self, count: int) -> list[ClientSegment]:
        """`count` segments; LimitExceededError (with none taken) when /dev/shm is full,
        StreamError once closed."""
        with self._lock:
            surplus = self._take_returned()
            taken = [self._free.pop() for _ in range(min(count, len(self._free)))]
        for seg in surplus:
            self.discard(seg)
        try:
            while len(taken) < count:
                seg = ClientSegment(*create_client_segment(self.nbytes))
                with self._lock:
                    closed = self._closed
                    if not closed:
                        self._owned[seg.name] = seg
                if closed:
                    self.discard(seg)
                    raise StreamError("the stream's shared memory was closed")
                taken.append(seg)
        except Exception:
            for seg in taken:
                self.release(seg)
            raise
        return taken

    def release(self, seg: ClientSegment) -> None:
        """Give a segment back (any thread, or a GC callback)."""
        if self._closed:
            self.discard(seg)
        else:
            self._returned.put(seg)

    def discard(self, seg: ClientSegment) -> None:
        """Unlink a segment and unmap it (unless a live array still views it)."""
        self._owned.pop(seg.name, None)
        release_segment(seg.shm, unlink=True)

    def view(self, seg: ClientSegment, shape: tuple[int, ...]) -> np.ndarray:
        """A writable array of the pixels in `seg` that gives the segment back when it is freed."""
        array = client_pixels(seg.shm, shape)
        done = weakref.finalize(array, self.release, seg)
        done.atexit = False  # at exit close() unlinks it; never unmap under a live array
        return array

    def close(self) -> None:
        """Unlink every segment this pool made. Free ones are unmapped too; one offered to a call
        or under a delivered batch keeps its mapping (numpy holds no buffer export that would stop
        an unmap under a live tensor) until it comes back, when `discard` unmaps it."""
        with self._lock:
            self._closed = True
            idle = self._free + self._take_returned()
            self._free = []
            idle_names = {seg.name for seg in idle}
            busy = [seg for name, seg in self._owned.items() if name not in idle_names]
            self._owned = {}
        for seg in idle:
            release_segment(seg.shm, unlink=True)
        for seg in busy:
            with contextlib.suppress(FileNotFoundError):
                seg.shm.unlink()  # the name (and the resource tracker's entry) only
