"""Shared by every test: after the session, nothing it killed is left in /dev/shm, and no torch
tensor is left in cyclic garbage for a daemon thread to free while the interpreter shuts down."""

from __future__ import annotations

import sys
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
    """The session ends as augsvc-train does (trainer_client.train.settle_before_exit), where the
    trainer was imported (the service's tests need no torch). On 2026-11-27 the thread in an
    aborted session's exit was a stream's fetch thread still inside a collection it had started: a
    multi-worker DataLoader iterator, left in a cycle by a test, joining its worker processes in
    __del__ (test_dataloader_with_workers_is_refused_with_what_to_do now shuts them down itself)."""
    train = sys.modules.get("trainer_client.train")
    if train is not None:
        train.settle_before_exit()
