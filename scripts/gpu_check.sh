#!/usr/bin/env bash
# The trainer's GPU hand-off checked on a real CUDA device: tests/test_gpu.py (DeviceFeed's copies
# on a side stream, the compute stream waiting on each batch's copy event, pinned staging,
# normalisation on the GPU, RegularizedCNN training on what it hands over).
#
# Needs only a Python with torch (CUDA build) — e.g. a GPU machine's Python 3.12 + torch 2.11 —
# run from anywhere: `bash scripts/gpu_check.sh` (PYTHON=... picks the interpreter). Uses pytest
# when it is installed, else runs the same test functions itself. Without CUDA it says so and
# every test is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" - <<'PYEOF'
import sys, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), {name}")
PYEOF
if "$PY" -c "import pytest" 2>/dev/null; then
  exec "$PY" -m pytest -p no:cacheprovider -o addopts="" -v tests/test_gpu.py
else
  exec "$PY" tests/test_gpu.py
fi
