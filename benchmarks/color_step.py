"""`python -m benchmarks.color_step`: milliseconds per batch of 64 224x224 sample photos for the
fused color step alone (brightness and contrast 0.2) and for the engine benchmark's pipeline, one
core, best of `--rounds`. Run it in two checkouts one after the other (old, new, old, new) to see
what a change to the color math costs."""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from augsvc import augment_batch
from augsvc.samples import sample_images

from .common import BENCH_SPEC

COLOR_ONLY = {"transforms": [{"color": {"brightness": 0.2, "contrast": 0.2}}]}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.color_step", description=__doc__)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    cv2.setNumThreads(0)  # one core, as in a worker process
    images = sample_images(64, 224)
    ids = np.arange(64)
    for name, spec in (("color step (brightness, contrast 0.2)", COLOR_ONLY), ("engine pipeline", BENCH_SPEC)):
        best = float("inf")
        for epoch in range(args.rounds):
            start = time.perf_counter()
            augment_batch(images, spec, seed=0, epoch=epoch, sample_ids=ids)
            best = min(best, time.perf_counter() - start)
        print(f"{name}: {best * 1e3:.2f} ms per 64 images")


if __name__ == "__main__":
    main()
