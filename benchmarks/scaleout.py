"""`python -m benchmarks.scaleout`: images/s one AugmentedStream receives from 1..N `augsvc serve`
processes on loopback (one worker each), over the built-in digits with the example spec, batch
256 — the "Scaling out" table. Needs torch (the client is the torch stream)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from trainer_client.client import AugmentClient
from trainer_client.embedded import EmbeddedServer
from trainer_client.stream import AugmentedStream

from .common import machine, write_json

SPEC = Path(__file__).resolve().parent.parent / "augsvc" / "examples" / "digits.yaml"


def rate(servers: int, *, seconds: float, batch: int) -> float:
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(EmbeddedServer(workers=1, unix=False)) for _ in range(servers)]
        client = stack.enter_context(AugmentClient([p.target for p in procs]))
        stream = AugmentedStream(client, "digits", str(SPEC), batch_size=batch, seed=0, prefetch=8)
        for _ in stream:  # warm-up epoch
            pass
        n, epoch, start = 0, 1, time.perf_counter()
        while time.perf_counter() - start < seconds:
            stream.set_epoch(epoch)
            n += sum(len(x) for x, _, _ in stream)
            epoch += 1
        return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaleout", description=__doc__)
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for n in args.servers:
        rows.append({"servers": n, "images_per_s": rate(n, seconds=args.seconds, batch=args.batch)})
    base = rows[0]["images_per_s"]
    print(f"scale-out, AugmentedStream over digits 32x32, 1 worker per server ({machine()})")
    print(f"{'servers':>8} {'images/s':>10} {'vs first':>9}")
    for r in rows:
        print(f"{r['servers']:>8} {r['images_per_s']:>10.0f} {r['images_per_s'] / base:>8.2f}x")
    write_json(args.json, {"benchmark": "scaleout", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
