"""AugmentClient: one or many augsvc endpoints, TLS / mutual TLS, a bearer token, deadlines,
retries, and the augsvc error tree for every failed unary call.

Targets: "host:port", "unix:/path/sock", a comma-separated list, a list of those, or a
"dns:///name:port" name, which gets gRPC's round_robin policy over every address it resolves to
(a Kubernetes headless Service, a compose service with several replicas).

Retries of unary calls have two layers. Inside a channel, gRPC's own retry policy (the channel's
service config, `SERVICE_CONFIG`) re-sends a call that got UNAVAILABLE, with exponential backoff:
a worker that died, a server that is restarting. Whatever status is left after that and is worth
retrying elsewhere (`RETRYABLE`) moves the call to the next endpoint, up to `retries` times.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from augsvc.errors import AugsvcError, NotFoundError, error_from_status
from augsvc.security import is_local_target
from augsvc.spec import Spec, load_spec
from augsvc.tensors import encode_tensor
from augsvc.v1 import augment_pb2 as pb
from augsvc.v1 import augment_pb2_grpc as pb_grpc
from augsvc.validation import check_counter, sample_keys
from augsvc.wire import parse_reply, serialize

#: Status codes worth retrying on another endpoint: the server or a worker went away, or is full.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})

#: gRPC's retry policy for the unary methods, within one channel: transient UNAVAILABLE only
#: (the other retryable codes are better asked of another endpoint). maxAttempts counts the first.
RETRY_POLICY: dict[str, Any] = {"maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s",
                                "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}


def _service_config() -> str:
    """The channels' service config: `RETRY_POLICY` for every unary method of the Augmenter service."""
    service = pb.DESCRIPTOR.services_by_name["Augmenter"]
    unary = [{"service": service.full_name, "method": m.name} for m in service.methods
             if not m.client_streaming and not m.server_streaming]
    return json.dumps({"methodConfig": [{"name": unary, "retryPolicy": RETRY_POLICY}]})


SERVICE_CONFIG = _service_config()


def status_error(exc: grpc.RpcError) -> AugsvcError:
    """The augsvc error for a failed call (`augsvc.errors.error_from_status`); still a grpc.RpcError."""
    return error_from_status(exc.code(), exc.details())


def _parse_response(data: bytes) -> tuple[pb.AugmentResponse, np.ndarray]:
    message, images = parse_reply(data, pb.AugmentResponse)
    assert images is not None  # only Batch replies may point into shared memory
    return message, images


@dataclass(frozen=True)
class TLSConfig:
    """Paths of PEM files: `ca` verifies the server; `cert` + `key` authenticate this client (mTLS)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None  # overrides the name checked against the server certificate

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def _proto_fields(cls: type[Any], msg: Any) -> dict[str, Any]:
    """The fields of dataclass `cls` read from the message of the same field names; repeated
    fields as tuples. Protobuf gives 64-bit integers as ints here (json_format gives strings)."""
    values = {f.name: getattr(msg, f.name) for f in fields(cls)}
    return {k: v if isinstance(v, (str, int, float)) else tuple(v) for k, v in values.items()}


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset a server holds, as ListDatasets describes it."""

    name: str
    num_samples: int
    num_classes: int
    class_names: tuple[str, ...]
    image_shape: tuple[int, ...] | None  # (H, W, C) when every image has that shape; None when sizes differ
    source: str  # kind of source: "folder", "manifest", "npz", "builtin"
    layout: str = ""  # how the server holds it: "decoded", "encoded" or "files" ("" from older servers)
    decode_size: str = ""  # its declared decode size, e.g. "shorter:256"; "" for full size

    @classmethod
    def from_proto(cls, msg: pb.DatasetInfo) -> DatasetInfo:
        values = _proto_fields(cls, msg)
        values["image_shape"] = values["image_shape"] or None
        return cls(**values)


@dataclass(frozen=True)
class ServerInfo:
    """A server's version, worker count, backends and limits, as GetServerInfo describes them."""

    version: str
    workers: int
    backends: tuple[str, ...]
    max_image_side: int
    max_batch_bytes: int
    max_inflight: int
    hostname: str
    pid: int
    decoder: str = ""  # what decodes JPEG there, with its version ("" from older servers)

    @classmethod
    def from_proto(cls, msg: pb.ServerInfo) -> ServerInfo:
        return cls(**_proto_fields(cls, msg))


class DecoderMismatchWarning(UserWarning):
    """Endpoints decode JPEG with different libraries or versions, so the same sample of a JPEG
    dataset may come back with different pixels depending on the server that made it."""


def parse_targets(target_or_endpoints: str | Sequence[str]) -> list[str]:
    """The endpoint targets named by a target, a comma-separated list of them, or a list."""
    if isinstance(target_or_endpoints, str):
        if target_or_endpoints.startswith("dns:"):
            return [target_or_endpoints]
        targets = [t.strip() for t in target_or_endpoints.split(",") if t.strip()]
    else:
        targets = [str(t) for t in target_or_endpoints]
    if not targets:
        raise ValueError("target_or_endpoints: empty; expected 'host:port', 'unix:/path', 'dns:///name:port' "
                         "or a list of them")
    return targets


class AugmentClient:
    """A client of one or more augsvc servers. Thread-safe; use as a context manager.

    A unary call that fails raises the augsvc error for its status (`augsvc.errors`: NotFoundError,
    InvalidInputError, UnavailableError, ...), which is also a grpc.RpcError with code() and details().
    The streaming calls hand out gRPC's own call objects; `AugmentedStream` maps their errors."""

    def __init__(self, target_or_endpoints: str | Sequence[str], *, tls: bool | TLSConfig | None = None,
                 token: str | None = None, timeout: float = 60.0, retries: int = 3,
                 max_message_bytes: int = 512 << 20, insecure: bool = False) -> None:
        """token: sent as `authorization: Bearer ...` with every call. Without `tls` it would
        cross the network in clear text: refused (ValueError) for a target beyond this host (not
        a unix socket or loopback) unless `insecure=True`, as `augsvc serve` needs --insecure to
        serve plaintext beyond loopback."""
        self.targets = parse_targets(target_or_endpoints)
        remote = [t for t in self.targets if not is_local_target(t)]
        if token and not tls and remote and not insecure:
            raise ValueError(f"token: it would be sent in clear text to {', '.join(remote)}; use TLS (tls=, "
                             "--tls-ca), or insecure=True (--insecure) on a network you trust")
        self.timeout = timeout
        self.retries = retries
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   # Bigger HTTP/2 windows: a batch is megabytes (measured in `augsvc bench transport`).
                   ("grpc.http2.lookahead_bytes", 8 << 20),
                   ("grpc.enable_retries", 1), ("grpc.service_config", SERVICE_CONFIG),
                   # gRPC retries only requests it still holds: by default up to 256 KiB, which
                   # would leave out most Augment batches.
                   ("grpc.per_rpc_retry_buffer_size", max_message_bytes)]
        tls_config = TLSConfig() if tls is True else (tls or None)
        if isinstance(tls_config, TLSConfig) and tls_config.server_name:
            options.append(("grpc.ssl_target_name_override", tls_config.server_name))
        self._channels: list[grpc.Channel] = []
        for target in self.targets:
            opts = list(options)
            if target.startswith("dns:"):
                opts.append(("grpc.lb_policy_name", "round_robin"))
            if tls_config is not None:
                self._channels.append(grpc.secure_channel(target, tls_config.credentials(), options=opts))
            else:
                self._channels.append(grpc.insecure_channel(target, options=opts))
        self._stubs = [pb_grpc.AugmenterStub(ch) for ch in self._channels]
        # The pixel-carrying replies are parsed without copying the pixels (augsvc.wire).
        service = "/augsvc.v1.Augmenter/"
        self._augment = [ch.unary_unary(service + "Augment",
                                        request_serializer=pb.AugmentRequest.SerializeToString,
                                        response_deserializer=_parse_response) for ch in self._channels]
        self._augment_stream = [ch.stream_stream(service + "AugmentStream",
                                                 request_serializer=pb.AugmentRequest.SerializeToString,
                                                 response_deserializer=_parse_response)
                                for ch in self._channels]
        self._stream_batches = [ch.unary_stream(service + "StreamBatches",
                                                request_serializer=serialize,  # a message, or its bytes
                                                response_deserializer=parse_reply) for ch in self._channels]
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._decoders: dict[str, str] = {}  # decoder -> the first server ("hostname pid") that reported it

    # -- endpoints -------------------------------------------------------------------------------
    @property
    def num_endpoints(self) -> int:
        """How many endpoints (channels) this client spreads its calls over."""
        return len(self._stubs)

    def stub(self, index: int) -> pb_grpc.AugmenterStub:
        """The plain gRPC stub of endpoint `index` (modulo the endpoint count)."""
        return self._stubs[index % len(self._stubs)]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata this client sends (the bearer token, if any)."""
        return self._metadata

    def _pick(self) -> int:
        with self._lock:
            return next(self._next) % len(self._stubs)

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        """A unary call. The channel retries UNAVAILABLE with backoff (`SERVICE_CONFIG`); a
        `RETRYABLE` status left after that moves the call to the next endpoint, up to `retries`
        times. A call that fails raises the augsvc error for its last status (`status_error`)."""
        start = self._pick()
        for attempt in range(self.retries + 1):
            index = (start + attempt) % len(self._stubs)
            call = self._augment[index] if method == "Augment" else getattr(self._stubs[index], method)
            try:
                return call(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self.retries:
                    raise status_error(exc) from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    # -- RPCs ------------------------------------------------------------------------------------
    def augment(self, images: np.ndarray, spec: Any, *, seed: int, epoch: int, sample_ids: Any,
                backend: str = "fused", timeout: float | None = None) -> np.ndarray:
        """Augment an (N,H,W,C) uint8 batch on a server; equals `augsvc.augment_batch` bit for bit."""
        # checked as augment_batch checks them (negative ids wrap to the same uint64 keys)
        request = pb.AugmentRequest(spec=load_spec(spec).to_proto(), images=encode_tensor(images),
                                    seed=check_counter(seed, "seed"), epoch=check_counter(epoch, "epoch"),
                                    sample_ids=sample_keys(sample_ids).tolist(), backend=backend)
        _reply, images = self._call("Augment", request, timeout)
        return np.array(images)

    def stream_batches(self, endpoint: int, request: pb.StreamBatchesRequest | bytes,
                       timeout: float | None = None) -> Any:
        """A StreamBatches call on one endpoint: a cancellable iterator of (Batch without its images,
        images as a read-only (N,H,W,C) uint8 view). It fails with gRPC's RpcError (`status_error` maps it)."""
        return self._stream_batches[endpoint % len(self._stubs)](request, timeout=timeout or self.timeout,
                                                                  metadata=self._metadata)

    def augment_stream(self, endpoint: int, requests: Iterator[pb.AugmentRequest],
                       timeout: float | None = None) -> Any:
        """An AugmentStream call: an iterator of (AugmentResponse without images, images view)."""
        return self._augment_stream[endpoint % len(self._stubs)](requests, timeout=timeout or self.timeout,
                                                                  metadata=self._metadata)

    def list_datasets(self) -> list[DatasetInfo]:
        """The datasets the server that answers holds."""
        reply = self._call("ListDatasets", pb.ListDatasetsRequest(), None)
        return [DatasetInfo.from_proto(d) for d in reply.datasets]

    def dataset_info(self, name: str) -> DatasetInfo:
        """The dataset called `name`; NotFoundError (a LookupError) when the server has none."""
        for info in self.list_datasets():
            if info.name == name:
                return info
        raise NotFoundError(f"dataset: {name!r} is not served at {', '.join(self.targets)}")

    def server_info(self) -> ServerInfo:
        """Version, workers, backends, limits and decoder of the server that answers (warns with
        DecoderMismatchWarning when its decoder differs from one seen before)."""
        return self._note_decoder(ServerInfo.from_proto(self._call("GetServerInfo", pb.ServerInfoRequest(), None)))

    def server_infos(self) -> list[ServerInfo]:
        """The ServerInfo of every endpoint, one call each (warns with DecoderMismatchWarning when
        they report different decoders)."""
        infos = []
        for stub in self._stubs:
            try:
                reply = stub.GetServerInfo(pb.ServerInfoRequest(), timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                raise status_error(exc) from exc
            infos.append(self._note_decoder(ServerInfo.from_proto(reply)))
        return infos

    def _note_decoder(self, info: ServerInfo) -> ServerInfo:
        if not info.decoder:
            return info
        with self._lock:
            self._decoders.setdefault(info.decoder, f"{info.hostname} pid {info.pid}")
            seen = dict(self._decoders)
        if len(seen) > 1:
            warnings.warn(DecoderMismatchWarning(
                "endpoints decode JPEG differently, so a JPEG dataset's samples may differ between servers: "
                + "; ".join(f"{where}: {decoder}" for decoder, where in seen.items())), stacklevel=3)
        return info

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until every endpoint's channel is connected."""
        for ch in self._channels:
            grpc.channel_ready_future(ch).result(timeout=timeout)

    def close(self) -> None:
        """Close every endpoint's channel."""
        for ch in self._channels:
            ch.close()

    def __enter__(self) -> AugmentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- what fits a server's limit ---------------------------------------------------------------------

def image_bytes(spec: Spec, info: DatasetInfo) -> int | None:
    """Bytes of one output image of `spec` on dataset `info` (3 channels where unknown: at most
    that many); None when neither the spec nor the dataset fixes the size."""
    channels = info.image_shape[2] if info.image_shape else 3
    size = spec.output_size_for((info.image_shape[0], info.image_shape[1]) if info.image_shape else None)
    return None if size is None else int(math.prod(size)) * channels


def batch_size_within(server: ServerInfo, spec: Spec, info: DatasetInfo, wanted: int) -> int:
    """`wanted`, lowered to what fits the server's max_batch_bytes (at least 1)."""
    per_image = image_bytes(spec, info)
    if per_image is None or server.max_batch_bytes <= 0:
        return wanted
    return max(1, min(wanted, server.max_batch_bytes // per_image))


def check_batch_fits(server: ServerInfo, spec: Spec, info: DatasetInfo, batch_size: int) -> None:
    """ValueError, before any call, when training batches would exceed the server's limit."""
    per_image = image_bytes(spec, info)
    if per_image is not None and 0 < server.max_batch_bytes < batch_size * per_image:
        raise ValueError(f"batch_size: {batch_size} images of {per_image} bytes are {batch_size * per_image} "
                         f"bytes, over the server's max_batch_bytes {server.max_batch_bytes}; use at most "
                         f"{server.max_batch_bytes // per_image}")
