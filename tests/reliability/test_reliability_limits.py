"""Hostile inputs the fuzz found (or that are too big for it), pinned as targeted tests against a
server with the default limits (64 MiB batches, sides up to 4096, 1 worker).

Fixed bugs stay as regression guards; open ones are strict xfails whose reason names the code
to change (they flip to XPASS, and fail, once it is fixed: then drop the marker).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from reliability_hostile import GOOD_SPEC, METHODS, tensor
from reliability_options import Budget
from reliability_procs import (
    TIMEOUT,
    channel,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
    serve_in_process,
    subprocess_env,
    wait_until,
)

from augsvc import augment_batch
from augsvc.server import AugmentServer, ServerSettings
from augsvc.v1 import augment_pb2 as pb
from augsvc.v1 import augment_pb2_grpc as pb_grpc

DEADLINE = 5.0


@dataclass
class Served:
    server: AugmentServer
    channel: grpc.Channel
    stub: pb_grpc.AugmenterStub


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    settings = ServerSettings(workers=1, datasets={"digits": "builtin:digits"})
    with serve_in_process(settings) as (server, target), channel(target) as ch:
        yield Served(server, ch, pb_grpc.AugmenterStub(ch))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_undecodable_requests_are_invalid_argument(served: Served, method: str) -> None:
    """Bytes that do not parse are a bad request (grpc alone would answer INTERNAL). ListDatasets
    and GetServerInfo take no fields, so answering them anyway is fine too."""
    body = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # a field key varint longer than 10 bytes
    kind = METHODS[method]
    if method in ("ListDatasets", "GetServerInfo"):
        try:
            served.channel.unary_unary(path := f"/augsvc.v1.Augmenter/{method}")(body, timeout=DEADLINE)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, exc.code(), exc.details())
        return
    path = f"/augsvc.v1.Augmenter/{method}"
    with pytest.raises(grpc.RpcError) as info:
        if kind == "unary_unary":
            served.channel.unary_unary(path)(body, timeout=DEADLINE)
        elif kind == "unary_stream":
            list(served.channel.unary_stream(path)(body, timeout=DEADLINE))
        else:
            list(served.channel.stream_stream(path)(iter([body]), timeout=DEADLINE))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())
    assert "not a valid augsvc.v1." in (info.value.details() or "")


@pytest.mark.parametrize("method", ["Augment", "AugmentStream"])
def test_an_empty_batch_is_augmented(served: Served, method: str) -> None:
    msg = pb.AugmentRequest(
        spec=GOOD_SPEC.to_proto(), images=pb.Tensor(data=b"", shape=[0, 8, 6, 3], dtype="uint8"), tag=5
    )
    if method == "Augment":
        reply = served.stub.Augment(msg, timeout=DEADLINE)
    else:
        (reply,) = list(served.stub.AugmentStream(iter([msg]), timeout=DEADLINE))
    assert list(reply.images.shape) == [0, 8, 6, 3] and reply.images.data == b"" and reply.tag == 5


def long_string_calls(fz: Served, s: str) -> dict[str, Callable[[], object]]:
    x = np.zeros((1, 4, 4, 3), np.uint8)

    def augment(**fields: Any) -> Callable[[], object]:
        msg = pb.AugmentRequest(spec=GOOD_SPEC.to_proto(), images=tensor(x), sample_ids=[0])
        for key, value in fields.items():
            if key == "dtype":
                msg.images.dtype = value
            elif key == "border":
                msg.spec.border = value
            else:
                setattr(msg, key, value)
        return lambda: fz.stub.Augment(msg, timeout=DEADLINE)

    stream = pb.StreamBatchesRequest(dataset=s, spec=GOOD_SPEC.to_proto(), batch_size=8)
    return {
        "NOT_FOUND dataset": lambda: list(fz.stub.StreamBatches(stream, timeout=DEADLINE)),
        "INVALID_ARGUMENT backend": augment(backend=s),
        "INVALID_ARGUMENT dtype": augment(dtype=s),
        "INVALID_ARGUMENT border": augment(border=s),
    }


def test_very_long_strings_keep_their_status_code(served: Served) -> None:
    got = {}
    for want, call in long_string_calls(served, "\u00e9" * 20_000).items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        got[want] = (info.value.code().name, len(info.value.details() or ""))
    assert all(want.startswith(code) for want, (code, _) in got.items()), got
    assert all(n <= 4096 for _, n in got.values()), got


def test_moderately_long_strings_keep_their_status_code(served: Served) -> None:
    """The same calls with a 1,000-character string: below grpc's metadata limits, all fine today."""
    for want, call in long_string_calls(served, "x" * 1000).items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert want.startswith(info.value.code().name), (want, info.value.code(), info.value.details()[:200])


def test_a_huge_population_costs_no_memory_per_batch(
    served: Served,
) -> None:
    stub = served.stub
    n = 4_000_000  # 4 MB on the wire; the default limits allow ~70M
    ids = np.zeros(n, np.uint64)
    ids[1::2] = 1
    msg = pb.StreamBatchesRequest(
        dataset="digits", spec=GOOD_SPEC.to_proto(), batch_size=1, shuffle=False, end=1
    )
    msg.sample_ids.extend(ids.tolist())
    del ids
    me = os.getpid()  # the server runs in this process
    base = rss_mb(me)
    if not reset_peak_rss(me):
        pytest.skip("cannot reset the peak RSS (/proc/PID/clear_refs)")
    (batch,) = list(stub.StreamBatches(msg, timeout=60))
    growth = peak_rss_mb(me) - base
    assert list(batch.sample_ids) == [0]
    # A few int64 copies of the population (decode, validate, permute) are fine: 4 x 8 bytes per id.
    assert growth < n * 4 * 8 / 2**20 + 100, (
        f"peak RSS grew by {growth:.0f} MiB for one batch of a {n}-id population"
    )


def heavy_spec(image: np.ndarray, seconds: float) -> pb.Pipeline:
    """A pipeline of gaussian blurs that takes about `seconds` on `image`, timed in-process on a
    short pipeline (16 steps, 6 times: any sane step limit allows that)."""
    probe = {"transforms": [{"gaussian_blur": {"sigma_range": [5.0, 5.0], "p": 1.0}}] * 16}
    started = time.perf_counter()
    for _ in range(6):
        augment_batch(image, probe, seed=0, epoch=0, sample_ids=[0])
    per_step = (time.perf_counter() - started) / 96
    spec = pb.Pipeline()
    for _ in range(min(200_000, math.ceil(seconds / per_step))):
        step = spec.transforms.add().gaussian_blur
        step.sigma_range.extend([5.0, 5.0])
        step.p = 1.0
    return spec


def jobs_run(server: AugmentServer) -> int:
    """Jobs that ran on a worker to their end (a cancelled job never ran)."""
    stats = server.pool.stats()
    return stats["completed"] + stats["failed"]


def test_a_spec_with_thousands_of_steps_does_not_monopolise_a_worker(
    served: Served, digits_pixels: np.ndarray
) -> None:
    """Counted, not timed: the heavy call (its deadline 1 s, about 6 s of work) ends with a refusal
    or its deadline, and the only job the worker runs is the good call after it."""
    server, stub = served.server, served.stub
    x = np.random.default_rng(0).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    spec = heavy_spec(x, seconds=6.0)
    heavy = pb.AugmentRequest(spec=spec, images=tensor(x), sample_ids=[0])
    wait_until(lambda: server.pool.stats()["inflight"] == 0, what="the pool to be idle")
    ran = jobs_run(server)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Augment(heavy, timeout=1.0)
        assert info.value.code().name in {"DEADLINE_EXCEEDED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
        ids = np.arange(4)
        reply = stub.Augment(
            pb.AugmentRequest(
                spec=GOOD_SPEC.to_proto(), images=tensor(digits_pixels[ids]), sample_ids=ids.tolist()
            ),
            timeout=TIMEOUT,
        )
        np.testing.assert_array_equal(
            np.frombuffer(reply.images.data, np.uint8).reshape(tuple(reply.images.shape)),
            augment_batch(digits_pixels[ids], GOOD_SPEC, seed=0, epoch=0, sample_ids=ids),
        )
    finally:  # leave the server idle for the next test
        wait_until(lambda: server.pool.stats()["inflight"] == 0, timeout=120, what="the pool to drain")
    assert jobs_run(server) - ran == 1, "the heavy spec ran on the worker"


@pytest.mark.slow
def test_atheris_request_parsers(budget: Budget, tmp_path: Path) -> None:
    """Coverage-guided fuzzing of the request parsers and validators (reliability_atheris.py) for
    fuzz-cases / 100 seconds, 30 to 120; skipped when atheris (optional) is not installed."""
    pytest.importorskip("atheris")
    seconds = int(min(120, max(30, budget.fuzz_cases(slow=True) / 100)))
    script = Path(__file__).with_name("reliability_atheris.py")
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            f"-max_total_time={seconds}",
            "-max_len=4096",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    done = [line for line in proc.stderr.splitlines() if line.startswith("Done ")]
    print(f"\natheris: {done[-1] if done else proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
