"""Options, markers and shared fixtures of the reliability suite.

Fast form (every CI run): ``pytest tests/reliability`` — bounded, under 3 minutes on 2 cores.
Long form: ``pytest tests/reliability -m slow --fuzz-cases 10000 --load-seconds 600`` (or
``--long``, which runs the fast and the slow tests with long defaults).

The options are read with defaults, so they also work when this folder is collected as part of
``pytest`` from the repository root (where they cannot be passed on the command line).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# tests/ itself, so that this suite shares tests/helpers when it runs alone (`pytest tests/reliability`).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reliability_options import (  # noqa: E402
    FAST_FUZZ_CASES,
    FAST_LOAD_SECONDS,
    LONG_FUZZ_CASES,
    LONG_LOAD_SECONDS,
    Budget,
    long_requested,
)

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("augsvc reliability")
    group.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run the slow reliability tests too, with long defaults",
    )
    group.addoption(
        "--fuzz-cases",
        type=int,
        default=None,
        help=f"total hostile-input cases across the RPCs (default {FAST_FUZZ_CASES}; "
        f"{LONG_FUZZ_CASES} for the slow test)",
    )
    group.addoption(
        "--load-seconds",
        type=float,
        default=None,
        help=f"duration of the load test (default {FAST_LOAD_SECONDS}; "
        f"{LONG_LOAD_SECONDS} for the slow test)",
    )
    group.addoption(
        "--load-json",
        default=None,
        metavar="PATH",
        help="write the load test's figures (latency percentiles, RSS) to this JSON file",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "reliability: the fault, fuzz, load and security suite (tests/reliability)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this folder's tests; skip its slow ones unless the long form was asked for."""
    skip = pytest.mark.skip(reason="long form: pass --long or -m slow")
    run_long = long_requested(config)
    budget = Budget(config)
    # pytest-timeout's 300 s (pyproject) bounds the fast form; a long run, or one whose options ask
    # for more, gets what they ask for plus room to start servers and check the results.
    timeout = None
    if run_long or budget.explicit:
        longest = max(budget.load_seconds(slow=run_long), budget.fuzz_cases(slow=run_long) * 0.05)
        timeout = pytest.mark.timeout(int(300 + 2 * longest))
    for item in items:
        if HERE not in Path(str(item.path)).resolve().parents:
            continue
        item.add_marker(pytest.mark.reliability)
        if "slow" in item.keywords and not run_long:
            item.add_marker(skip)
        elif timeout is not None and not item.get_closest_marker("timeout"):
            item.add_marker(timeout)


@pytest.fixture(scope="session")
def budget(pytestconfig: pytest.Config) -> Budget:
    return Budget(pytestconfig)


@pytest.fixture(scope="session")
def digits_pixels() -> Iterator[np.ndarray]:
    """The served `builtin:digits` pixels (N, 32, 32, 1), read the way a worker reads them."""
    from helpers.data import served_digits

    yield served_digits()[0]
