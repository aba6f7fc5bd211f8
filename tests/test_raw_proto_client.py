"""A client generated from protos/ alone gets exactly what `augment_batch` and `epoch_batches`
define (DESIGN contracts 1-3), from a 1-worker and a 2-worker server.

The client runs in its own interpreter (tests/helpers/raw_client.py): it compiles the .proto
files with grpc_tools.protoc, imports no augsvc module, and writes the pixels it received to
.npy files; this process recomputes them in-process and compares bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.data import served_digits
from helpers.servers import Served, serve, subprocess_env

import augsvc
from augsvc import augment_batch, epoch_batches, load_spec
from augsvc.server import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
CLIENT = Path(__file__).resolve().parent / "helpers" / "raw_client.py"
NUM_DIGITS = 1797

SPECS: dict[str, dict[str, Any]] = {
    "geometry_color_crop": {"transforms": [
        {"hflip": {"p": 0.5}},
        {"rotate": {"limit_range": [-20, 20]}},
        {"scale": {"scale_range": [0.9, 1.15]}},
        {"color": {"brightness": 0.3, "contrast": 0.2, "saturation": 0.3, "hue": 0.05, "p": 0.8}},
        {"random_resized_crop": {"height": 24, "width": 28, "scale_range": [0.5, 1.0]}},
    ]},
    "flip_dropout_blur": {"border": "constant", "fill": 127, "transforms": [
        {"vflip": {"p": 0.5}},
        {"rotate": {"limit_range": [-45, 10], "p": 0.7}},
        {"coarse_dropout": {"num_holes_range": [1, 3], "p": 0.9}},
        {"gaussian_blur": {"sigma_range": [0.3, 1.2], "p": 0.5}},
    ]},
}
AUGMENT_CASES: list[dict[str, Any]] = [
    {"name": "rgb_fused", "spec": "geometry_color_crop", "shape": [6, 40, 36, 3], "data_seed": 1,
     "seed": 11, "epoch": 2, "sample_ids": [100, 101, 102, 103, 104, 105], "backend": ""},
    {"name": "gray_albumentations", "spec": "flip_dropout_blur", "shape": [5, 30, 34, 1], "data_seed": 2,
     "seed": 2**63 + 5, "epoch": 7, "sample_ids": [7, 7, 1, 2**40, 0], "backend": "albumentations"},
]
STREAM_CASES: list[dict[str, Any]] = [
    # one whole shuffled epoch, the last batch partial
    {"name": "whole_epoch", "spec": "geometry_color_crop", "dataset": "digits", "batch_size": 128,
     "seed": 5, "epoch": 1},
    # rank 1 of 2 over a subset, unshuffled, drop_last, a batch range, the reference backend
    {"name": "subset_rank1", "spec": "flip_dropout_blur", "dataset": "digits", "batch_size": 50,
     "seed": 9, "epoch": 3, "shuffle": False, "drop_last": True,
     "sample_ids": list(range(0, NUM_DIGITS, 3)), "start": 1, "end": 11, "stride": 2,
     "backend": "albumentations"},
]
WORKERS = {"w1": 1, "w2": 2}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Served]]:
    settings = {name: ServerSettings(workers=n,
                                     datasets={"digits": "builtin:digits"}, max_batch_bytes=4 << 20)
                for name, n in WORKERS.items()}
    with serve(settings["w1"]) as w1, serve(settings["w2"]) as w2:
        yield {"w1": w1, "w2": w2}


@pytest.fixture(scope="module")
def received(servers: dict[str, Served], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("raw_client")
    config = {"out": str(out), "protos": str(ROOT / "protos"), "project_package": str(ROOT / "augsvc"),
              "targets": {name: s.target for name, s in servers.items()},
              "specs": SPECS, "augment": AUGMENT_CASES, "stream": STREAM_CASES}
    (out / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, str(CLIENT), str(out / "config.json")], cwd=out,
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 0, f"raw client failed:\n{proc.stdout}\n{proc.stderr}"
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    results["_out"] = out
    return results


@pytest.fixture(scope="module")
def digits() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The digits as the server defines them, loaded independently of the servers under test."""
    yield served_digits()


def load(received: dict[str, Any], name: str) -> np.ndarray:
    return np.load(received["_out"] / f"{name}.npy")


def test_stubs_come_from_protos_only(received: dict[str, Any]) -> None:
    stubs = received["stubs"]
    gen = (received["_out"] / "gen").resolve()
    assert Path(stubs["augment_pb2"]).is_relative_to(gen)
    assert Path(stubs["augment_pb2_grpc"]).is_relative_to(gen)
    assert stubs["project_modules_loaded"] == []


@pytest.mark.parametrize("target", list(WORKERS))
def test_server_info_over_raw_stubs(received: dict[str, Any], target: str) -> None:
    info = received[target]["info"]
    assert info["workers"] == WORKERS[target]
    assert info["version"] == augsvc.__version__
    assert set(info["backends"]) == {"fused", "albumentations"}


@pytest.mark.parametrize("target", list(WORKERS))
@pytest.mark.parametrize("case", AUGMENT_CASES, ids=lambda c: c["name"])
def test_augment_is_bit_identical(received: dict[str, Any], target: str, case: dict[str, Any]) -> None:
    images = load(received, f"{target}.augment.{case['name']}.input")
    expected = augment_batch(images, load_spec(SPECS[case["spec"]]), seed=case["seed"], epoch=case["epoch"],
                             sample_ids=case["sample_ids"], backend=case["backend"] or "fused")
    unary = load(received, f"{target}.augment.{case['name']}.output")
    streamed = load(received, f"{target}.augment_stream.{case['name']}.output")
    assert unary.dtype == np.uint8 and unary.shape == expected.shape
    np.testing.assert_array_equal(unary, expected)
    np.testing.assert_array_equal(streamed, expected)
    meta = received[target]["augment"][case["name"]]
    assert meta["sample_ids"] == case["sample_ids"] and meta["dtype"] == "uint8"
    assert meta["tag"] == AUGMENT_CASES.index(case)
    assert received[target]["augment_stream"][case["name"]]["sample_ids"] == case["sample_ids"]


@pytest.mark.parametrize("target", list(WORKERS))
@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: c["name"])
def test_stream_batches_follow_the_epoch_plan(received: dict[str, Any], digits: tuple[np.ndarray, np.ndarray],
                                              target: str, case: dict[str, Any]) -> None:
    pixels, labels = digits
    population = case.get("sample_ids", NUM_DIGITS)
    plan = epoch_batches(population, case["batch_size"], seed=case["seed"], epoch=case["epoch"],
                         shuffle=case.get("shuffle", True), drop_last=case.get("drop_last", False))
    indices = list(range(case.get("start", 0), case.get("end", len(plan)), case.get("stride", 0) or 1))
    got = received[target]["stream"][case["name"]]
    assert got["batch_index"] == indices
    assert got["epochs"] == [case["epoch"]] * len(indices)
    assert got["dtypes"] == ["uint8"] * len(indices)
    spec = load_spec(SPECS[case["spec"]])
    expected = []
    for k, ids, batch_labels in zip(indices, got["sample_ids"], got["labels"], strict=True):
        assert ids == plan[k].tolist()
        assert batch_labels == labels[plan[k]].tolist()
        expected.append(augment_batch(pixels[plan[k]], spec, seed=case["seed"], epoch=case["epoch"],
                                      sample_ids=plan[k], backend=case.get("backend", "fused")))
    assert got["shapes"] == [list(e.shape) for e in expected]
    np.testing.assert_array_equal(load(received, f"{target}.stream.{case['name']}.images"),
                                  np.concatenate(expected))
    if case["name"] == "whole_epoch":  # every sample exactly once
        assert sorted(i for ids in got["sample_ids"] for i in ids) == list(range(NUM_DIGITS))
