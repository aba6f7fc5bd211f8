"""The benchmark commands run end to end and write what the README quotes (tiny sizes, no timing
assertions: speed is judged from `scripts/bench_all.sh` runs, never in CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

AUGSVC = Path(sys.executable).with_name("augsvc")


def bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run([str(AUGSVC), "bench", *args, "--json", str(out)], capture_output=True, text=True,
                          timeout=180)
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
