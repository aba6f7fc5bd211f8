"""Shared pieces of the benchmarks: the standard pipeline, test images, and side-by-side timing in
alternating windows."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

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
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A
    import cv2

    return A.Compose([
        A.HorizontalFlip(p=0.5),
        # reflect_101 border, as the spec's default: both sides do the same work.
        A.Affine(rotate=(-15, 15), scale=(0.9, 1.1), border_mode=cv2.BORDER_REFLECT_101, p=1.0),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=0.8),
    ])


def sample_images(count: int, side: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """`count` distinct natural-image crops (scikit-learn's sample photos) resized to side x side."""
    import cv2
    from sklearn.datasets import load_sample_image

    photos = [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
    rng = np.random.default_rng(seed)
    out = np.empty((count, side, side, channels), np.uint8)
    for i in range(count):
        photo = photos[i % 2]
        crop = int(rng.integers(160, 400))
        y = int(rng.integers(0, photo.shape[0] - crop))
        x = int(rng.integers(0, photo.shape[1] - crop))
        img = cv2.resize(photo[y:y + crop, x:x + crop], (side, side), interpolation=cv2.INTER_AREA)
        out[i] = img if channels == 3 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None]
    return out


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

    def window(fn: Callable[[], int]) -> Window:
        def run(length: float) -> tuple[float, float]:
            done, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < length:
                done += fn()
            return done, elapsed

        return run

    for fn in fns.values():
        fn()  # warm-up
    return interleaved_rates({name: window(fn) for name, fn in fns.items()}, seconds=seconds, rounds=rounds)


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


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (None when the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and ')'


def parent_of(pid: int) -> int | None:
    """The parent of a live (non-zombie) process; None when it is gone or a zombie."""
    fields = _proc_stat(pid)
    return int(fields[1]) if fields and fields[0] != "Z" else None


def descendants(pid: int) -> set[int]:
    """Live (non-zombie) processes below `pid`, from a /proc scan."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = parent_of(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cpu_seconds(pids: Any) -> float:
    """User + system CPU time the processes `pids` have used so far (those gone count 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = _proc_stat(pid)
        if fields:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        payload = {"date": date.today().isoformat(), "machine": machine(), **payload}
        Path(path).write_text(json.dumps(payload, indent=2))
