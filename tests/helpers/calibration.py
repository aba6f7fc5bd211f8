"""Time margins scaled by how loaded this machine is while the tests run.

Tests assert counts and events, not speed. The few that still compare a duration do so because
the duration is the property (a server that exits once drained, not when its --grace runs out;
a call answered by its deadline). Their margins are written for an idle machine and multiplied
by `slowdown()`: how much longer a fixed reference operation takes now than it took on an idle
2-core machine (REFERENCE_IDLE_S). The reference is measured the first time a test asks (the
session's calibration) and again at every later call; the larger of the two wins, so load that
starts mid-session widens the margins too. A faster machine than the reference gets the idle
margins (the slowdown is never below 1).
"""

from __future__ import annotations

import functools
import time

import numpy as np

#: `reference_seconds()` on an idle 2-core machine (the one these tests are written on,
#: 2026-11-26: 0.027 to 0.031 s over 24 idle runs; two busy loops beside it made it 0.04 to 0.09 s).
REFERENCE_IDLE_S = 0.028
#: A margin never grows past MAX_SLOWDOWN times its idle value: past that the machine is too
#: loaded for any bound, and pytest-timeout's 300 s must still be able to stop a hung test.
MAX_SLOWDOWN = 8.0


def _reference_operation() -> int:
    """A fixed amount of CPU work of the kinds a server does: Python holding the GIL (gRPC
    handlers, the pool's bookkeeping) and numpy outside it (pixels)."""
    total = 0
    for i in range(600_000):
        total += i * i % 7
    pixels = np.arange(1 << 19, dtype=np.float32).reshape(512, 1024)
    return total + int(np.sort(np.sin(pixels), axis=None)[-1] > 0)


def reference_seconds(repeats: int = 8) -> float:
    """Mean wall time of the reference operation over `repeats` runs back to back (about 0.25 s
    in all: long enough to span several scheduler time slices, so it sees the share of a core
    this process gets rather than one lucky slice)."""
    started = time.perf_counter()
    for _ in range(repeats):
        _reference_operation()
    return (time.perf_counter() - started) / repeats


@functools.cache
def session_reference_seconds() -> float:
    """The reference as measured the first time a test of this session asked."""
    return reference_seconds()


def slowdown() -> float:
    """How much slower than idle this machine is now: in [1, MAX_SLOWDOWN]."""
    measured = max(session_reference_seconds(), reference_seconds())
    return min(MAX_SLOWDOWN, max(1.0, measured / REFERENCE_IDLE_S))


def margin(idle_seconds: float) -> float:
    """`idle_seconds` (enough on an idle machine) scaled by the current `slowdown()`."""
    return idle_seconds * slowdown()


def exceeds(seconds: float, idle_seconds: float) -> bool:
    """Whether `seconds` is over `margin(idle_seconds)`. Calibrates only when `seconds` is over the
    idle bound itself, so a check per call (thousands of fuzz cases) costs nothing when all is well."""
    return seconds > idle_seconds and seconds > margin(idle_seconds)
