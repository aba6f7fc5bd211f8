"""The durations and counts of the reliability suite, as set by its command-line options.

Fast defaults run in every CI job; slow-marked tests use the long defaults; an explicit option
(``--fuzz-cases``, ``--load-seconds``) overrides both.
"""

from __future__ import annotations

import pytest

FAST_FUZZ_CASES = 2_000
LONG_FUZZ_CASES = 10_000
FAST_LOAD_SECONDS = 20.0
LONG_LOAD_SECONDS = 600.0


def long_requested(config: pytest.Config) -> bool:
    markexpr = str(config.getoption("markexpr", default="") or "")
    return bool(config.getoption("--long", default=False)) or "slow" in markexpr


class Budget:
    """What the options asked for; read with defaults, so it works when the options are unknown
    (this folder collected from the repository root, where they cannot be passed)."""

    def __init__(self, config: pytest.Config) -> None:
        self.long = long_requested(config)
        self._fuzz = config.getoption("--fuzz-cases", default=None)
        self._load = config.getoption("--load-seconds", default=None)
        self.load_json: str | None = config.getoption("--load-json", default=None)
        self.explicit = self._fuzz is not None or self._load is not None

    def fuzz_cases(self, slow: bool) -> int:
        if self._fuzz is not None:
            return int(self._fuzz)
        return LONG_FUZZ_CASES if slow else FAST_FUZZ_CASES

    def load_seconds(self, slow: bool) -> float:
        if self._load is not None:
            return float(self._load)
        return LONG_LOAD_SECONDS if slow else FAST_LOAD_SECONDS
