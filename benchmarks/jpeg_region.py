"""`python -m benchmarks.jpeg_region --folder DIR`: what decoding only a random crop's region
saves, on a JPEG folder (e.g. the one `benchmarks.jpeg --folder DIR` makes), one core.

For each file, the rectangle that RandomResizedCrop 224 + flip (the JPEG benchmark's geometric
steps) reads is drawn by the engine before any pixel is decoded (`augsvc.engine.source_boxes`),
and `augsvc.datasets.decode_region` decodes only it (libjpeg-turbo's partial decompression:
`jpeg_crop_scanline` for the columns, `jpeg_skip_scanlines` for the rows above; the rows below are
not decoded at all). Checked first: the rectangle's bytes equal the same rectangle of the full
decode (simplejpeg, the pinned decoder) in every file and epoch measured. Then the time per image
of the full decode and of the region decode, side by side in alternating windows, with the top
and the bottom half of each image beside them: rows above a rectangle still go through the
entropy decoder (a JPEG without restart markers has no other way to find where a row starts), so
the saving is smaller than the area left out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from augsvc.datasets.decode import REGION_DECODER, decode, decode_region, probe
from augsvc.engine import source_boxes

from .common import compare_rates, machine
from .jpeg import TRAIN_SPEC


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jpeg_region", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=4, help="crops per file: one per epoch")
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args(argv)
    if REGION_DECODER is None:
        print("augsvc.datasets._jpegregion is not built here: nothing to measure")
        return 1
    blobs = [p.read_bytes() for p in sorted(Path(args.folder).glob("c*/*.jpg"))[:args.images]]
    headers = [probe(b) for b in blobs]
    heights = np.array([h.height for h in headers])
    widths = np.array([h.width for h in headers])
    ids = np.arange(len(blobs))
    boxes = []
    for e in range(args.epochs):
        epoch_boxes = source_boxes(TRAIN_SPEC, seed=0, epoch=e, sample_ids=ids, heights=heights, widths=widths)
        assert epoch_boxes is not None  # the spec starts with a crop
        boxes.append(epoch_boxes)
    buffers = [np.empty((h.height, h.width, 4), np.uint8) for h in headers]
    identical, area = 0, 0.0
    for e in range(args.epochs):
        for b, h, box, buf in zip(blobs, headers, boxes[e], buffers, strict=True):
            x0, y0, x1, y1 = (int(v) for v in box)
            full = decode(b, h, 3)
            assert decode_region(b, h, 1, buf, (x0, y0, x1, y1))
            identical += bool(np.array_equal(buf[y0:y1, x0:x1, :3], full[y0:y1, x0:x1]))
            area += (x1 - x0) * (y1 - y0) / (h.height * h.width)
    count = args.epochs * len(blobs)
    state = {"e": 0}

    def full_decodes() -> int:
        for b, h, buf in zip(blobs, headers, buffers, strict=True):
            decode(b, h, 3, 1, buf)
        return len(blobs)

    def region_decodes() -> int:
        epoch_boxes = boxes[state["e"] % args.epochs]
        state["e"] += 1
        for b, h, box, buf in zip(blobs, headers, epoch_boxes, buffers, strict=True):
            decode_region(b, h, 1, buf, (int(box[0]), int(box[1]), int(box[2]), int(box[3])))
        return len(blobs)

    def half(bottom: bool) -> int:
        for b, h, buf in zip(blobs, headers, buffers, strict=True):
            middle = h.height // 2
            decode_region(b, h, 1, buf, (0, middle if bottom else 0, h.width, h.height if bottom else middle))
        return len(blobs)

    rates = compare_rates({"full": full_decodes, "region": region_decodes, "top_half": lambda: half(False),
                           "bottom_half": lambda: half(True)}, seconds=args.seconds, rounds=5)
    ms = {k: 1e3 / v for k, v in rates.items()}
    print(f"{len(blobs)} JPEGs x {args.epochs} epochs ({machine()}; {REGION_DECODER}): the crop's rectangle is "
          f"{100 * area / count:.0f}% of the image on average; its bytes equal the full decode's in {identical} of "
          f"{count}")
    print(f"one core, ms per image: full decode {ms['full']:.3f}, region decode {ms['region']:.3f} "
          f"({ms['region'] / ms['full']:.2f}x); the top half of each image {ms['top_half']:.3f}, the bottom half "
          f"{ms['bottom_half']:.3f} (its rows above still go through the entropy decoder)")
    return 0 if identical == count else 1


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    sys.exit(main())
