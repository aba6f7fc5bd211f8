"""`load_dataset`: a source made into a served dataset, in the layout its cache budget allows.

Files (a folder or a manifest) are listed once, their headers read in parallel (`scan`), bad
files (and files too large for the server's --max-image-side) refused or left out
(`apply_policy`), then the layout is chosen: ``decoded`` when the decoded pixels fit, else
``encoded`` when the files' bytes fit, else ``files`` (`layouts`) — fit the cache budget and half
of the free space in /dev/shm (the other half is left for the workers' reply slots and the
clients' batch segments). Pixel sources (``builtin:digits``, ``.npz``) are always ``decoded``.
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ..shm import release_segment, shm_free_bytes
from ..validation import DEFAULT_MAX_SIDE
from .decode import JPEG_DECODER, DecodeFailed, DecodeSize, decode
from .layouts import LAYOUTS, DatasetHandle, build_segment
from .scan import Catalog, apply_policy, read_file, scan, too_large
from .sources import MANIFEST_SUFFIXES, ArraySource, digits, list_folder, read_manifest, read_npz

__all__ = ["DEFAULT_CACHE_BUDGET", "Dataset", "load_dataset", "parse_dataset_arg"]

log = logging.getLogger("augsvc.datasets")

BUILTINS = ("digits",)
DEFAULT_CACHE_BUDGET = 2 << 30
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Dataset:
    """A loaded dataset: metadata in this process, its samples in shared memory (`layouts`).

    The creator owns the segment: `close()` unlinks it (idempotent; also at exit). Build one
    with `load_dataset`.
    """

    def __init__(self, *, name: str, kind: str, source: str, labels: np.ndarray, class_names: list[str],
                 handle: DatasetHandle, shm: SharedMemory, nbytes: int, decode_size: DecodeSize | None = None
                 ) -> None:
        self.name, self.kind, self.source, self.decode_size = name, kind, source, decode_size
        self.labels, self.class_names = labels, class_names
        self.nbytes = nbytes                  # the segment's size
        self._handle = handle
        self._finalizer = weakref.finalize(self, release_segment, shm, True)

    @property
    def num_samples(self) -> int:
        return self._handle.num_samples

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(H, W, C) shared by every image, or None when sizes are mixed."""
        return self._handle.image_shape

    @property
    def channels(self) -> int:
        return self._handle.channels

    @property
    def layout(self) -> str:
        """How the samples are held: "decoded" (pixels), "encoded" (file bytes) or "files" (paths)."""
        return self._handle.layout

    @property
    def cached(self) -> bool:
        """False for the files layout: workers read each file per request."""
        return self.layout != "files"

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def handle(self) -> DatasetHandle:
        if self.closed:
            raise RuntimeError(f"dataset {self.name!r} is closed")
        return self._handle

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, kind={self.kind!r}, num_samples={self.num_samples}, "
                f"image_shape={self.image_shape}, layout={self.layout!r})")


def parse_dataset_arg(arg: str) -> tuple[str, str]:
    """Split ``--dataset NAME=SOURCE``."""
    name, sep, source = arg.partition("=")
    name, source = name.strip(), source.strip()
    if not sep or not name or not source:
        raise InvalidInputError(f"--dataset {arg!r}: expected NAME=SOURCE, e.g. digits=builtin:digits "
                                "or cats=/data/cats (an image folder) or x=/data/x.npz or t=/data/train.csv")
    if not _NAME_RE.fullmatch(name):
        raise InvalidInputError(f"--dataset {arg!r}: the name {name!r} must be 1-64 characters of "
                                "letters, digits, '_', '.', '-' and start with a letter or digit")
    return name, source


def load_dataset(name: str, source: str, *, builtin_side: int = 32, cache_budget_bytes: int = DEFAULT_CACHE_BUDGET,
                 decode_size: DecodeSize | str | None = None, layout: str = "auto", on_bad_file: str = "fail",
                 verify: bool = False, max_image_side: int = DEFAULT_MAX_SIDE) -> Dataset:
    """Load ``builtin:digits``, an ``.npz`` (``images``, ``labels``), an image folder with one
    sub-folder per class (class index = sorted sub-folder names) or a manifest (``.csv``,
    ``.jsonl``) into shared memory.

    decode_size: the size the dataset is used at (`DecodeSize`, or ``shorter:256``/``max:512``):
    each JPEG decodes at the smallest DCT scale that reaches it. layout: "auto" (decoded if the
    decoded pixels fit `cache_budget_bytes` and half of /dev/shm's free space, else encoded if the
    files do, else files), or one of them. on_bad_file: "fail" or "skip" files whose header cannot
    be read or whose decoded side is over `max_image_side` (the server's limit: no request could
    read them); verify: decode every file now, so that corrupt data is found at start too."""
    arg = f"--dataset {name}={source}"
    if not _NAME_RE.fullmatch(name):
        raise InvalidInputError(f"{arg}: the name must be 1-64 characters of letters, digits, '_', '.', '-'")
    if layout != "auto" and layout not in LAYOUTS:
        raise InvalidInputError(f"layout: {layout!r} is not allowed; expected auto, {', '.join(LAYOUTS)}")
    size = DecodeSize.parse(decode_size) if isinstance(decode_size, str) else decode_size
    if source.startswith("builtin:"):
        which = source.removeprefix("builtin:")
        if which not in BUILTINS:
            raise InvalidInputError(f"{arg}: unknown built-in {which!r}; available: "
                                    + ", ".join(f"builtin:{b}" for b in BUILTINS))
        if not 1 <= builtin_side <= 4096:
            raise InvalidInputError(f"builtin_side: {builtin_side} is outside [1, 4096]")
        return _from_array(name, "builtin", source, digits(builtin_side), max_image_side, arg)
    path = Path(source)
    if not path.exists():
        raise InvalidInputError(f"{arg}: {source!r} does not exist; expected an image folder, a manifest "
                                "(.csv, .jsonl), an .npz file or builtin:digits")
    if path.suffix.lower() == ".npz" and path.is_file():
        return _from_array(name, "npz", source, read_npz(path, arg), max_image_side, arg)
    if path.is_dir():
        kind, table = "folder", list_folder(path, arg)
    elif path.suffix.lower() in MANIFEST_SUFFIXES:
        kind, table = "manifest", read_manifest(path, arg)
    else:
        raise InvalidInputError(f"{arg}: unknown source kind; expected an image folder, a manifest (.csv, "
                                ".jsonl), an .npz file or builtin:digits")
    cat, bad = scan(table, size=size, verify=verify)
    cat = apply_policy(cat, sorted(bad + too_large(cat, max_image_side, name)), on_bad_file, arg)
    return _from_files(name, kind, source, cat, size, layout, cache_budget_bytes, arg)


def _from_array(name: str, kind: str, source: str, src: ArraySource, max_side: int, arg: str) -> Dataset:
    images = src.images
    if max(images.shape[1:3]) > max_side:
        raise InvalidInputError(f"{arg}: its images are {images.shape[2]}x{images.shape[1]}, over "
                                f"--max-image-side {max_side}")

    def fill(a: dict[str, np.ndarray]) -> None:
        a["pixels"][...] = images

    shm, fields = build_segment([("pixels", np.uint8, images.shape)], fill)
    h, w, c = images.shape[1:]
    handle = DatasetHandle(name, "decoded", shm.name, len(images), c, (h, w, c), fields)
    return Dataset(name=name, kind=kind, source=source, labels=src.labels, class_names=src.class_names,
                   handle=handle, shm=shm, nbytes=shm.size)


def _from_files(name: str, kind: str, source: str, cat: Catalog, size: DecodeSize | None, layout: str,
                budget: int, arg: str) -> Dataset:
    n, c, table = len(cat), cat.channels, cat.table
    heights, widths = cat.decoded_sizes()
    pixel_bytes = int((heights.astype(np.int64) * widths).sum()) * c
    encoded_bytes = int(cat.file_bytes.sum())
    capped = None  # the layout the cache budget alone would choose, where /dev/shm's room changed it
    if layout == "auto":
        def fits(room: int) -> str:
            return "decoded" if pixel_bytes <= room else "encoded" if encoded_bytes <= room else "files"

        free = shm_free_bytes()
        room = budget if free is None else min(budget, free // 2)
        layout, by_budget = fits(room), fits(budget)
        capped = by_budget if by_budget != layout else None
    one_shape = bool((heights == heights[0]).all() and (widths == widths[0]).all())
    shape = (int(heights[0]), int(widths[0]), c) if one_shape else None
    arrays: list[tuple[str, Any, tuple[int, ...]]] = [
        ("path_offsets", np.int64, table.offsets.shape), ("paths", np.uint8, table.paths.shape),
        ("formats", np.uint8, (n,)), ("header_hw", np.int32, (n, 2)), ("decoded_hw", np.int32, (n, 2)),
        ("scales", np.uint8, (n,)), ("file_bytes", np.int64, (n,)), ("mtime_ns", np.int64, (n,))]
    if layout == "decoded":
        arrays += [("bad", np.uint8, (n,))]
        arrays += [("pixels", np.uint8, (n, *shape))] if shape else \
            [("pixel_offsets", np.int64, (n + 1,)), ("pixels", np.uint8, (pixel_bytes,))]
    elif layout == "encoded":
        arrays += [("data_offsets", np.int64, (n + 1,)), ("data", np.uint8, (encoded_bytes,))]

    def fill(a: dict[str, np.ndarray]) -> None:
        a["path_offsets"][...], a["paths"][...] = table.offsets, table.paths
        a["formats"][...], a["scales"][...] = cat.formats, cat.scales
        a["file_bytes"][...], a["mtime_ns"][...] = cat.file_bytes, cat.mtime_ns
        a["header_hw"][:, 0], a["header_hw"][:, 1] = cat.heights, cat.widths
        a["decoded_hw"][:, 0], a["decoded_hw"][:, 1] = heights, widths
        if layout == "decoded":
            _decode_all(name, cat, a, c)
        elif layout == "encoded":
            _read_all(cat, a, arg)

    shm, fields = build_segment(arrays, fill)
    handle = DatasetHandle(name, layout, shm.name, n, c, shape, fields)
    ds = Dataset(name=name, kind=kind, source=source, labels=table.labels, class_names=table.class_names,
                 handle=handle, shm=shm, nbytes=shm.size, decode_size=size)
    log.info("dataset %r: %d images from %s, layout %s (%.1f MB in shared memory; decoded %.1f MB, "
             "encoded %.1f MB, cache budget %.1f MB), decode size %s, %s", name, n, kind, layout, shm.size / 1e6,
             pixel_bytes / 1e6, encoded_bytes / 1e6, budget / 1e6, size or "full", JPEG_DECODER)
    if capped:
        log.warning("dataset %r: layout %s, not %s, because /dev/shm has room for %.1f MB (half its free space); "
                    "give the container more shared memory (docker --shm-size, a k8s emptyDir with medium Memory) "
                    "to cache it", name, layout, capped, room / 1e6)
    return ds


def _parallel(n: int, run: Any) -> None:
    """run(start, stop) over chunks of range(n) on a thread pool (libjpeg-turbo and file reads
    release the GIL)."""
    chunk = 64
    with ThreadPoolExecutor(min(8, 2 * (os.cpu_count() or 1)), thread_name_prefix="augsvc-load") as ex:
        list(ex.map(lambda s: run(s, min(s + chunk, n)), range(0, n, chunk)))


def _decode_all(name: str, cat: Catalog, a: dict[str, np.ndarray], channels: int) -> None:
    """Decode every file into the decoded layout's pixels; a file that fails is marked bad."""
    dense = a["pixels"].ndim == 4
    hw = a["decoded_hw"]
    if not dense:
        np.cumsum(hw[:, 0].astype(np.int64) * hw[:, 1] * channels, out=a["pixel_offsets"][1:])
        a["pixel_offsets"][0] = 0
    failed: list[tuple[int, str]] = []

    def run(start: int, stop: int) -> None:
        for i in range(start, stop):
            h, w = int(hw[i, 0]), int(hw[i, 1])
            if dense:
                out = a["pixels"][i]
            else:
                off = int(a["pixel_offsets"][i])
                out = a["pixels"][off:off + h * w * channels].reshape(h, w, channels)
            try:
                decode(read_file(cat.table.path(i)), cat.header(i), channels, int(cat.scales[i]), out)
            except (DecodeFailed, OSError) as exc:
                a["bad"][i] = 1
                out[...] = 0
                failed.append((i, str(exc)))

    _parallel(len(cat), run)
    if failed:
        failed.sort()
        log.warning("dataset %r: %d files did not decode; requests for them get INVALID_ARGUMENT (--verify finds "
                    "them at start): %s", name, len(failed),
                    "; ".join(f"sample {i} ({cat.table.path(i)}): {why}" for i, why in failed[:20]))


def _read_all(cat: Catalog, a: dict[str, np.ndarray], arg: str) -> None:
    """Copy every file's bytes into the encoded layout."""
    offsets = a["data_offsets"]
    offsets[0] = 0
    np.cumsum(cat.file_bytes, out=offsets[1:])

    def run(start: int, stop: int) -> None:
        for i in range(start, stop):
            data = read_file(cat.table.path(i))
            if len(data) != cat.file_bytes[i]:
                raise InvalidInputError(f"{arg}: {cat.table.path(i)!r} changed while the dataset was loaded")
            a["data"][int(offsets[i]):int(offsets[i + 1])] = np.frombuffer(data, np.uint8)

    _parallel(len(cat), run)

