"""A dataset's shared-memory segment, in one of three layouts, and a worker's reader of it.

- ``decoded`` — the pixels: one (N, H, W, C) array when every image has one shape, else the
  pixels back to back with an offset table. Memory: the decoded pixels (H x W x C bytes each).
- ``encoded`` — the files' bytes back to back with an offset table; workers decode the samples
  they are asked for. Memory: the files' size (JPEG: about 5-10x less than decoded).
- ``files``   — only the table below; workers read and decode the files. Memory: the paths.

Datasets made from files also keep, in every layout, a table of their paths (for logs, never for
clients), of each file's size and modification time (the files layout refuses a sample whose file
changed since the start: its pixels would no longer be the ones the seed promised), and of what
each header said (format, size, DCT scale), so that every layout decodes
a sample the same way (`augsvc.datasets.decode.decode`) — the decoded layout does it once, in the
loading process. A sample that failed to decode there is marked bad, and a request for it fails
as it would in the other layouts.

A segment is a set of named arrays (`Field`) at 64-byte-aligned offsets; the `DatasetHandle`
that describes it is small and picklable, whatever the dataset size. Only the creator of a
segment unlinks it; readers never register their attachments with the resource tracker
(`augsvc.shm.attach_segment`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BadSampleError
from ..shm import attach_segment, create_segment, release_segment
from .decode import DecodeFailed, Header, decode, decode_region
from .scan import read_file_stat
from .sources import path_at

if TYPE_CHECKING:  # the engine's type, not its import: a dataset reader needs no engine
    from ..engine import ReadImage

__all__ = ["LAYOUTS", "DatasetHandle", "DatasetReader", "Field", "attach", "build_segment"]

log = logging.getLogger("augsvc.datasets")

#: The layouts, in the order the cache budget tries them.
LAYOUTS = ("decoded", "encoded", "files")
_ALIGN = 64
#: The largest decode buffer a reader keeps between batches (`DatasetReader._scratch`).
_SCRATCH_KEEP = 256 << 20


@dataclass(frozen=True)
class Field:
    """One array of a dataset segment."""

    name: str
    offset: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class DatasetHandle:
    """What a worker needs to read a dataset: picklable and small, whatever the dataset size."""

    name: str
    layout: str                                # "decoded" | "encoded" | "files"
    segment: str
    num_samples: int
    channels: int
    image_shape: tuple[int, int, int] | None   # (H, W, C) when every image has it
    fields: tuple[Field, ...]


def build_segment(arrays: Sequence[tuple[str, np.dtype[Any] | type, tuple[int, ...]]],
                  fill: Callable[[dict[str, np.ndarray]], None]) -> tuple[SharedMemory, tuple[Field, ...]]:
    """A new dataset segment holding `arrays` (name, dtype, shape), filled by `fill` with views of
    them; unlinked again if filling fails."""
    fields, offset = [], 0
    for name, dtype, shape in arrays:
        fields.append(Field(name, offset, np.dtype(dtype).str, tuple(int(s) for s in shape)))
        offset += -(-int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN
    shm = create_segment(offset, "ds", reserve=True)
    try:
        views = _views(shm, fields)
        fill(views)
        del views
    except BaseException:
        release_segment(shm, unlink=True)
        raise
    return shm, tuple(fields)


def _views(shm: SharedMemory, fields: Sequence[Field]) -> dict[str, np.ndarray]:
    return {f.name: np.ndarray(f.shape, np.dtype(f.dtype), buffer=shm.buf, offset=f.offset) for f in fields}


class DatasetReader:
    """A worker's view of one dataset; `gather` returns new arrays (unless asked for views), so the
    mapping can close anytime."""

    def __init__(self, handle: DatasetHandle) -> None:
        if handle.layout not in LAYOUTS:
            raise ValueError(f"unknown dataset layout {handle.layout!r}")
        self.handle = handle
        self._shm: SharedMemory | None = attach_segment(handle.segment)
        self._a = _views(self._shm, handle.fields)
        self._buffer: np.ndarray | None = None
        self.region_decodes = 0
        # per sample: decoded whole, without error, once in this process (see `_decode`)
        self._whole_once = np.zeros(handle.num_samples if handle.layout in ("encoded", "files") else 0, bool)

    @property
    def num_samples(self) -> int:
        return self.handle.num_samples

    def path(self, sample_id: int) -> str:
        """The file of one sample of a dataset made from files (for logs, never for clients)."""
        return path_at(self._a["paths"], self._a["path_offsets"], sample_id)

    def nbytes(self, sample_ids: Any) -> int:
        """The bytes the samples' decoded pixels take (known from the dataset's table: no decode)."""
        ids = np.asarray(sample_ids, np.int64)
        shape = self.handle.image_shape
        if shape is not None:
            return len(ids) * shape[0] * shape[1] * shape[2]
        hw = self._a["decoded_hw"][ids].astype(np.int64)
        return int((hw[:, 0] * hw[:, 1]).sum()) * self.handle.channels

    def largest_side(self, sample_ids: Any) -> int:
        """The longest side among the samples' decoded images (from the dataset's table: no decode)."""
        ids = np.asarray(sample_ids, np.int64)
        if ids.size == 0:
            return 0
        shape = self.handle.image_shape
        return max(shape[0], shape[1]) if shape is not None else int(self._a["decoded_hw"][ids].max())

    def gather(self, sample_ids: Any, *, copy: bool = True) -> np.ndarray | list[np.ndarray]:
        """Images for the ids: an (N, H, W, C) array when the dataset has one image shape,
        otherwise a list of (H, W, C) arrays. A sample that does not decode raises BadSampleError,
        which names the sample id, not the path. The ids are indices checked when the job was
        made (`augsvc.jobs`).

        copy=False (a worker's case): read-only images valid only until the next `gather` or
        `close()`. The decoded layout's mixed-size images are views of the shared pixels (no
        copy); the other layouts decode into one buffer this reader keeps (`_scratch`), RGB
        images as views of RGBX pixels, which the fused engine warps as they are (`decode`)."""
        if not copy:
            images, read = self.gather_deferred(sample_ids)
            if read is not None:
                for k in range(len(images)):
                    read(k, None)
            return images
        ids = self._checked(sample_ids)
        held = self._decoded(ids, copy=True)
        if held is not None:
            return held
        shape = self.handle.image_shape
        if shape is not None:
            out = np.empty((len(ids), *shape), np.uint8)
            for k, i in enumerate(ids):
                self._decode(int(i), out[k])
            return out
        return [self._decode(int(i), None) for i in ids]

    def gather_deferred(self, sample_ids: Any) -> tuple[np.ndarray | list[np.ndarray], ReadImage | None]:
        """`gather(copy=False)` with the decoding left to the caller: (images, read), where the
        images have their final shapes and read(k, box) fills image k (at most once, before
        anything reads its pixels; BadSampleError as in `gather`) — a JPEG only in the rectangle
        `box` = (x0, y0, x1, y1) where `decode_region` can, the rest of the image then holding
        anything; all of it when box is None. `region_decodes` counts the images decoded so. A
        worker hands `read` to `augment_batch`, which passes each image's box and decodes it just
        before it warps it, while its pixels are in the cache (`python -m benchmarks.jpeg`: a
        worker's job is cheaper than its decode and augment measured apart). read is None when
        nothing is left to decode (decoded layout)."""
        ids = self._checked(sample_ids)
        held = self._decoded(ids, copy=False)
        if held is not None:
            return held, None
        a, shape = self._a, self.handle.image_shape
        if shape is not None:
            count = len(ids) * shape[0] * shape[1] * shape[2]
            targets: Any = self._scratch(count).reshape(len(ids), *shape)
            batch = targets.view()
            batch.flags.writeable = False
            images: np.ndarray | list[np.ndarray] = batch
        else:
            c = self.handle.channels
            depth = 4 if c == 3 else c  # RGB decodes to RGBX (`decode`)
            hw = a["decoded_hw"][ids].astype(np.int64)
            ends = np.cumsum(hw[:, 0] * hw[:, 1] * depth)
            flat = self._scratch(int(ends[-1]) if len(ids) else 0)
            targets = [flat[int(ends[k - 1]) if k else 0:int(ends[k])].reshape(int(h), int(w), depth)
                       for k, (h, w) in enumerate(hw)]
            images = []
            for target in targets:
                image = target[:, :, :3] if depth == 4 else target.view()
                image.flags.writeable = False
                images.append(image)

        def read(k: int, box: tuple[int, int, int, int] | None) -> None:
            self._decode(int(ids[k]), targets[k], box)

        return images, read

    def _decoded(self, ids: np.ndarray, copy: bool) -> np.ndarray | list[np.ndarray] | None:
        """The images of the ids where the dataset holds them decoded (one array, or the decoded
        layout's views, copied if `copy`); None where they are still to be decoded."""
        pixels = self._a.get("pixels")
        if pixels is not None and pixels.ndim == 4:
            dense: np.ndarray = pixels[ids]  # indexing with an array copies
            return dense
        if self.handle.layout == "decoded":
            return [self._view(int(i), copy) for i in ids]
        return None

    def _checked(self, sample_ids: Any) -> np.ndarray:
        """The ids as int64, refusing any that loading found bad."""
        ids = np.asarray(sample_ids, np.int64)
        a = self._a
        if "bad" in a and ids.size and a["bad"][ids].any():
            i = int(ids[np.flatnonzero(a["bad"][ids])[0]])
            raise self._bad(i, "corrupt or truncated image data (found when the dataset was loaded)")
        return ids

    def _scratch(self, nbytes: int) -> np.ndarray:
        """`nbytes` of this reader's decode buffer, reused by every gather(copy=False): decoding
        into memory already mapped saves each image's allocation, its page faults and its unmap
        (measured: a quarter of a worker's time on a folder of photos went to the kernel). A
        buffer of up to `_SCRATCH_KEEP` bytes is kept; a larger batch gets its own."""
        if self._buffer is not None and self._buffer.size >= nbytes:
            return self._buffer[:nbytes]
        buffer = np.empty(nbytes, np.uint8)
        if nbytes <= _SCRATCH_KEEP:
            self._buffer = buffer
        return buffer

    def _view(self, i: int, copy: bool) -> np.ndarray:
        """One image of the decoded layout's mixed sizes: a copy, or a read-only view."""
        a, c = self._a, self.handle.channels
        h, w = int(a["decoded_hw"][i, 0]), int(a["decoded_hw"][i, 1])
        start = int(a["pixel_offsets"][i])
        view: np.ndarray = a["pixels"][start:start + h * w * c].reshape(h, w, c)
        if copy:
            return view.copy()
        view.flags.writeable = False  # the engine never writes into its input
        return view

    def _decode(self, i: int, out: np.ndarray | None, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Sample i of the encoded or files layout, decoded (into `out`, as `decode` takes it;
        only the rectangle `box` of it where `decode_region` can).

        A region leaves the rows below it undecoded, so damage there would go unseen — a sample
        would fail for some crops and not others. Hence a sample's first decode in this process
        is whole and strict (what the decoded layout does at load): a damaged file fails then, and
        every time after, since it never gets past this first decode; only a file that decoded
        whole without error is decoded by regions later."""
        a, c = self._a, self.handle.channels
        header = Header(int(a["formats"][i]), int(a["header_hw"][i, 0]), int(a["header_hw"][i, 1]), False)
        try:
            if self.handle.layout == "encoded":
                data: bytes | memoryview = a["data"][int(a["data_offsets"][i]):int(a["data_offsets"][i + 1])].data
            else:
                data, st = read_file_stat(self.path(i))
                was = int(a["file_bytes"][i]), int(a["mtime_ns"][i])
                if (len(data), st.st_mtime_ns) != was:
                    now = f"{len(data)} bytes, it was {was[0]}" if len(data) != was[0] else "modified since"
                    raise DecodeFailed(f"the file changed since the dataset was loaded ({now}); the server reads it "
                                       "again when it restarts")
            scale = int(a["scales"][i])
            if box is not None and out is not None and self._whole_once[i] and decode_region(
                    data, header, scale, out, box):
                self.region_decodes += 1
                return out[:, :, :3] if out.shape[2] == 4 else out
            pixels = decode(data, header, c, scale, out)
            self._whole_once[i] = True
            return pixels
        except DecodeFailed as exc:
            raise self._bad(i, str(exc)) from None
        except OSError as exc:
            raise self._bad(i, f"the file cannot be read ({exc.strerror or type(exc).__name__})") from None

    def _bad(self, i: int, why: str) -> BadSampleError:
        log.warning("dataset %r: sample %d (%s): %s", self.handle.name, i, self.path(i), why)
        return BadSampleError(f"sample {i} of dataset {self.handle.name!r}: {why}")

    def close(self) -> None:
        """Drop this process's mapping (never unlinks: only the creator does)."""
        if self._shm is not None:
            self._a, self._buffer = {}, None
            release_segment(self._shm, unlink=False)
            self._shm = None


def attach(handle: DatasetHandle) -> DatasetReader:
    """Open a dataset in this process from its handle."""
    return DatasetReader(handle)

