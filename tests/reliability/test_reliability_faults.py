"""Faults: a worker SIGKILLed mid-stream, one of two servers SIGKILLed mid-epoch, SIGTERM while
streams are open (drain, or re-ask elsewhere), a client that disappears mid-stream, and a client
that stops reading (DESIGN contracts 2 and 5).

Each asserts the epoch is exactly-once and bit-identical to `augment_batch` in-process (what a
clean run produces, by contract 1) where the contract promises it, and that no shared-memory
segment or process of a server is left once it has stopped (or was killed).

The worker sleep hook (AUGSVC_TEST_WORKER_SLEEP="SEED:SECONDS") makes every batch of SLOW_SEED
take HOOK_S seconds, so "mid-stream" is deterministic. Subprocess servers (for RSS and signals)
boot in parallel in one module fixture; each victim is used by one test.

Time enters only as generous bounds that stop a hung test, and in the two places where it is the
property (a drained server exits before its --grace could have run out; stopped servers' processes
and segments go within seconds), with margins scaled by helpers.calibration (see there).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from helpers.calibration import margin
from reliability_options import Budget
from reliability_procs import (
    TIMEOUT,
    ServeProcess,
    alive,
    channel,
    metric,
    segments_of,
    serve_in_process,
    subprocess_env,
    wait_until,
)

from augsvc import augment_batch, epoch_batches, load_spec
from augsvc.server import AugmentServer, ServerSettings
from augsvc.v1 import augment_pb2 as pb
from augsvc.v1 import augment_pb2_grpc as pb_grpc
from augsvc.worker import SLEEP_HOOK_ENV
from trainer_client import AugmentClient, AugmentedStream
from trainer_client.client import RETRYABLE

SPEC = load_spec(
    {
        "transforms": [
            {"rotate": {"limit_range": [-12, 12]}},
            {"scale": {"scale_range": [0.9, 1.1]}},
            {"color": {"brightness": 0.2, "contrast": 0.2, "p": 0.8}},
        ],
        "border": "constant",
    }
)
NUM_DIGITS = 1797
BATCH = 64
SLOW_SEED = 515_151
HOOK_S = 0.2
HOOK = f"{SLOW_SEED}:{HOOK_S}"
GONE_S = 15.0  # how long a killed or stopped server's processes and segments take to go, idle (scaled)
DRAIN_GRACE_S = 20.0  # the drained server's --grace on an idle machine (scaled): ~7x what its drain takes


Batches = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def assert_exactly_once(
    batches: Batches, digits: np.ndarray, *, seed: int, epoch: int, population: np.ndarray | int = NUM_DIGITS
) -> None:
    """Plan order, every sample once, and the pixels augment_batch computes in-process."""
    plan = epoch_batches(population, BATCH, seed=seed, epoch=epoch)
    assert len(batches) == len(plan), (len(batches), len(plan))
    for k, ((x, _, ids), plan_ids) in enumerate(zip(batches, plan, strict=True)):
        assert np.array_equal(ids.numpy(), plan_ids), f"batch {k}: sample ids"
        want = augment_batch(digits[plan_ids], SPEC, seed=seed, epoch=epoch, sample_ids=plan_ids)
        assert x.dtype == torch.uint8 and np.array_equal(x.numpy(), want.transpose(0, 3, 1, 2)), f"batch {k}"
    pop = np.arange(population) if isinstance(population, int) else np.sort(population)
    assert np.array_equal(np.sort(torch.cat([b[2] for b in batches]).numpy()), pop), (
        "every sample exactly once"
    )


def assert_gone(pids: set[int], segments: set[str], what: str) -> None:
    """The processes exit and the segments are unlinked (README: "within seconds": GONE_S on an
    idle machine, scaled by the calibrated slowdown)."""
    gone_s = margin(GONE_S)
    wait_until(lambda: not any(alive(p) for p in pids), timeout=gone_s, what=f"{what}: processes to exit")
    wait_until(
        lambda: not any(os.path.exists(f"/dev/shm/{s}") for s in segments),
        timeout=gone_s,
        what=f"{what}: shared-memory segments to be unlinked",
    )


def to_array(msg: pb.Tensor) -> np.ndarray:
    return np.frombuffer(msg.data, np.uint8).reshape(tuple(msg.shape))


def stream_request(**fields: object) -> pb.StreamBatchesRequest:
    fields.setdefault("dataset", "digits")
    fields.setdefault("batch_size", BATCH)
    return pb.StreamBatchesRequest(spec=SPEC.to_proto(), **fields)  # type: ignore[arg-type]


# -- subprocess servers ----------------------------------------------------------------------------


@dataclass
class Fleet:
    survivor: ServeProcess  # stays up all module long
    killed: ServeProcess  # SIGKILLed mid-epoch
    drained: ServeProcess  # SIGTERM with a long grace (drain_grace): its open stream completes
    short_grace: ServeProcess  # SIGTERM with a 0.5 s grace: the client re-asks elsewhere
    drain_grace: float  # seconds


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    logs = tmp_path_factory.mktemp("fleet")
    common = [
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--workers",
        "1",
        "--dataset",
        "digits=builtin:digits",
        "--metrics-port",
        "0",
    ]
    env = subprocess_env(**{SLEEP_HOOK_ENV: HOOK})
    drain_grace = round(margin(DRAIN_GRACE_S), 1)
    names = {
        "survivor": ["--grace", "5"],
        "killed": ["--grace", "5"],
        "drained": ["--grace", str(drain_grace)],
        "short_grace": ["--grace", "0.5"],
    }
    started = ServeProcess.start_all(
        [(common + extra, logs / f"{name}.log", env) for name, extra in names.items()]
    )
    try:
        yield Fleet(*started, drain_grace=drain_grace)
    finally:
        for server in started:
            server.close()


# -- 1. a worker SIGKILLed mid-stream --------------------------------------------------------------


@pytest.fixture()
def hooked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(SLEEP_HOOK_ENV, HOOK)  # forwarded to workers at their start
    yield


def running_jobs(server: AugmentServer) -> int:
    stats = server.pool.stats()
    return stats["inflight"] - stats["queued"]


def test_worker_sigkill_mid_stream_keeps_the_epoch_exactly_once(
    hooked: None, digits_pixels: np.ndarray
) -> None:
    population = np.random.default_rng(3).choice(NUM_DIGITS, 640, replace=False)  # 10 batches of 0.2 s
    own = segments_of(os.getpid())
    with serve_in_process(ServerSettings(workers=1, datasets={"digits": "builtin:digits"})) as (
        server,
        target,
    ):
        pool = server.pool
        (victim,) = pool.pids()
        assert victim is not None
        with AugmentClient(target) as client:
            stream = AugmentedStream(
                client,
                "digits",
                SPEC,
                batch_size=BATCH,
                seed=SLOW_SEED,
                epoch=4,
                sample_ids=population,
                prefetch=4,
            )
            got: Batches = []
            for i, batch in enumerate(stream):
                got.append(tuple(t.clone() for t in batch))  # type: ignore[arg-type]
                if i == 2:
                    wait_until(lambda: running_jobs(server) >= 1, what="a batch on the worker")
                    os.kill(victim, signal.SIGKILL)
        stats = pool.stats()
        assert stats["restarts"] == 1 and stats["failed"] >= 1, f"the kill did not hit a job: {stats}"
        workers = {p for p in pool.pids() if p is not None} | {victim}
        segments = segments_of(os.getpid()) - own
        assert len(segments) == 3, segments  # the dataset, one input and one output slot
    assert_exactly_once(got, digits_pixels, seed=SLOW_SEED, epoch=4, population=population)
    assert_gone(workers, segments, "the stopped in-process server")


# -- 2. one of two servers SIGKILLed mid-epoch -----------------------------------------------------


def stream_open(server: ServeProcess) -> bool:
    """The server is inside a call now (the consumer checks between batches, so the prefetch
    window is not yet full and the fetchers are streaming)."""
    assert server.metrics_port is not None
    return metric(server.metrics_port, "augsvc_inflight_calls") >= 1


def test_sigkill_of_one_of_two_servers_mid_epoch(fleet: Fleet, digits_pixels: np.ndarray) -> None:
    victim = fleet.killed
    children, segments = victim.descendants(), victim.segments()
    assert len(children) >= 2 and len(segments) == 3, (children, segments)
    with AugmentClient([victim.target, fleet.survivor.target]) as client:
        stream = AugmentedStream(
            client, "digits", SPEC, batch_size=BATCH, seed=SLOW_SEED, epoch=6, prefetch=4
        )
        got: Batches = []
        killed = False
        for i, batch in enumerate(stream):
            got.append(tuple(t.clone() for t in batch))  # type: ignore[arg-type]
            if i >= 3 and not killed and stream_open(victim):
                victim.signal(signal.SIGKILL)
                killed = True
    assert killed, "the victim never had an open stream"
    assert victim.proc.wait(TIMEOUT) == -signal.SIGKILL
    assert_exactly_once(got, digits_pixels, seed=SLOW_SEED, epoch=6)
    # its forkserver, worker and resource tracker exit; the tracker unlinks the segments
    assert_gone(children, segments, "the SIGKILLed server")


# -- 3. SIGTERM while streams are open -------------------------------------------------------------


def test_sigterm_drains_an_open_stream_within_the_grace_period(
    fleet: Fleet, digits_pixels: np.ndarray
) -> None:
    """The open stream completes (had the grace run out, it would end CANCELLED), new calls are
    refused meanwhile, and the server exits 0 once drained: before its grace could have run out."""
    victim = fleet.drained  # --grace fleet.drain_grace
    children, segments = victim.descendants(), victim.segments()
    plan = epoch_batches(NUM_DIGITS, BATCH, seed=SLOW_SEED, epoch=7)
    with channel(victim.target) as ch:
        stub = pb_grpc.AugmenterStub(ch)
        call = stub.StreamBatches(stream_request(seed=SLOW_SEED, epoch=7, end=10), timeout=60)
        got = [next(call)]
        signalled = time.monotonic()
        victim.signal(signal.SIGTERM)
        # new calls are refused while it drains: a client re-asks elsewhere
        seen: list[str] = []
        try:
            wait_until(lambda: victim.proc.poll() is not None or refused(stub, seen), timeout=TIMEOUT)
        except AssertionError:
            raise AssertionError(f"new calls were not refused while draining; answers: {seen}") from None
        got += list(call)  # the open stream completes: OK, not CANCELLED by the grace running out
    assert [b.batch_index for b in got] == list(range(10))
    for b in got:
        ids = plan[b.batch_index]
        assert list(b.sample_ids) == ids.tolist()
        np.testing.assert_array_equal(
            to_array(b.images),
            augment_batch(digits_pixels[ids], SPEC, seed=SLOW_SEED, epoch=7, sample_ids=ids),
        )
    assert victim.proc.wait(fleet.drain_grace + TIMEOUT) == 0, victim.log()
    exited = time.monotonic() - signalled
    # Ordering, not speed: it exits once drained, not when the grace runs out. A server that sat out
    # its grace would exit after it; the grace is ~7x what drain and exit take (scaled by the load).
    assert exited < fleet.drain_grace, f"exit {exited:.1f}s after SIGTERM, grace {fleet.drain_grace}s: not once drained"
    assert_gone(children, segments, "the drained server")
    assert "Traceback" not in victim.log(), victim.log()


def refused(stub: pb_grpc.AugmenterStub, seen: list[str]) -> bool:
    """A new call fails fast with a code the client re-asks elsewhere on (UNAVAILABLE; CANCELLED
    for a call that raced the start of the shutdown)."""
    started = time.monotonic()
    try:
        stub.GetServerInfo(pb.ServerInfoRequest(), timeout=2)
        seen.append("OK")
        return False
    except grpc.RpcError as exc:
        seen.append(f"{exc.code().name} after {time.monotonic() - started:.1f}s")
        fast = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        return fast and exc.code() in RETRYABLE


def test_sigterm_with_a_short_grace_the_client_re_asks_elsewhere(
    fleet: Fleet, digits_pixels: np.ndarray
) -> None:
    victim = fleet.short_grace  # --grace 0.5
    children, segments = victim.descendants(), victim.segments()
    with AugmentClient([victim.target, fleet.survivor.target]) as client:
        stream = AugmentedStream(
            client, "digits", SPEC, batch_size=BATCH, seed=SLOW_SEED, epoch=8, prefetch=6
        )
        got: Batches = []
        signalled = False
        for i, batch in enumerate(stream):
            got.append(tuple(t.clone() for t in batch))  # type: ignore[arg-type]
            if i >= 2 and not signalled and stream_open(victim):
                signalled = True
                victim.signal(signal.SIGTERM)
    assert signalled, "the victim never had an open stream"
    assert victim.proc.wait(TIMEOUT) == 0, victim.log()  # a bound for a hung exit only
    assert_exactly_once(got, digits_pixels, seed=SLOW_SEED, epoch=8)
    assert_gone(children, segments, "the stopped server")


# -- 4. a client that disappears mid-stream --------------------------------------------------------

#: A client that knows nothing but grpc: the serialized request comes on stdin (hex), a line per batch.
VANISHING_CLIENT = r"""
import sys, grpc
body = bytes.fromhex(sys.stdin.read())
ch = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
for i, _ in enumerate(ch.unary_stream("/augsvc.v1.Augmenter/StreamBatches")(body, timeout=120)):
    print(i, flush=True)
"""


def test_a_client_that_disappears_mid_stream_frees_its_work(hooked: None, digits_pixels: np.ndarray) -> None:
    settings = ServerSettings(workers=1, datasets={"digits": "builtin:digits"})
    with serve_in_process(settings) as (server, target):
        own = segments_of(os.getpid())
        sent = server.metrics.registry.get_sample_value
        before = sent("augsvc_batches_total", {"method": "StreamBatches"}) or 0.0
        ran_before = jobs_run(server)
        request = stream_request(seed=SLOW_SEED, batch_size=8)  # 225 batches of 0.2 s: 45 s of work
        client = subprocess.Popen(
            [sys.executable, "-c", VANISHING_CLIENT, target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        try:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(request.SerializeToString().hex())
            client.stdin.close()
            for _ in range(3):
                assert client.stdout.readline(), "the client got no batch"
            assert running_jobs(server) >= 1 or server.pool.stats()["queued"] >= 1
            client.kill()
        finally:
            if client.poll() is None:
                client.kill()
            client.wait(10)
        killed = time.monotonic()
        # Events, then counts: the pool empties and the call ends (TIMEOUT only stops a hang; a
        # server that kept working would need 45 s), and what the server computed and sent for
        # the vanished client stays a few batches (3 read, a window of 2 and what was in transit).
        wait_until(
            lambda: server.pool.stats()["inflight"] == 0 and server.pool.stats()["queued"] == 0,
            what="the pool to drop the vanished client's work",
        )
        wait_until(lambda: sent("augsvc_inflight_calls") == 0, what="the call to end")
        drained = time.monotonic() - killed
        produced = (sent("augsvc_batches_total", {"method": "StreamBatches"}) or 0.0) - before
        computed = jobs_run(server) - ran_before
        assert produced < 25, f"{produced:.0f} batches produced for a client that went away"
        assert computed < 25, f"{computed} batches computed for a client that went away"
        assert segments_of(os.getpid()) == own, "shared memory changed"
        # the server keeps serving
        with channel(target) as ch:
            (batch,) = list(
                pb_grpc.AugmenterStub(ch).StreamBatches(stream_request(seed=1, end=1), timeout=TIMEOUT)
            )
        ids = epoch_batches(NUM_DIGITS, BATCH, seed=1, epoch=0)[0]
        np.testing.assert_array_equal(
            to_array(batch.images), augment_batch(digits_pixels[ids], SPEC, seed=1, epoch=0, sample_ids=ids)
        )
    print(
        f"\nvanished client: work freed {drained:.2f}s after SIGKILL; "
        f"{produced:.0f} batches sent, {computed} computed"
    )


def jobs_run(server: AugmentServer) -> int:
    """Jobs that ran on a worker to their end (the cancelled ones never ran)."""
    stats = server.pool.stats()
    return stats["completed"] + stats["failed"]


# -- 5. a client that does not read ----------------------------------------------------------------

SLOW_CLIENT_LIMIT = 16  # batches a server may produce for a client that read one
STALL_SAMPLES = 4  # samples 0.5 s apart with the same count: production has stopped


def test_a_slow_client_does_not_make_the_server_buffer(fleet: Fleet) -> None:
    server = fleet.survivor
    assert server.metrics_port is not None
    port = server.metrics_port
    big = load_spec(
        {"transforms": [{"rotate": {"limit_range": [-10, 10]}}, {"resize": {"height": 64, "width": 64}}]}
    )
    population = list(range(NUM_DIGITS)) * 40  # 71,880 ids: 281 batches of 1 MiB
    request = pb.StreamBatchesRequest(
        dataset="digits", spec=big.to_proto(), batch_size=256, sample_ids=population
    )
    sent = lambda: metric(port, "augsvc_batches_total", {"method": "StreamBatches"})  # noqa: E731
    before = sent()
    # Without BDP probing the client's HTTP/2 window stays at its fixed size: the count then measures
    # the server's buffering. With it, a loaded machine (slow ping acks) lets this client's own
    # transport take in tens of 1 MiB batches it never reads (seen: 68), client memory, not server's.
    with channel(server.target, options=[("grpc.http2.bdp_probe", 0)]) as ch:
        call = pb_grpc.AugmenterStub(ch).StreamBatches(request, timeout=TIMEOUT + 120)
        try:
            first = next(call)
            assert len(first.images.data) == 1 << 20
            rss0 = server.rss_mb()
            samples: list[float] = []
            counts = [sent() - before]
            # Read nothing until the server stops producing (the event backpressure makes): the
            # count stays put for STALL_SAMPLES samples in a row, after at least 5 s of watching.
            # A server that buffers keeps producing on a loaded machine too, only slower: it fails
            # as soon as it passes the limit. TIMEOUT stops a watch that never settles.
            watched = time.monotonic()
            while counts[-1] <= SLOW_CLIENT_LIMIT:
                time.sleep(0.5)
                samples.append(server.rss_mb() - rss0)
                counts.append(sent() - before)
                settled = len(counts) > STALL_SAMPLES and len(set(counts[-STALL_SAMPLES:])) == 1
                if settled and time.monotonic() - watched >= 5:
                    break
                assert time.monotonic() - watched < TIMEOUT, f"production never settled: {counts}"
            produced = counts[-1]
            assert metric(port, "augsvc_inflight_calls") == 1
        finally:
            call.cancel()
    wait_until(lambda: metric(port, "augsvc_inflight_calls") == 0, what="the cancelled call to end")
    growth = max(samples, default=0.0)
    print(
        f"\nslow client: {produced:.0f} of 281 batches produced in {len(samples) / 2:.1f} s unread "
        f"(count every 0.5 s: {counts}); RSS growth max {growth:.1f} MiB"
    )
    assert growth < 100, f"server RSS grew by {growth:.0f} MiB for a client that does not read"
    assert produced <= SLOW_CLIENT_LIMIT, f"{produced:.0f} batches produced for a client that read one"


# -- long form: repeated worker kills over several epochs ------------------------------------------


@pytest.mark.slow
def test_repeated_worker_kills_over_many_epochs(
    tmp_path: Path, budget: Budget, digits_pixels: np.ndarray
) -> None:
    """For --load-seconds (long default 600; capped at 300 here): two servers of two workers, a
    worker SIGKILLed every ~0.7 s; every epoch is still exactly-once and bit-identical."""
    duration = min(budget.load_seconds(slow=True), 300.0)
    args = ["--host", "127.0.0.1", "--port", "0", "--workers", "2", "--dataset", "digits=builtin:digits"]
    servers = ServeProcess.start_all([(args, tmp_path / f"s{i}.log", subprocess_env()) for i in range(2)])
    rng = np.random.default_rng(0)
    kills = epochs = 0
    try:
        with AugmentClient([s.target for s in servers]) as client:
            deadline = time.monotonic() + duration
            next_kill = time.monotonic() + 0.7
            while time.monotonic() < deadline:
                stream = AugmentedStream(
                    client, "digits", SPEC, batch_size=BATCH, seed=21, epoch=epochs, prefetch=6
                )
                got: Batches = []
                for batch in stream:
                    got.append(tuple(t.clone() for t in batch))  # type: ignore[arg-type]
                    if time.monotonic() > next_kill:
                        server = servers[int(rng.integers(2))]
                        workers = sorted(server.worker_pids())
                        if workers:
                            with contextlib.suppress(ProcessLookupError):  # it may have just exited
                                os.kill(workers[int(rng.integers(len(workers)))], signal.SIGKILL)
                                kills += 1
                        next_kill = time.monotonic() + 0.7
                assert_exactly_once(got, digits_pixels, seed=21, epoch=epochs)
                epochs += 1
        print(f"\nchaos: {epochs} epochs exactly-once with {kills} worker kills in {duration:.0f}s")
        assert kills > 0 and epochs > 0
        # after all those replacements, a SIGTERM still leaves nothing behind
        for server in servers:
            children, segments = server.descendants(), server.segments()
            assert len(segments) == 5, segments  # the dataset and two slots per worker
            server.signal(signal.SIGTERM)
            assert server.proc.wait(30) == 0, server.log()
            assert_gone(children, segments, "a server after the chaos")
    finally:
        for s in servers:
            s.close()
