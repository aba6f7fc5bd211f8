"""`python -m benchmarks.jpeg_region --folder DIR`: what decoding only a random crop's region would
save, measured on a JPEG folder (e.g. the one `benchmarks.jpeg --folder DIR` makes).

Region decoding is not in augsvc: the crop box is drawn by the engine after the decode, and the
decoded pixels must not depend on the draws unless they are bit-identical to a full decode. This
measures the lever with libjpeg-turbo's lossless crop (TurboJPEG's tjTransform, via PyTurboJPEG 1.x
and the system's libturbojpeg, which augsvc does not depend on: run it in a venv that has them) of
a RandomResizedCrop box (scale 0.08-1, ratio 3/4-4/3) grown by one iMCU (16 px) on each side, then
decoding that smaller JPEG. It checks that the box's pixels are bit-identical to the same box of
the full decode (the margin keeps the chroma upsampling's edge effects outside it), and reports the
time per image of both on one core, side by side in alternating windows.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MARGIN = 16  # one iMCU of 4:2:0 JPEG: chroma upsampling near a crop edge stays outside the box


def rrc_box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box (y, x, height, width), torchvision's rule (scale 0.08-1, ratio 3/4-4/3)."""
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    return 0, 0, h, w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jpeg_region", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    from turbojpeg import TJPF_RGB, TurboJPEG

    jpeg: Any = TurboJPEG()
    blobs = [p.read_bytes() for p in sorted(Path(args.folder).glob("c*/*.jpg"))[:args.images]]
    rng = np.random.default_rng(0)
    jobs = []
    for b in blobs:
        w, h, _, _ = jpeg.decode_header(b)
        y, x, ch, cw = rrc_box(h, w, rng)
        # the region on iMCU boundaries (a lossless crop starts on one), grown by MARGIN where there is room
        ry, rx = max(0, (y - MARGIN) // 16 * 16), max(0, (x - MARGIN) // 16 * 16)
        rh, rw = min(h, y + ch + MARGIN) - ry, min(w, x + cw + MARGIN) - rx
        jobs.append((b, (y, x, ch, cw), (ry, rx, rh, rw)))
    identical = 0
    for b, (y, x, ch, cw), (ry, rx, rh, rw) in jobs:
        full = jpeg.decode(b, pixel_format=TJPF_RGB)
        part = jpeg.decode(jpeg.crop(b, rx, ry, rw, rh), pixel_format=TJPF_RGB)
        identical += bool(np.array_equal(full[y:y + ch, x:x + cw], part[y - ry:y - ry + ch, x - rx:x - rx + cw]))
    times = {"full": 0.0, "region": 0.0}
    for _ in range(args.rounds):
        for name in times:
            start = time.perf_counter()
            for b, _box, (ry, rx, rh, rw) in jobs:
                if name == "full":
                    jpeg.decode(b, pixel_format=TJPF_RGB)
                else:
                    jpeg.decode(jpeg.crop(b, rx, ry, rw, rh), pixel_format=TJPF_RGB)
            times[name] += time.perf_counter() - start
    ms = {k: 1e3 * v / (args.rounds * len(jobs)) for k, v in times.items()}
    print(f"{len(jobs)} JPEGs, a RandomResizedCrop box each: box pixels bit-identical to the full decode's in "
          f"{identical} of {len(jobs)}")
    print(f"one core, ms per image: full decode {ms['full']:.3f}, lossless crop + decode of the region "
          f"{ms['region']:.3f} ({ms['region'] / ms['full']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
