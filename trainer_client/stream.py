"""AugmentedStream: a torch IterableDataset over augsvc that delivers each batch of the epoch
plan exactly once, in plan order, whatever happens to the servers (DESIGN contract 2).

How: the client computes the same plan as the servers (`augsvc.epoch_batches`). This rank's batch
indices are cut into small chunks; one fetch thread per stream takes the next chunk that lies
inside the prefetch window and asks an endpoint for it (StreamBatches for server-side datasets,
AugmentStream for data the client owns). Batches land in a table keyed by index, so a duplicate
is dropped; when a call fails with a retryable code, the chunk's missing batches go back to the
front of the queue for any healthy endpoint, and the failed endpoint backs off. The consumer
yields indices in order. A batch is an idempotent unit of work: any server produces the same
bytes for batch k of epoch e. A status that is not retryable, or a batch asked for more than
`max_attempts` times, ends the pass with `StreamError` (augsvc.errors), whose cause is the
augsvc error for that status.

Shared memory: with a server on this host (a unix socket or loopback target), each StreamBatches
call offers one shared-memory segment per batch (`_Segments`); the workers write the augmented
pixels straight into them and the gRPC stream carries only labels, ids and shapes. The delivered
tensor is a view of its segment, which goes back to the pool when the tensor is freed. Any batch a
server cannot put there (another host, no access) arrives inline, so the result is the same.

Images are delivered as [N, C, H, W] tensors in torch.channels_last memory format: a view of the
NHWC pixels, which is what a CNN wants anyway (channels_last=False gives contiguous NCHW, at the
cost of one transposing copy per batch).
"""

from __future__ import annotations

import math
import queue
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import grpc
import numpy as np
import torch
from torch.utils.data import IterableDataset

from augsvc.errors import AugsvcError, LimitExceededError, StreamError
from augsvc.plan import epoch_batches
from augsvc.security import is_local_address
from augsvc.shm import CLIENT_HEADER_BYTES, client_pixels, create_client_segment, release_segment
from augsvc.spec import load_spec
from augsvc.tensors import encode_tensor
from augsvc.v1 import augment_pb2 as pb

from .client import RETRYABLE, AugmentClient, DatasetInfo, status_error

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


#: What the default prefetch may hold: as many batches as fit, between 4 and 32.
PREFETCH_BYTES = 256 << 20


def default_prefetch(batch_bytes: int | None) -> int:
    """Batches a stream keeps ahead of its consumer by default. Small batches want many: calls of
    several batches spread a call's cost, and the fetch threads never wait on the consumer. Large
    ones are bounded by memory (`PREFETCH_BYTES`). Unknown sizes get 8."""
    if not batch_bytes:
        return 8
    return max(4, min(32, PREFETCH_BYTES // batch_bytes))


def _to_torch(images: np.ndarray, labels: Any, ids: Any, *, channels_last: bool, owned: bool = False) -> Batch:
    """NHWC uint8 pixels as an [N, C, H, W] tensor: a channels_last view of `images` when they are
    `owned` (writable, ours to keep), of a copy otherwise; or a contiguous NCHW copy."""
    if channels_last:
        nhwc = images if owned else images.copy()
        tensor = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
    else:
        tensor = torch.from_numpy(images.transpose(0, 3, 1, 2).copy(order="C"))
    return (tensor, torch.as_tensor(np.asarray(labels, np.int64)), torch.as_tensor(np.asarray(ids, np.int64)))


@dataclass(frozen=True)
class _Segment:
    """One of this client's segments and the token in its header (`augsvc.shm`)."""

    shm: SharedMemory
    token: bytes

    @property
    def name(self) -> str:
        return self.shm.name

    def offer(self) -> pb.ShmSegment:
        return pb.ShmSegment(name=self.shm.name, token=self.token)


class _Segments:
    """Shared-memory segments for `nbytes` of pixels that this client offers a server on its
    host, one per batch of a call. A segment is free, offered to a call, or owned by a delivered
    batch (until its tensor is freed). A segment offered to a call that failed may still be
    written by a worker that was mid-batch, so it is never reused: `discard` unlinks it.

    Segments come back from garbage collection (a freed batch): that path only puts them on a
    SimpleQueue (safe in GC callbacks, unlike the lock), and `acquire` takes them from there."""

    def __init__(self, nbytes: int, keep: int) -> None:
        self.nbytes, self.keep = nbytes, keep
        self._free: list[_Segment] = []
        self._returned: queue.SimpleQueue[_Segment] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False

    def _take_returned(self) -> list[_Segment]:
        """Move returned segments to the free list (under the lock); the surplus to discard."""
        surplus: list[_Segment] = []
        while True:
            try:
                seg = self._returned.get_nowait()
            except queue.Empty:
                return surplus
            (self._free if not self._closed and len(self._free) < self.keep else surplus).append(seg)

    def acquire(self, count: int) -> list[_Segment]:
        """`count` segments; LimitExceededError (with none taken) when /dev/shm is full."""
        with self._lock:
            surplus = self._take_returned()
            taken = [self._free.pop() for _ in range(min(count, len(self._free)))]
        for seg in surplus:
            self.discard(seg)
        try:
            while len(taken) < count:
                taken.append(_Segment(*create_client_segment(self.nbytes)))
        except Exception:
            for seg in taken:
                self.release(seg)
            raise
        return taken

    def release(self, seg: _Segment) -> None:
        """Give a segment back (any thread, or a GC callback)."""
        if self._closed:
            self.discard(seg)
        else:
            self._returned.put(seg)

    @staticmethod
    def discard(seg: _Segment) -> None:
        release_segment(seg.shm, unlink=True)

    def view(self, seg: _Segment, shape: tuple[int, ...]) -> np.ndarray:
        """A writable array of the pixels in `seg` that gives the segment back when it is freed."""
        array = client_pixels(seg.shm, shape)
        done = weakref.finalize(array, self.release, seg)
        done.atexit = False  # at exit the resource tracker unlinks; never unmap under a live array
        return array

    def close(self) -> None:
        with self._lock:
            self._closed = True
            free, self._free = self._free + self._take_returned(), []
        for seg in free:
            self.discard(seg)


class AugmentedStream(IterableDataset[Batch]):
    """Augmented batches `(images uint8 [N,C,H,W], labels int64 [N], sample_ids int64 [N])`.

    dataset: a dataset name served by the endpoints. sample_ids: the epoch's population (a split
    or subset); None means the whole dataset. Rank r of world_size R gets batches k % R == r.
    prefetch: batches kept in flight or ready ahead of the consumer (memory is bounded by it); None
    means `default_prefetch` of the batch's size.
    shared_memory: receive pixels through shared memory (see the module docstring); None means
    when every endpoint is a unix socket or loopback address. channels_last: images are
    channels_last views of the received pixels (default) or contiguous NCHW copies.
    strength: the augmentation magnitude in [0, 1] (None: the spec's own); class_strength: one
    more multiplier per class of the dataset (a sample's magnitude is strength * class_strength
    of its label). Both are per-epoch state: `set_epoch(e, strength=...)` changes them for the
    next pass, and no batch of that pass is made with the old values.
    """

    def __init__(self, client: AugmentClient, dataset: str | None, spec: Any, *, batch_size: int, seed: int,
                 epoch: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, prefetch: int | None = None,
                 sample_ids: Any = None, drop_last: bool = False, backend: str = "fused",
                 streams: int | None = None, chunk: int | None = None, timeout: float = 120.0,
                 max_attempts: int = 10, shared_memory: bool | None = None, channels_last: bool = True,
                 strength: float | None = None, class_strength: Sequence[float] | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} is not allowed; expected >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank/world_size: rank {rank} of {world_size} is not allowed; "
                             "expected 0 <= rank < world_size")
        if prefetch is not None and prefetch < 1:
            raise ValueError(f"prefetch: {prefetch} is not allowed; expected >= 1")
        self.client = client
        self.dataset = dataset
        self.spec = load_spec(spec)
        self.class_strength: tuple[float, ...] | None = None
        self._set_strength(strength, class_strength)
        self.batch_size, self.seed, self.epoch, self.shuffle = batch_size, seed, epoch, shuffle
        self.rank, self.world_size = rank, world_size
        self.drop_last, self.backend, self.timeout, self.max_attempts = drop_last, backend, timeout, max_attempts
        self.streams = streams or max(2, client.num_endpoints)
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None
        self._dataset_info: DatasetInfo | None = client.dataset_info(dataset) if dataset is not None else None
        # The whole dataset goes on the wire as no ids at all (the request's default).
        self._whole_dataset = False
        if sample_ids is None and self._dataset_info is not None:
            self._whole_dataset = True
            self.population: np.ndarray = np.arange(self._dataset_info.num_samples)
        else:
            self.population = np.asarray(sample_ids, np.int64)
        self._set_prefetch(prefetch, chunk)
        self._request_head = b""  # set by __iter__: the epoch-constant part of its requests
        self.position = 0  # batches of this rank already yielded in `self.epoch`
        self.channels_last = channels_last
        if shared_memory is None:
            shared_memory = all(is_local_address(t) for t in client.targets)
        self.shared_memory = shared_memory and dataset is not None
        self._segments: _Segments | None = None
        self._segments_lock = threading.Lock()
        self._inline_endpoints: set[int] = set()  # endpoints that wrote no segment of a finished call
        #: How the batches of this stream arrived so far: {"shared_memory": n, "inline": m}.
        self.received = {"shared_memory": 0, "inline": 0}
        self._received_lock = threading.Lock()

    @classmethod
    def from_arrays(cls, client: AugmentClient, images: np.ndarray, labels: Sequence[int] | np.ndarray,
                    spec: Any, **kwargs: Any) -> AugmentedStream:
        """The same guarantees for data the client owns: `images` (N,H,W,C) uint8 are sent through
        AugmentStream; sample id i is row i (pass sample_ids= to restrict the population)."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images: {images.dtype} {images.shape} is not a uint8 (N, H, W, C) array")
        kwargs.setdefault("sample_ids", np.arange(len(images)))
        stream = cls(client, None, spec, **kwargs)
        stream._arrays = (images, np.asarray(labels, np.int64))
        stream._set_prefetch(kwargs.get("prefetch"), kwargs.get("chunk"))  # now that the batch size is known
        return stream

    def _batch_shape(self) -> tuple[int, int, int] | None:
        """(H, W, C) of this stream's output images, where the dataset or arrays and the spec fix it."""
        if self._arrays is not None:
            shape = [int(d) for d in self._arrays[0].shape[1:]]
        else:
            shape = list(self._dataset_info.image_shape or ()) if self._dataset_info is not None else []
        size = self.spec.output_size_for((shape[0], shape[1]) if len(shape) == 3 else None)
        if size is None:
            return None
        return size[0], size[1], shape[2] if len(shape) == 3 else 3

    def _set_prefetch(self, prefetch: int | None, chunk: int | None) -> None:
        shape = self._batch_shape()
        self.prefetch = prefetch or default_prefetch(self.batch_size * math.prod(shape) if shape else None)
        # Batches per call: fewer, longer calls cost less per batch; every stream keeps one call going.
        self.chunk = chunk or max(1, min(8, self.prefetch // self.streams))

    # -- epoch and resume ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int, *, strength: float | None = None,
                  class_strength: Sequence[float] | None = None) -> None:
        """Move to the start of `epoch` (a new permutation when shuffling); a `strength` or
        `class_strength` given applies from this epoch on."""
        self.epoch, self.position = epoch, 0
        self._set_strength(strength, class_strength)

    @property
    def strength(self) -> float:
        """The global augmentation magnitude of the next pass."""
        return self.spec.strength

    def _set_strength(self, strength: float | None, class_strength: Sequence[float] | None) -> None:
        if strength is not None and strength != self.spec.strength:
            self.spec = self.spec.with_strength(float(strength))
        if class_strength is not None:
            if self.dataset is None:
                raise ValueError("class_strength: streams of the client's own arrays have no per-class strength")
            values = tuple(float(v) for v in class_strength)
            if any(not 0.0 <= v <= 1.0 for v in values):
                raise ValueError(f"class_strength: {list(values)} is not allowed; expected values in [0, 1]")
            self.class_strength = values

    def plan(self) -> list[np.ndarray]:
        """This epoch's batches of sample ids, every rank's (`augsvc.epoch_batches`)."""
        return epoch_batches(self.population, self.batch_size, seed=self.seed, epoch=self.epoch,
                             shuffle=self.shuffle, drop_last=self.drop_last)

    def _indices(self) -> list[int]:
        return list(range(self.rank, len(self.plan()), self.world_size))

    def __len__(self) -> int:
        """Batches this rank gets per epoch."""
        return len(self._indices())

    def state_dict(self) -> dict[str, Any]:
        """Where this stream is (epoch, batches of it already yielded) and what it streams, to resume from."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size,
                "spec": self.spec.identity, "strength": self.spec.strength,
                "class_strength": None if self.class_strength is None else list(self.class_strength)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a `state_dict()`'s epoch, position and strength; ValueError if it belongs to
        another stream (the spec is compared without its strength, which is state)."""
        for key in ("seed", "batch_size", "rank", "world_size", "spec"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"state_dict: {key} {state[key]!r} does not match this stream's {mine!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._set_strength(state.get("strength"), state.get("class_strength"))

    # -- shared memory -------------------------------------------------------------------------------
    def _segment_pool(self) -> _Segments | None:
        """The segment pool, sized for one batch of this dataset and spec (None: sizes unknown).
        Made once, before the fetch threads start (`__iter__`)."""
        if not self.shared_memory or self.dataset is None:
            return None
        with self._segments_lock:
            if self._segments is None:
                shape = self._batch_shape()
                if shape is None:
                    self.shared_memory = False
                    return None
                nbytes = self.batch_size * math.prod(shape)
                # Enough to keep every call's segments, the prefetched batches and a few held by the
                # consumer without creating new ones each epoch.
                self._segments = _Segments(nbytes, keep=self.streams * self.chunk + self.prefetch + 4)
                weakref.finalize(self, self._segments.close)
            return self._segments

    def _stop_shared_memory(self, why: str) -> None:
        warnings.warn(f"augsvc: {why}; receiving batches inline", ResourceWarning, stacklevel=3)
        self.shared_memory = False
        with self._segments_lock:
            segments = self._segments
        if segments is not None:
            segments.close()

    def _from_segment(self, segments: _Segments, seg: _Segment, msg: pb.Batch) -> Batch:
        shape = tuple(int(d) for d in msg.images.shape)
        if len(shape) != 4 or msg.images.dtype != "uint8" or \
                CLIENT_HEADER_BYTES + math.prod(shape) > seg.shm.size:
            segments.discard(seg)
            raise StreamError(f"batch {msg.batch_index}: shape {list(shape)} {msg.images.dtype!r} does not fit "
                              f"the {seg.shm.size}-byte segment it was written to")
        if self.channels_last:
            return _to_torch(segments.view(seg, shape), msg.labels, msg.sample_ids, channels_last=True, owned=True)
        try:
            return _to_torch(client_pixels(seg.shm, shape), msg.labels, msg.sample_ids, channels_last=False)
        finally:
            segments.release(seg)

    def _epoch_request_head(self) -> bytes:
        """The part of this pass's StreamBatchesRequests that is the same for every call (spec,
        population: up to megabytes), serialized once; a whole dataset goes as no ids at all."""
        head = pb.StreamBatchesRequest(
            dataset=self.dataset, spec=self.spec.to_proto(), seed=self.seed, epoch=self.epoch,
            batch_size=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last, backend=self.backend,
            sample_ids=[] if self._whole_dataset else self.population.tolist(),
            class_strength=list(self.class_strength or ()))
        data: bytes = head.SerializeToString()
        return data

    def _stream_request(self, chunk: list[int], segments: list[_Segment]) -> bytes:
        """StreamBatchesRequest bytes for `chunk`: the pass's head and this call's fields; protobuf
        reads the two concatenated parts as one message (they share no field)."""
        tail = pb.StreamBatchesRequest(start=chunk[0], end=chunk[-1] + 1, stride=self.world_size,
                                       shm_segments=[seg.offer() for seg in segments])
        data: bytes = self._request_head + tail.SerializeToString()
        return data

    def _count(self, how: str) -> None:
        with self._received_lock:
            self.received[how] += 1

    # -- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan()
        indices = self._indices()[self.position:]
        if self._arrays is None:
            self._request_head = self._epoch_request_head()
            self._segment_pool()
        fetcher = _Fetcher(self, plan, indices)
        try:
            for k in indices:
                batch = fetcher.take(k)
                self.position += 1
                yield batch
            self.position = 0  # the epoch is complete; set_epoch() moves to the next
        finally:
            fetcher.stop()

    # -- one chunk from one endpoint -----------------------------------------------------------------
    def _fetch(self, endpoint: int, chunk: list[int], plan: list[np.ndarray],
               deliver: Any, calls: list[Any]) -> None:
        if self._arrays is None:
            segments = self._segment_pool() if endpoint not in self._inline_endpoints else None
            offered: dict[str, _Segment] = {}
            if segments is not None:
                try:
                    offered = {seg.name: seg for seg in segments.acquire(len(chunk))}
                except (LimitExceededError, OSError) as exc:
                    self._stop_shared_memory(f"no shared memory for batches ({exc})")
                    segments = None
            request = self._stream_request(chunk, list(offered.values()))
            completed, written = False, 0
            try:
                call = self.client.stream_batches(endpoint, request, timeout=self.timeout)
                calls.append(call)
                try:
                    for msg, pixels in call:
                        k = int(msg.batch_index)
                        if not np.array_equal(np.asarray(msg.sample_ids, np.int64), plan[k]):
                            raise StreamError(f"batch {k}: the server's epoch plan differs from the client's")
                        if pixels is not None:
                            self._count("inline")
                            deliver(k, _to_torch(pixels, msg.labels, msg.sample_ids,
                                                 channels_last=self.channels_last))
                            continue
                        seg = offered.pop(msg.shm_segment, None)
                        if seg is None or segments is None:
                            raise StreamError(f"batch {k}: the server wrote to segment {msg.shm_segment!r}, "
                                              "which this call did not offer")
                        written += 1
                        self._count("shared_memory")
                        deliver(k, self._from_segment(segments, seg, msg))
                finally:
                    calls.remove(call)  # only live calls are kept (for cancelling), not one per chunk
                completed = True
            finally:
                for seg in offered.values():  # not written (inline replies) if the call completed
                    if completed and segments is not None:
                        segments.release(seg)
                    else:
                        _Segments.discard(seg)
            if offered and not written:  # this server cannot reach our segments: stop offering them
                self._inline_endpoints.add(endpoint)
            return
        images, labels = self._arrays
        spec_msg = self.spec.to_proto()

        def requests() -> Iterator[pb.AugmentRequest]:
            for k in chunk:
                ids = plan[k]
                yield pb.AugmentRequest(spec=spec_msg, images=encode_tensor(images[ids]), seed=self.seed,
                                        epoch=self.epoch, sample_ids=ids.tolist(), backend=self.backend, tag=k)

        call = self.client.augment_stream(endpoint, requests(), timeout=self.timeout)
        calls.append(call)
        try:
            for msg, pixels in call:
                k = int(msg.tag)
                self._count("inline")
                deliver(k, _to_torch(pixels, labels[plan[k]], plan[k], channels_last=self.channels_last))
        finally:
            calls.remove(call)


def _fatal(exc: Exception, pending: list[int]) -> StreamError:
    """The StreamError that ends a pass: "batches [...]: CODE: details" for a failed call, whose
    status it keeps (`code()`), with the augsvc error for that status as its cause."""
    cause = status_error(exc) if isinstance(exc, grpc.RpcError) else exc
    error = StreamError(f"batches {pending}: {cause}")
    if isinstance(cause, AugsvcError):
        error.status_code_name = cause.status_code_name
    error.__cause__ = cause
    return error


class _Fetcher:
    """Background fetch threads for one pass over `indices` (see the module docstring)."""

    def __init__(self, stream: AugmentedStream, plan: list[np.ndarray], indices: list[int]) -> None:
        self.stream = stream
        self.plan = plan
        self.order = {k: i for i, k in enumerate(indices)}
        size = stream.chunk
        self.queue: deque[list[int]] = deque(indices[i:i + size] for i in range(0, len(indices), size))
        self.ready: dict[int, Batch] = {}
        self.attempts: dict[int, int] = {}
        self.consumed = 0
        self.error: BaseException | None = None
        self.stopped = False
        self.cond = threading.Condition()
        self.calls: list[Any] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True, name=f"augsvc-fetch-{i}")
                        for i in range(min(stream.streams, max(1, len(self.queue))))]
        for t in self.threads:
            t.start()

    def take(self, k: int) -> Batch:
        with self.cond:
            while k not in self.ready:
                if self.error is not None:
                    raise self.error
                self.cond.wait(0.5)
            batch = self.ready.pop(k)
            self.consumed += 1
            self.cond.notify_all()
            return batch

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
            calls = list(self.calls)
        for call in calls:
            call.cancel()
        for t in self.threads:
            t.join(timeout=5)

    def _deliver(self, k: int, batch: Batch, *, pending: list[int]) -> None:
        with self.cond:
            if k in pending:
                pending.remove(k)
            if k in self.order and self.order[k] >= self.consumed and k not in self.ready:
                self.ready[k] = batch  # a duplicate (a re-asked batch arriving twice) is dropped
            self.cond.notify_all()

    def _next_chunk(self) -> list[int] | None:
        with self.cond:
            while not self.stopped and self.error is None:
                if not self.queue:
                    return None
                head = self.queue[0]
                if self.order[head[0]] < self.consumed + self.stream.prefetch:
                    return self.queue.popleft()
                self.cond.wait(0.5)  # backpressure: the consumer is behind
            return None

    def _run(self, worker: int) -> None:
        endpoint = worker % self.stream.client.num_endpoints
        backoff = 0.0
        while True:
            chunk = self._next_chunk()
            if chunk is None:
                return
            pending = list(chunk)
            try:
                self.stream._fetch(endpoint, chunk, self.plan, partial(self._deliver, pending=pending),
                                   self.calls)
                if pending:  # the stream ended early without an error status
                    raise StreamError(f"batches {pending} missing from a finished stream")
                backoff = 0.0
            except Exception as exc:  # noqa: BLE001 - classified below
                with self.cond:
                    if self.stopped:
                        exc.__traceback__ = None  # see below
                        return
                    retryable = not isinstance(exc, grpc.RpcError) or exc.code() in RETRYABLE
                    for k in pending:
                        self.attempts[k] = self.attempts.get(k, 0) + 1
                    exhausted = any(self.attempts[k] > self.stream.max_attempts for k in pending)
                    if not retryable or exhausted or isinstance(exc, StreamError) and not pending:
                        self.error = _fatal(exc, pending)
                        self.cond.notify_all()
                        return
                    if pending:
                        self.queue.appendleft(pending)  # any healthy endpoint re-asks for them
                    self.cond.notify_all()
                # A failed call is its own RpcError, and its traceback holds the frame that holds the
                # call: break that cycle, or the stream (and its shared memory) would live until the
                # next garbage collection. (A fatal error becomes StreamError's cause: for a failed
                # call, the augsvc error for its status; any other exception keeps its traceback.)
                exc.__traceback__ = None
                # This endpoint failed: move to the next one and back off before using it again.
                endpoint = (endpoint + 1) % self.stream.client.num_endpoints
                backoff = min(2.0, backoff * 2 or 0.05)
                time.sleep(backoff)
