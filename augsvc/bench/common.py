"""Shared pieces of the benchmarks: the standard pipeline, test images, and a timer."""

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


def compare_rates(fns: dict[str, Callable[[], int]], *, seconds: float, rounds: int = 5) -> dict[str, float]:
    """Best items/s of each function, measured in alternating windows so that a noisy neighbour
    slows every candidate alike (a ratio of two sequential measurements would not be fair)."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, 0.0)
    window = seconds / rounds
    for _ in range(rounds):
        for name, fn in fns.items():
            done, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < window:
                done += fn()
            best[name] = max(best[name], done / elapsed)
    return best


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        payload = {"date": date.today().isoformat(), "machine": machine(), **payload}
        Path(path).write_text(json.dumps(payload, indent=2))
