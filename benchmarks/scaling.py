"""`python -m benchmarks.scaling`: how cost grows — images/s and megapixels/s one client receives from a
local server, for image sides 32..224 and 1..W workers (StreamBatches, the standard pipeline), with
pixels through shared memory (a client on the server's host) and in the gRPC stream (any client).
Prints a table, writes JSON and, with --plot, a PNG."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import machine, write_json
from .service import run as service_run


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_img, ax_pix = fig.subplots(1, 2)
    for i, workers in enumerate(sorted({r["workers"] for r in rows})):
        rs = [r for r in rows if r["workers"] == workers]
        sides = [r["side"] for r in rs]
        for key, style, how in (("service_shm", "o-", "shared memory"), ("service", "s--", "gRPC bytes")):
            label = f"{workers} worker(s), {how}"
            ax_img.plot(sides, [r[key] for r in rs], style, color=f"C{i}", label=label)
            ax_pix.plot(sides, [r[key] * r["side"] ** 2 / 1e6 for r in rs], style, color=f"C{i}", label=label)
    ax_img.set(xscale="log", yscale="log", xlabel="image side (px)", ylabel="images/s received",
               title="images/s vs image side")
    ax_pix.set(xscale="log", xlabel="image side (px)", ylabel="megapixels/s", title="pixel throughput")
    for ax in (ax_img, ax_pix):
        ax.minorticks_off()
        ax.set_xticks(sorted({r["side"] for r in rows}), labels=[str(s) for s in sorted({r["side"] for r in rows})])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__)
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 64, 128, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--json")
    parser.add_argument("--plot", help="write a PNG here")
    args = parser.parse_args(argv)
    batches = {32: 512, 64: 256, 128: 128, 224: 64}
    rows = [r for w in args.workers for r in service_run(args.sides, workers=w, seconds=args.seconds,
                                                           batches=batches)]
    print(f"cost vs image side and workers, one client, StreamBatches ({machine()})")
    print("shared memory: pixels through segments the client offers; bytes: pixels in the gRPC stream")
    print(f"{'workers':>8} {'side':>5} {'images/s shm':>13} {'MPix/s':>8} {'us/image/worker':>16} {'vs engine':>10} "
          f"{'images/s bytes':>15} {'vs engine':>10}")
    for r in rows:
        print(f"{r['workers']:>8} {r['side']:>5} {r['service_shm']:>13.0f} "
              f"{r['service_shm'] * r['side'] ** 2 / 1e6:>8.1f} {1e6 * r['workers'] / r['service_shm']:>16.0f} "
              f"{r['ratio_shm']:>10.2f} {r['service']:>15.0f} {r['ratio']:>10.2f}")
    write_json(args.json, {"benchmark": "scaling", "rows": rows})
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
