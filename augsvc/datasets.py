"""Server-side datasets whose pixels live in shared memory, so every worker reads one copy.

`load_dataset` decodes a source once in the serving process and places the pixels in a POSIX
shared-memory segment; `Dataset.handle()` is a small picklable description that worker
processes (forkserver children, which inherit nothing) pass to `attach` to read the same pages.

Layouts of a handle:

- ``dense``  — all images share one shape: one (N, H, W, C) uint8 array.
- ``packed`` — mixed sizes: the pixels back to back, then an int64 (N, 3) table (offset, H, W).
- ``files``  — an image folder larger than the cache budget: an int64 (N + 1) offset table and
  the UTF-8 file paths back to back; workers decode the files they are asked for.

Channels: folder images (and encoded request images) decode to C=1 when every one of them is
grayscale (Pillow modes ``1``, ``L``, ``LA``), otherwise all decode to RGB (C=3). EXIF
orientation is not applied: pixels are used as stored.

Only the creator of a segment unlinks it (`Dataset.close`); readers never register their
attachments with the resource tracker (see `augsvc.shm.attach_segment`).
"""

from __future__ import annotations

import io
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np

from .errors import InvalidInputError, LimitExceededError
from .shm import attach_segment, create_segment, release_segment
from .validation import Limits

__all__ = [
    "Dataset", "DatasetHandle", "DatasetReader", "attach", "load_dataset", "parse_dataset_arg",
    "decode_images",
]

BUILTINS = ("digits",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_FORMATS = ("PNG", "JPEG")
_GRAY_MODES = frozenset({"1", "L", "LA"})
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DEFAULT_CACHE_BUDGET = 2 << 30


# ---------------------------------------------------------------------------------------------
# decoding and validation
# ---------------------------------------------------------------------------------------------

def _open_image(src: str | BinaryIO, what: str, limits: Limits | None) -> Any:
    from PIL import Image

    try:
        img = Image.open(src, formats=_FORMATS)  # no other decoders: less attack surface
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise InvalidInputError(f"{what}: the image file cannot be read") from None
    except Image.DecompressionBombError:
        raise LimitExceededError(f"{what}: the image has too many pixels") from None
    except Exception:
        raise InvalidInputError(f"{what}: not a decodable PNG/JPEG image") from None
    if limits is not None:
        try:
            limits.check_header_side(what, *img.size)
        except LimitExceededError:
            img.close()
            raise
    return img


def _decode(img: Any, channels: int, what: str) -> np.ndarray:
    try:
        with img:
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except Exception:
        raise InvalidInputError(f"{what}: not a decodable PNG/JPEG image") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_images(blobs: Sequence[bytes | memoryview], *, limits: Limits | None = None,
                  field: str = "encoded_images") -> list[np.ndarray]:
    """Decode PNG/JPEG bytes to (H, W, C) uint8; C=1 only when every image is grayscale.

    Opening reads only the headers; with `limits`, an image side or a batch whose headers claim
    more decoded pixels than allowed is refused (LimitExceededError) before any pixel is decoded."""
    imgs = [_open_image(io.BytesIO(bytes(b)), f"{field}[{i}]", limits) for i, b in enumerate(blobs)]
    channels = 1 if imgs and all(im.mode in _GRAY_MODES for im in imgs) else 3
    if limits is not None:
        claimed = sum(im.size[0] * im.size[1] for im in imgs) * channels
        try:
            limits.check_batch_bytes(field, claimed, "the images decode to ")
        except LimitExceededError:
            for im in imgs:
                im.close()
            raise
    return [_decode(im, channels, f"{field}[{i}]") for i, im in enumerate(imgs)]


# ---------------------------------------------------------------------------------------------
# handles and readers (worker side)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetHandle:
    """What a worker needs to read a dataset: picklable and small, whatever the dataset size."""

    name: str
    layout: str                      # "dense" | "packed" | "files"
    segment: str
    num_samples: int
    channels: int
    image_shape: tuple[int, int, int] | None   # (H, W, C) when every image has it
    table_offset: int = 0            # packed: where the int64 (offset, H, W) table starts


class DatasetReader:
    """A worker's view of one dataset; `gather` returns copies, so the mapping can close anytime."""

    def __init__(self, handle: DatasetHandle) -> None:
        self.handle = handle
        self._shm: SharedMemory | None = attach_segment(handle.segment)
        buf = self._shm.buf
        n = handle.num_samples
        if handle.layout == "dense":
            assert handle.image_shape is not None
            self._dense = np.ndarray((n, *handle.image_shape), np.uint8, buffer=buf)
        elif handle.layout == "packed":
            self._table = np.ndarray((n, 3), np.int64, buffer=buf, offset=handle.table_offset)
            self._pixels = np.ndarray((handle.table_offset,), np.uint8, buffer=buf)
        elif handle.layout == "files":
            self._offsets = np.ndarray((n + 1,), np.int64, buffer=buf)
        else:
            raise ValueError(f"unknown dataset layout {handle.layout!r}")

    @property
    def num_samples(self) -> int:
        return self.handle.num_samples

    def gather(self, sample_ids: Any, *, limits: Limits | None = None) -> np.ndarray | list[np.ndarray]:
        """Images for the ids: an (N, H, W, C) array when the dataset has one image shape,
        otherwise a list of (H, W, C) arrays. Unreadable files name the sample id, not the path.
        The ids are indices checked when the job was made (`augsvc.jobs`)."""
        ids = np.asarray(sample_ids, np.int64)
        layout = self.handle.layout
        if layout == "dense":
            dense: np.ndarray = self._dense[ids]
            return dense
        if layout == "packed":
            out = []
            for i in ids:
                off, h, w = (int(v) for v in self._table[i])
                size = h * w * self.handle.channels
                out.append(self._pixels[off:off + size].reshape(h, w, self.handle.channels).copy())
            return out
        return self._gather_files(ids, limits)

    def path(self, sample_id: int) -> str:
        """The file of one sample of an uncached folder dataset (for logs, never for clients)."""
        lo, hi = int(self._offsets[sample_id]), int(self._offsets[sample_id + 1])
        base = 8 * (self.handle.num_samples + 1)
        assert self._shm is not None
        return bytes(cast(memoryview, self._shm.buf)[base + lo:base + hi]).decode()

    def _gather_files(self, ids: np.ndarray, limits: Limits | None) -> np.ndarray | list[np.ndarray]:
        images = []
        for i in ids:
            what = f"sample {int(i)} of dataset {self.handle.name!r}"
            arr = _decode(_open_image(self.path(int(i)), what, limits), self.handle.channels, what)
            if self.handle.image_shape is not None and arr.shape != self.handle.image_shape:
                raise InvalidInputError(f"{what}: the image is now {arr.shape}, it was "
                                        f"{self.handle.image_shape} when the dataset was loaded")
            images.append(arr)
        if self.handle.image_shape is not None:
            return np.stack(images) if images else np.empty((0, *self.handle.image_shape), np.uint8)
        return images

    def close(self) -> None:
        """Drop this process's mapping (never unlinks: only the creator does)."""
        if self._shm is not None:
            self.__dict__.pop("_dense", None)
            self.__dict__.pop("_table", None)
            self.__dict__.pop("_pixels", None)
            self.__dict__.pop("_offsets", None)
            release_segment(self._shm, unlink=False)
            self._shm = None


def attach(handle: DatasetHandle) -> DatasetReader:
    """Open a dataset in this process from its handle."""
    return DatasetReader(handle)


# ---------------------------------------------------------------------------------------------
# the dataset (creator side)
# ---------------------------------------------------------------------------------------------

class Dataset:
    """A loaded dataset: metadata in this process, pixels (or file paths) in shared memory.

    The creator owns the segment: `close()` unlinks it (idempotent; also at exit). Build one
    with `load_dataset`.
    """

    def __init__(self, *, name: str, kind: str, source: str, labels: np.ndarray, class_names: list[str],
                 handle: DatasetHandle, shm: SharedMemory, nbytes: int) -> None:
        self.name = name
        self.kind = kind
        self.source = source
        self.labels = labels
        self.class_names = class_names
        self.nbytes = nbytes
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
    def cached(self) -> bool:
        """False for a folder too large for the cache budget: workers decode its files per request."""
        return self._handle.layout != "files"

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
                f"image_shape={self.image_shape}, cached={self.cached})")


def parse_dataset_arg(arg: str) -> tuple[str, str]:
    """Split ``--dataset NAME=SOURCE``."""
    name, sep, source = arg.partition("=")
    name, source = name.strip(), source.strip()
    if not sep or not name or not source:
        raise InvalidInputError(f"--dataset {arg!r}: expected NAME=SOURCE, e.g. digits=builtin:digits "
                                "or cats=/data/cats (an image folder) or x=/data/x.npz")
    if not _NAME_RE.fullmatch(name):
        raise InvalidInputError(f"--dataset {arg!r}: the name {name!r} must be 1-64 characters of "
                                "letters, digits, '_', '.', '-' and start with a letter or digit")
    return name, source


def load_dataset(name: str, source: str, *, builtin_side: int = 32,
                 cache_budget_bytes: int = _DEFAULT_CACHE_BUDGET) -> Dataset:
    """Load ``builtin:digits``, an ``.npz`` (``images``, ``labels``) or an image folder with one
    sub-folder per class (class index = sorted sub-folder names) into shared memory. A folder
    whose decoded size exceeds ``cache_budget_bytes`` is not cached: only its file paths are."""
    arg = f"--dataset {name}={source}"
    if not _NAME_RE.fullmatch(name):
        raise InvalidInputError(f"{arg}: the name must be 1-64 characters of letters, digits, '_', '.', '-'")
    if source.startswith("builtin:"):
        which = source.removeprefix("builtin:")
        if which != "digits":
            raise InvalidInputError(f"{arg}: unknown built-in {which!r}; available: "
                                    + ", ".join(f"builtin:{b}" for b in BUILTINS))
        if not 1 <= builtin_side <= 4096:
            raise InvalidInputError(f"builtin_side: {builtin_side} is outside [1, 4096]")
        images, labels = _digits(builtin_side)
        return _from_array(name, "builtin", source, images, labels, [str(i) for i in range(10)])
    path = Path(source)
    if not path.exists():
        raise InvalidInputError(f"{arg}: {source!r} does not exist; expected an image folder, an .npz "
                                "file or builtin:digits")
    if path.is_dir():
        return _from_folder(name, path, arg, cache_budget_bytes)
    if path.suffix.lower() == ".npz":
        images, labels, class_names = _read_npz(path, arg)
        return _from_array(name, "npz", source, images, labels, class_names)
    raise InvalidInputError(f"{arg}: unknown source kind; expected an image folder, an .npz file or "
                            "builtin:digits")


def _digits(side: int) -> tuple[np.ndarray, np.ndarray]:
    import cv2
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = np.round(bunch.images * 255.0 / 16.0).astype(np.uint8)
    images = np.stack([cv2.resize(im, (side, side), interpolation=cv2.INTER_LINEAR) for im in small])
    return images[..., None], bunch.target.astype(np.int64)


def _read_npz(path: Path, arg: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"images", "labels"} - set(npz.files)
            if missing:
                raise InvalidInputError(
                    f"{arg}: the .npz lacks {sorted(missing)}; it holds {sorted(npz.files)}")
            images, labels = npz["images"], npz["labels"]
            names = [str(s) for s in npz["class_names"]] if "class_names" in npz.files else None
    except InvalidInputError:
        raise
    except Exception as exc:
        raise InvalidInputError(f"{arg}: cannot read the .npz: {exc}") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[3:] not in ((), (1,), (3,)):
        raise InvalidInputError(f"{arg}: images must be uint8 (N, H, W) or (N, H, W, C) with C in {{1, 3}}, "
                                f"got {images.dtype} {images.shape}")
    if images.ndim == 3:
        images = images[..., None]
    if len(images) == 0 or min(images.shape[1:3]) == 0:
        raise InvalidInputError(f"{arg}: images is empty ({images.shape})")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise InvalidInputError(f"{arg}: labels must be {len(images)} non-negative integers, got "
                                f"{labels.dtype} {labels.shape}")
    n_classes = int(labels.max()) + 1
    if names is None:
        names = [str(i) for i in range(n_classes)]
    elif len(names) < n_classes:
        raise InvalidInputError(
            f"{arg}: class_names has {len(names)} names but labels go up to {n_classes - 1}")
    return images, labels.astype(np.int64), names


def _from_array(name: str, kind: str, source: str, images: np.ndarray, labels: np.ndarray,
                class_names: list[str]) -> Dataset:
    shm = create_segment(images.nbytes, "ds", reserve=True)
    np.ndarray(images.shape, np.uint8, buffer=shm.buf)[...] = images
    h, w, c = images.shape[1:]
    handle = DatasetHandle(name, "dense", shm.name, len(images), c, (h, w, c))
    return Dataset(name=name, kind=kind, source=source, labels=labels, class_names=class_names,
                   handle=handle, shm=shm, nbytes=images.nbytes)


def _from_folder(name: str, root: Path, arg: str, budget: int) -> Dataset:
    from PIL import Image

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for index, cls in enumerate(classes):
        found = sorted(p for p in (root / cls).rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."))
        files += found
        labels += [index] * len(found)
    if not files:
        raise InvalidInputError(f"{arg}: no PNG/JPEG images in class sub-folders of {str(root)!r}")
    sizes, gray = [], True
    for p in files:  # headers only: Pillow decodes lazily
        try:
            with Image.open(p, formats=_FORMATS) as im:
                sizes.append((im.size[1], im.size[0]))
                gray = gray and im.mode in _GRAY_MODES
        except Exception:
            raise InvalidInputError(f"{arg}: {str(p)!r} is not a readable PNG/JPEG image") from None
    channels = 1 if gray else 3
    nbytes = sum(h * w for h, w in sizes) * channels
    shape = (sizes[0][0], sizes[0][1], channels) if len(set(sizes)) == 1 else None
    n = len(files)
    if nbytes > budget:
        blobs = [str(p.resolve()).encode() for p in files]
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        shm = create_segment(offsets.nbytes + int(offsets[-1]), "ds", reserve=True)
        np.ndarray(offsets.shape, np.int64, buffer=shm.buf)[...] = offsets
        cast(memoryview, shm.buf)[offsets.nbytes:offsets.nbytes + int(offsets[-1])] = b"".join(blobs)
        handle = DatasetHandle(name, "files", shm.name, n, channels, shape)
    else:
        table_offset = (nbytes + 7) // 8 * 8
        shm = create_segment(table_offset + (0 if shape else n * 24), "ds", reserve=True)
        try:
            handle = _fill_pixels(name, shm, files, sizes, channels, shape, table_offset, arg)
        except BaseException:
            release_segment(shm, unlink=True)
            raise
    return Dataset(name=name, kind="folder", source=str(root), labels=np.asarray(labels, np.int64),
                   class_names=classes, handle=handle, shm=shm, nbytes=nbytes)


def _fill_pixels(name: str, shm: SharedMemory, files: list[Path], sizes: list[tuple[int, int]], channels: int,
                 shape: tuple[int, int, int] | None, table_offset: int, arg: str) -> DatasetHandle:
    n = len(files)
    pixels = np.ndarray((table_offset,), np.uint8, buffer=shm.buf)
    table = None if shape else np.ndarray((n, 3), np.int64, buffer=shm.buf, offset=table_offset)
    offset = 0
    for i, (p, (h, w)) in enumerate(zip(files, sizes, strict=True)):
        what = f"{arg}: {str(p)!r}"
        arr = _decode(_open_image(str(p), what, None), channels, what)
        if arr.shape[:2] != (h, w):
            raise InvalidInputError(f"{what}: decoded as {arr.shape[:2]}, its header says {(h, w)}")
        pixels[offset:offset + arr.size] = arr.reshape(-1)
        if table is not None:
            table[i] = (offset, h, w)
        offset += arr.size
    del pixels, table
    if shape:
        return DatasetHandle(name, "dense", shm.name, n, channels, shape)
    return DatasetHandle(name, "packed", shm.name, n, channels, None, table_offset)
