"""AugmentClient's error story and retries: every status comes back as the augsvc error tree (the
mirror of `augsvc.errors.grpc_status`) that is still a grpc.RpcError; UNAVAILABLE is retried with
backoff inside one channel (gRPC's retry policy), what is left fails over to the next endpoint;
dataset and server info come back typed, with integer fields.

The servers here are scripted in-process gRPC servers that count every attempt they receive, so
each test asserts how many attempts reached which endpoint, never how long anything took.
"""

from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest

from augsvc import errors
from augsvc.v1 import augment_pb2 as pb
from trainer_client import AugmentClient, AugmentedStream, DatasetInfo, ServerInfo
from trainer_client.client import RETRY_POLICY

MAX_ATTEMPTS = RETRY_POLICY["maxAttempts"]
SPEC = {"transforms": [{"hflip": {}}]}
DIGITS = pb.DatasetInfo(name="digits", num_samples=1797, num_classes=10, class_names=[str(i) for i in range(10)],
                        image_shape=[32, 32, 1], source="builtin")
MIXED = pb.DatasetInfo(name="mixed", num_samples=2**40, num_classes=2, class_names=["a", "b"], source="folder")
SERVER = pb.ServerInfo(version="9.9.9", workers=3, backends=["fused", "albumentations"], max_image_side=4096,
                       max_batch_bytes=2**33, max_inflight=64, hostname="fake", pid=2**33 + 1)


class ScriptedServer:
    """An Augmenter that fails each method with scripted status codes before it answers: `fail`
    holds codes used once each, in order; `always` a code for every attempt. `attempts` counts
    the attempts each method received."""

    def __init__(self) -> None:
        self.fail: dict[str, list[grpc.StatusCode]] = {}
        self.always: dict[str, grpc.StatusCode] = {}
        self.attempts: Counter[str] = Counter()
        self.server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", -1)])
        handlers = {
            "Augment": grpc.unary_unary_rpc_method_handler(
                self._unary("Augment", lambda r: pb.AugmentResponse(images=r.images, sample_ids=r.sample_ids)),
                request_deserializer=pb.AugmentRequest.FromString,
                response_serializer=pb.AugmentResponse.SerializeToString),
            "ListDatasets": grpc.unary_unary_rpc_method_handler(
                self._unary("ListDatasets", lambda _: pb.ListDatasetsResponse(datasets=[DIGITS, MIXED])),
                request_deserializer=pb.ListDatasetsRequest.FromString,
                response_serializer=pb.ListDatasetsResponse.SerializeToString),
            "GetServerInfo": grpc.unary_unary_rpc_method_handler(
                self._unary("GetServerInfo", lambda _: SERVER),
                request_deserializer=pb.ServerInfoRequest.FromString,
                response_serializer=pb.ServerInfo.SerializeToString),
            "StreamBatches": grpc.unary_stream_rpc_method_handler(
                self._stream_batches, request_deserializer=pb.StreamBatchesRequest.FromString,
                response_serializer=pb.Batch.SerializeToString),
        }
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("augsvc.v1.Augmenter", handlers)])
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _scripted_failure(self, method: str, context: grpc.ServicerContext) -> None:
        self.attempts[method] += 1
        queued = self.fail.get(method)
        code = queued.pop(0) if queued else self.always.get(method)
        if code is not None:
            context.abort(code, f"scripted {code.name} for {method}")

    def _unary(self, method: str, answer: Any) -> Any:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            self._scripted_failure(method, context)
            return answer(request)

        return handle

    def _stream_batches(self, request: pb.StreamBatchesRequest, context: grpc.ServicerContext) -> Iterator[pb.Batch]:
        self._scripted_failure("StreamBatches", context)
        yield from ()  # an answer that gets this far is an empty stream

    def close(self) -> None:
        self.server.stop(0)


@pytest.fixture
def servers() -> Iterator[list[ScriptedServer]]:
    started = [ScriptedServer() for _ in range(2)]
    yield started
    for server in started:
        server.close()


# -- the mapping -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, mirrored", [
    (errors.SpecError, errors.InvalidInputError),  # INVALID_ARGUMENT cannot tell a spec from a tensor
    (errors.InvalidInputError, errors.InvalidInputError),
    (errors.NotFoundError, errors.NotFoundError),
    (errors.LimitExceededError, errors.LimitExceededError),
    (errors.WorkerUnavailableError, errors.UnavailableError),  # the client cannot tell why a server is unavailable
    (errors.UnavailableError, errors.UnavailableError),
    (errors.UnauthenticatedError, errors.UnauthenticatedError),
    (errors.CancelledError, errors.CancelledError),
])
def test_error_from_status_mirrors_grpc_status(cls: type[errors.AugsvcError],
                                               mirrored: type[errors.AugsvcError]) -> None:
    code, message = errors.grpc_status(cls("what was wrong"))
    error = errors.error_from_status(code, message)
    assert isinstance(error, mirrored) and isinstance(error, grpc.RpcError)
    assert (error.code(), error.details()) == (code, "what was wrong")
    assert str(error) == f"{code.name}: what was wrong"
    assert errors.grpc_status(error) == (code, message)


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK], ids=lambda c: c.name)
def test_every_status_code_comes_back_as_an_augsvc_error(code: grpc.StatusCode) -> None:
    error = errors.error_from_status(code, "details")
    assert isinstance(error, errors.AugsvcError) and isinstance(error, grpc.RpcError)
    assert error.code() == code and error.details() == "details" and code.name in str(error)
    assert type(error).__name__ == type(error).__mro__[1].__name__, "named as the class of the tree it extends"
    if code.name not in {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "UNAUTHENTICATED",
                         "CANCELLED"}:
        assert isinstance(error, errors.RemoteError)
    assert errors.error_from_status(code.name, "details").code() == code, "the code's name works too"
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and (copy.code(), str(copy)) == (code, str(error))


def test_stream_error_joins_the_tree() -> None:
    import trainer_client

    assert trainer_client.StreamError is errors.StreamError
    assert issubclass(errors.StreamError, errors.AugsvcError) and issubclass(errors.StreamError, RuntimeError)


# -- unary calls: errors and retries -----------------------------------------------------------------

def test_one_transient_unavailable_is_retried_within_one_channel(servers: list[ScriptedServer]) -> None:
    one = servers[0]
    one.fail["GetServerInfo"] = [grpc.StatusCode.UNAVAILABLE]
    with AugmentClient(one.target, retries=0) as client:  # no failover: only the channel can retry
        assert client.server_info().workers == 3
    assert one.attempts["GetServerInfo"] == 2


def test_a_large_augment_request_is_retried_within_one_channel(servers: list[ScriptedServer]) -> None:
    """gRPC retries only what its retry buffer holds (256 KiB by default); the client raises it."""
    one = servers[0]
    one.fail["Augment"] = [grpc.StatusCode.UNAVAILABLE]
    images = np.random.default_rng(0).integers(0, 256, (8, 256, 256, 1), np.uint8)  # 512 KiB
    with AugmentClient(one.target, retries=0) as client:
        out = client.augment(images, SPEC, seed=0, epoch=0, sample_ids=np.arange(8))
    assert np.array_equal(out, images)  # the scripted server echoes the pixels
    assert one.attempts["Augment"] == 2


def test_unavailable_beyond_the_retry_policy_fails_over_to_the_next_endpoint(servers: list[ScriptedServer]) -> None:
    down, up = servers
    down.always["ListDatasets"] = grpc.StatusCode.UNAVAILABLE
    with AugmentClient([down.target, up.target]) as client:  # the first call starts at the first endpoint
        assert [d.name for d in client.list_datasets()] == ["digits", "mixed"]
    assert (down.attempts["ListDatasets"], up.attempts["ListDatasets"]) == (MAX_ATTEMPTS, 1)


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL])
def test_other_retryable_codes_fail_over_without_retrying_in_the_channel(servers: list[ScriptedServer],
                                                                        code: grpc.StatusCode) -> None:
    full, up = servers
    full.fail["GetServerInfo"] = [code]
    with AugmentClient([full.target, up.target]) as client:
        assert client.server_info().pid == 2**33 + 1
    assert (full.attempts["GetServerInfo"], up.attempts["GetServerInfo"]) == (1, 1)


def test_retries_exhausted_raise_the_last_status_as_an_augsvc_error(servers: list[ScriptedServer]) -> None:
    for server in servers:
        server.always["GetServerInfo"] = grpc.StatusCode.UNAVAILABLE
    with AugmentClient([s.target for s in servers], retries=2) as client:
        with pytest.raises(errors.UnavailableError) as info:
            client.server_info()
    assert isinstance(info.value, grpc.RpcError) and info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert str(info.value) == "UNAVAILABLE: scripted UNAVAILABLE for GetServerInfo"
    # Three calls (the first and two failovers: endpoints 0, 1, 0), each tried MAX_ATTEMPTS times.
    assert [s.attempts["GetServerInfo"] for s in servers] == [2 * MAX_ATTEMPTS, MAX_ATTEMPTS]


@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidInputError),
    (grpc.StatusCode.UNAUTHENTICATED, errors.UnauthenticatedError),
    (grpc.StatusCode.PERMISSION_DENIED, errors.RemoteError),
])
def test_a_status_not_worth_retrying_raises_at_once(servers: list[ScriptedServer], code: grpc.StatusCode,
                                                   cls: type[errors.AugsvcError]) -> None:
    bad, other = servers
    bad.always["Augment"] = code
    with AugmentClient([bad.target, other.target]) as client, pytest.raises(cls) as info:
        client.augment(np.zeros((2, 4, 4, 1), np.uint8), SPEC, seed=0, epoch=0, sample_ids=[0, 1])
    assert isinstance(info.value, grpc.RpcError)
    assert (info.value.code(), info.value.details()) == (code, f"scripted {code.name} for Augment")
    assert (bad.attempts["Augment"], other.attempts["Augment"]) == (1, 0)


# -- typed info --------------------------------------------------------------------------------------

def test_dataset_and_server_info_are_typed_with_integer_fields(servers: list[ScriptedServer]) -> None:
    with AugmentClient(servers[0].target) as client:
        datasets = client.list_datasets()
        digits = client.dataset_info("digits")
        server = client.server_info()
        with pytest.raises(errors.NotFoundError, match="dataset: 'nope' is not served at"):
            client.dataset_info("nope")
    assert digits == datasets[0] == DatasetInfo(name="digits", num_samples=1797, num_classes=10,
                                                class_names=tuple(str(i) for i in range(10)),
                                                image_shape=(32, 32, 1), source="builtin")
    assert datasets[1].num_samples == 2**40 and datasets[1].image_shape is None  # sizes differ
    assert server == ServerInfo(version="9.9.9", workers=3, backends=("fused", "albumentations"),
                                max_image_side=4096, max_batch_bytes=2**33, max_inflight=64, hostname="fake",
                                pid=2**33 + 1)
    assert all(type(v) is int for v in (digits.num_samples, server.max_batch_bytes, server.pid))


# -- the stream ----------------------------------------------------------------------------------------

def test_a_fatal_stream_status_is_a_stream_error_with_its_code_and_cause(servers: list[ScriptedServer]) -> None:
    one = servers[0]
    one.always["StreamBatches"] = grpc.StatusCode.INVALID_ARGUMENT
    with AugmentClient(one.target) as client:
        stream = AugmentedStream(client, "digits", SPEC, batch_size=64, seed=0, shared_memory=False,
                                 streams=1)  # one fetch thread: one call at a time
        with pytest.raises(errors.StreamError, match="INVALID_ARGUMENT: scripted") as info:
            next(iter(stream))
    assert isinstance(info.value, RuntimeError) and info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(info.value.__cause__, errors.InvalidInputError)
    assert one.attempts["StreamBatches"] == 1, "not asked again"
