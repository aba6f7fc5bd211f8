"""Reference data for tests, loaded independently of any server under test."""

from __future__ import annotations

import os

import numpy as np


def served_digits() -> tuple[np.ndarray, np.ndarray]:
    """The `builtin:digits` pixels (N, 32, 32, 1) and labels, read the way a worker reads them."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from augsvc.datasets import attach, load_dataset

    with load_dataset("reference", "builtin:digits") as ds:
        reader = attach(ds.handle())
        try:
            return np.array(reader.gather(np.arange(ds.num_samples))), ds.labels.copy()
        finally:
            reader.close()
