"""Security: TLS, mutual TLS and the token as `augsvc serve` flags; the token check is
constant-time and costs no work, even for bytes that do not parse; no filesystem paths on the
wire; plaintext beyond loopback refused (AUGSVC_* environment); limits against a client that lies
about sizes, including encoded images whose headers claim more pixels than the batch limit
(DESIGN contracts 3-5). tests/test_security.py covers the in-process TLS/token matrix; this file
does not repeat it.

Certificates are generated per run (tests/helpers/certs.py). Servers bind 127.0.0.1 only; the
"beyond loopback" cases check that the server refuses to start, and send no traffic.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from helpers.certs import Pki, make_pki
from PIL import Image
from reliability_procs import (
    TIMEOUT,
    ServeProcess,
    channel,
    metric,
    peak_rss_mb,
    reset_peak_rss,
    serve_in_process,
    subprocess_env,
    wait_until,
)

import augsvc.security
from augsvc import augment_batch, load_spec
from augsvc.server import AugmentServer, ServerSettings
from augsvc.v1 import augment_pb2 as pb
from augsvc.v1 import augment_pb2_grpc as pb_grpc

SPEC = load_spec({"transforms": [{"hflip": {"p": 0.5}}, {"rotate": {"limit_range": [-10, 10]}}]})
TOKEN = "s3cret-token-for-tests"
X = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
WORK_KEYS = ("completed", "failed", "cancelled", "inflight", "queued")


def tensor(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(data=array.tobytes(), shape=list(array.shape), dtype="uint8")


def good_request() -> pb.AugmentRequest:
    return pb.AugmentRequest(spec=SPEC.to_proto(), images=tensor(X), seed=1, sample_ids=[3, 4])


def expected() -> np.ndarray:
    return augment_batch(X, SPEC, seed=1, epoch=0, sample_ids=[3, 4])


def to_array(msg: pb.Tensor) -> np.ndarray:
    return np.frombuffer(msg.data, np.uint8).reshape(tuple(msg.shape))


def work(server: AugmentServer) -> dict[str, int]:
    stats = server.pool.stats()
    return {k: stats[k] for k in WORK_KEYS}


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def creds(
    pki: Pki, cert: Path | None = None, key: Path | None = None, ca: Path | None = None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        (ca or pki.ca_cert).read_bytes(),
        key.read_bytes() if key else None,
        cert.read_bytes() if cert else None,
    )


def assert_refused(target: str, credentials: grpc.ChannelCredentials | None) -> None:
    """Every call on this channel fails at the transport: UNAVAILABLE, no reply. (The refusal
    comes as soon as the handshake fails; TIMEOUT only keeps a slow machine from turning it into
    DEADLINE_EXCEEDED.)"""
    with channel(target, credentials) as ch:
        stub = pb_grpc.AugmenterStub(ch)
        for call in (
            lambda: stub.GetServerInfo(pb.ServerInfoRequest(), timeout=TIMEOUT),
            lambda: stub.Augment(good_request(), timeout=TIMEOUT),
            lambda: list(stub.StreamBatches(pb.StreamBatchesRequest(dataset="digits"), timeout=TIMEOUT)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()


def assert_augments(
    target: str, credentials: grpc.ChannelCredentials | None, metadata: tuple[tuple[str, str], ...] = ()
) -> None:
    with channel(target, credentials) as ch:
        reply = pb_grpc.AugmenterStub(ch).Augment(good_request(), timeout=TIMEOUT, metadata=metadata)
    np.testing.assert_array_equal(to_array(reply.images), expected())


# -- TLS, mutual TLS and the token, configured through `augsvc serve` flags ------------------------


@dataclass
class SecureServers:
    tls: ServeProcess  # --tls-cert/--tls-key and --token-file
    mtls: ServeProcess  # ... and --tls-client-ca


@pytest.fixture(scope="module")
def secure(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureServers]:
    folder = tmp_path_factory.mktemp("secure")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    common = [
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--workers",
        "1",
        "--metrics-port",
        "0",
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--token-file",
        str(token_file),
    ]
    started = ServeProcess.start_all(
        [
            (common, folder / "tls.log", subprocess_env()),
            (common + ["--tls-client-ca", str(pki.ca_cert)], folder / "mtls.log", subprocess_env()),
        ]
    )
    try:
        yield SecureServers(*started)
    finally:
        for server in started:
            server.close()


def images_done(server: ServeProcess) -> float:
    assert server.metrics_port is not None
    return sum(
        metric(server.metrics_port, "augsvc_images_total", {"method": m})
        for m in ("Augment", "AugmentStream", "StreamBatches")
    )


BEARER = (("authorization", f"Bearer {TOKEN}"),)


def test_cli_tls_refuses_plaintext_and_wants_the_token(secure: SecureServers, pki: Pki) -> None:
    server = secure.tls
    before = images_done(server)
    assert_refused(server.target, None)  # plaintext
    assert_refused(server.target, creds(pki, ca=pki.other_ca_cert))  # a CA that did not sign the server
    assert images_done(server) == before, "a refused connection cost augmentation work"
    with channel(server.target, creds(pki)) as ch, pytest.raises(grpc.RpcError) as info:
        pb_grpc.AugmenterStub(ch).Augment(good_request(), timeout=TIMEOUT)  # TLS, but no token
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert images_done(server) == before
    assert_augments(server.target, creds(pki), BEARER)
    assert images_done(server) == before + len(X)


def test_cli_mutual_tls_refuses_clients_without_a_trusted_certificate(
    secure: SecureServers, pki: Pki
) -> None:
    server = secure.mtls
    before = images_done(server)
    assert_refused(server.target, None)  # plaintext
    assert_refused(server.target, creds(pki))  # TLS without a client certificate
    assert_refused(server.target, creds(pki, pki.rogue_client_cert, pki.rogue_client_key))
    assert images_done(server) == before
    assert_augments(server.target, creds(pki, pki.client_cert, pki.client_key), BEARER)
    assert images_done(server) == before + len(X)


# -- the bearer token ------------------------------------------------------------------------------

RPCS = {
    "Augment": ("unary_unary", good_request()),
    "AugmentStream": ("stream_stream", good_request()),
    "StreamBatches": (
        "unary_stream",
        pb.StreamBatchesRequest(dataset="digits", spec=SPEC.to_proto(), batch_size=8, end=2),
    ),
    "ListDatasets": ("unary_unary", pb.ListDatasetsRequest()),
    "GetServerInfo": ("unary_unary", pb.ServerInfoRequest()),
}
#: tests/test_security.py covers more header variants; these check the spy and the unparsed body.
BAD_METADATA = {
    "missing": (),
    "wrong": (("authorization", "Bearer not-the-token"),),
    "prefix_of_token": (("authorization", f"Bearer {TOKEN[:-1]}"),),
}


def call_raw(ch: grpc.Channel, method: str, body: bytes, metadata: tuple[tuple[str, str], ...]) -> None:
    """One call of `method` with a serialized body, draining any stream."""
    kind, _ = RPCS[method]
    path = f"/augsvc.v1.Augmenter/{method}"
    if kind == "unary_unary":
        ch.unary_unary(path)(body, timeout=TIMEOUT, metadata=metadata)
    elif kind == "unary_stream":
        list(ch.unary_stream(path)(body, timeout=TIMEOUT, metadata=metadata))
    else:
        list(ch.stream_stream(path)(iter([body]), timeout=TIMEOUT, metadata=metadata))


@pytest.fixture(scope="module")
def token_server() -> Iterator[tuple[AugmentServer, str]]:
    with serve_in_process(ServerSettings(workers=1, token=TOKEN, datasets={"digits": "builtin:digits"})) as s:
        yield s


@pytest.mark.parametrize("method", sorted(RPCS))
@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_wrong_or_missing_token_is_unauthenticated_and_costs_no_work(
    token_server: tuple[AugmentServer, str], monkeypatch: pytest.MonkeyPatch, method: str, case: str
) -> None:
    server, target = token_server
    calls: list[tuple[bytes, bytes]] = []
    real = augsvc.security.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(augsvc.security.hmac, "compare_digest", spy)
    before = work(server)
    _, request = RPCS[method]
    with channel(target) as ch:
        for body in (request.SerializeToString(), b"\xff\xfe not a protobuf message"):
            with pytest.raises(grpc.RpcError) as info:
                call_raw(ch, method, body, BAD_METADATA[case])
            # garbage is not even parsed: the token check comes first
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
    assert work(server) == before, "a call without the token cost augmentation work"
    assert len(calls) == 2, "the token must be compared with hmac.compare_digest"
    assert all(b == f"Bearer {TOKEN}".encode() for _, b in calls)


def test_the_right_token_works_and_health_needs_none(
    token_server: tuple[AugmentServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, target = token_server
    seen: list[bytes] = []
    real = augsvc.security.hmac.compare_digest
    monkeypatch.setattr(augsvc.security.hmac, "compare_digest", lambda a, b: seen.append(a) or real(a, b))
    completed = server.pool.stats()["completed"]
    assert_augments(target, None, (("authorization", f"Bearer {TOKEN}"),))
    assert seen == [f"Bearer {TOKEN}".encode()]
    assert server.pool.stats()["completed"] == completed + 1
    with channel(target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- no filesystem paths on the wire ---------------------------------------------------------------

#: The only string fields a request may carry: names and enum-like choices, never a path.
#: "name" is ShmSegment.name (the shared-memory reply path): a POSIX shared-memory name the client
#: created, which the server takes only in the augsvc_client_<pid>_<hex>_<tag> form
#: (test_segment_names_are_never_paths below; tests/test_shm_path.py sends bad ones).
NAME_FIELDS = {"dataset", "backend", "dtype", "border", "name"}
REQUESTS = [pb.AugmentRequest, pb.StreamBatchesRequest, pb.ListDatasetsRequest, pb.ServerInfoRequest]


def string_fields(desc: Descriptor, seen: set[str] | None = None) -> set[str]:
    """Names of every string field reachable from a message type (nested messages included)."""
    seen = set() if seen is None else seen
    if desc.full_name in seen:
        return set()
    seen.add(desc.full_name)
    found = set()
    for field in desc.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            found.add(field.name)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            found |= string_fields(field.message_type, seen)
    return found


def test_no_request_message_has_a_path_field() -> None:
    service = pb.DESCRIPTOR.services_by_name["Augmenter"]
    inputs = {m.input_type.full_name for m in service.methods}
    assert inputs == {r.DESCRIPTOR.full_name for r in REQUESTS}, "a new RPC: add its request here"
    for request in REQUESTS:
        fields = string_fields(request.DESCRIPTOR)
        assert fields <= NAME_FIELDS, (
            f"{request.DESCRIPTOR.name}: unexpected string fields {fields - NAME_FIELDS}"
        )
        for name in fields:
            assert not any(word in name for word in ("path", "file", "dir", "url", "uri")), name


def test_segment_names_are_never_paths() -> None:
    from augsvc.shm import is_client_segment

    assert pb.ShmSegment.DESCRIPTOR.fields_by_name["name"].type == FieldDescriptor.TYPE_STRING
    tricks = ["augsvc_client_1_deadbeef_batch/../../etc/passwd", "/augsvc_client_1_deadbeef_batch",
              "augsvc_client_1_deadbeef_batch\x00", "augsvc_1_deadbeef_out", "augsvc_client_1_deadbeef_b.x"]
    for name in PATH_NAMES + tricks:
        assert not is_client_segment(name), name


@pytest.fixture(scope="module")
def plain_server() -> Iterator[tuple[AugmentServer, str]]:
    with serve_in_process(ServerSettings(workers=1, datasets={"digits": "builtin:digits"})) as s:
        yield s


PATH_NAMES = [
    "/etc/passwd",
    "../x",
    "../../../../etc/shadow",
    "digits/../digits",
    "./digits",
    "~/digits",
    "file:///etc/passwd",
    "builtin:digits",
    "/dev/shm",
    "digits\x00",
    ".",
    "..",
    "C:\\Windows",
    "/work/main/augsvc/examples/digits.yaml",
]


@pytest.mark.parametrize("name", PATH_NAMES)
def test_a_path_as_dataset_name_is_not_found(plain_server: tuple[AugmentServer, str], name: str) -> None:
    server, target = plain_server
    before = work(server)
    request = pb.StreamBatchesRequest(dataset=name, spec=SPEC.to_proto(), batch_size=8, end=1)
    with channel(target) as ch, pytest.raises(grpc.RpcError) as info:
        list(pb_grpc.AugmenterStub(ch).StreamBatches(request, timeout=TIMEOUT))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
    assert work(server) == before


@pytest.mark.parametrize("field, value", [("backend", "/etc/passwd"), ("border", "../reflect_101")])
def test_a_path_in_other_string_fields_is_invalid(
    plain_server: tuple[AugmentServer, str], field: str, value: str
) -> None:
    _, target = plain_server
    request = good_request()
    if field == "border":
        request.spec.border = value
    else:
        request.backend = value
    with channel(target) as ch, pytest.raises(grpc.RpcError) as info:
        pb_grpc.AugmenterStub(ch).Augment(request, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


# -- plaintext beyond loopback ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [{"AUGSVC_HOST": "0.0.0.0"}, {"AUGSVC_HOST": "::"}, {"AUGSVC_HOST": "0.0.0.0", "AUGSVC_INSECURE": "0"}],
    ids=["ipv4_any", "ipv6_any", "insecure_0"],
)
def test_cli_refuses_plaintext_beyond_loopback_configured_by_environment(env: dict[str, str]) -> None:
    """Containers configure `augsvc serve` through AUGSVC_* variables (tests/test_security.py checks
    the --host flag in-process); the refusal holds there too, before anything starts."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "augsvc.cli", "serve", "--port", "0", "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(**env),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)  # a bound for a hung process only
    finally:
        if proc.poll() is None:  # it started after all: stop it at once
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 2, (out, err)
    assert '"event": "ready"' not in out
    assert "is not loopback" in err and "--insecure" in err, err


# -- limits against a client that lies about sizes -------------------------------------------------

LIES = [
    ("claims_4096x4096x3_sends_10_bytes", [1, 4096, 4096, 3], 10, {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}),
    ("huge_n", [2**40, 64, 64, 3], 0, {"RESOURCE_EXHAUSTED"}),
    ("int64_max_n", [2**63 - 1, 1, 1, 1], 16, {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"}),
    ("huge_sides", [1, 2**31, 2**31, 3], 0, {"RESOURCE_EXHAUSTED"}),
    ("negative_n", [-5, 8, 8, 3], 0, {"INVALID_ARGUMENT"}),
    ("negative_sides", [1, -4096, -4096, 3], 0, {"INVALID_ARGUMENT"}),
    ("int64_min", [-(2**63), 1, 1, 1], 0, {"INVALID_ARGUMENT"}),
    ("zero_sides", [4, 0, 0, 3], 0, {"INVALID_ARGUMENT"}),
    ("many_dims", [1] * 64 + [3], 3, {"INVALID_ARGUMENT"}),
]


@pytest.mark.parametrize("shape, nbytes, codes", [c[1:] for c in LIES], ids=[c[0] for c in LIES])
def test_a_lying_tensor_is_refused_without_allocating(
    plain_server: tuple[AugmentServer, str], shape: list[int], nbytes: int, codes: set[str]
) -> None:
    server, target = plain_server
    request = pb.AugmentRequest(
        spec=SPEC.to_proto(), images=pb.Tensor(data=bytes(nbytes), shape=shape, dtype="uint8"), sample_ids=[0]
    )
    before = work(server)
    with channel(target) as ch:
        stub = pb_grpc.AugmenterStub(ch)
        stub.GetServerInfo(pb.ServerInfoRequest(), timeout=TIMEOUT)  # connected before the measurement
        tracemalloc.start()
        try:
            with pytest.raises(grpc.RpcError) as info:
                stub.Augment(request, timeout=TIMEOUT)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert info.value.code().name in codes, info.value.details()
    assert peak < 4 << 20, f"{peak} bytes were allocated to refuse a {nbytes}-byte tensor"
    assert work(server) == before, "a lying tensor reached the worker pool"


@pytest.fixture()
def small_limit_server() -> Iterator[tuple[AugmentServer, str]]:
    """1 MiB batches, sides up to 2048: an encoded batch that decodes (or resizes) past 1 MiB is over."""
    with serve_in_process(ServerSettings(workers=1, max_batch_bytes=1 << 20, max_image_side=2048)) as s:
        yield s


def worker_peak_growth_mb(
    server: AugmentServer, target: str, request: pb.AugmentRequest
) -> tuple[str, float]:
    """(status code name, growth of the worker's peak RSS in MiB) for one call."""
    (pid,) = server.pool.pids()
    assert pid is not None
    with channel(target) as ch:
        stub = pb_grpc.AugmenterStub(ch)
        warm = pb.AugmentRequest(spec=SPEC.to_proto(), encoded_images=[png(X[0])], sample_ids=[0])
        stub.Augment(warm, timeout=TIMEOUT)  # imports and caches warmed up in the worker
        if not reset_peak_rss(pid):
            pytest.skip("cannot reset the worker's peak RSS (/proc/PID/clear_refs)")
        base = peak_rss_mb(pid)
        with pytest.raises(grpc.RpcError) as info:
            stub.Augment(request, timeout=TIMEOUT)
        wait_until(lambda: server.pool.stats()["inflight"] == 0, what="the pool to drain")
    return info.value.code().name, peak_rss_mb(pid) - base


def test_encoded_images_that_decode_past_the_batch_limit_are_refused_from_their_headers(
    small_limit_server: tuple[AugmentServer, str],
) -> None:
    server, target = small_limit_server
    blob = png(np.zeros((2048, 2048), np.uint8))  # 4 MiB of pixels in a few KiB
    assert len(blob) < 64 << 10
    request = pb.AugmentRequest(spec=SPEC.to_proto(), encoded_images=[blob] * 8, sample_ids=list(range(8)))
    code, growth = worker_peak_growth_mb(server, target, request)
    assert code == "RESOURCE_EXHAUSTED"
    assert growth < 8, f"the worker's peak RSS grew by {growth:.0f} MiB to refuse a 1 MiB-limited batch"


def test_encoded_images_resized_past_the_batch_limit_are_refused_before_the_work(
    small_limit_server: tuple[AugmentServer, str],
) -> None:
    """Fixed in 2d20775 (the worker sizes its output before augmenting); kept as a guard."""
    server, target = small_limit_server
    spec = load_spec({"transforms": [{"resize": {"height": 2048, "width": 2048}}]})
    tiny = png(np.full((1, 1), 7, np.uint8))
    request = pb.AugmentRequest(spec=spec.to_proto(), encoded_images=[tiny] * 8, sample_ids=list(range(8)))
    code, growth = worker_peak_growth_mb(server, target, request)
    assert code == "RESOURCE_EXHAUSTED"
    assert growth < 8, f"the worker's peak RSS grew by {growth:.0f} MiB to refuse a 1 MiB-limited batch"
