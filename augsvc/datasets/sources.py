"""Where a dataset's samples come from, before any layout is chosen.

- ``builtin:digits`` and ``.npz`` files are pixels already: `ArraySource`.
- An image folder (one sub-folder per class, class index = sorted sub-folder names, files sorted
  by path within a class) and a manifest (``.csv`` rows ``path,label`` or ``.jsonl`` objects
  ``{"path": ..., "label": ...}``; relative paths resolve against the manifest's folder; labels are
  integers, or class names numbered in sorted order) are files: `FileTable`.

A `FileTable` keeps its N paths as one UTF-8 blob and an offset array, and its labels as one
array: no Python object per file, so a folder of millions costs a few arrays. Class names travel
as protobuf strings, so a name that is not valid UTF-8 (a folder named in Latin-1, say) is
published with its odd bytes written as ``\xe9`` (`_utf8_names`).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError

__all__ = ["IMAGE_SUFFIXES", "ArraySource", "FileTable", "digits", "list_folder", "read_manifest", "read_npz"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class ArraySource:
    """Decoded pixels: uint8 (N, H, W, C) images with their labels and class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]


@dataclass(frozen=True)
class FileTable:
    """N image files: their paths (UTF-8, back to back in `paths`, file i at
    ``paths[offsets[i]:offsets[i + 1]]``), labels and class names."""

    paths: np.ndarray     # uint8
    offsets: np.ndarray   # int64 (N + 1)
    labels: np.ndarray    # int64 (N)
    class_names: list[str]

    @classmethod
    def of(cls, paths: list[str], labels: np.ndarray, class_names: list[str]) -> FileTable:
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), np.uint8)
        return cls(blob, offsets, np.asarray(labels, np.int64), class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return path_at(self.paths, self.offsets, i)

    def select(self, keep: np.ndarray) -> FileTable:
        """The files where `keep` (a bool mask) is true, in order."""
        lengths = np.diff(self.offsets)[keep]
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = self.offsets[:-1][keep]
        gather = (np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])) if len(lengths) else \
            np.zeros(0, np.int64)
        return FileTable(self.paths[gather], offsets, self.labels[keep], self.class_names)


def path_at(paths: np.ndarray, offsets: np.ndarray, i: int) -> str:
    """File i of a path table (`FileTable`, or its copy in shared memory)."""
    return bytes(paths[int(offsets[i]):int(offsets[i + 1])]).decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------------
# pixels already
# ---------------------------------------------------------------------------------------------

def digits(side: int) -> ArraySource:
    """scikit-learn's 1,797 digits, 0..16 scaled to 0..255, resized to side x side (C=1)."""
    import cv2
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = np.round(bunch.images * 255.0 / 16.0).astype(np.uint8)
    images = np.stack([cv2.resize(im, (side, side), interpolation=cv2.INTER_LINEAR) for im in small])
    return ArraySource(images[..., None], bunch.target.astype(np.int64), [str(i) for i in range(10)])


def read_npz(path: Path, arg: str) -> ArraySource:
    """An .npz with ``images`` (uint8 (N, H, W) or (N, H, W, C), C in {1, 3}), ``labels`` and
    optionally ``class_names``."""
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
    return ArraySource(images, labels.astype(np.int64), _utf8_names(names, arg))


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

def _image_files(folder: str) -> Iterator[str]:
    """Image files below `folder` (by suffix; hidden files left out), in no particular order."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                yield from _image_files(entry.path)
            elif not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_SUFFIXES) \
                    and entry.is_file():
                yield entry.path


def list_folder(root: Path, arg: str) -> FileTable:
    """An image folder with one sub-folder per class, listed once (os.scandir)."""
    with os.scandir(root) as entries:
        classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    paths: list[str] = []
    counts = []
    for cls in classes:
        # sorted as Path sorts, part by part: with the separator as the lowest character
        found = sorted(_image_files(os.path.join(root, cls)), key=lambda p: p.replace(os.sep, "\0"))
        paths += found
        counts.append(len(found))
    if not paths:
        raise InvalidInputError(f"{arg}: no PNG/JPEG images in class sub-folders of {str(root)!r}")
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
    return FileTable.of(paths, labels, _utf8_names(classes, arg))


def read_manifest(path: Path, arg: str) -> FileTable:
    """A manifest of ``path,label`` rows (.csv, an optional ``path,label`` header row) or
    ``{"path": ..., "label": ...}`` lines (.jsonl)."""
    rows = list(_csv_rows(path, arg) if path.suffix.lower() == ".csv" else _jsonl_rows(path, arg))
    if not rows:
        raise InvalidInputError(f"{arg}: the manifest lists no files")
    base = path.parent
    paths = [str(base / p) for p, _ in rows]
    raw = [label for _, label in rows]
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit()) for v in raw):
        labels = np.array([int(v) for v in raw], np.int64)
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    else:
        class_names = sorted({str(v) for v in raw})
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index[str(v)] for v in raw], np.int64)
    return FileTable.of(paths, labels, _utf8_names(class_names, arg))


def _utf8_names(names: list[str], arg: str) -> list[str]:
    """`names` as valid UTF-8 text: bytes a file system name carried that are not UTF-8
    (surrogate-escaped by os.scandir) written as ``\xe9``; InvalidInputError when two names become one."""
    out = []
    for name in names:
        try:
            out.append(name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
        except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (a JSON "\ud800")
            out.append(name.encode("utf-8", "backslashreplace").decode("utf-8"))
    if len(set(out)) < len(out):
        twice = sorted({n for n in out if out.count(n) > 1})
        raise InvalidInputError(f"{arg}: class names {twice!r} are each two classes once their bytes that are "
                                "not UTF-8 are written as \\x..; rename one of each")
    return out


def _csv_rows(path: Path, arg: str) -> Iterator[tuple[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.reader(f), start=1):
                if not row or (line == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
                    continue
                if len(row) != 2 or not row[0].strip() or not row[1].strip():
                    raise InvalidInputError(f"{arg}: line {line}: expected path,label, got {row!r}"[:300])
                yield row[0].strip(), row[1].strip()
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInputError(f"{arg}: cannot read the manifest: {exc}") from None


def _jsonl_rows(path: Path, arg: str) -> Iterator[tuple[str, int | str]]:
    try:
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except ValueError:
                    raise InvalidInputError(f"{arg}: line {line}: not a JSON object") from None
                label = row.get("label") if isinstance(row, dict) else None
                if not isinstance(row, dict) or not isinstance(row.get("path"), str) \
                        or isinstance(label, bool) or not isinstance(label, (int, str)) \
                        or (isinstance(label, int) and label < 0):
                    raise InvalidInputError(f"{arg}: line {line}: expected {{\"path\": str, \"label\": "
                                            "int >= 0 or str}")
                yield row["path"], label
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{arg}: cannot read the manifest: {exc}") from None
