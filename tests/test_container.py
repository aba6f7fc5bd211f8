"""The worker image for real: build deploy/Dockerfile with podman, run two worker containers on
loopback ports (`--network host`, AUGSVC_HOST=127.0.0.1, so no TLS is needed; the built-in digits),
stream an epoch from both exactly once, then `podman stop` (SIGTERM) one mid-epoch and still get
the whole epoch, bit-identical.

Also: the containers run as a non-root user, report healthy through the image's own HEALTHCHECK
(`podman healthcheck run`), start one worker per CPU of their `--cpus` quota, run with a read-only
root filesystem, and exit 0 after draining on SIGTERM.

Skips, saying why, where podman, its runtime or the python:3.11-slim base is missing. When podman
is missing and ../shared/container/make-base-image.sh exists (this machine's way to get podman and
an offline stand-in for the base image), it runs that first, bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.servers import wait_until

from augsvc import epoch_batches, load_spec
from augsvc.launcher import ReadyLine
from trainer_client import AugmentClient, AugmentedStream

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
BASE_SCRIPT = ROOT.parent / "shared" / "container" / "make-base-image.sh"
BASE_IMAGE = "docker.io/library/python:3.11-slim"
IMAGE = "localhost/augsvc-worker:test"
PODMAN = ["podman", "--runtime", "runc"]
SPEC = load_spec(ROOT / "augsvc" / "examples" / "digits.yaml")
NUM_DIGITS = 1797
BATCH = 32
SEED = 5
EPOCH = 1


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def make_base_image(why: str) -> None:
    """Run the shared setup script (installs podman + runc, builds the base), or skip."""
    if not BASE_SCRIPT.exists():
        pytest.skip(f"{why}, and {BASE_SCRIPT} (which would set it up) does not exist")
    if os.geteuid() != 0:
        pytest.skip(f"{why}, and {BASE_SCRIPT.name} needs root")
    try:
        done = subprocess.run(["bash", str(BASE_SCRIPT)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{why}, and {BASE_SCRIPT.name} did not finish within 900 s")
    if done.returncode != 0:
        pytest.skip(f"{why}, and {BASE_SCRIPT.name} failed ({done.returncode}): {done.stderr[-500:]}")


@pytest.fixture(scope="module")
def worker_image() -> str:
    if shutil.which("podman") is None:
        make_base_image("podman is not installed")
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.skip("podman with the runc runtime is not available")
    info = podman("info", check=False, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-500:]}")
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        make_base_image(f"the base image {BASE_IMAGE} is not present")
        if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
            pytest.skip(f"the base image {BASE_IMAGE} is not present and could not be made")
    probe = podman("run", "--rm", "--pull=never", "--network", "host", BASE_IMAGE, "true", check=False)
    if probe.returncode != 0:
        pytest.skip(f"the runc runtime cannot start containers here: {probe.stderr.strip()[-500:]}")
    # --format docker keeps the HEALTHCHECK (the OCI image format has no field for it).
    build = subprocess.run([*PODMAN, "build", "--format", "docker", "--pull=never", "--network", "host",
                            "-f", "deploy/Dockerfile", "-t", IMAGE, "."],
                           cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, f"image build failed:\n{build.stdout[-4000:]}\n{build.stderr[-2000:]}"
    return IMAGE


@dataclass
class Container:
    name: str
    port: int
    workers: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        out = podman("logs", self.name, check=False)
        return out.stdout + out.stderr

    def state(self, field: str) -> str:
        return podman("inspect", "--format", "{{" + field + "}}", self.name).stdout.strip()


def loopback_port() -> int:
    """A loopback port free right now. Containers on the host network cannot report a port 0 back
    to the HEALTHCHECK (it reads AUGSVC_PORT), so this one place picks a port; a start that loses
    the race is retried with another (the server refuses to share a port: so_reuseport is off)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_container(image: str, name: str, attempts: int = 3) -> Container:
    last = ""
    for _ in range(attempts):
        port = loopback_port()
        podman("rm", "-f", "-t", "0", name, check=False)
        podman("run", "-d", "--name", name, "--network", "host", "--read-only", "--cpus", "1",
               "-e", "AUGSVC_HOST=127.0.0.1", "-e", f"AUGSVC_PORT={port}", image)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            logs = subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True, timeout=30).stdout
            ready = next((r for r in map(ReadyLine.parse, logs.splitlines()) if r), None)
            if ready:
                return Container(name, ready.port, ready.workers)
            if podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip() != "true":
                break  # exited before it was ready: most likely the port was taken meanwhile
            time.sleep(0.2)
        last = Container(name, port, 0).logs()
    raise AssertionError(f"container {name} never became ready; its log:\n{last[-3000:]}")


@pytest.fixture(scope="module")
def containers(worker_image: str) -> Iterator[list[Container]]:
    names = [f"augsvc-test-{os.getpid()}-{i}" for i in range(2)]
    try:
        yield [start_container(worker_image, name) for name in names]
    finally:
        for name in names:
            with contextlib.suppress(subprocess.SubprocessError, AssertionError):
                podman("rm", "-f", "-t", "0", name, check=False, timeout=60)


def test_containers_run_as_non_root(containers: list[Container]) -> None:
    for c in containers:
        assert c.state(".Config.User").split(":")[0] not in ("", "0", "root")
        uid = podman("exec", c.name, "id", "-u").stdout.strip()
        assert uid.isdigit() and int(uid) != 0, uid


def test_worker_count_follows_the_cpu_quota(containers: list[Container]) -> None:
    # --cpus 1 and no AUGSVC_WORKERS: one worker, although this machine has more CPUs.
    assert [c.workers for c in containers] == [1, 1]


def test_healthcheck_reports_healthy(containers: list[Container]) -> None:
    for c in containers:
        assert "augsvc health" in c.state(".Config.Healthcheck.Test")
        # Runs the image's HEALTHCHECK command inside the container now (without systemd, podman
        # cannot schedule the periodic runs, and says so on stderr; the manual run works).
        run = podman("healthcheck", "run", c.name, check=False, timeout=60)
        assert run.returncode == 0, f"{c.name}: {run.stdout} {run.stderr}"
        assert c.state(".State.Health.Status") == "healthy"


def collect(client: AugmentClient, stop_after: int | None = None, stop: Container | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    stream = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED, epoch=EPOCH, prefetch=6)
    batches = []
    for i, batch in enumerate(stream):
        batches.append(tuple(t.clone() for t in batch))
        if stop is not None and i == stop_after:
            # SIGTERM; returns once the container has drained and exited. The prefetch window keeps
            # the fetchers at most 6 batches ahead, so most of the epoch is still to be asked for.
            podman("stop", "-t", "30", stop.name, timeout=90)
    xs, ys, ids = zip(*batches, strict=True)
    return torch.cat(xs), torch.cat(ys), torch.cat(ids)


def test_epoch_exactly_once_and_podman_stop_mid_epoch(containers: list[Container]) -> None:
    plan = np.concatenate(epoch_batches(NUM_DIGITS, BATCH, seed=SEED, epoch=EPOCH))
    with AugmentClient([c.target for c in containers]) as client:
        assert client.num_endpoints == 2
        full = collect(client)
        assert np.array_equal(full[2].numpy(), plan), "every sample exactly once, in plan order"
        stopped = containers[0]
        again = collect(client, stop_after=1, stop=stopped)
    assert stopped.state(".State.Running") == "false"
    assert stopped.state(".State.ExitCode") == "0", f"a drained exit, not a kill:\n{stopped.logs()[-2000:]}"
    assert "draining" in stopped.logs()
    assert np.array_equal(again[2].numpy(), plan), "every sample exactly once after the stop"
    assert torch.equal(again[1], full[1])
    assert torch.equal(again[0], full[0]), "pixels bit-identical with and without the stop"
    wait_until(lambda: containers[1].state(".State.Running") == "true", timeout=5, what="the other worker")
