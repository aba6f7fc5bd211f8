"""Shared-memory segments never outlive their server: names carry the creator's pid, start time
and pid namespace, and a starting server removes what processes that no longer exist left behind.
Every wait is bounded; every process started here is ended by its own id or process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import pytest
from helpers.servers import OwnGroupServer, descendants, subprocess_env, wait_until

from augsvc.procfs import alive, pid_namespace, start_time
from augsvc.server import ServerSettings, create_server
from augsvc.shm import (
    SHM_DIR,
    attach_segment,
    create_client_segment,
    create_segment,
    is_client_segment,
    release_segment,
    segments_of,
    sweep_stale_segments,
)

NS = pid_namespace()
pytestmark = pytest.mark.skipif(NS is None or start_time(os.getpid()) is None, reason="needs /proc")


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def fake(name: str) -> str:
    """A segment called `name`, as a crashed process would have left it."""
    shm = SharedMemory(name=name, create=True, size=64)
    shm.close()
    from multiprocessing import resource_tracker

    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]  # not ours to unlink
    return name


def test_names_carry_pid_start_time_and_namespace() -> None:
    shm = create_segment(16, "t", reserve=True)
    client, _token = create_client_segment(16)
    try:
        me, started = os.getpid(), start_time(os.getpid())
        assert started is not None and NS is not None
        assert shm.name.startswith(f"augsvc_{me}_{started:x}.{NS:x}_") and shm.name.endswith("_t")
        assert client.name.startswith(f"augsvc_client_{me}_{started:x}.{NS:x}_") and is_client_segment(client.name)
        assert shm.name in segments_of(me)
    finally:
        release_segment(shm, unlink=True)
        release_segment(client, unlink=True)


@pytest.mark.parametrize("name, valid", [
    ("augsvc_client_12_0badf00d_batch", True),               # older clients: no owner tag
    ("augsvc_client_12_1a2b.f00d_0badf00d_batch", True),
    ("augsvc_12_1a2b.f00d_0badf00d_batch", False),            # a server's own segment
    ("augsvc_client_12_1a2b_0badf00d_batch", False),
    ("augsvc_client_12_1a2b.f00d_0badf00d_batch/../x", False),
])
def test_client_segment_names(name: str, valid: bool) -> None:
    assert is_client_segment(name) is valid


def test_sweep_removes_only_segments_of_processes_that_no_longer_exist() -> None:
    assert NS is not None
    me, started, gone = os.getpid(), start_time(os.getpid()), dead_pid()
    assert started is not None and not alive(gone)
    tag = secrets_hex()
    stale = [fake(f"augsvc_{gone}_{started:x}.{NS:x}_{tag}_ds"),                  # pid gone
             fake(f"augsvc_client_{gone}_{started:x}.{NS:x}_{tag}_batch"),     # a dead client's
             fake(f"augsvc_{me}_{started + 1:x}.{NS:x}_{tag}_in0")]             # pid used again
    stale += [fake(f"augsvc_{gone}_{tag}_ds"),                                  # untagged (older): pid gone
              fake(f"augsvc_client_{gone}_{tag}_batch")]                        # and nobody maps it
    kept = [fake(f"augsvc_{me}_{started:x}.{NS:x}_{tag}_out0"),                 # this live process
            fake(f"augsvc_{gone}_{started:x}.{NS + 1:x}_{tag}_ds"),             # another pid namespace
            fake(f"augsvc_{me}_{tag}_in0"),                                     # untagged, its pid alive
            fake(f"augsvc_{gone}_{tag}_out0")]                                  # untagged, mapped (below)
    in_use = attach_segment(kept[-1])  # mapped by this process, not registered for unlinking
    try:
        removed = sweep_stale_segments()
        assert set(stale) <= set(removed) and not set(kept) & set(removed)
        left = set(os.listdir(SHM_DIR))
        assert not set(stale) & left and set(kept) <= left
    finally:
        release_segment(in_use, unlink=False)
        for name in stale + kept:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass


def secrets_hex() -> str:
    import secrets

    return secrets.token_hex(4)


def test_a_server_killed_with_its_process_group_leaves_nothing_after_the_next_start(tmp_path: Path) -> None:
    """kill -9 of a whole group (server, forkserver, workers, resource tracker) leaves its dataset
    segment and worker slots in /dev/shm; the next server to start removes every one of them."""
    first = OwnGroupServer(["--unix", str(tmp_path / "a.sock"), "--workers", "2", "--dataset",
                            "digits=builtin:digits", "--builtin-side", "8"], tmp_path / "a.log")
    try:
        first.wait_ready(120)
        group = {first.pid} | descendants(first.pid)
        left = segments_of(first.pid)
        assert {n.rsplit("_", 1)[1] for n in left} == {"ds", "in0", "out0", "in1", "out1"}
        os.killpg(first.pid, signal.SIGKILL)
        first.process.wait(timeout=30)
        wait_until(lambda: not any(alive(p) for p in group), what="the killed group to exit")
        assert segments_of(first.pid) == left  # what issue 12 found: nothing unlinked them
        server, _port = create_server(f"unix:{tmp_path / 'b.sock'}", ServerSettings(workers=1))
        try:
            assert segments_of(first.pid) == set()
        finally:
            server.stop(0)
    finally:
        first.kill()


def test_a_live_servers_segments_survive_another_start(tmp_path: Path) -> None:
    first = OwnGroupServer(["--unix", str(tmp_path / "a.sock"), "--workers", "1"], tmp_path / "a.log",
                           env=subprocess_env())
    try:
        first.wait_ready(120)
        before = segments_of(first.pid)
        assert len(before) == 2
        server, _port = create_server(f"unix:{tmp_path / 'b.sock'}", ServerSettings(workers=1))
        server.stop(0)
        assert segments_of(first.pid) == before
    finally:
        first.kill()
    # The launcher killed the whole group, resource tracker included, and unlinked what it left.
    assert segments_of(first.pid) == set()
