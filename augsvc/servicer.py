"""The Augmenter servicer: thin methods over the worker pool (DESIGN contracts 2-5).

Each method turns its request into jobs (`augsvc.jobs`, where every check lives), hands them to
the pool (`WorkerPool.map_ordered` for the two streaming methods), and builds the replies; errors
from the package's exception tree become status codes in one place (`_status_of`). Replies that
carry pixels are pre-serialized bytes (`augsvc.wire`), so the methods are registered with
`add_augmenter_servicer` instead of the generated helper.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from functools import partial
from typing import Any, TypeVar, overload

import grpc
import numpy as np

from . import __version__
from .datasets import JPEG_DECODER, Dataset
from .engine import BACKENDS
from .errors import AugsvcError, BadSampleError, CancelledError, grpc_status
from .jobs import (
    BatchRange,
    ClientSegment,
    MalformedRequest,
    StreamBatchesCall,
    augment_request,
    batch_range,
    client_segments,
    parse_stream_batches,
    parser,
    refuse_malformed,
)
from .metrics import ServerMetrics
from .plan import PlanCache
from .pool import WorkerPool, wait_result
from .security import is_local_peer
from .settings import ServerSettings
from .v1 import augment_pb2 as pb
from .v1 import augment_pb2_grpc as pb_grpc
from .wire import augment_response_bytes, batch_bytes, batch_shm_bytes, serialize

__all__ = ["SERVICE_NAME", "AugmenterServicer", "add_augmenter_servicer"]

log = logging.getLogger("augsvc.servicer")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Augmenter"].full_name
T = TypeVar("T")
Reply = tuple[int, bytes]  # (images in it, the serialized message)


class _Offers(Sequence[tuple[int, "ClientSegment | None"]]):
    """The call's (batch index, segment offered for it or None) pairs, made as they are asked for:
    a call may span millions of batches (batch_size 1 over a large population), and a list of
    them would cost a tuple each before the first reply."""

    def __init__(self, indices: range, segments: list[ClientSegment]) -> None:
        self._indices, self._segments = indices, segments

    def __len__(self) -> int:
        return len(self._indices)

    @overload
    def __getitem__(self, i: int) -> tuple[int, ClientSegment | None]: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[tuple[int, ClientSegment | None]]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._indices[i], self._segments[i] if self._segments else None


def _batch_reply(epoch: int, index: int, ids: np.ndarray, labels: np.ndarray, images: np.ndarray,
                 segment: str | None) -> Reply:
    """Runs in the pool's feeder thread on the worker's output slot: one copy of the pixels, or
    none when the worker wrote them into the client's shared-memory segment."""
    if segment is not None:
        return len(images), batch_shm_bytes(epoch=epoch, batch_index=index, shape=images.shape,
                                            labels=labels.tolist(), sample_ids=ids.tolist(), segment=segment)
    return len(images), batch_bytes(epoch=epoch, batch_index=index, images=images, labels=labels.tolist(),
                                    sample_ids=ids.tolist())


def _augment_reply(ids: Any, tag: int, images: np.ndarray, _segment: str | None) -> Reply:
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


class AugmenterServicer(pb_grpc.AugmenterServicer):
    """The five RPCs of augsvc.v1.Augmenter over one worker pool and the served datasets."""

    def __init__(self, pool: WorkerPool, datasets: Mapping[str, Dataset], settings: ServerSettings,
                 metrics: ServerMetrics) -> None:
        self._pool = pool
        self._datasets = datasets
        self._settings = settings
        self._limits = settings.limits
        self._metrics = metrics
        self._plans = PlanCache()

    # -- one place for errors and metrics --------------------------------------------------------
    def _status_of(self, method: str, exc: BaseException, context: grpc.ServicerContext) -> None:
        code, message = grpc_status(exc)
        if not isinstance(exc, AugsvcError):
            log.exception("internal error in %s", method)
        elif isinstance(exc, BadSampleError):
            self._metrics.bad_samples.inc()
        self._metrics.errors.labels(method, code.name).inc()
        context.abort(code, message)

    def _guard(self, method: str, context: grpc.ServicerContext, body: Callable[[], T]) -> T:
        self._metrics.inflight.inc()
        try:
            return body()
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never raised into gRPC
            if isinstance(exc, CancelledError) and not context.is_active():  # the caller left: not our error
                context.abort(grpc.StatusCode.CANCELLED, str(exc))
            self._status_of(method, exc, context)
            raise  # pragma: no cover - abort raises
        finally:
            self._metrics.inflight.dec()

    def _stream(self, method: str, context: grpc.ServicerContext, replies: Iterator[Reply]) -> Iterator[bytes]:
        """Yield each reply's bytes, observing it; errors become a status (none once the caller left)."""
        self._metrics.inflight.inc()
        try:
            started = time.perf_counter()
            for count, reply in replies:
                self._observe(method, count, started)
                yield reply
                started = time.perf_counter()
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
    def _submit_augment(self, request: pb.AugmentRequest | MalformedRequest) -> Future[Reply]:
        job, payload = augment_request(request, self._limits)
        assert isinstance(request, pb.AugmentRequest)
        return self._pool.submit(job, payload, finish=partial(_augment_reply, request.sample_ids, request.tag))

    def Augment(self, request: pb.AugmentRequest | MalformedRequest, context: grpc.ServicerContext
                ) -> pb.AugmentResponse:
        """One batch of the caller's images, augmented."""
        def body() -> pb.AugmentResponse:
            started = time.perf_counter()
            count, reply = wait_result(self._submit_augment(request), context.is_active)
            self._observe("Augment", count, started)
            return reply  # type: ignore[return-value]  # pre-serialized AugmentResponse

        return self._guard("Augment", context, body)

    def AugmentStream(self, request_iterator: Iterator[pb.AugmentRequest], context: grpc.ServicerContext
                      ) -> Iterator[pb.AugmentResponse]:
        """A stream of the caller's batches, augmented, replies in request order."""
        replies = self._pool.map_ordered(request_iterator, self._submit_augment, is_active=context.is_active)
        return self._stream("AugmentStream", context, replies)  # type: ignore[return-value]  # pre-serialized

    # -- StreamBatches ---------------------------------------------------------------------------
    def StreamBatches(self, request: StreamBatchesCall | pb.StreamBatchesRequest | MalformedRequest,
                      context: grpc.ServicerContext) -> Iterator[pb.Batch]:
        """Batches [start, end) (every stride-th) of an epoch of a served dataset, in index order."""
        return self._stream("StreamBatches", context, self._batches(request, context))  # type: ignore[return-value]

    def _batches(self, request: StreamBatchesCall | pb.StreamBatchesRequest | MalformedRequest,
                 context: grpc.ServicerContext) -> Iterator[Reply]:
        batches = batch_range(request, self._datasets, self._limits, self._plans)
        segments = self._client_segments(refuse_malformed(request), len(batches.indices), context)
        yield from self._pool.map_ordered(_Offers(batches.indices, segments), partial(self._submit_batch, batches),
                                          is_active=context.is_active)

    def _submit_batch(self, batches: BatchRange, item: tuple[int, ClientSegment | None]) -> Future[Reply]:
        k, segment = item
        ids = batches.sample_ids(k)
        labels = batches.dataset.labels[ids]
        return self._pool.submit(batches.job(k, segment),
                                 finish=partial(_batch_reply, batches.augmentation.epoch, k, ids, labels))

    def _client_segments(self, request: StreamBatchesCall | pb.StreamBatchesRequest, count: int,
                         context: grpc.ServicerContext) -> list[ClientSegment]:
        """The request's segments, checked; none (pixels inline) unless this server allows the
        shared-memory path and the peer is on this host (unix socket or loopback). Workers check
        each segment's token and size again before writing."""
        message = request.message if isinstance(request, StreamBatchesCall) else request
        segments = client_segments(message, count)
        if not (segments and self._settings.shared_memory and is_local_peer(context.peer())):
            return []
        return segments

    # -- metadata --------------------------------------------------------------------------------
    def ListDatasets(self, request: pb.ListDatasetsRequest | MalformedRequest, context: grpc.ServicerContext
                     ) -> pb.ListDatasetsResponse:
        """The datasets this server serves."""
        def body() -> pb.ListDatasetsResponse:
            refuse_malformed(request)
            infos = [pb.DatasetInfo(name=ds.name, num_samples=ds.num_samples, num_classes=len(ds.class_names),
                                    class_names=ds.class_names, image_shape=list(ds.image_shape or ()),
                                    source=ds.kind, layout=ds.layout, decode_size=str(ds.decode_size or ""))
                     for ds in self._datasets.values()]
            return pb.ListDatasetsResponse(datasets=infos)

        return self._guard("ListDatasets", context, body)

    def GetServerInfo(self, request: pb.ServerInfoRequest | MalformedRequest, context: grpc.ServicerContext
                      ) -> pb.ServerInfo:
        """This server's version, workers, backends, limits and JPEG decoder."""
        def body() -> pb.ServerInfo:
            refuse_malformed(request)
            return pb.ServerInfo(version=__version__, workers=self._pool.worker_count, backends=list(BACKENDS),
                                 max_image_side=self._limits.max_image_side,
                                 max_batch_bytes=self._limits.max_batch_bytes,
                                 max_inflight=self._pool.max_inflight, hostname=socket.gethostname(),
                                 pid=os.getpid(), decoder=JPEG_DECODER)

        return self._guard("GetServerInfo", context, body)
