#!/usr/bin/env bash
# Every figure in the README's benchmark section, from one quiet run: JSON under runs/bench/,
# the scaling plot in docs/. Takes about 6-8 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/bench
mkdir -p "$out"
aug=.venv/bin/augsvc
$aug bench engine --seconds 8 --json "$out/engine.json"
$aug bench service --seconds 8 --json "$out/service.json"
$aug bench e2e --seconds 10 --json "$out/e2e.json"
$aug bench transport --seconds 3 --json "$out/transport.json"
$aug bench scaling --seconds 4 --json "$out/scaling.json" --plot docs/scaling.png
$aug bench scaleout --seconds 6 --json "$out/scaleout.json"
