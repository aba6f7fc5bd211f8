"""The Augmenter servicer: thin methods over the worker pool (DESIGN contracts 2-5).

Each method decodes and validates its message, hands the work to the pool, and builds the reply;
errors from the package's exception tree become status codes in one place (`_status_of`). Replies
that carry pixels are pre-serialized bytes (`augsvc.wire`), so the methods are registered with
`add_augmenter_servicer` instead of the generated helper.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from . import __version__
from .calls import MalformedRequest, PlanCache, StreamBatchesCall, parse_stream_batches, parser, spec_of
from .datasets import Dataset, check_sample_ids
from .engine import BACKENDS
from .errors import (
    AugsvcError,
    CancelledError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    grpc_status,
)
from .metrics import ServerMetrics
from .plan import epoch_permutation, num_batches
from .pool import WorkerPool
from .security import is_local_peer
from .shm import CLIENT_SEGMENT_PREFIX, CLIENT_TOKEN_BYTES, is_client_segment
from .spec import Spec
from .tensors import decode_tensor
from .v1 import augment_pb2 as pb
from .v1 import augment_pb2_grpc as pb_grpc
from .wire import augment_response_bytes, batch_bytes, batch_shm_bytes, serialize

if TYPE_CHECKING:
    from .server import ServerSettings

__all__ = ["SERVICE_NAME", "AugmenterServicer", "add_augmenter_servicer"]

log = logging.getLogger("augsvc.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Augmenter"].full_name
T = TypeVar("T")


def _wait(fut: futures.Future[T], context: grpc.ServicerContext) -> T:
    """The future's result, giving up (and cancelling queued work) if the caller goes away."""
    while True:
        try:
            return fut.result(timeout=0.2)
        except futures.TimeoutError:
            if not context.is_active():
                fut.cancel()
                raise CancelledError("the call was cancelled or its deadline passed") from None


def _batch_reply(epoch: int, index: int, ids: np.ndarray, images: np.ndarray, labels: np.ndarray | None,
                 segment: str | None) -> tuple[int, bytes]:
    """Runs in the pool's feeder thread on the worker's output slot: one copy of the pixels, or
    none when the worker wrote them into the client's shared-memory segment."""
    label_list = [] if labels is None else labels.tolist()
    if segment is not None:
        return len(images), batch_shm_bytes(epoch=epoch, batch_index=index, shape=images.shape, labels=label_list,
                                            sample_ids=ids.tolist(), segment=segment)
    return len(images), batch_bytes(epoch=epoch, batch_index=index, images=images, labels=label_list,
                                    sample_ids=ids.tolist())


def _augment_reply(ids: Any, tag: int, images: np.ndarray, _labels: np.ndarray | None, _segment: str | None
                   ) -> tuple[int, bytes]:
    return len(images), augment_response_bytes(images=images, sample_ids=ids, tag=tag)


def add_augmenter_servicer(servicer: AugmenterServicer, server: grpc.Server) -> None:
    """Like the generated add_AugmenterServicer_to_server, but replies may be pre-serialized bytes."""
    methods = {
        "Augment": grpc.unary_unary_rpc_method_handler(
            servicer.Augment, request_deserializer=parser(pb.AugmentRequest), response_serializer=serialize),
        "AugmentStream": grpc.stream_stream_rpc_method_handler(
            servicer.AugmentStream, request_deserializer=parser(pb.AugmentRequest),
            response_serializer=serialize),
        "StreamBatches": grpc.unary_stream_rpc_method_handler(
            servicer.StreamBatches, request_deserializer=parse_stream_batches,
            response_serializer=serialize),
        "ListDatasets": grpc.unary_unary_rpc_method_handler(
            servicer.ListDatasets, request_deserializer=parser(pb.ListDatasetsRequest),
            response_serializer=serialize),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerInfo, request_deserializer=parser(pb.ServerInfoRequest),
            response_serializer=serialize),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, methods),))


def _backend(name: str) -> str:
    name = name or "fused"
    if name not in BACKENDS:
        raise InvalidInputError(f"backend: {name!r} is not allowed; allowed: {', '.join(BACKENDS)}")
    return name


def _refuse_malformed(request: Any) -> None:
    """Request bytes that did not parse (`calls.MalformedRequest`) are INVALID_ARGUMENT."""
    if isinstance(request, MalformedRequest):
        raise request.error()


class AugmenterServicer(pb_grpc.AugmenterServicer):
    def __init__(self, pool: WorkerPool, datasets: dict[str, Dataset], settings: ServerSettings,
                 metrics: ServerMetrics) -> None:
        self._pool = pool
        self._datasets = datasets
        self._settings = settings
        self._metrics = metrics
        # Two jobs per worker: each worker has its next batch queued while the last is being sent.
        self._window = 2 * pool.worker_count
        self._plans = PlanCache()

    # -- one place for errors and metrics --------------------------------------------------------
    def _status_of(self, method: str, exc: BaseException, context: grpc.ServicerContext) -> None:
        code, message = grpc_status(exc)
        if not isinstance(exc, AugsvcError):
            log.exception("internal error in %s", method)
        self._metrics.errors.labels(method, code.name).inc()
        context.abort(code, message)

    def _guard(self, method: str, context: grpc.ServicerContext, body: Callable[[], T]) -> T:
        self._metrics.inflight.inc()
        try:
            return body()
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never raised into gRPC
            self._status_of(method, exc, context)
            raise  # pragma: no cover - abort raises
        finally:
            self._metrics.inflight.dec()

    def _guard_stream(self, method: str, context: grpc.ServicerContext, body: Iterator[T]) -> Iterator[T]:
        self._metrics.inflight.inc()
        try:
            yield from body
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, grpc.RpcError) or isinstance(exc, CancelledError) and not context.is_active():
                return
            self._status_of(method, exc, context)
        finally:
            self._metrics.inflight.dec()

    def _observe(self, method: str, images: int, started: float) -> None:
        self._metrics.images.labels(method).inc(images)
        self._metrics.batches.labels(method).inc()
        self._metrics.latency.labels(method).observe(time.perf_counter() - started)

    # -- Augment / AugmentStream -----------------------------------------------------------------
    def _submit_augment(self, request: pb.AugmentRequest) -> futures.Future[tuple[int, bytes]]:
        _refuse_malformed(request)
        spec = spec_of(request.spec)
        backend = _backend(request.backend)
        images: Any
        if request.encoded_images:
            if request.HasField("images") and request.images.data:
                raise InvalidInputError("images: send either images or encoded_images, not both")
            images = list(request.encoded_images)
        else:
            images = decode_tensor(request.images, max_side=self._settings.max_image_side,
                                   max_bytes=self._settings.max_batch_bytes)
        return self._pool.submit_augment(images, spec.to_bytes(), seed=request.seed, epoch=request.epoch,
                                         sample_ids=np.array(request.sample_ids, np.uint64), backend=backend,
                                         finish=partial(_augment_reply, request.sample_ids, request.tag))

    def Augment(self, request: pb.AugmentRequest, context: grpc.ServicerContext) -> pb.AugmentResponse:
        def body() -> pb.AugmentResponse:
            started = time.perf_counter()
            count, reply = _wait(self._submit_augment(request), context)
            self._observe("Augment", count, started)
            return reply  # type: ignore[return-value]  # pre-serialized AugmentResponse

        return self._guard("Augment", context, body)

    def AugmentStream(self, request_iterator: Iterator[pb.AugmentRequest], context: grpc.ServicerContext
                      ) -> Iterator[pb.AugmentResponse]:
        return self._guard_stream("AugmentStream", context, self._augment_stream(request_iterator, context))

    def _augment_stream(self, requests: Iterator[pb.AugmentRequest], context: grpc.ServicerContext
                        ) -> Iterator[pb.AugmentResponse]:
        # A reader thread submits requests as they arrive (bounded by the window), so a client
        # that waits for each reply before sending the next is never deadlocked.
        pending: deque[tuple[pb.AugmentRequest, futures.Future[tuple[int, bytes]] | BaseException]] = deque()
        cond = threading.Condition()
        finished = [False]

        def reader() -> None:
            try:
                for req in requests:
                    with cond:
                        while len(pending) >= self._window and context.is_active():
                            cond.wait(0.2)
                    try:
                        item: futures.Future[tuple[int, bytes]] | BaseException = self._submit_augment(req)
                    except Exception as exc:  # noqa: BLE001 - reported in order, below
                        item = exc
                    with cond:
                        pending.append((req, item))
                        cond.notify_all()
                    if isinstance(item, BaseException) or not context.is_active():
                        break
            except Exception:  # noqa: BLE001 - the client's stream broke; nothing left to read
                pass
            finally:
                with cond:
                    finished[0] = True
                    cond.notify_all()

        threading.Thread(target=reader, name="augment-stream-reader", daemon=True).start()
        while True:
            with cond:
                while not pending and not finished[0]:
                    cond.wait(0.2)
                    if not context.is_active():
                        return
                if not pending:
                    return
                req, item = pending.popleft()
                cond.notify_all()
            if isinstance(item, BaseException):
                raise item
            started = time.perf_counter()
            count, reply = _wait(item, context)
            self._observe("AugmentStream", count, started)
            yield reply  # type: ignore[misc]  # pre-serialized AugmentResponse

    # -- StreamBatches ---------------------------------------------------------------------------
    def StreamBatches(self, request: StreamBatchesCall | pb.StreamBatchesRequest, context: grpc.ServicerContext
                      ) -> Iterator[pb.Batch]:
        return self._guard_stream("StreamBatches", context, self._stream_batches(request, context))

    def _stream_batches(self, call: StreamBatchesCall | pb.StreamBatchesRequest, context: grpc.ServicerContext
                        ) -> Iterator[pb.Batch]:
        _refuse_malformed(call)
        if isinstance(call, pb.StreamBatchesRequest):  # called directly, not through gRPC
            call = StreamBatchesCall.of(call)
        request = call.message
        ds = self._datasets.get(request.dataset)
        if ds is None:
            served = ", ".join(sorted(self._datasets)) or "none"
            raise NotFoundError(f"dataset: {request.dataset!r} is not served here; available: {served}")
        spec = spec_of(request.spec)
        backend = _backend(request.backend)
        if ds.image_shape is None and spec.output_size is None:
            raise InvalidInputError(f"spec: dataset {ds.name!r} has images of different sizes; add a resize "
                                    "or random_resized_crop step so that every batch has one shape")
        if request.batch_size < 1:
            raise InvalidInputError("batch_size: 0 is not allowed; expected an integer >= 1")
        self._check_batch_bytes(ds, spec, request.batch_size)
        shuffle = request.shuffle if request.HasField("shuffle") else True

        def plan() -> np.ndarray:
            # epoch_batches without its list: batch k is a view of one permutation, so a population
            # of millions of ids costs one int64 array, not an array object per batch.
            ids = call.sample_ids()
            population = check_sample_ids(np.array(ids, np.uint64), ds.num_samples) if ids else ds.num_samples
            return epoch_permutation(population, seed=request.seed, epoch=request.epoch, shuffle=shuffle)

        order = (plan() if call.ids_field is None else
                 self._plans.get((ds.name, call.ids_field, request.seed, request.epoch, shuffle), plan))
        size = request.batch_size
        count = num_batches(order.size, size, drop_last=request.drop_last)
        end = request.end if request.HasField("end") else count
        if not request.start <= end <= count:
            raise InvalidInputError(f"start/end: batch range [{request.start}, {end}) is outside the epoch's "
                                    f"batches [0, {count})")
        indices = range(request.start, end, request.stride or 1)
        segments = self._client_segments(request, len(indices), context)
        spec_bytes = spec.to_bytes()
        window: deque[tuple[int, futures.Future[tuple[int, bytes]]]] = deque()
        it = iter(enumerate(indices))
        try:
            while True:
                while len(window) < self._window and context.is_active():
                    j, k = next(it, (None, None))
                    if j is None or k is None:
                        break
                    ids = order[k * size:(k + 1) * size]
                    window.append((k, self._pool.submit_batch(
                        ds.name, ids, spec_bytes, seed=request.seed, epoch=request.epoch, backend=backend,
                        finish=partial(_batch_reply, request.epoch, k, ids),
                        out_segment=segments[j] if segments else None)))
                if not window:
                    return
                k, fut = window.popleft()
                started = time.perf_counter()
                count, reply = _wait(fut, context)
                self._observe("StreamBatches", count, started)
                yield reply  # type: ignore[misc]  # pre-serialized Batch (augsvc.wire)
        finally:
            for _, fut in window:
                fut.cancel()

    def _client_segments(self, request: pb.StreamBatchesRequest, count: int, context: grpc.ServicerContext
                         ) -> list[tuple[str, bytes]]:
        """The request's shm_segments as (name, token), checked; empty (pixels inline) unless this
        server allows the shared-memory path and the peer is on this host (unix socket or
        loopback). Workers check each segment's token and size again before writing."""
        segments = [(s.name, s.token) for s in request.shm_segments]
        if not segments:
            return []
        if len(segments) != count:
            raise InvalidInputError(f"shm_segments: {len(segments)} segments for the {count} batches of this "
                                    "call; expected one per batch, or none")
        for j, (name, token) in enumerate(segments):
            if not is_client_segment(name):
                raise InvalidInputError(f"shm_segments[{j}].name: {name[:80]!r} is not a client segment name; "
                                        f"expected {CLIENT_SEGMENT_PREFIX}<pid>_<8 hex digits>_<tag>")
            if len(token) != CLIENT_TOKEN_BYTES:
                raise InvalidInputError(f"shm_segments[{j}].token: {len(token)} bytes; expected "
                                        f"{CLIENT_TOKEN_BYTES}")
        if len({name for name, _ in segments}) != len(segments):
            raise InvalidInputError("shm_segments: a name appears twice; expected one segment per batch")
        if not (self._settings.shared_memory and is_local_peer(context.peer())):
            return []
        return segments

    def _check_batch_bytes(self, ds: Dataset, spec: Spec, batch_size: int) -> None:
        size = spec.output_size or (ds.image_shape[:2] if ds.image_shape else None)
        if size is None:
            return
        nbytes = batch_size * size[0] * size[1] * ds.channels
        if nbytes > self._settings.max_batch_bytes:
            raise LimitExceededError(f"batch_size: {batch_size} images of {size[0]}x{size[1]}x{ds.channels} "
                                     f"are {nbytes} bytes, over the batch limit of "
                                     f"{self._settings.max_batch_bytes} bytes")

    # -- metadata --------------------------------------------------------------------------------
    def ListDatasets(self, request: pb.ListDatasetsRequest | MalformedRequest, context: grpc.ServicerContext
                     ) -> pb.ListDatasetsResponse:
        def body() -> pb.ListDatasetsResponse:
            _refuse_malformed(request)
            infos = [pb.DatasetInfo(name=ds.name, num_samples=ds.num_samples, num_classes=len(ds.class_names),
                                    class_names=ds.class_names, image_shape=list(ds.image_shape or ()),
                                    source=ds.kind) for ds in self._datasets.values()]
            return pb.ListDatasetsResponse(datasets=infos)

        return self._guard("ListDatasets", context, body)

    def GetServerInfo(self, request: pb.ServerInfoRequest | MalformedRequest, context: grpc.ServicerContext
                      ) -> pb.ServerInfo:
        def body() -> pb.ServerInfo:
            _refuse_malformed(request)
            return pb.ServerInfo(version=__version__, workers=self._pool.worker_count, backends=list(BACKENDS),
                                 max_image_side=self._settings.max_image_side,
                                 max_batch_bytes=self._settings.max_batch_bytes,
                                 max_inflight=self._pool.max_inflight, hostname=socket.gethostname(),
                                 pid=os.getpid())

        return self._guard("GetServerInfo", context, body)
