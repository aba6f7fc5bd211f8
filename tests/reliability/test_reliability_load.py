"""Load: 16 concurrent clients (threads) mixing Augment, AugmentStream and StreamBatches against
one `augsvc serve` subprocess for a bounded time (CI: 20 s; ``--load-seconds`` sets it; the slow
variant defaults to 600 s).

Asserts: no error other than RESOURCE_EXHAUSTED (over a configured limit); every answer is
bit-identical to what `augment_batch` computes in-process (no cross-talk between concurrent
calls sharing workers and shared-memory slots); the server's RSS in the last quarter of the run
is within 10% of the first quarter's (sampled from /proc/PID/status after a warm-up under the same
load; see run_load for the statistic). Prints
p50/p99 latencies per method and writes them, with the RSS figures, to ``--load-json PATH``.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from reliability_options import Budget
from reliability_procs import ServeProcess, channel, metric, status_kb, subprocess_env

from augsvc import augment_batch, epoch_batches, load_spec
from augsvc.v1 import augment_pb2 as pb
from augsvc.v1 import augment_pb2_grpc as pb_grpc

CLIENTS = 16
WORKERS = 2
MAX_INFLIGHT = 48  # 16 streams x a window of 2, and room for the unary calls
WARMUP_MIN_S = 5.0
WARMUP_MAX_S = 20.0
WARMUP_WINDOW_S = 2.5
RSS_GROWTH_LIMIT = 0.10
NUM_DIGITS = 1797
SPECS = [
    load_spec(
        {
            "transforms": [
                {"hflip": {"p": 0.5}},
                {"rotate": {"limit_range": [-15, 15]}},
                {"color": {"brightness": 0.2, "contrast": 0.2, "p": 0.8}},
            ]
        }
    ),
    load_spec(
        {
            "transforms": [
                {"random_resized_crop": {"height": 24, "width": 24}},
                {"gaussian_blur": {"p": 0.5}},
                {"coarse_dropout": {"p": 0.5}},
            ]
        }
    ),
]
METHODS = ("Augment", "AugmentStream", "StreamBatches")


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True)
class Job:
    """One call with its answer known in advance."""

    method: str
    augment: list[pb.AugmentRequest] = field(default_factory=list)  # Augment: 1; AugmentStream: several
    stream: pb.StreamBatchesRequest | None = None
    want: tuple[str, ...] = ()  # digests of the answers' pixels


def make_jobs(digits: np.ndarray) -> list[Job]:
    rng = np.random.default_rng(7)
    jobs = []
    for i in range(12):
        spec = SPECS[i % 2]
        requests, wants = [], []
        for j in range(4):
            ids = rng.choice(NUM_DIGITS, 32, replace=False)
            seed, epoch = int(rng.integers(1 << 32)), int(rng.integers(100))
            requests.append(
                pb.AugmentRequest(
                    spec=spec.to_proto(),
                    images=pb.Tensor(
                        data=digits[ids].tobytes(), shape=list(digits[ids].shape), dtype="uint8"
                    ),
                    seed=seed,
                    epoch=epoch,
                    sample_ids=ids.tolist(),
                    tag=j,
                )
            )
            wants.append(
                digest(augment_batch(digits[ids], spec, seed=seed, epoch=epoch, sample_ids=ids).tobytes())
            )
        jobs.append(Job("Augment", requests[:1], want=tuple(wants[:1])))
        jobs.append(Job("AugmentStream", requests, want=tuple(wants)))
        seed, epoch, start = int(rng.integers(1 << 32)), i, int(rng.integers(0, 20))
        plan = epoch_batches(NUM_DIGITS, 64, seed=seed, epoch=epoch)
        want = tuple(
            digest(augment_batch(digits[plan[k]], spec, seed=seed, epoch=epoch, sample_ids=plan[k]).tobytes())
            for k in range(start, start + 6)
        )
        jobs.append(
            Job(
                "StreamBatches",
                stream=pb.StreamBatchesRequest(
                    dataset="digits",
                    spec=spec.to_proto(),
                    seed=seed,
                    epoch=epoch,
                    batch_size=64,
                    start=start,
                    end=start + 6,
                ),
                want=want,
            )
        )
    return jobs


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    batches: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    codes: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def run_job(stub: pb_grpc.AugmenterStub, job: Job, tally: Tally) -> None:
    started = time.perf_counter()
    stamps: list[float] = []
    got: list[str] = []
    try:
        if job.method == "Augment":
            reply = stub.Augment(job.augment[0], timeout=60)
            got.append(digest(reply.images.data))
            stamps.append(time.perf_counter())
        elif job.method == "AugmentStream":
            for reply in stub.AugmentStream(iter(job.augment), timeout=60):
                got.append(digest(reply.images.data))
                stamps.append(time.perf_counter())
        else:
            for batch in stub.StreamBatches(job.stream, timeout=60):
                got.append(digest(batch.images.data))
                stamps.append(time.perf_counter())
        code = "OK"
    except grpc.RpcError as exc:
        code = exc.code().name
        if code != "RESOURCE_EXHAUSTED":
            with tally.lock:
                tally.unexpected.append(f"{job.method}: {code}: {exc.details()}")
    ended = time.perf_counter()
    with tally.lock:
        tally.codes[f"{job.method} {code}"] += 1
        if code == "OK":
            tally.calls[job.method].append(ended - started)
            previous = started
            for stamp in stamps:
                tally.batches[job.method].append(stamp - previous)
                previous = stamp
        if got != list(job.want[: len(got)]) or code == "OK" and len(got) != len(job.want):
            tally.wrong.append(f"{job.method}: answers differ from augment_batch")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    arr = np.array(values) * 1000
    return {
        "count": len(values),
        "p50_ms": round(float(np.percentile(arr, 50)), 2),
        "p99_ms": round(float(np.percentile(arr, 99)), 2),
        "max_ms": round(float(arr.max()), 2),
    }


def images_sent(port: int) -> float:
    return sum(metric(port, "augsvc_images_total", {"method": m}) for m in METHODS)


def threads_of(pid: int) -> int:
    return status_kb(pid, "Threads")


def sample_rss(server: ServeProcess, stop: threading.Event, out: list[tuple[float, float, int]]) -> None:
    while not stop.wait(0.25):
        try:
            out.append((time.monotonic(), server.rss_mb(), threads_of(server.pid)))
        except OSError:
            return


@pytest.fixture()
def load_server(tmp_path: Path) -> Iterator[ServeProcess]:
    args = [
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--workers",
        str(WORKERS),
        "--max-inflight",
        str(MAX_INFLIGHT),
        "--dataset",
        "digits=builtin:digits",
        "--metrics-port",
        "0",
    ]
    server = ServeProcess(args, tmp_path / "serve.log", subprocess_env()).wait_ready()
    try:
        yield server
    finally:
        server.close()


def warm_up(server: ServeProcess, samples: list[float]) -> float:
    """Wait (under load) until the server's RSS stops climbing: the allocator's heaps grow for the
    first seconds of a new load. Returns the seconds waited (WARMUP_MIN_S to WARMUP_MAX_S)."""
    started = time.monotonic()
    window = int(WARMUP_WINDOW_S / 0.25)
    while True:
        time.sleep(0.25)
        samples.append(server.rss_mb())
        waited = time.monotonic() - started
        if waited >= WARMUP_MAX_S:
            return waited
        if (
            waited >= WARMUP_MIN_S
            and len(samples) >= 2 * window
            and np.median(samples[-window:]) <= np.median(samples[-2 * window : -window]) * 1.01
        ):
            return waited


def run_load(
    server: ServeProcess, digits: np.ndarray, seconds: float, json_path: str | None
) -> dict[str, Any]:
    jobs = make_jobs(digits)
    tally = Tally()
    rss: list[tuple[float, float, int]] = []
    stop_sampling = threading.Event()
    end = [time.monotonic() + WARMUP_MAX_S + seconds]  # moved up once the warm-up is over
    with channel(server.target) as ch:
        stub = pb_grpc.AugmenterStub(ch)
        for job in jobs[:3]:  # connected, and one call of each kind done
            run_job(stub, job, tally)

        def client(i: int) -> None:
            rng = random.Random(i)
            while time.monotonic() < end[0]:
                run_job(stub, rng.choice(jobs), tally)

        threads = [
            threading.Thread(target=client, args=(i,), name=f"load-{i}", daemon=True) for i in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        warm_rss: list[float] = []
        warmup = warm_up(server, warm_rss)
        with tally.lock:  # latencies and codes count after the warm-up only
            for m in METHODS:
                tally.calls[m].clear()
                tally.batches[m].clear()
            tally.codes.clear()
        assert server.metrics_port is not None
        images_before = images_sent(server.metrics_port)
        measured_from = time.monotonic()
        end[0] = measured_from + seconds
        sampler = threading.Thread(target=sample_rss, args=(server, stop_sampling, rss), daemon=True)
        sampler.start()
        for t in threads:
            t.join(timeout=seconds + 120)
        stop_sampling.set()
        sampler.join(10)
        elapsed = time.monotonic() - measured_from
        hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"client threads still running: {hung}"
    # The heap grows in a sawtooth under this load (glibc trims it every few tens of seconds; the
    # long run shows a plateau), so the comparison is robust to its phase: the last quarter's
    # median RSS against the highest RSS seen up to the end of the first quarter. A leak makes new
    # highs; the sawtooth does not. The medians of both quarters are reported as well.
    quarter = max(1, len(rss) // 4)
    values = [r for _, r, _ in rss]
    first = float(np.median(values[:quarter]))
    last = float(np.median(values[-quarter:]))
    early_peak = max(warm_rss + values[:quarter])
    report = {
        "clients": CLIENTS,
        "workers": WORKERS,
        "seconds": seconds,
        "warmup_seconds": round(warmup, 1),
        "calls": {m: percentiles(tally.calls[m]) for m in METHODS},
        "per_reply": {m: percentiles(tally.batches[m]) for m in METHODS},
        "codes": dict(sorted(tally.codes.items())),
        "images_per_second": round((images_sent(server.metrics_port) - images_before) / elapsed),
        "rss_mb": {
            "first_quarter": round(first, 1),
            "last_quarter": round(last, 1),
            "growth": round(last / first - 1, 4),
            "early_peak": round(early_peak, 1),
            "last_quarter_vs_early_peak": round(last / early_peak - 1, 4),
            "max": round(max(values), 1),
            "samples": [round(r, 1) for _, r, _ in rss[:: max(1, len(rss) // 40)]],
        },
        "server_threads": {
            "first": rss[0][2],
            "last": rss[-1][2],
            "samples": [n for _, _, n in rss[:: max(1, len(rss) // 40)]],
        },
    }
    print("\nload:", json.dumps(report, indent=1))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    assert not tally.unexpected, f"{len(tally.unexpected)} unexpected errors: {tally.unexpected[:5]}"
    assert not tally.wrong, tally.wrong[:5]
    assert sum(len(v) for v in tally.calls.values()) > 0
    assert last <= early_peak * (1 + RSS_GROWTH_LIMIT), f"server RSS grew {report['rss_mb']}"
    assert "Traceback" not in server.log(), server.log()[-3000:]
    return report


def test_load_mixed_rpcs(load_server: ServeProcess, budget: Budget, digits_pixels: np.ndarray) -> None:
    run_load(load_server, digits_pixels, budget.load_seconds(slow=False), budget.load_json)


@pytest.mark.slow
def test_load_mixed_rpcs_long(load_server: ServeProcess, budget: Budget, digits_pixels: np.ndarray) -> None:
    run_load(load_server, digits_pixels, budget.load_seconds(slow=True), budget.load_json)
