"""Transport security (DESIGN contract 4): bearer token, TLS, mutual TLS, and the refusal to
serve plaintext beyond loopback. Certificates are generated per run (tests/helpers/certs.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from helpers.certs import Pki, make_pki
from helpers.data import served_digits
from helpers.servers import (
    CHANNEL_OPTIONS,
    TIMEOUT,
    Served,
    health_status,
    segments_of,
    serve,
    wait_until,
)

from augsvc import augment_batch, cli, epoch_batches, load_spec
from augsvc.server import ServerSettings, create_server
from augsvc.v1 import augment_pb2 as pb
from augsvc.v1 import augment_pb2_grpc as pb_grpc

TOKEN = "s3cret-token"
SPEC = load_spec({"transforms": [{"hflip": {"p": 0.5}}, {"rotate": {"limit_range": [-10, 10]}}]})
X = np.random.default_rng(0).integers(0, 256, (2, 12, 10, 3), dtype=np.uint8)
EXPECTED = augment_batch(X, SPEC, seed=1, epoch=0, sample_ids=[0, 1])
AUGMENT = pb.AugmentRequest(spec=SPEC.to_proto(), images=pb.Tensor(data=X.tobytes(), shape=list(X.shape),
                                                                   dtype="uint8"), seed=1, sample_ids=[0, 1])


def to_array(msg: pb.Tensor) -> np.ndarray:
    return np.frombuffer(msg.data, np.uint8).reshape(tuple(msg.shape))


def augment_ok(stub: pb_grpc.AugmenterStub, metadata: Any = None) -> None:
    reply = stub.Augment(AUGMENT, timeout=TIMEOUT, metadata=metadata)
    np.testing.assert_array_equal(to_array(reply.images), EXPECTED)


def rpc_code(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def server_info_code(channel: grpc.Channel) -> grpc.StatusCode:
    # TIMEOUT only keeps a slow machine from turning the transport's refusal into DEADLINE_EXCEEDED
    return rpc_code(lambda: pb_grpc.AugmenterStub(channel).GetServerInfo(pb.ServerInfoRequest(),
                                                                         timeout=TIMEOUT))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path else None


def tls_channel(port: int, pki: Pki, *, ca: Path | None = None, cert: Path | None = None,
                key: Path | None = None, host: str = "127.0.0.1") -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(read(ca or pki.ca_cert), read(key), read(cert))
    return grpc.secure_channel(f"{host}:{port}", creds, options=CHANNEL_OPTIONS)


# -- bearer token -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def with_token() -> Iterator[Served]:
    with serve(ServerSettings(workers=1, token=TOKEN, datasets={"digits": "builtin:digits"})) as served:
        yield served


CALLS: dict[str, Callable[[pb_grpc.AugmenterStub, Any], Any]] = {
    "GetServerInfo": lambda stub, md: stub.GetServerInfo(pb.ServerInfoRequest(), timeout=TIMEOUT,
                                                         metadata=md),
    "Augment": lambda stub, md: stub.Augment(AUGMENT, timeout=TIMEOUT, metadata=md),
    "AugmentStream": lambda stub, md: list(stub.AugmentStream(iter([AUGMENT]), timeout=TIMEOUT, metadata=md)),
    "StreamBatches": lambda stub, md: list(stub.StreamBatches(pb.StreamBatchesRequest(
        dataset="digits", spec=SPEC.to_proto(), batch_size=500), timeout=TIMEOUT, metadata=md)),
}
WRONG = {
    "missing": None,
    "wrong_token": [("authorization", "Bearer nope")],
    "token_with_a_suffix": [("authorization", f"Bearer {TOKEN}x")],
    "no_bearer_scheme": [("authorization", TOKEN)],
    "lowercase_scheme": [("authorization", f"bearer {TOKEN}")],
    "other_header": [("x-token", f"Bearer {TOKEN}")],
}


@pytest.mark.parametrize("method", list(CALLS))
@pytest.mark.parametrize("sent", list(WRONG))
def test_token_missing_or_wrong_is_unauthenticated(with_token: Served, method: str, sent: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        CALLS[method](with_token.stub, WRONG[sent])
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in info.value.details()


def check_answer(method: str, answer: Any) -> None:
    """A served call's answer is the real one: this server's info, or the exact pixels."""
    if method == "GetServerInfo":
        assert (answer.pid, answer.workers) == (os.getpid(), 1)
    elif method == "Augment":
        np.testing.assert_array_equal(to_array(answer.images), EXPECTED)
    elif method == "AugmentStream":
        assert len(answer) == 1
        np.testing.assert_array_equal(to_array(answer[0].images), EXPECTED)
    else:  # the whole epoch of digits in batches of 500
        pixels, labels = served_digits()
        plan = epoch_batches(len(pixels), 500, seed=0, epoch=0)
        assert [b.batch_index for b in answer] == list(range(len(plan)))
        for b, ids in zip(answer, plan, strict=True):
            assert list(b.sample_ids) == ids.tolist() and list(b.labels) == labels[ids].tolist()
            np.testing.assert_array_equal(to_array(b.images),
                                          augment_batch(pixels[ids], SPEC, seed=0, epoch=0, sample_ids=ids))


#: Jobs each call runs on the worker pool (StreamBatches: one per batch).
JOBS = {"GetServerInfo": 0, "Augment": 1, "AugmentStream": 1, "StreamBatches": 4}


@pytest.mark.parametrize("method", list(CALLS))
def test_right_token_is_served(with_token: Served, method: str) -> None:
    completed = with_token.server.pool.stats()["completed"]
    answer = CALLS[method](with_token.stub, [("authorization", f"Bearer {TOKEN}")])
    check_answer(method, answer)
    # the pool counts a job when its result is handed over, which can be just after the reply left
    done = lambda: with_token.server.pool.stats()["completed"] - completed  # noqa: E731
    wait_until(lambda: done() >= JOBS[method], what="the pool to count the jobs")
    assert done() == JOBS[method]


def test_token_rejections_do_no_work_and_are_counted(with_token: Served) -> None:
    stats = with_token.server.pool.stats()
    for _ in range(3):
        code = rpc_code(lambda: with_token.stub.Augment(AUGMENT, timeout=TIMEOUT))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    after = with_token.server.pool.stats()
    assert (after["completed"], after["failed"]) == (stats["completed"], stats["failed"])
    count = with_token.server.metrics.registry.get_sample_value(
        "augsvc_errors_total", {"method": "Augment", "code": "UNAUTHENTICATED"})  # the servicer's label
    assert count is not None and count >= 3
    augment_ok(with_token.stub, [("authorization", f"Bearer {TOKEN}")])
    # a method the server does not have is UNIMPLEMENTED, and adds no series: before, every made-up
    # name a caller without the token sent became a label of its own
    def samples() -> list[str]:
        return [f"{s.name}{s.labels}" for m in with_token.server.metrics.registry.collect() for s in m.samples]

    before = samples()
    for i in range(5):
        made_up = with_token.channel.unary_unary(f"/augsvc.v1.Augmenter/Nope{i}")
        assert rpc_code(lambda c=made_up: c(b"", timeout=TIMEOUT)) == grpc.StatusCode.UNIMPLEMENTED
    assert not any("Nope" in s for s in samples()) and len(samples()) == len(before)


def test_health_needs_no_token(with_token: Served) -> None:
    assert with_token.health() == "SERVING"
    assert with_token.health("augsvc.v1.Augmenter") == "SERVING"


# -- TLS --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def with_tls(pki: Pki) -> Iterator[Served]:
    settings = ServerSettings(workers=1, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    with serve(settings, credentials=grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())) as served:
        yield served


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_client_with_the_ca(with_tls: Served, pki: Pki, host: str) -> None:
    with tls_channel(with_tls.port, pki, host=host) as channel:
        augment_ok(pb_grpc.AugmenterStub(channel))
        assert health_status(channel) == "SERVING"


def test_plaintext_client_against_tls_fails_and_tls_keeps_working(with_tls: Served, pki: Pki) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{with_tls.port}", options=CHANNEL_OPTIONS) as channel:
        for _ in range(2):
            assert server_info_code(channel) == grpc.StatusCode.UNAVAILABLE
    augment_ok(with_tls.stub)


def test_tls_client_trusting_another_ca_fails(with_tls: Served, pki: Pki) -> None:
    with tls_channel(with_tls.port, pki, ca=pki.other_ca_cert) as channel:
        assert server_info_code(channel) == grpc.StatusCode.UNAVAILABLE
    augment_ok(with_tls.stub)


def test_health_cli_over_tls(with_tls: Served, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    # in-process: the `augsvc` script itself is exercised in test_server.py
    assert cli.main(["health", "--target", f"localhost:{with_tls.port}", "--tls-ca", str(pki.ca_cert)]) == 0
    assert "SERVING" in capsys.readouterr().out
    plaintext = ["health", "--target", f"127.0.0.1:{with_tls.port}", "--timeout", str(TIMEOUT)]  # refused at once
    assert cli.main(plaintext) == 1
    assert "UNAVAILABLE" in capsys.readouterr().out


# -- mutual TLS -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def with_mtls(pki: Pki) -> Iterator[Served]:
    settings = ServerSettings(workers=1, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                              tls_client_ca=str(pki.ca_cert))
    creds = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes(), pki.client_key.read_bytes(),
                                         pki.client_cert.read_bytes())
    with serve(settings, credentials=creds) as served:
        yield served


def test_mtls_client_with_a_certificate_from_the_ca(with_mtls: Served) -> None:
    augment_ok(with_mtls.stub)
    assert with_mtls.health() == "SERVING"


@pytest.mark.parametrize("client", ["no_certificate", "certificate_from_another_ca"])
def test_mtls_refuses_other_clients(with_mtls: Served, pki: Pki, client: str) -> None:
    cert, key = (None, None) if client == "no_certificate" else (pki.rogue_client_cert, pki.rogue_client_key)
    with tls_channel(with_mtls.port, pki, cert=cert, key=key) as channel:
        assert server_info_code(channel) == grpc.StatusCode.UNAVAILABLE
        assert rpc_code(lambda: health_status(channel, timeout=TIMEOUT)) == grpc.StatusCode.UNAVAILABLE
    augment_ok(with_mtls.stub)  # still serving


def test_health_cli_over_mtls(with_mtls: Served, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--target", f"127.0.0.1:{with_mtls.port}", "--timeout", str(TIMEOUT), "--tls-ca", str(pki.ca_cert)]
    assert cli.main(["health", *target]) == 1  # no client certificate
    assert "UNAVAILABLE" in capsys.readouterr().out
    client = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    assert cli.main(["health", *target, *client]) == 0
    assert "SERVING" in capsys.readouterr().out


# -- plaintext beyond loopback ----------------------------------------------------------------------

@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", "10.1.2.3:50051", "example.com:50051",
                                     "dns:///localhost:50051"])
def test_plaintext_beyond_loopback_is_refused(address: str) -> None:
    """Refused before anything starts: no workers, no shared memory, nothing bound."""
    before = segments_of(os.getpid())
    with pytest.raises(ValueError, match=r"is not loopback or a unix socket; serve it with TLS .*insecure"):
        create_server(address, ServerSettings(workers=1, datasets={"digits": "builtin:digits"}))
    assert segments_of(os.getpid()) == before


@pytest.mark.parametrize("settings, message", [
    (dict(tls_cert="server.pem"), "tls_cert and tls_key: give both or neither"),
    (dict(tls_key="server.key"), "tls_cert and tls_key: give both or neither"),
    (dict(tls_client_ca="ca.pem"), "tls_client_ca: mutual TLS needs tls_cert and tls_key"),
])
def test_incomplete_tls_settings_are_refused(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_server("127.0.0.1:0", ServerSettings(workers=1, **settings))


def test_insecure_opt_in_binds_every_interface() -> None:
    with serve(ServerSettings(workers=1, insecure=True), "0.0.0.0:0") as served:
        assert served.port > 0 and served.target == f"127.0.0.1:{served.port}"  # we connect via loopback only
        augment_ok(served.stub)


def test_cli_refuses_plaintext_beyond_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    # in-process: the refusal comes before any worker, socket or signal handler exists
    before = segments_of(os.getpid())
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "0", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "augsvc serve: error: address: '0.0.0.0:0' is not loopback" in err and "--insecure" in err, err
    assert segments_of(os.getpid()) == before


def test_client_refuses_to_send_its_token_in_clear_text_beyond_this_host() -> None:
    """Before, AugmentClient("host:port", token=...) without TLS sent the bearer token in clear
    text to any host; now that needs insecure=True, as plaintext serving needs --insecure."""
    from trainer_client import AugmentClient

    with pytest.raises(ValueError, match=r"token: it would be sent in clear text to augsvc\.example\.com:50051"):
        AugmentClient("127.0.0.1:1,augsvc.example.com:50051", token="s3cret")
    for kwargs in ({"insecure": True}, {"tls": True}):
        AugmentClient("augsvc.example.com:50051", token="s3cret", **kwargs).close()  # type: ignore[arg-type]
    for target in ("127.0.0.1:1", "[::1]:1", "localhost:1", "unix:/tmp/augsvc.sock", "dns:///localhost:1",
                   "dns://10.0.0.2/localhost:1", "ipv4:127.0.0.1:1", "ipv6:[::1]:1"):  # gRPC's target forms
        AugmentClient(target, token="s3cret").close()
    for target in ("dns:///augsvc.example.com:50051", "ipv4:10.1.2.3:50051", "dns://127.0.0.1/augsvc.example.com:1"):
        with pytest.raises(ValueError, match="clear text"):
            AugmentClient(target, token="s3cret")
    AugmentClient("augsvc.example.com:50051").close()  # no token: nothing to protect


def test_augsvc_train_says_why_it_will_not_send_the_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    from trainer_client.cli import main

    (tmp_path / "token").write_text("s3cret\n")
    with pytest.raises(SystemExit) as info:
        main(["--server", "augsvc.example.com:50051", "--token-file", str(tmp_path / "token"), "--out",
              str(tmp_path / "run"), "--epochs", "1", "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("augsvc-train: error: token: it would be sent in clear text") and "--insecure" in err
