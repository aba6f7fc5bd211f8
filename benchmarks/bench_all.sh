#!/usr/bin/env bash
# Every figure in the README's benchmark section, from one quiet run: JSON under runs/bench/,
# the scaling plot in docs/. Takes about 20 minutes on a quiet 2-core machine (the JPEG comparison about 10 of them).
# Run from anywhere:
# `bash benchmarks/bench_all.sh` (PYTHON picks the interpreter; default: the project's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/bench
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
$py -m benchmarks.engine --seconds 8 --json "$out/engine.json"
$py -m benchmarks.service --seconds 8 --json "$out/service.json"
$py -m benchmarks.e2e --seconds 10 --json "$out/e2e.json"
$py -m benchmarks.transport --seconds 3 --json "$out/transport.json"
$py -m benchmarks.scaling --seconds 4 --json "$out/scaling.json" --plot docs/scaling.png
$py -m benchmarks.scaleout --seconds 6 --json "$out/scaleout.json"
$py -m benchmarks.jpeg --seconds 40 --rounds 5 --folder "$out/jpeg-folder" --json "$out/jpeg.json"
$py -m benchmarks.jpeg_region --folder "$out/jpeg-folder"
$py -m benchmarks.jpeg_startup --json "$out/jpeg_startup.json"
