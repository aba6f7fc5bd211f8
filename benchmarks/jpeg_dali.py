"""(c) of `python -m benchmarks.jpeg --dali-python PY`: NVIDIA DALI's CPU pipeline over the same
JPEG folder, run by PY — the Python of a venv that has DALI (`pip install nvidia-dali-cuda120`);
augsvc never depends on it. This file imports nothing of augsvc, so that it runs there.

The pipeline (no GPU: `device_id=None`, `--threads` CPU threads): the file reader (shuffled), the
decoder's random crop — DALI's ROI decode, RandomResizedCrop's area 0.08-1 and aspect ratio
3/4-4/3 — resized to 224x224, then with probability 0.8 brightness and contrast factors in
[0.8, 1.2] (DALI's contrast pivots on mid-grey, torchvision's on the image's mean), saturation
in [0.8, 1.2] and a hue shift of +-18 degrees (0.05 of the circle), and a horizontal flip with
probability 0.5 while the batch is laid out as CHW uint8, as the other sides deliver it.

Protocol, one line each way: it prints "ready" once built and warmed up; for each line
"run SECONDS SKIP" read from stdin it takes SKIP batches untimed (what its prefetch made ready
meanwhile), then batches for SECONDS, and prints "IMAGES ELAPSED"; an empty line ends it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def build(folder: str, batch: int, threads: int) -> Any:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=0)  # type: ignore[untyped-decorator]
    def pipeline() -> Any:
        jpegs, labels = fn.readers.file(file_root=folder, random_shuffle=True)
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                               random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
        images = fn.resize(images, resize_x=224, resize_y=224)
        jittered = fn.cast(fn.random.coin_flip(probability=0.8), dtype=types.FLOAT)

        def factor(x: float) -> Any:  # 1 + U(-x, x) when jittered, else 1
            return jittered * fn.random.uniform(range=[1.0 - x, 1.0 + x]) + (1.0 - jittered)

        images = fn.brightness_contrast(images, brightness=factor(0.2), contrast=factor(0.2))
        images = fn.hsv(images, saturation=factor(0.2), hue=jittered * fn.random.uniform(range=[-18.0, 18.0]))
        images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(probability=0.5), dtype=types.UINT8,
                                          output_layout="CHW")
        return images, labels

    pipe = pipeline()
    pipe.build()
    return pipe


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pipe = build(args.folder, args.batch, args.threads)

    def one() -> int:
        images, _ = pipe.run()
        return int(images.as_array().shape[0])  # into this process's memory, as one array

    for _ in range(3):
        one()
    print("ready", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        _, seconds, skip = line.split()
        for _ in range(int(skip)):
            one()
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < float(seconds):
            n += one()
        print(n, elapsed, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
