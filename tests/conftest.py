"""Shared by every test: after the session, nothing it killed is left in /dev/shm, and no torch
tensor is left in cyclic garbage for a daemon thread to free while the interpreter shuts down."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from augsvc.shm import sweep_stale_segments


@pytest.fixture(scope="session", autouse=True)
def no_segments_left_behind() -> Iterator[None]:
    """Tests that SIGKILL a whole process group (a trainer under torchrun, a server with its
    resource tracker) leave its segments until the next server starts; the session ends with
    that sweep, whatever test ran last."""
    yield
    sweep_stale_segments()


def pytest_sessionfinish() -> None:
    """Collect cyclic garbage while the interpreter is whole. A core dump of a session that
    aborted at exit ("terminate called without an active exception", 4 of 21 full runs on
    2026-11-26) showed a daemon thread whose allocation started a garbage collection during
    finalization: freeing a tensor there released the GIL, the thread was ended on taking it back
    (pthread_exit), and the unwind through torch's C++ destructor terminated the process."""
    gc.collect()
