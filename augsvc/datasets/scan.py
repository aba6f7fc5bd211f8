"""Every file's header read once at start, in parallel, and the bad-file policy.

`scan` reads the first bytes of each file of a `FileTable` (all of it when the JPEG header runs
longer, or with ``verify``, which also decodes every file at the dataset's decode scale) on a
thread pool, and keeps what the headers say in arrays (`Catalog`). Files whose header cannot be
read — empty, not an image, another format, unreadable — are reported with their reason;
`too_large` adds the files whose decoded side is over the server's --max-image-side (no request
could read them); `apply_policy` then refuses the dataset with the list of offenders (``fail``) or
leaves them out with a logged count (``skip``: sample ids then number the good files).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError
from .decode import JPEG, DecodeFailed, DecodeSize, Header, dct_scale, decode, probe
from .sources import FileTable

__all__ = ["BAD_FILE_POLICIES", "Catalog", "apply_policy", "read_file", "read_file_stat", "scan", "too_large"]

log = logging.getLogger("augsvc.datasets")

BAD_FILE_POLICIES = ("fail", "skip")
_HEAD_BYTES = 16 << 10   # a JPEG header with a large EXIF thumbnail or ICC profile may need more
_CHUNK = 256             # files per thread-pool task
_LISTED = 20             # offenders named in an error or a log line


@dataclass(frozen=True)
class Catalog:
    """A `FileTable` and what each file's header says, as arrays: format (`decode.JPEG`/`PNG`),
    size, grayscale, the DCT scale it decodes at, and its size on disk and modification time
    (which the files layout checks on every read)."""

    table: FileTable
    formats: np.ndarray    # uint8
    heights: np.ndarray    # int32, the header's
    widths: np.ndarray     # int32
    gray: np.ndarray       # bool
    scales: np.ndarray     # uint8: 1, 2, 4 or 8
    file_bytes: np.ndarray  # int64
    mtime_ns: np.ndarray    # int64

    def __len__(self) -> int:
        return len(self.table)

    @property
    def channels(self) -> int:
        """1 when every image is grayscale, else 3 (RGB)."""
        return 1 if bool(self.gray.all()) else 3

    def header(self, i: int) -> Header:
        return Header(int(self.formats[i]), int(self.heights[i]), int(self.widths[i]), bool(self.gray[i]))

    def decoded_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(heights, widths) as decoded: libjpeg-turbo rounds a scaled side up."""
        return -(-self.heights // self.scales), -(-self.widths // self.scales)

    def select(self, keep: np.ndarray) -> Catalog:
        return Catalog(self.table.select(keep), self.formats[keep], self.heights[keep], self.widths[keep],
                       self.gray[keep], self.scales[keep], self.file_bytes[keep], self.mtime_ns[keep])


def read_file(path: str, limit: int | None = None) -> bytes:
    """The file's bytes (its first `limit` bytes)."""
    with open(path, "rb") as f:
        return f.read() if limit is None else f.read(limit)


def read_file_stat(path: str, limit: int | None = None) -> tuple[bytes, os.stat_result]:
    """The file's bytes (its first `limit` bytes) and its stat, from one open."""
    with open(path, "rb") as f:
        return (f.read() if limit is None else f.read(limit)), os.fstat(f.fileno())


def _probe_file(path: str, verify: bool, size: DecodeSize | None) -> tuple[Header, int, os.stat_result]:
    """(header, DCT scale, stat) of one file; DecodeFailed or OSError when unreadable."""
    data, st = read_file_stat(path, None if verify else _HEAD_BYTES)  # one open: no second path lookup
    try:
        header = probe(data)
    except DecodeFailed:
        if verify or len(data) < _HEAD_BYTES:
            raise
        data = read_file(path)
        header = probe(data)
    scale = dct_scale(header.height, header.width, size) if header.format == JPEG and header.dct else 1
    if verify:
        decode(data, header, 1 if header.gray else 3, scale)
    return header, scale, st


def scan(table: FileTable, *, size: DecodeSize | None, verify: bool = False) -> tuple[Catalog, list[tuple[int, str]]]:
    """Read every file's header (and with `verify`, decode it); returns the catalog and the
    files that failed, as (index, reason)."""
    n = len(table)
    cat = Catalog(table, np.zeros(n, np.uint8), np.zeros(n, np.int32), np.zeros(n, np.int32),
                  np.zeros(n, bool), np.ones(n, np.uint8), np.zeros(n, np.int64), np.zeros(n, np.int64))
    bad: list[tuple[int, str]] = []

    def run(start: int) -> None:
        for i in range(start, min(start + _CHUNK, n)):
            try:
                header, scale, st = _probe_file(table.path(i), verify, size)
            except DecodeFailed as exc:
                bad.append((i, str(exc)))
                continue
            except OSError as exc:
                bad.append((i, f"cannot be read ({exc.strerror or type(exc).__name__})"))
                continue
            cat.formats[i], cat.heights[i], cat.widths[i] = header.format, header.height, header.width
            cat.gray[i], cat.scales[i] = header.gray, scale
            cat.file_bytes[i], cat.mtime_ns[i] = st.st_size, st.st_mtime_ns

    with ThreadPoolExecutor(min(16, 4 * (os.cpu_count() or 1)), thread_name_prefix="augsvc-scan") as ex:
        list(ex.map(run, range(0, n, _CHUNK)))
    return cat, sorted(bad)


def too_large(cat: Catalog, max_side: int, name: str) -> list[tuple[int, str]]:
    """The files whose decoded side is over `max_side`, as (index, reason): every request for
    them would be refused, so they are bad files. (A file whose header failed has size 0 here.)"""
    heights, widths = cat.decoded_sizes()
    sides = np.maximum(heights, widths)
    hint = f" or decode JPEGs smaller (--decode-size {name}=shorter:N)" if bool((cat.formats == JPEG).any()) else ""
    return [(int(i), f"its decoded side {int(sides[i])} is over --max-image-side {max_side} (raise it{hint})")
            for i in np.flatnonzero(sides > max_side)]


def apply_policy(cat: Catalog, bad: list[tuple[int, str]], policy: str, arg: str) -> Catalog:
    """The catalog without its bad files (``skip``), or InvalidInputError listing them (``fail``)."""
    if policy not in BAD_FILE_POLICIES:
        raise InvalidInputError(f"on_bad_file: {policy!r} is not allowed; expected one of "
                                f"{', '.join(BAD_FILE_POLICIES)}")
    if not bad:
        return cat
    listed = "; ".join(f"{cat.table.path(i)}: {why}" for i, why in bad[:_LISTED])
    more = f"; and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
    if policy == "fail":
        raise InvalidInputError(f"{arg}: {len(bad)} of {len(cat)} files are not readable PNG/JPEG images or are "
                                f"too large to serve (--on-bad-file=skip leaves them out): {listed}{more}")
    log.warning("%s: left out %d of %d files that are not readable PNG/JPEG images or are too large to serve "
                "(--on-bad-file=skip): %s%s",
                arg, len(bad), len(cat), listed, more)
    keep = np.ones(len(cat), bool)
    keep[[i for i, _ in bad]] = False
    if not keep.any():
        raise InvalidInputError(f"{arg}: none of its {len(cat)} files is a readable PNG/JPEG image small enough "
                                "to serve")
    return cat.select(keep)
