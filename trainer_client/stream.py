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
call offers one shared-memory segment per batch (`SegmentPool`); the workers write the augmented
pixels straight into them and the gRPC stream carries only labels, ids and shapes. The delivered
tensor is a view of its segment, which goes back to the pool when the tensor is freed. Any batch a
server cannot put there (another host, no access) arrives inline, so the result is the same.

Images are delivered as [N, C, H, W] tensors in torch.channels_last memory format: a view of the
NHWC pixels, which is what a CNN wants anyway (channels_last=False gives contiguous NCHW, at the
cost of one transposing copy per batch).

Several ranks (DESIGN contract 2): rank r of R takes positions k = r, r + R, ... of the epoch's
plan, which is first made a multiple of R long, so every rank gets the same number of batches
and no collective waits on a rank that ran out. remainder="pad" (the default) wraps the plan
the way `DistributedSampler` wraps its indices: position n + j (n: the plan's batches) repeats
batch j. remainder="drop" leaves out the last n % R batches instead. A rank's padding is at most
one batch, its last; `with_mask=True` adds a fourth element to each batch, `real` (bool [N]):
False for the samples of a repeated batch (whose ids are the original's, so ids cannot tell).
The un-padded batches of all ranks together are the epoch, each sample exactly once.

Position and resume: `position` counts the batches of `epoch` this rank's consumer has received
(a generator hands a batch over only when asked for it; what the fetch threads hold ahead is not
counted). After the last batch of epoch e the stream stands at the start of e + 1. `state_dict()`
is that position plus what identifies the stream (dataset, population, shuffle, batch size,
world size, spec identity, seed); `load_state_dict` refuses a state of another stream, naming
what differs. Strength is state, not identity.

DataLoader: `DataLoader(stream, batch_size=None)` (num_workers=0) iterates the stream in the
calling process; the stream does its own prefetching. Worker processes are refused: the stream
holds gRPC channels and threads, which must not cross a fork, and each worker would deliver the
whole epoch.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import grpc
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from augsvc.errors import AugsvcError, LimitExceededError, StreamError
from augsvc.plan import epoch_batches
from augsvc.security import is_local_target
from augsvc.shm import CLIENT_HEADER_BYTES, client_pixels
from augsvc.spec import load_spec
from augsvc.tensors import encode_tensor
from augsvc.v1 import augment_pb2 as pb
from augsvc.validation import check_counter, dataset_indices, population_ids

from .client import RETRYABLE, AugmentClient, DatasetInfo, check_batch_fits, status_error
from .segments import ClientSegment, SegmentPool
from .world import World

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(images uint8 [N, C, H, W], labels int64 [N], sample_ids int64 [N])."""
StreamItem = tuple[torch.Tensor, ...]
"""What a stream yields: a Batch, and `real` (bool [N], False for padding) with `with_mask=True`."""

#: What `state_dict()` writes as "format"; `load_state_dict` reads no other.
STATE_FORMAT = "augsvc.stream/2"
REMAINDERS = ("pad", "drop")

WORKERS_REFUSED = (
    "AugmentedStream in a DataLoader worker process: the stream holds gRPC channels and fetch threads, "
    "which must not cross a fork, and every worker would deliver the whole epoch. Use "
    "DataLoader(stream, batch_size=None, num_workers=0): the stream already fetches batches ahead on its "
    "own threads (prefetch=) and the augmentation runs on the servers' workers.")


#: What the default prefetch may hold: as many batches as fit, between 4 and 32.
PREFETCH_BYTES = 256 << 20
#: The name of every fetch thread starts with this (see train.settle_before_exit).
FETCH_THREAD_PREFIX = "augsvc-fetch-"


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


class AugmentedStream(IterableDataset[StreamItem]):
    """Augmented batches `(images uint8 [N,C,H,W], labels int64 [N], sample_ids int64 [N])`, and
    `real` (bool [N]) as a fourth element with `with_mask=True`.

    dataset: a dataset name served by the endpoints. sample_ids: the epoch's population (a split
    or subset); None means the whole dataset. rank/world_size: None (both) means discovered
    (`World.discover`: the initialised process group, else RANK/WORLD_SIZE, else 0 of 1); rank r
    of R gets positions k % R == r of the plan, made a multiple of R long by `remainder`: "pad"
    (repeat batches from the plan's start, like DistributedSampler) or "drop" (see the module
    docstring). prefetch: batches kept in flight or ready ahead of the consumer (memory is
    bounded by it); None means `default_prefetch` of the batch's size.
    shared_memory: receive pixels through shared memory (see the module docstring); None means
    when every endpoint is a unix socket or loopback address. channels_last: images are
    channels_last views of the received pixels (default) or contiguous NCHW copies.
    strength: the augmentation magnitude in [0, 1] (None: the spec's own); class_strength: one
    more multiplier per class of the dataset (a sample's magnitude is strength * class_strength
    of its label). Both are per-epoch state: `set_epoch(e, strength=...)` changes them for the
    next pass, and no batch of that pass is made with the old values.
    """

    def __init__(self, client: AugmentClient, dataset: str | None, spec: Any, *, batch_size: int, seed: int,
                 epoch: int = 0, shuffle: bool = True, rank: int | None = None, world_size: int | None = None,
                 prefetch: int | None = None, sample_ids: Any = None, drop_last: bool = False,
                 remainder: str = "pad", with_mask: bool = False, backend: str = "fused",
                 streams: int | None = None, chunk: int | None = None, timeout: float = 120.0,
                 max_attempts: int = 10, shared_memory: bool | None = None, channels_last: bool = True,
                 strength: float | None = None, class_strength: Sequence[float] | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} is not allowed; expected >= 1")
        if prefetch is not None and prefetch < 1:
            raise ValueError(f"prefetch: {prefetch} is not allowed; expected >= 1")
        if remainder not in REMAINDERS:
            raise ValueError(f"remainder: {remainder!r} is not allowed; expected one of {REMAINDERS}")
        self.world = World.of(rank, world_size)
        self.client = client
        self.dataset = dataset
        self.spec = load_spec(spec)
        self.class_strength: tuple[float, ...] | None = None
        self._set_strength(strength, class_strength)
        self.batch_size, self.shuffle = batch_size, shuffle
        self.seed, self.epoch = check_counter(seed, "seed"), check_counter(epoch, "epoch")
        self.remainder, self.with_mask = remainder, with_mask
        self.drop_last, self.backend, self.timeout, self.max_attempts = drop_last, backend, timeout, max_attempts
        self.streams = streams or max(2, client.num_endpoints)
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None
        self._dataset_info: DatasetInfo | None = client.dataset_info(dataset) if dataset is not None else None
        if self._dataset_info is not None and self._dataset_info.image_shape is not None:
            # a batch over the server's limit would be refused RESOURCE_EXHAUSTED on every try: say so now
            check_batch_fits(client.server_info(), self.spec, self._dataset_info, batch_size)
        # The whole dataset goes on the wire as no ids at all (the request's default).
        self._whole_dataset = False
        if sample_ids is None and self._dataset_info is not None:
            self._whole_dataset = True
            self.population: np.ndarray = np.arange(self._dataset_info.num_samples)
        elif self._dataset_info is not None:  # checked here, not after a call: the dataset's size is known
            self.population = dataset_indices(sample_ids, self._dataset_info.num_samples)
        else:  # the client's arrays: from_arrays checks them against its rows
            self.population = population_ids(sample_ids)
        self._population_digest = hashlib.sha256(self.population.astype("<i8").tobytes()).hexdigest()
        self._plan_cache: tuple[int, list[np.ndarray]] | None = None
        self._set_prefetch(prefetch, chunk)
        self.position = 0  # batches of `self.epoch` this rank's consumer has received
        self._pass = 0  # bumped whenever the position is set from outside: an older pass stops counting
        self._resuming = False  # load_state_dict set a position inside an epoch; set_epoch keeps it
        self._fetcher: _Fetcher | None = None
        self.channels_last = channels_last
        if shared_memory is None:
            shared_memory = all(is_local_target(t) for t in client.targets)
        self.shared_memory = shared_memory and dataset is not None
        self._segments: SegmentPool | None = None
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
        dataset_indices(kwargs["sample_ids"], len(images))
        stream = cls(client, None, spec, **kwargs)
        stream._arrays = (images, np.asarray(labels, np.int64))
        stream._set_prefetch(kwargs.get("prefetch"), kwargs.get("chunk"))  # now that the batch size is known
        return stream

    @property
    def rank(self) -> int:
        """This stream's rank (`self.world`)."""
        return self.world.rank

    @property
    def world_size(self) -> int:
        """How many ranks share each epoch (`self.world`)."""
        return self.world.world_size

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
        `class_strength` given applies from this epoch on. Right after `load_state_dict` put the
        stream inside `epoch`, it stays there (a loop that calls set_epoch every epoch resumes
        where the checkpoint left off) with the checkpoint's strength."""
        if self._resuming and epoch == self.epoch:
            if (strength is not None and strength != self.spec.strength) or \
                    (class_strength is not None and tuple(class_strength) != self.class_strength):
                warnings.warn(f"set_epoch({epoch}): resuming inside epoch {epoch} with the checkpoint's strength "
                              f"{self.spec.strength}; the strength given applies from the next epoch",
                              stacklevel=2)
            return
        self._resuming = False
        self._pass += 1
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
        """This epoch's batches of sample ids, every rank's (`augsvc.epoch_batches`), unpadded."""
        if self._plan_cache is None or self._plan_cache[0] != self.epoch:
            plan = epoch_batches(self.population, self.batch_size, seed=self.seed, epoch=self.epoch,
                                 shuffle=self.shuffle, drop_last=self.drop_last)
            self._plan_cache = (self.epoch, plan)
        return self._plan_cache[1]

    def _padded_length(self) -> int:
        """Positions in the epoch once made a multiple of world_size long (`remainder`)."""
        n, r = len(self.plan()), self.world_size
        return -(-n // r) * r if self.remainder == "pad" else n // r * r

    def _indices(self) -> list[int]:
        """This rank's positions in the padded plan; position k >= len(plan) repeats batch k % len(plan)."""
        return list(range(self.rank, self._padded_length(), self.world_size))

    def __len__(self) -> int:
        """Batches this rank gets per epoch: the same on every rank."""
        return len(self._indices())

    @property
    def real_batches(self) -> int:
        """How many of this rank's batches per epoch are not padding: the first ones."""
        return len(range(self.rank, len(self.plan()), self.world_size)) if self.remainder == "pad" else len(self)

    def state_dict(self) -> dict[str, Any]:
        """Where this stream is — `epoch` and `position`, the batches of it that this rank's consumer
        has received — its strength, and what identifies it, to resume from. Every rank of a
        world stands at the same position between steps, so one rank's state resumes them all."""
        return {"format": STATE_FORMAT, "epoch": self.epoch, "position": self.position,
                "strength": self.spec.strength,
                "class_strength": None if self.class_strength is None else list(self.class_strength),
                "dataset": self.dataset,
                "population": {"count": len(self.population), "sha256": self._population_digest},
                "shuffle": self.shuffle, "batch_size": self.batch_size, "world_size": self.world_size,
                "spec": self.spec.identity, "seed": self.seed, "drop_last": self.drop_last,
                "remainder": self.remainder, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a `state_dict()`'s epoch, position and strength. ValueError, naming what
        differs, for the state of another stream: another dataset, population, shuffle, batch
        size, world size, spec (compared by `Spec.identity`, without its strength, which is
        state), seed, drop_last or remainder. The rank may differ (see `state_dict`)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"load_state_dict: format {state.get('format')!r} is not an AugmentedStream state "
                             f"({STATE_FORMAT!r})")
        mine = self.state_dict()
        for key, what in (("dataset", "dataset"), ("population", "population (the epoch's sample ids)"),
                          ("shuffle", "shuffle"), ("batch_size", "batch size"), ("world_size", "world size"),
                          ("spec", "spec (its identity, strength aside)"), ("seed", "seed"),
                          ("drop_last", "drop_last"), ("remainder", "remainder")):
            if state.get(key) != mine[key]:
                raise ValueError(f"load_state_dict: another {what} ({key}): the state has {state.get(key)!r}, "
                                 f"this stream {mine[key]!r}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"load_state_dict: position {position} is outside an epoch's 0..{len(self)} batches")
        if position == len(self):  # the end of an epoch is the start of the next
            epoch, position = epoch + 1, 0
        self._resuming = False
        self.set_epoch(epoch, strength=state.get("strength"), class_strength=state.get("class_strength"))
        if state.get("class_strength") is None:  # set_epoch keeps the current vector for None: the state has none
            self.class_strength = None
        self.position = position
        self._resuming = position > 0

    def __getstate__(self) -> Any:
        raise TypeError(WORKERS_REFUSED)

    # -- shared memory -------------------------------------------------------------------------------
    def _segment_pool(self) -> SegmentPool | None:
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
                self._segments = SegmentPool(nbytes, keep=self.streams * self.chunk + self.prefetch + 4)
                weakref.finalize(self, self._segments.close)
            return self._segments

    def _stop_shared_memory(self, why: str) -> None:
        warnings.warn(f"augsvc: {why}; receiving batches inline", ResourceWarning, stacklevel=3)
        self.shared_memory = False
        with self._segments_lock:
            segments = self._segments
        if segments is not None:
            segments.close()

    def _from_segment(self, segments: SegmentPool, seg: ClientSegment, msg: pb.Batch) -> Batch:
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

    def _stream_request(self, head: bytes, chunk: list[int], segments: list[ClientSegment]) -> bytes:
        """StreamBatchesRequest bytes for `chunk`: the pass's head and this call's fields; protobuf
        reads the two concatenated parts as one message (they share no field)."""
        tail = pb.StreamBatchesRequest(start=chunk[0], end=chunk[-1] + 1, stride=self.world_size,
                                       shm_segments=[seg.offer() for seg in segments])
        data: bytes = head + tail.SerializeToString()
        return data

    def _count(self, how: str) -> None:
        with self._received_lock:
            self.received[how] += 1

    # -- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StreamItem]:
        """A pass from the current position to the end of the epoch (RuntimeError in a DataLoader
        worker process: see the module docstring)."""
        if get_worker_info() is not None:
            raise RuntimeError(WORKERS_REFUSED)
        return self._pass_over_epoch()

    def _pass_over_epoch(self) -> Iterator[StreamItem]:
        plan, epoch, positions = self.plan(), self.epoch, self._indices()
        start = min(self.position, len(positions))
        self._resuming = False
        self._pass += 1
        this_pass = self._pass
        # What the pass asks for is fixed when it starts: a set_epoch (another epoch, strength) while
        # an older pass is still open applies to the next pass, never to that one's requests.
        if self._arrays is None:
            head = self._epoch_request_head()
            self._segment_pool()
        else:
            head = self.spec.to_proto().SerializeToString()
        fetcher = _Fetcher(self, epoch, plan, positions[start:], head)
        self._fetcher = fetcher
        try:
            for received, k in enumerate(positions[start:], start + 1):
                batch: StreamItem = fetcher.take(k)
                if self._pass == this_pass:  # set_epoch / load_state_dict since: they set the position
                    self.position = received
                    if received == len(positions):  # the epoch is complete: the next one starts
                        self.epoch, self.position = epoch + 1, 0
                if self.with_mask:
                    batch = (*batch, torch.full((len(batch[2]),), k < len(plan), dtype=torch.bool))
                yield batch
            if not positions and self._pass == this_pass:
                self.epoch, self.position = epoch + 1, 0
        finally:
            fetcher.stop()
            if self._fetcher is fetcher:
                self._fetcher = None

    def close(self) -> None:
        """Stop a pass in progress (its fetch threads and calls) and unlink this stream's
        shared-memory segments; a batch still held keeps its pixels. The stream may be iterated
        again (it makes new segments)."""
        fetcher = self._fetcher
        if fetcher is not None:
            fetcher.stop()
        with self._segments_lock:
            segments, self._segments = self._segments, None
        if segments is not None:
            segments.close()

    def __enter__(self) -> AugmentedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one chunk from one endpoint -----------------------------------------------------------------
    def _fetch(self, endpoint: int, chunk: list[int], fetcher: _Fetcher, deliver: Any) -> None:
        """Ask `endpoint` for the batches at positions `chunk` (all real, or one repeat) and deliver
        them keyed by position."""
        plan, calls = fetcher.plan, fetcher.calls
        source = [k % len(plan) for k in chunk]  # a repeated position asks for the batch it repeats
        position_of = dict(zip(source, chunk, strict=True))
        if self._arrays is None:
            segments = self._segment_pool() if endpoint not in self._inline_endpoints else None
            offered: dict[str, ClientSegment] = {}
            if segments is not None:
                try:
                    offered = {seg.name: seg for seg in segments.acquire(len(chunk))}
                except (LimitExceededError, OSError) as exc:
                    self._stop_shared_memory(f"no shared memory for batches ({exc})")
                    segments = None
            request = self._stream_request(fetcher.head, source, list(offered.values()))
            completed, written, refused = False, 0, False
            try:
                call = self.client.stream_batches(endpoint, request, timeout=self.timeout)
                calls.append(call)
                try:
                    for msg, pixels in call:
                        k = int(msg.batch_index)
                        if not 0 <= k < len(plan) or \
                                not np.array_equal(np.asarray(msg.sample_ids, np.int64), plan[k]):
                            raise StreamError(f"batch {k}: the server's epoch plan differs from the client's")
                        position = position_of.get(k, k)  # a re-asked range may bring batches delivered before
                        if pixels is not None:
                            self._count("inline")
                            deliver(position, _to_torch(pixels, msg.labels, msg.sample_ids,
                                                        channels_last=self.channels_last))
                            continue
                        seg = offered.pop(msg.shm_segment, None)
                        if seg is None or segments is None:
                            raise StreamError(f"batch {k}: the server wrote to segment {msg.shm_segment!r}, "
                                              "which this call did not offer")
                        written += 1
                        self._count("shared_memory")
                        deliver(position, self._from_segment(segments, seg, msg))
                finally:
                    calls.remove(call)  # only live calls are kept (for cancelling), not one per chunk
                completed = True
            except grpc.RpcError as exc:
                # A server of another version may refuse this version's segment names: pixels inline.
                refused = bool(offered) and not written and _refuses_segments(exc)
                if not refused:
                    raise
                exc.__traceback__ = None  # the call's frame: see _Fetcher._run
            finally:
                for seg in offered.values():  # not written (inline replies) if the call completed
                    assert segments is not None  # segments are offered only from a pool
                    if completed:
                        segments.release(seg)
                    else:
                        segments.discard(seg)
            if offered and not written:  # this server cannot reach our segments: stop offering them
                self._inline_endpoints.add(endpoint)
            if refused and not fetcher.stopped:
                warnings.warn(f"augsvc: endpoint {endpoint} refused this client's shared-memory segments (a server "
                              "of another version?); receiving its batches inline", ResourceWarning, stacklevel=2)
                self._fetch(endpoint, chunk, fetcher, deliver)
            return
        images, labels = self._arrays
        spec_msg = pb.Pipeline.FromString(fetcher.head)  # the pass's spec, whatever set_epoch did since

        def requests() -> Iterator[pb.AugmentRequest]:
            for k, src in zip(chunk, source, strict=True):
                ids = plan[src]
                yield pb.AugmentRequest(spec=spec_msg, images=encode_tensor(images[ids]), seed=self.seed,
                                        epoch=fetcher.epoch, sample_ids=ids.tolist(), backend=self.backend, tag=k)

        call = self.client.augment_stream(endpoint, requests(), timeout=self.timeout)
        calls.append(call)
        try:
            for msg, pixels in call:
                k = int(msg.tag)
                ids = plan[k % len(plan)]
                self._count("inline")
                deliver(k, _to_torch(pixels, labels[ids], ids, channels_last=self.channels_last))
        finally:
            calls.remove(call)


_REFUSED_SEGMENT = re.compile(r"shm_segments\[\d+\]\.(name|token): ")


def _refuses_segments(exc: grpc.RpcError) -> bool:
    """True when a call failed because the server refused a segment's name or token form (a server
    of another version); other segment errors (their count, a name twice) are this client's bugs."""
    return exc.code() == grpc.StatusCode.INVALID_ARGUMENT and _REFUSED_SEGMENT.match(exc.details() or "") is not None


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
    """Background fetch threads for one pass over positions `indices` of `epoch` (see the module
    docstring). A chunk is real positions, or one repeated position alone."""

    def __init__(self, stream: AugmentedStream, epoch: int, plan: list[np.ndarray], indices: list[int],
                 head: bytes) -> None:
        self.stream = stream
        self.epoch = epoch
        #: the pass's fixed request part: a StreamBatchesRequest head (dataset), or the spec (arrays)
        self.head = head
        self.plan = plan
        self.order = {k: i for i, k in enumerate(indices)}
        size = stream.chunk
        real = [k for k in indices if k < len(plan)]
        self.queue: deque[list[int]] = deque(real[i:i + size] for i in range(0, len(real), size))
        self.queue.extend([k] for k in indices if k >= len(plan))
        self.ready: dict[int, Batch] = {}
        self.attempts: dict[int, int] = {}
        self.consumed = 0
        self.error: BaseException | None = None
        self.stopped = False
        self.cond = threading.Condition()
        self.calls: list[Any] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True, name=f"{FETCH_THREAD_PREFIX}{i}")
                        for i in range(min(stream.streams, max(1, len(self.queue))))]
        for t in self.threads:
            t.start()

    def take(self, k: int) -> Batch:
        with self.cond:
            while k not in self.ready:
                if self.error is not None:
                    raise self.error
                if self.stopped:
                    raise StreamError("the stream was closed during its pass")
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
                self.stream._fetch(endpoint, chunk, self, partial(self._deliver, pending=pending))
                if pending:  # the stream ended early without an error status
                    raise StreamError(f"batches {pending} missing from a finished stream")
                backoff = 0.0
            except Exception as exc:  # noqa: BLE001 - classified below
                with self.cond:
                    if self.stopped:
                        exc.__traceback__ = None  # see below
                        return
                    # a failed call with a status worth another try, or a stream that broke off (its
                    # batches missing, a bad segment); anything else (a closed channel, a bug) ends the pass
                    retryable = isinstance(exc, StreamError) or \
                        isinstance(exc, grpc.RpcError) and exc.code() in RETRYABLE
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
