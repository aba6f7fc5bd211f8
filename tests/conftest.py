"""Shared by every test: after the session, nothing it killed is left in /dev/shm."""

from __future__ import annotations

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
