"""`python -m benchmarks.engine`: images/s per core of the fused backend, the albumentations reference
backend, and a plain albumentations Compose built the usual way — same pipeline, same images,
same run, one process (one core)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import cv2

from augsvc.samples import sample_images
from augsvc.sizing import BatchWork
from augsvc.spec import load_spec

from .common import BENCH_SPEC, albumentations_compose, compare_rates, machine, write_json


def run(sides: list[int], *, batch: int, seconds: float) -> list[dict[str, Any]]:
    cv2.setNumThreads(0)  # one core, as in a worker process
    spec = load_spec(BENCH_SPEC)
    compose = albumentations_compose()
    rows = []
    for side in sides:
        images = sample_images(batch, side)

        def plain(images: Any = images) -> int:
            for img in images:
                compose(image=img)
            return len(images)

        # As in a worker, the engine's output goes to one reused buffer (the worker's shared-memory
        # slot); Compose, image by image, gets its small outputs recycled by malloc the same way.
        fused_work, reference_work = BatchWork(images, spec), BatchWork(images, spec, backend="albumentations")
        rates = compare_rates({"fused": fused_work, "reference": reference_work, "compose": plain}, seconds=seconds)
        fused, reference, baseline = rates["fused"], rates["reference"], rates["compose"]
        rows.append({"side": side, "fused": fused, "albumentations_backend": reference,
                     "albumentations_compose": baseline, "fused_vs_compose": fused / baseline,
                     "fused_vs_reference": fused / reference})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__)
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=6.0, help="time per candidate and side")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rows = run(args.sides, batch=args.batch, seconds=args.seconds)
    print(f"engine, images/s on one core ({machine()}); pipeline: hflip + rotate + scale + color jitter")
    print(f"{'side':>5} {'fused':>9} {'albu backend':>13} {'albu Compose':>13} {'fused/Compose':>14}")
    for r in rows:
        print(f"{r['side']:>5} {r['fused']:>9.0f} {r['albumentations_backend']:>13.0f} "
              f"{r['albumentations_compose']:>13.0f} {r['fused_vs_compose']:>13.2f}x")
    write_json(args.json, {"benchmark": "engine", "batch": args.batch, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
