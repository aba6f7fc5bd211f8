"""The engine, service and end-to-end benchmarks of two checkouts, run in alternating rounds on
one machine, and their ratios side by side: how a restructuring is shown to change no speed.

    python -m benchmarks.old_vs_new --old ../augsvc-old [--rounds 3] [--json out.json]

--old is another checkout of this repository with its own .venv (`make install` there). Its
benchmarks run from wherever that version kept them (`augsvc bench NAME` before they moved to
benchmarks/, `python -m benchmarks.NAME` after). Each round runs every benchmark once for each
checkout, alternating, so that a noisy neighbour slows both alike; the ratios each benchmark
prints (fused/Compose, service/engine, (b)/(a), (b)/(c)) are averaged over the rounds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import machine, write_json

#: benchmark -> (its arguments, the ratios it reports: JSON key -> label)
BENCHMARKS: dict[str, tuple[list[str], dict[str, str]]] = {
    "engine": (["--seconds", "4"], {"fused_vs_compose": "fused / Compose"}),
    "service": (["--seconds", "4"], {"ratio": "service (gRPC bytes) / engine", "ratio_shm": "service (shm) / engine"}),
    "e2e": (["--seconds", "6"], {"augsvc_vs_dataloader": "(b) / (a)", "augsvc_vs_engine": "(b) / (c)"}),
}


def _command(checkout: Path, name: str) -> list[str]:
    python = str(checkout / ".venv" / "bin" / "python")
    if (checkout / "benchmarks" / f"{name}.py").exists():
        return [python, "-m", f"benchmarks.{name}"]
    return [str(checkout / ".venv" / "bin" / "augsvc"), "bench", name]


def run_once(checkout: Path, name: str) -> list[dict[str, Any]]:
    args, _ = BENCHMARKS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        proc = subprocess.run([*_command(checkout, name), *args, "--json", str(out)], cwd=checkout,
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{checkout} {name}: {proc.stderr[-2000:]}")
        rows: list[dict[str, Any]] = json.loads(out.read_text())["rows"]
        return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.old_vs_new", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="the other checkout (with its .venv)")
    parser.add_argument("--new", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    checkouts = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    ratios: dict[tuple[str, str, int, str], list[float]] = {}
    for r in range(args.rounds):
        for name in args.only:
            for version, checkout in checkouts.items():
                for row in run_once(checkout, name):
                    for key in BENCHMARKS[name][1]:
                        ratios.setdefault((name, key, int(row["side"]), version), []).append(float(row[key]))
                print(f"round {r + 1}: {name} {version} done", file=sys.stderr, flush=True)
    print(f"{machine()}; {args.rounds} alternating rounds")
    print(f"{'benchmark':<10} {'ratio':<32} {'side':>5} {'old':>7} {'new':>7} {'new/old':>8}")
    table = []
    for (name, key, side, version), values in sorted(ratios.items()):
        if version != "old":
            continue
        old = sum(values) / len(values)
        new_values = ratios[(name, key, side, "new")]
        new = sum(new_values) / len(new_values)
        label = BENCHMARKS[name][1][key]
        print(f"{name:<10} {label:<32} {side:>5} {old:>7.3f} {new:>7.3f} {new / old:>8.3f}")
        table.append({"benchmark": name, "ratio": label, "side": side, "old": old, "new": new,
                      "old_runs": values, "new_runs": new_values})
    write_json(args.json, {"rounds": args.rounds, "rows": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
