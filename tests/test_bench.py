"""The benchmarks (`python -m benchmarks.X` from the repository root) run end to end and write what
the README quotes, and `augsvc bench` sizes a user's spec (tiny sizes, no timing assertions: speed
is judged from `benchmarks/bench_all.sh` runs, never in CI)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from augsvc.datasets.decode import REGION_DECODER

ROOT = Path(__file__).resolve().parent.parent
AUGSVC = Path(sys.executable).with_name("augsvc")


def bench(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args, "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data: dict = json.loads(out.read_text())
    assert data["machine"] and data["date"]
    return data


def test_bench_service_measures_both_paths(tmp_path: Path) -> None:
    (row,) = bench(tmp_path, "service", "--sides", "32", "--seconds", "0.5", "--batch-32", "64")["rows"]
    assert row["side"] == 32 and row["workers"] == 2
    for key in ("engine_local", "service", "service_shm"):
        assert row[key] > 0, key
    assert row["ratio_shm"] == row["service_shm"] / row["engine_local"]


def test_bench_e2e_records_memory_and_the_shared_memory_path(tmp_path: Path) -> None:
    (row,) = bench(tmp_path, "e2e", "--sides", "32", "--seconds", "0.5", "--batch", "64", "--images", "512")["rows"]
    assert row["images"] == 512 and min(row["dataloader"], row["augsvc"], row["engine"]) > 0
    # the embedded server is on a unix socket: every batch came through shared memory
    assert row["received"]["shared_memory"] > 0 and row["received"]["inline"] == 0
    assert len(row["memory"]) >= 2 and all(m["server_mb"] > 0 and m["client_mb"] > 0 for m in row["memory"])
    # the server's memory split: the dataset lives in shared memory, the rest is anonymous
    assert all(m["server_anon_mb"] > 0 and m["server_shmem_mb"] > 0 for m in row["memory"])
    # the cores (b) kept busy: its workers did the augmenting
    assert row["augsvc_cores"]["workers"] > 0 and set(row["augsvc_cores"]) == {"server", "workers", "client"}


def test_bench_engine_and_transport(tmp_path: Path) -> None:
    (row,) = bench(tmp_path, "engine", "--sides", "32", "--batch", "32", "--seconds", "0.3")["rows"]
    assert row["fused"] > 0 and row["fused_vs_compose"] > 0
    rows = bench(tmp_path, "transport", "--sizes-kb", "64", "--seconds", "0.3")["rows"]
    assert rows and all(r["socket"] > 0 and r["augsvc_wire"] > 0 for r in rows)


def sizing(*args: str) -> str:
    proc = subprocess.run([str(AUGSVC), "bench", *args], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_augsvc_bench_sizes_a_spec_on_sample_photos_or_the_users_image(tmp_path: Path) -> None:
    spec = ROOT / "augsvc" / "examples" / "imagenet.yaml"
    out = sizing("--spec", str(spec), "--side", "64", "--batch", "4", "--seconds", "0.2")
    rate = re.match(r"(\d+) images/s per core", out)
    assert rate and int(rate[1]) > 0, out
    assert "batches of 4 64x64x3 -> 224x224x3" in out, out  # the spec ends in a 224x224 crop
    image = tmp_path / "gray.png"
    Image.fromarray(np.arange(40 * 30, dtype=np.uint8).reshape(30, 40)).save(image)
    out = sizing("--spec", '{"transforms": [{"hflip": {}}]}', "--image", str(image), "--batch", "2",
                 "--seconds", "0.2")
    assert "batches of 2 30x40x1 -> 30x40x1" in out, out



@pytest.mark.skipif(REGION_DECODER is None, reason="augsvc.datasets._jpegregion is not built here")
def test_bench_jpeg_region_checks_every_crop_against_the_full_decode(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(6):
        h, w = (int(v) for v in rng.integers(60, 140, 2))
        xs, ys = np.meshgrid(np.arange(w) * 3 % 256, np.arange(h) * 5 % 256)
        pixels = np.stack([xs, ys, np.full((h, w), 80 + i)], axis=2).astype(np.uint8)
        (tmp_path / "c0").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "c0" / f"{i}.jpg", quality=90)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.jpeg_region", "--folder", str(tmp_path), "--epochs", "2",
                           "--seconds", "0.2"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "its bytes equal the full decode's in 12 of 12" in proc.stdout, proc.stdout
    assert re.search(r"full decode \d+\.\d+, region decode \d+\.\d+", proc.stdout), proc.stdout
