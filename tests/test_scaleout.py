"""Scale-out on one machine: three `augsvc serve` processes (1 worker each) on loopback and one
client whose multi-address target spreads an epoch over them (DESIGN contract 2).

Every server serves a share (each one's own /metrics counts its StreamBatches batches); the epoch
is exactly-once and bit-identical to the same epoch from one server; SIGKILL of one server
mid-epoch changes neither.
"""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.servers import CliServer, wait_until
from prometheus_client.parser import text_string_to_metric_families

from augsvc import epoch_batches, load_spec
from trainer_client import AugmentClient, AugmentedStream

SPEC = load_spec(Path(__file__).resolve().parent.parent / "augsvc" / "examples" / "digits.yaml")
NUM_DIGITS = 1797
BATCH = 32  # 57 batches: enough that a mid-epoch kill leaves most of the epoch still to fetch
SEED = 11
EPOCH = 2
SERVERS = 3

Epoch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, labels, sample ids, concatenated


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[CliServer]]:
    logs = tmp_path_factory.mktemp("scaleout")

    def start(i: int) -> CliServer:
        return CliServer(["--host", "127.0.0.1", "--port", "0", "--workers", "1", "--metrics-port", "0",
                          "--dataset", "digits=builtin:digits"], logs / f"server{i}.log")

    # Started side by side: each spends seconds importing and loading before its ready line.
    with ThreadPoolExecutor(SERVERS) as pool:
        futures = [pool.submit(start, i) for i in range(SERVERS)]
    started = [f.result() for f in futures if f.exception() is None]
    try:
        for f in futures:
            f.result()  # re-raises a failed start, after the others were collected for closing
        yield started
    finally:
        for server in started:
            server.close()


def streamed_batches(server: CliServer) -> float:
    """StreamBatches batches this server has sent, from its own Prometheus endpoint."""
    assert server.metrics_port is not None, "the server was started with --metrics-port 0"
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with no_proxy.open(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "augsvc_batches_total" and sample.labels.get("method") == "StreamBatches":
                return float(sample.value)
    return 0.0


def stream(client: AugmentClient, **kwargs: object) -> AugmentedStream:
    return AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED, epoch=EPOCH, **kwargs)


def concat(batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Epoch:
    xs, ys, ids = zip(*batches, strict=True)
    return torch.cat(xs), torch.cat(ys), torch.cat(ids)


def assert_same_epoch(got: Epoch, want: Epoch) -> None:
    plan = np.concatenate(epoch_batches(NUM_DIGITS, BATCH, seed=SEED, epoch=EPOCH))
    assert np.array_equal(got[2].numpy(), plan), "batches in plan order"
    assert np.array_equal(np.sort(got[2].numpy()), np.arange(NUM_DIGITS)), "every sample exactly once"
    assert torch.equal(got[1], want[1]), "labels"
    assert got[0].dtype == torch.uint8 and torch.equal(got[0], want[0]), "pixels bit-identical"


@pytest.fixture(scope="module")
def one_server_epoch(servers: list[CliServer]) -> Epoch:
    with AugmentClient(servers[0].target) as client:
        return concat(list(stream(client)))


def test_every_server_serves_a_share_of_a_bit_identical_epoch(servers: list[CliServer],
                                                              one_server_epoch: Epoch) -> None:
    before = [streamed_batches(s) for s in servers]
    with AugmentClient(",".join(s.target for s in servers)) as client:
        assert client.num_endpoints == SERVERS
        got = concat(list(stream(client)))
    assert_same_epoch(got, one_server_epoch)
    shares = [streamed_batches(s) - b for s, b in zip(servers, before, strict=True)]
    assert all(share > 0 for share in shares), f"batches per server: {shares}"
    assert sum(shares) == -(-NUM_DIGITS // BATCH), f"each batch served once: {shares}"


def test_sigkill_of_one_server_mid_epoch_changes_nothing(servers: list[CliServer],
                                                         one_server_epoch: Epoch) -> None:
    victim = servers[-1]
    with AugmentClient([s.target for s in servers]) as client:
        batches = []
        for i, batch in enumerate(stream(client, prefetch=6)):
            batches.append(tuple(t.clone() for t in batch))
            if i == 1:
                # The prefetch window keeps the fetchers at most 6 batches ahead, so most of the
                # epoch is still to be asked for, a third of it from this server.
                os.kill(victim.proc.pid, signal.SIGKILL)
                wait_until(lambda: victim.proc.poll() is not None, what="the killed server to exit")
    assert victim.proc.returncode == -signal.SIGKILL
    assert_same_epoch(concat(batches), one_server_epoch)
