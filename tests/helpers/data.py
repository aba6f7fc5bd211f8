"""Reference data for tests, loaded independently of any server under test."""

from __future__ import annotations

from typing import Any

import numpy as np

#: flip + rotate + scale + color jitter: the standard pipeline of the README's benchmarks, kept here
#: as the tests' own copy (tests never import benchmark code).
BENCH_SPEC: dict[str, Any] = {
    "transforms": [
        {"hflip": {"p": 0.5}},
        {"rotate": {"limit_range": [-15, 15], "p": 1.0}},
        {"scale": {"scale_range": [0.9, 1.1], "p": 1.0}},
        {"color": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05, "p": 0.8}},
    ]
}


def served_digits() -> tuple[np.ndarray, np.ndarray]:
    """The `builtin:digits` pixels (N, 32, 32, 1) and labels, read the way a worker reads them."""
    from augsvc.datasets import attach, load_dataset

    with load_dataset("reference", "builtin:digits") as ds:
        reader = attach(ds.handle())
        try:
            return np.array(reader.gather(np.arange(ds.num_samples))), ds.labels.copy()
        finally:
            reader.close()
