"""The worker pool: same pixels as in-process, limits, errors, worker death, cleanup."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from augsvc.datasets import Dataset, attach, load_dataset
from augsvc.engine import augment_batch
from augsvc.errors import (
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    SpecError,
    WorkerUnavailableError,
)
from augsvc.pool import WorkerPool, default_workers
from augsvc.spec import load_spec
from augsvc.worker import SLEEP_HOOK_ENV, remote_error

SPEC = load_spec({"transforms": [
    {"hflip": {"p": 0.5}},
    {"rotate": {"limit_range": [-20, 20]}},
    {"color": {"brightness": 0.2, "contrast": 0.2, "p": 0.8}},
]})
RESIZE = load_spec({"transforms": [
    {"rotate": {"limit_range": [-10, 10]}},
    {"resize": {"height": 16, "width": 16}},
]})
SLOW_SEED = 777_777  # the sleep hook's seed: a job with it hangs until its worker is killed
TIMEOUT = 30


def own_segments() -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"augsvc_{os.getpid()}_"))


def batch(n: int, h: int = 24, w: int = 20, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def wait_until(cond: object, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def digits() -> Iterator[Dataset]:
    with load_dataset("digits", "builtin:digits", builtin_side=16) as ds:
        yield ds


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataset]:
    root = tmp_path_factory.mktemp("folder")
    for i, (h, w) in enumerate([(12, 10), (9, 14), (16, 16), (7, 5)]):
        arr = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(arr).save(root / f"c{i % 2}" / f"{i}.png")
    with load_dataset("folder", str(root), cache_budget_bytes=0) as ds:
        yield ds


@pytest.fixture(scope="module")
def pool(digits: Dataset, folder: Dataset) -> Iterator[WorkerPool]:
    with WorkerPool(2, datasets={"digits": digits, "folder": folder}, max_batch_bytes=1 << 20) as p:
        yield p


# -- results ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["fused", "albumentations"])
def test_same_pixels_as_in_process(pool: WorkerPool, backend: str) -> None:
    jobs = []
    for k in range(6):  # enough to land on both workers
        x, ids = batch(5, seed=k), np.arange(5) + 100 * k
        fut = pool.submit_augment(x, SPEC.to_bytes(), seed=3, epoch=k, sample_ids=ids, backend=backend)
        jobs.append((fut, augment_batch(x, SPEC, seed=3, epoch=k, sample_ids=ids, backend=backend)))
    for fut, expected in jobs:
        np.testing.assert_array_equal(fut.result(TIMEOUT), expected)


def test_gray_and_non_contiguous_input(pool: WorkerPool) -> None:
    x = batch(4, c=1)[:, ::2, ::-1]  # a strided view goes through the slot as well
    got = pool.submit_augment(x, SPEC, seed=1, epoch=0, sample_ids=[9, 8, 7, 6]).result(TIMEOUT)
    np.testing.assert_array_equal(got, augment_batch(x, SPEC, seed=1, epoch=0, sample_ids=[9, 8, 7, 6]))


def test_encoded_images(pool: WorkerPool) -> None:
    x = batch(3)
    got = pool.submit_augment([png(im) for im in x], SPEC.to_bytes(), seed=5, epoch=1, sample_ids=[1, 2, 3])
    expected = augment_batch(x, SPEC, seed=5, epoch=1, sample_ids=[1, 2, 3])
    np.testing.assert_array_equal(got.result(TIMEOUT), expected)


def test_dataset_batch(pool: WorkerPool, digits: Dataset) -> None:
    ids = np.array([5, 1796, 0, 42])
    images, labels = pool.submit_batch("digits", ids, SPEC.to_bytes(), seed=2, epoch=3).result(TIMEOUT)
    reader = attach(digits.handle())
    expected = augment_batch(reader.gather(ids), SPEC, seed=2, epoch=3, sample_ids=ids)
    reader.close()
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(labels, digits.labels[ids])


def test_uncached_mixed_size_dataset_batch(pool: WorkerPool, folder: Dataset) -> None:
    ids = np.array([3, 0, 2])
    images, labels = pool.submit_batch("folder", ids, RESIZE.to_bytes(), seed=1, epoch=0).result(TIMEOUT)
    reader = attach(folder.handle())
    expected = augment_batch(reader.gather(ids), RESIZE, seed=1, epoch=0, sample_ids=ids)
    reader.close()
    assert images.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(images, expected)
    assert labels.tolist() == [1, 0, 1]  # samples: c0/0, c0/2, c1/1, c1/3


# -- errors -------------------------------------------------------------------------------------

def test_errors_travel_back_and_workers_keep_serving(pool: WorkerPool) -> None:
    x = batch(2)
    with pytest.raises(InvalidInputError, match=r"encoded_images\[1\]: not a decodable PNG/JPEG"):
        pool.submit_augment([png(x[0]), b"\x89PNG broken"], SPEC, seed=0, epoch=0,
                            sample_ids=[0, 1]).result(TIMEOUT)
    with pytest.raises(SpecError, match="not a valid augsvc.v1.Pipeline"):
        pool.submit_augment(x, b"\xff\xff\xff", seed=0, epoch=0, sample_ids=[0, 1]).result(TIMEOUT)
    with pytest.raises(InvalidInputError, match="backend"):
        pool.submit_augment(x, SPEC, seed=0, epoch=0, sample_ids=[0, 1], backend="nope").result(TIMEOUT)
    assert pool.submit_augment(x, SPEC, seed=0, epoch=0, sample_ids=[0, 1]).result(TIMEOUT).shape == x.shape
    assert pool.stats()["restarts"] == 0


def test_submit_time_errors(pool: WorkerPool) -> None:
    with pytest.raises(NotFoundError, match="'nope' is not served here; available: digits, folder"):
        pool.submit_batch("nope", [0], SPEC.to_bytes(), seed=0, epoch=0)
    with pytest.raises(InvalidInputError, match=r"sample_ids: 1797 is outside \[0, 1796\]"):
        pool.submit_batch("digits", [0, 1797], SPEC.to_bytes(), seed=0, epoch=0)
    with pytest.raises(InvalidInputError, match="sample_ids: 1 ids for 2 images"):
        pool.submit_augment(batch(2), SPEC, seed=0, epoch=0, sample_ids=[0])
    with pytest.raises(InvalidInputError, match="not a uint8"):
        pool.submit_augment(batch(2).astype(np.float32), SPEC, seed=0, epoch=0, sample_ids=[0, 1])


def test_a_dataset_batch_may_read_more_than_it_returns_within_the_work_limit(digits: Dataset,
                                                                             folder: Dataset) -> None:
    # The folder's images hold 360, 378, 768 and 105 bytes; a 2x2 resize returns 12 bytes each.
    # The digits are 16 x 16 x 1 (256 bytes): 4 are 1,024 bytes read, 4 bytes each returned.
    small = load_spec({"transforms": [{"resize": {"height": 2, "width": 2}}]}).to_bytes()
    with WorkerPool(1, datasets={"folder": folder, "digits": digits}, max_batch_bytes=64) as p:
        out, _ = p.submit_batch("digits", [0, 1, 2, 3], small, seed=0, epoch=0).result(TIMEOUT)
        assert out.shape == (4, 2, 2, 1)
        with pytest.raises(LimitExceededError, match="images once read are 1280 bytes, over a worker's limit"):
            p.submit_batch("digits", [0, 1, 2, 3, 4], small, seed=0, epoch=0)  # refused at submit: a fixed shape
        out, _ = p.submit_batch("folder", [0, 3], small, seed=0, epoch=0).result(TIMEOUT)  # reads 465 > 64 bytes
        assert out.shape == (2, 2, 2, 3)
        with pytest.raises(LimitExceededError, match=r"images once read are 1611 bytes, over a worker's limit of "
                                                     r"1024 bytes \(16 x max_batch_bytes\)"):
            p.submit_batch("folder", [0, 1, 2, 3], small, seed=0, epoch=0).result(TIMEOUT)
        assert p.submit_batch("folder", [1], small, seed=0, epoch=0).result(TIMEOUT)[0].shape == (1, 2, 2, 3)


def test_a_dataset_sample_over_the_side_limit_is_refused_before_it_is_read(folder: Dataset) -> None:
    # The folder's images are 12x10, 16x16, 9x14 and 7x5 (sample order); the limit is 15.
    color = load_spec({"transforms": [{"color": {"brightness": 0.3, "p": 1.0}}]}).to_bytes()
    crop = load_spec({"transforms": [{"random_resized_crop": {"height": 4, "width": 4}}]}).to_bytes()
    with WorkerPool(1, datasets={"folder": folder}, max_batch_bytes=1 << 20, max_image_side=15) as p:
        out, _ = p.submit_batch("folder", [0, 2, 3], crop, seed=0, epoch=0).result(TIMEOUT)
        assert out.shape == (3, 4, 4, 3)
        for spec in (color, crop):  # read whole, or by regions: the table's sizes decide first
            with pytest.raises(LimitExceededError, match=r"sample_ids: a sample's decoded side 16 is over the "
                                                         r"limit of 15 pixels"):
                p.submit_batch("folder", [0, 1], spec, seed=0, epoch=0).result(TIMEOUT)


def test_limits(pool: WorkerPool) -> None:
    big = batch(1, 600, 600)  # 1.08 MB > 1 MiB slot
    with pytest.raises(LimitExceededError, match="max_batch_bytes"):
        pool.submit_augment(big, SPEC, seed=0, epoch=0, sample_ids=[0])
    with pytest.raises(LimitExceededError, match="max_batch_bytes"):
        pool.submit_augment([b"x" * (1 << 20) + b"x"], SPEC, seed=0, epoch=0, sample_ids=[0])
    with pytest.raises(LimitExceededError, match="max_batch_bytes"):  # 1797 x 16 x 16 fits; x 2 does not
        pool.submit_batch("digits", np.arange(1797).repeat(3), SPEC.to_bytes(), seed=0, epoch=0)
    with pytest.raises(LimitExceededError, match="images: side 5000 is over the limit of 4096"):
        pool.submit_augment(np.zeros((1, 5000, 1, 1), np.uint8), SPEC, seed=0, epoch=0, sample_ids=[0])
    upscale = load_spec({"transforms": [{"resize": {"height": 512, "width": 512}}]})
    with pytest.raises(LimitExceededError, match="augmented batch would be"):  # refused before the work
        pool.submit_augment(batch(2), upscale, seed=0, epoch=0, sample_ids=[0, 1]).result(TIMEOUT)
    with pytest.raises(LimitExceededError, match="augmented batch would be"):  # found after the work
        blobs = [png(batch(1)[0])] * 2
        pool.submit_augment(blobs, upscale, seed=0, epoch=0, sample_ids=[0, 1]).result(TIMEOUT)


def test_remote_error_mapping() -> None:
    err = remote_error("LimitExceededError", "too big")
    assert type(err) is LimitExceededError and str(err) == "too big"
    for name in ("internal", "ValueError", "remote_error", "os"):  # never instantiate arbitrary names
        assert type(remote_error(name, "internal error in worker 0: KeyError")) is RuntimeError


# -- in-flight limit, cancellation, worker death ------------------------------------------------

def test_inflight_limit_and_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SLEEP_HOOK_ENV, f"{SLOW_SEED}:60")
    x, before = batch(1), own_segments()
    with WorkerPool(1, max_inflight=2, max_batch_bytes=1 << 16) as p:
        slow = p.submit_augment(x, SPEC, seed=SLOW_SEED, epoch=0, sample_ids=[0])
        wait_until(slow.running)
        queued = p.submit_augment(x, SPEC, seed=1, epoch=0, sample_ids=[0])
        with pytest.raises(LimitExceededError, match="max_inflight"):
            p.submit_augment(x, SPEC, seed=1, epoch=0, sample_ids=[0])
        assert queued.cancel()  # not started: removed at once, which frees its place
        assert p.stats()["inflight"] == 1 and p.stats()["queued"] == 0
        again = p.submit_augment(x, SPEC, seed=1, epoch=0, sample_ids=[0])
        assert not slow.cancel()  # started jobs run to the end
    # closing fails the running job (retryable) and cancels the queued one
    with pytest.raises(WorkerUnavailableError, match="shutting down"):
        slow.result(TIMEOUT)
    assert again.cancelled()
    assert own_segments() == before


def test_sigkill_mid_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SLEEP_HOOK_ENV, f"{SLOW_SEED}:60")
    x, before = batch(3), own_segments()
    expected = augment_batch(x, SPEC, seed=1, epoch=0, sample_ids=[0, 1, 2])
    with WorkerPool(1, max_batch_bytes=1 << 16) as p:
        (old_pid,) = p.pids()
        slow = p.submit_augment(x, SPEC, seed=SLOW_SEED, epoch=0, sample_ids=[0, 1, 2])
        wait_until(slow.running)
        behind = p.submit_augment(x, SPEC, seed=1, epoch=0, sample_ids=[0, 1, 2])  # queued behind it
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        with pytest.raises(WorkerUnavailableError, match=r"worker 0 died \(exit code -9\).*retry"):
            slow.result(TIMEOUT)
        np.testing.assert_array_equal(behind.result(TIMEOUT), expected)
        np.testing.assert_array_equal(p.submit_augment(x, SPEC, seed=1, epoch=0, sample_ids=[0, 1, 2])
                                      .result(TIMEOUT), expected)
        stats = p.stats()
        assert (stats["restarts"], stats["alive"], stats["failed"], stats["completed"]) == (1, 1, 1, 2)
        assert p.pids() != [old_pid]
        pids = p.pids()
    assert own_segments() == before
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids))


def test_close_is_idempotent_and_leaves_nothing(digits: Dataset) -> None:
    before = own_segments()
    p = WorkerPool(2, datasets={"digits": digits}, max_batch_bytes=1 << 16).start()
    assert len(own_segments()) == len(before) + 4 and p.worker_count == 2
    pids = p.pids()
    p.close()
    p.close()
    assert own_segments() == before
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids))
    with pytest.raises(WorkerUnavailableError, match="not running"):
        p.submit_augment(batch(1), SPEC, seed=0, epoch=0, sample_ids=[0])


def test_resource_tracker_stays_quiet(tmp_path: Path) -> None:
    """A whole server lifetime in a fresh interpreter: workers attach and exit, the creator
    unlinks; the resource tracker (its stderr is ours) must neither warn nor fail."""
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent("""
        import numpy as np
        from augsvc.datasets import load_dataset
        from augsvc.pool import WorkerPool
        from augsvc.spec import load_spec

        spec = load_spec({"transforms": [{"hflip": {"p": 0.5}}]})
        with load_dataset("d", "builtin:digits", builtin_side=8) as ds:
            with WorkerPool(2, datasets={"d": ds}, max_batch_bytes=1 << 16) as pool:
                futs = [pool.submit_batch("d", np.arange(8) + k, spec, seed=1, epoch=0) for k in range(6)]
                print(sum(f.result(60)[0].shape[0] for f in futs))
    """))  # no __main__ guard on purpose: workers must not re-run the main script
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "48"
    assert "resource_tracker" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# -- default worker count -----------------------------------------------------------------------

@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "max 100000\n"}, 8),
    ({"cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "10000 100000\n"}, 1),
    ({"cpu.max": "3200000 100000\n"}, 8),  # a quota above the CPUs we may run on
    ({"cpu/cpu.cfs_quota_us": "250000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 8),
    ({}, 8),
])
def test_default_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str],
                         expected: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert default_workers(tmp_path) == expected


def test_default_workers_on_this_machine() -> None:
    assert 1 <= default_workers() <= len(os.sched_getaffinity(0))
