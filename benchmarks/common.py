"""Shared pieces of the benchmarks: the standard pipeline, its albumentations twin, and
side-by-side timing in alternating windows. Sample images come from `augsvc.samples`, /proc
readings from `augsvc.procfs`."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any

from augsvc.sizing import run_for

#: flip + rotate + scale + color jitter, the pipeline every benchmark compares.
BENCH_SPEC: dict[str, Any] = {
    "transforms": [
        {"hflip": {"p": 0.5}},
        {"rotate": {"limit_range": [-15, 15], "p": 1.0}},
        {"scale": {"scale_range": [0.9, 1.1], "p": 1.0}},
        {"color": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05, "p": 0.8}},
    ]
}


def albumentations_compose() -> Any:
    """The same pipeline built the usual way with albumentations 2.0.8 (`BENCH_SPEC`'s border
    reflect_101 made explicit, since Affine's own default is a constant border)."""
    import cv2

    from augsvc._albumentations import albumentations as A

    return A.Compose([
        A.HorizontalFlip(p=0.5),
        # reflect_101 border, as the spec's default: both sides do the same work.
        A.Affine(rotate=(-15, 15), scale=(0.9, 1.1), border_mode=cv2.BORDER_REFLECT_101, p=1.0),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=0.8),
    ])


#: One measurement window of a candidate: given a length in seconds, run it and return the items it
#: delivered and the seconds its timed part took.
Window = Callable[[float], tuple[float, float]]


def interleaved_rates(windows: dict[str, Window], *, seconds: float, rounds: int = 5,
                      settle: bool = False) -> dict[str, float]:
    """Items/s of each candidate over `rounds` alternating windows of `seconds / rounds`, so that a
    noisy neighbour slows every candidate alike (a ratio of sequential measurements would not be
    fair on a shared machine). settle: wait for the machine to go quiet before each window, for
    candidates whose pipelines go on filling their buffers after their window ends."""
    done = dict.fromkeys(windows, 0.0)
    spent = dict.fromkeys(windows, 0.0)
    for _ in range(rounds):
        for name, window in windows.items():
            if settle:
                wait_quiet()
            items, elapsed = window(seconds / rounds)
            done[name] += items
            spent[name] += elapsed
    return {name: done[name] / spent[name] for name in windows}


def compare_rates(fns: dict[str, Callable[[], int]], *, seconds: float, rounds: int = 5) -> dict[str, float]:
    """Items/s of functions that each do one unit of work and return its item count, measured in
    alternating windows (`interleaved_rates`)."""
    for fn in fns.values():
        fn()  # warm-up
    windows: dict[str, Window] = {name: partial(run_for, fn) for name, fn in fns.items()}
    return interleaved_rates(windows, seconds=seconds, rounds=rounds)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat (None elsewhere); steal
    time is left out of both, since a neighbour's share is not ours to wait for."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq = fields
    return user + nice + system + irq + softirq, sum(fields)


def wait_quiet(*, busy_below: float = 0.1, interval: float = 0.1, timeout: float = 10.0) -> None:
    """Wait until the machine's cores are at most `busy_below` busy over `interval` (or `timeout`)."""
    deadline = time.monotonic() + timeout
    before = _cpu_jiffies()
    while before is not None and time.monotonic() < deadline:
        time.sleep(interval)
        after = _cpu_jiffies()
        if after is None:
            return
        busy, total = after[0] - before[0], after[1] - before[1]
        if total > 0 and busy / total <= busy_below:
            return
        before = after
    if before is None:
        time.sleep(1.0)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        payload = {"date": date.today().isoformat(), "machine": machine(), **payload}
        Path(path).write_text(json.dumps(payload, indent=2))
