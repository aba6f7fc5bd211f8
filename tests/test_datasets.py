"""Server-side datasets: sources, shared-memory layouts, id validation and cleanup."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from augsvc.datasets import (
    Dataset,
    attach,
    decode_images,
    load_dataset,
    parse_dataset_arg,
)
from augsvc.errors import InvalidInputError, LimitExceededError
from augsvc.shm import attach_segment, create_segment, release_segment
from augsvc.validation import Limits
from augsvc.validation import dataset_indices as check_sample_ids


def own_segments() -> list[str]:
    """Segments created by this process (other test runs may share /dev/shm)."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"augsvc_{os.getpid()}_"))


def write_png(path: Path, h: int, w: int, c: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)
    return arr


def make_folder(root: Path, *, sizes: list[tuple[int, int]], channels: int = 3) -> list[np.ndarray]:
    """Two classes ("cat" < "dog"); images in label order, sorted by file name within a class."""
    images = []
    for i, (h, w) in enumerate(sizes):
        cls = "cat" if i < len(sizes) // 2 else "dog"
        images.append(write_png(root / cls / f"img{i:02d}.png", h, w, channels, seed=i))
    return images


# -- arguments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arg, expected", [
    ("digits=builtin:digits", ("digits", "builtin:digits")),
    ("cats=/data/a=b", ("cats", "/data/a=b")),
    (" x.1 = y.npz ", ("x.1", "y.npz")),
])
def test_parse_dataset_arg(arg: str, expected: tuple[str, str]) -> None:
    assert parse_dataset_arg(arg) == expected


@pytest.mark.parametrize("arg, fragment", [
    ("digits", "expected NAME=SOURCE"),
    ("=builtin:digits", "expected NAME=SOURCE"),
    ("digits=", "expected NAME=SOURCE"),
    ("my data=x.npz", "the name 'my data'"),
])
def test_parse_dataset_arg_errors(arg: str, fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=fragment):
        parse_dataset_arg(arg)


@pytest.mark.parametrize("source, fragment", [
    ("builtin:mnist", "unknown built-in 'mnist'; available: builtin:digits"),
    ("/nonexistent/path", "does not exist"),
])
def test_bad_sources_name_the_argument(source: str, fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=f"--dataset d={source}: .*{fragment}"):
        load_dataset("d", source)


def test_unknown_source_kind(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("1,2,3")
    with pytest.raises(InvalidInputError, match="unknown source kind"):
        load_dataset("d", str(tmp_path / "data.txt"))


# -- builtin:digits -----------------------------------------------------------------------------

def test_builtin_digits() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    with load_dataset("digits", "builtin:digits") as ds:
        assert (ds.kind, ds.num_samples, ds.image_shape, ds.cached) == ("builtin", 1797, (32, 32, 1), True)
        assert ds.labels.dtype == np.int64 and np.array_equal(ds.labels, bunch.target)
        assert ds.class_names == [str(i) for i in range(10)]
        reader = attach(ds.handle())
        images = reader.gather(np.arange(1797))
        reader.close()
        assert isinstance(images, np.ndarray) and images.shape == (1797, 32, 32, 1)
        small = np.round(bunch.images[5] * 255 / 16).astype(np.uint8)
        expected = cv2.resize(small, (32, 32), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(images[5, :, :, 0], expected)
    assert own_segments() == []


def test_builtin_side_8_is_the_raw_digits() -> None:
    from sklearn.datasets import load_digits

    with load_dataset("digits", "builtin:digits", builtin_side=8) as ds:
        reader = attach(ds.handle())
        got = reader.gather([0, 1796])
        reader.close()
    expected = np.round(load_digits().images[[0, 1796]] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(got[..., 0], expected)


# -- image folders ------------------------------------------------------------------------------

SIZES = [(12, 10), (9, 14), (16, 16), (7, 5), (20, 11), (8, 8)]


@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["cached", "uncached"])
def test_folder_mixed_sizes(tmp_path: Path, budget: int) -> None:
    expected = make_folder(tmp_path, sizes=SIZES)
    with load_dataset("pets", str(tmp_path), cache_budget_bytes=budget) as ds:
        assert ds.cached is (budget > 0)
        assert (ds.kind, ds.num_samples, ds.image_shape, ds.channels) == ("folder", 6, None, 3)
        assert ds.class_names == ["cat", "dog"]
        assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
        reader = attach(ds.handle())
        got = reader.gather([5, 0, 3, 3])
        reader.close()
    assert isinstance(got, list) and len(got) == 4
    for g, i in zip(got, [5, 0, 3, 3], strict=True):
        np.testing.assert_array_equal(g, expected[i])
    assert own_segments() == []


def test_folder_cached_and_uncached_agree_uniform_gray(tmp_path: Path) -> None:
    expected = np.stack(make_folder(tmp_path, sizes=[(10, 12)] * 4, channels=1))
    with (load_dataset("a", str(tmp_path)) as cached,
          load_dataset("b", str(tmp_path), cache_budget_bytes=0) as lazy):
        assert cached.image_shape == lazy.image_shape == (10, 12, 1)
        assert cached.cached and not lazy.cached
        r1, r2 = attach(cached.handle()), attach(lazy.handle())
        ids = np.array([3, 1, 2])
        a, b = r1.gather(ids), r2.gather(ids)
        r1.close()
        r2.close()
    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, expected[ids])


def test_folder_mixed_gray_and_color_decodes_rgb(tmp_path: Path) -> None:
    write_png(tmp_path / "a" / "1.png", 6, 6, 1, seed=1)
    rgb = write_png(tmp_path / "b" / "2.png", 6, 6, 3, seed=2)
    with load_dataset("m", str(tmp_path)) as ds:
        assert ds.image_shape == (6, 6, 3)
        reader = attach(ds.handle())
        np.testing.assert_array_equal(reader.gather([1])[0], rgb)
        reader.close()


def test_uncached_corrupt_file_names_the_sample_not_the_path(tmp_path: Path) -> None:
    make_folder(tmp_path, sizes=[(8, 8)] * 4)
    with load_dataset("pets", str(tmp_path), cache_budget_bytes=0) as ds:
        victim = tmp_path / "dog" / "img02.png"
        victim.write_bytes(victim.read_bytes()[:40])  # truncated after the header
        reader = attach(ds.handle())
        assert reader.gather([0, 1]).shape == (2, 8, 8, 3)
        with pytest.raises(InvalidInputError, match="sample 2 of dataset 'pets'") as info:
            reader.gather([1, 2])
        assert str(tmp_path) not in str(info.value)
        reader.close()


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "cls").mkdir()
    with pytest.raises(InvalidInputError, match="no PNG/JPEG images"):
        load_dataset("e", str(tmp_path))


# -- npz ----------------------------------------------------------------------------------------

def test_npz_gray_adds_channel(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 7), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 2, 1, 2, 0]))
    with load_dataset("d", str(tmp_path / "d.npz")) as ds:
        assert (ds.kind, ds.num_samples, ds.image_shape) == ("npz", 5, (6, 7, 1))
        assert ds.class_names == ["0", "1", "2"] and ds.labels.dtype == np.int64
        reader = attach(ds.handle())
        np.testing.assert_array_equal(reader.gather([4, 0])[..., 0], images[[4, 0]])
        reader.close()


def test_npz_rgb_with_class_names(tmp_path: Path) -> None:
    images = np.zeros((2, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([1, 0]), class_names=np.array(["no", "yes"]))
    with load_dataset("d", str(tmp_path / "d.npz")) as ds:
        assert ds.image_shape == (4, 4, 3) and ds.class_names == ["no", "yes"]


@pytest.mark.parametrize("arrays, fragment", [
    ({"images": np.zeros((2, 4, 4), np.uint8)}, r"lacks \['labels'\]"),
    ({"images": np.zeros((2, 4, 4), np.float32), "labels": np.zeros(2, int)}, "must be uint8"),
    ({"images": np.zeros((2, 4, 4, 2), np.uint8), "labels": np.zeros(2, int)}, "must be uint8"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(3, int)}, "labels must be 2"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0, -1])}, "non-negative"),
])
def test_bad_npz(tmp_path: Path, arrays: dict[str, np.ndarray], fragment: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(InvalidInputError, match=f"--dataset d=.*d.npz: .*{fragment}"):
        load_dataset("d", str(tmp_path / "d.npz"))


def test_not_an_npz(tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_bytes(b"not a zip")
    with pytest.raises(InvalidInputError, match="cannot read the .npz"):
        load_dataset("d", str(tmp_path / "d.npz"))


# -- ids, decoding, lifetime -------------------------------------------------------------------

@pytest.mark.parametrize("ids, fragment", [
    ([0, 10], r"10 is outside \[0, 9\]"),
    ([-1], r"-1 is outside \[0, 9\]"),
    ([[1, 2]], "1-D"),
    ([0.5], "integers"),
])
def test_check_sample_ids(ids: list[object], fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=f"sample_ids: .*{fragment}"):
        check_sample_ids(ids, 10)


def test_decode_images_channels_and_limits() -> None:
    import io

    def png(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    gray, rgb = np.full((4, 5), 7, np.uint8), np.full((4, 5, 3), 9, np.uint8)
    assert [a.shape for a in decode_images([png(gray), png(gray)])] == [(4, 5, 1)] * 2
    assert [a.shape for a in decode_images([png(gray), png(rgb)])] == [(4, 5, 3)] * 2
    with pytest.raises(InvalidInputError, match=r"encoded_images\[1\]: not a decodable"):
        decode_images([png(gray), b"garbage"])
    with pytest.raises(LimitExceededError, match=r"encoded_images\[0\]: 5x4 exceeds the maximum image side"):
        decode_images([png(gray)], limits=Limits(max_image_side=4))


def test_close_is_idempotent_and_unlinks(tmp_path: Path) -> None:
    before = own_segments()
    ds = load_dataset("digits", "builtin:digits", builtin_side=8)
    assert isinstance(ds, Dataset) and len(own_segments()) == len(before) + 1
    reader = attach(ds.handle())  # a reader in the creator's own process must not disturb the tracker
    reader.close()
    ds.close()
    ds.close()
    assert ds.closed and own_segments() == before
    with pytest.raises(RuntimeError, match="closed"):
        ds.handle()


def test_attach_does_not_register_with_the_resource_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers share the creator's tracker, which keeps a set of names: a reader's register and
    unregister would erase the creator's entry, so readers must not register at all."""
    from multiprocessing import resource_tracker

    shm = create_segment(16, "t", reserve=True)
    calls: list[tuple[object, str]] = []
    original = resource_tracker.register

    def record(name: object, rtype: str) -> None:
        calls.append((name, rtype))
        original(name, rtype)  # type: ignore[arg-type]

    monkeypatch.setattr(resource_tracker, "register", record)
    other = create_segment(16, "t", reserve=True)  # creating still registers
    reader = attach_segment(shm.name)
    assert calls == [("/" + other.name, "shared_memory")]
    assert resource_tracker.register is record and reader.buf is not None
    release_segment(reader, unlink=False)
    monkeypatch.undo()
    release_segment(other, unlink=True)
    release_segment(shm, unlink=True)
    assert not any(n in own_segments() for n in (shm.name, other.name))
