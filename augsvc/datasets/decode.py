"""Encoded images to pixels: one function for every layout, every worker and every server.

JPEG goes through libjpeg-turbo via simplejpeg (`JPEG_DECODER`, pinned exactly in the package, so
every server decodes the same bytes); PNG goes through Pillow, whose decoding is lossless. A
file's header is read once (`probe`) and says how it decodes: its format, size and whether it is
grayscale. Conversions, whatever the file holds:

- grayscale (JPEG Gray; PNG 1/L/LA, 16-bit gray) -> L, or its value on every channel when the
  dataset (or request batch) is RGB; C=1 only when every image of it is grayscale;
- colour (YCbCr/RGB JPEG, RGB/RGBA/palette PNG) -> RGB; CMYK and YCCK JPEG -> RGB by
  libjpeg-turbo's conversion;
- alpha (LA, RGBA, a palette's transparency) is dropped, not composited;
- 16-bit samples keep their high byte (v >> 8);
- EXIF orientation is not applied: pixels are used as stored.

A declared decode size (`DecodeSize`) makes a JPEG decode at the smallest DCT scale (1/2, 1/4,
1/8) whose result still reaches it (`dct_scale`): a function of the file's size and the
dataset's setting only, so every layout decodes, and caches, the same pixels. PNG has no such
scale and decodes whole, and neither has a lossless JPEG (no DCT: `Header.dct` is False), which
decodes at full size whatever the setting.

A worker told which part of an image its augmentation reads (a random crop's rectangle, by
`augment_batch(read=)`: `augsvc.engine.source_boxes`) decodes only that part when it can (`decode_region`):
libjpeg-turbo's partial decompression, through the optional compiled module
`augsvc.datasets._jpegregion` (built against the system's libjpeg-turbo). The rectangle's pixels
are the bytes a full decode gives — tested on every kind of file and crop — so whether a server
has the module changes its speed, never its pixels.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import numpy as np
import simplejpeg

from ..errors import InvalidInputError, LimitExceededError
from ..validation import Limits

_jpegregion: Any
try:
    from . import _jpegregion
except ImportError:  # not built here (no compiler or libjpeg headers): images decode whole
    _jpegregion = None

__all__ = ["DCT_SCALES", "JPEG_DECODER", "REGION_DECODER", "DecodeFailed", "DecodeSize", "Header", "TooManyPixels",
           "dct_coded", "dct_scale", "decode", "decode_images", "decode_region", "probe", "through_end_marker"]

log = logging.getLogger(__name__)

#: What decodes JPEG on this server (its exact version is pinned; reported by GetServerInfo).
JPEG_DECODER = f"simplejpeg {version('simplejpeg')}"
#: What decodes a JPEG's region (`decode_region`), or None where the module is not built.
REGION_DECODER: str | None = None if _jpegregion is None else _jpegregion.library_version()
#: The DCT scales libjpeg-turbo decodes fast, largest reduction first.
DCT_SCALES = (8, 4, 2)
JPEG, PNG = 1, 2
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"})


class DecodeFailed(Exception):
    """An encoded image that cannot be read or decoded; the message says why, never where from."""


class TooManyPixels(DecodeFailed):
    """A header that claims more pixels than Pillow's decompression-bomb limit (a PNG's, checked by
    Pillow; a JPEG's, against the same number: libjpeg-turbo would decode a file whose header was
    edited to claim 40000x40000 into a buffer of that size, gigabytes, before finding its data short)."""


@dataclass(frozen=True)
class DecodeSize:
    """The size a dataset is used at: its images' shorter (or longer) side should reach `side`."""

    side: int
    edge: str = "shorter"    # "shorter" | "max"

    def __post_init__(self) -> None:
        if self.edge not in ("shorter", "max"):
            raise InvalidInputError(f"decode size: {self.edge!r} is not allowed; expected shorter or max")
        if not 1 <= self.side <= 65535:
            raise InvalidInputError(f"decode size: {self.side} is outside [1, 65535]")

    @classmethod
    def parse(cls, text: str) -> DecodeSize:
        """``shorter:256`` or ``max:512``."""
        edge, sep, side = text.partition(":")
        if not sep or not side.strip().isdigit():
            raise InvalidInputError(f"decode size: {text!r} is not EDGE:SIDE, e.g. shorter:256 or max:512")
        return cls(int(side), edge.strip())

    def __str__(self) -> str:
        return f"{self.edge}:{self.side}"

    def reaches(self, height: int, width: int) -> bool:
        edge = min(height, width) if self.edge == "shorter" else max(height, width)
        return edge >= self.side


def scaled(height: int, width: int, scale: int) -> tuple[int, int]:
    """The size libjpeg-turbo decodes an image of `height` x `width` to at 1/`scale`."""
    return math.ceil(height / scale), math.ceil(width / scale)


def dct_scale(height: int, width: int, size: DecodeSize | None) -> int:
    """The DCT scale (8, 4, 2 or 1 for 1/8 .. full) a JPEG of this size decodes at: the smallest
    result that still reaches `size` (1 without a declared size, or when only the full image does)."""
    if size is not None:
        for scale in DCT_SCALES:
            if size.reaches(*scaled(height, width, scale)):
                return scale
    return 1


@dataclass(frozen=True)
class Header:
    """What an encoded image's header says: format (JPEG or PNG), size, whether it is gray, and
    for a JPEG whether it is DCT-coded (False: lossless, which has no scaled decode)."""

    format: int
    height: int
    width: int
    gray: bool
    dct: bool = True


def probe(data: bytes | memoryview) -> Header:
    """Read an encoded image's header (no pixels); DecodeFailed when it is not a readable PNG/JPEG.
    A JPEG's header may need more than the first bytes of a file: the caller retries with all of it."""
    head = bytes(data[:8])
    if head.startswith(_JPEG_MAGIC):
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as exc:
            raise DecodeFailed(f"not a readable JPEG header ({exc})") from None
        if int(height) * int(width) > _pixel_limit():
            raise TooManyPixels("the image has too many pixels")
        frame = _frame(data)
        if frame is not None and frame[1] > 8:  # 12-bit DCT or 9-16-bit lossless: the decoder reads 8-bit only
            raise DecodeFailed(f"a {frame[1]}-bit JPEG: only 8-bit JPEGs are read (convert it to an 8-bit "
                               "JPEG, or to a 16-bit PNG, whose high byte is used)")
        return Header(JPEG, int(height), int(width), colorspace == "Gray",
                      frame is not None and frame[0] not in _LOSSLESS_FRAMES)
    if head == _PNG_MAGIC:
        img = _open_png(data)
        with img:
            return Header(PNG, img.size[1], img.size[0], img.mode in _GRAY_MODES)
    if not head:
        raise DecodeFailed("the file is empty")
    raise DecodeFailed("not a PNG/JPEG image")


def _pixel_limit() -> float:
    """Pillow's decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS), for JPEG too."""
    from PIL import Image

    return math.inf if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def _open_png(data: bytes | memoryview) -> Any:
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data), formats=("PNG",))  # no other decoders: less attack surface
    except Image.DecompressionBombError:
        raise TooManyPixels("the image has too many pixels") from None
    except Exception:
        raise DecodeFailed("not a readable PNG header") from None


def decode(data: bytes | memoryview, header: Header, channels: int, scale: int = 1,
           out: np.ndarray | None = None) -> np.ndarray:
    """Pixels (H, W, `channels`) uint8 of an image whose header is `header`, at 1/`scale` for a JPEG
    (`dct_scale`); into `out` when given: a C-contiguous array of exactly that shape, or, for
    3 channels, of shape (H, W, 4) — the pixels then fill its first three channels (a JPEG is
    decoded straight to RGBX: same RGB bytes) and the result is that (H, W, 3) view, which the
    fused engine warps without converting it to RGBA first. DecodeFailed for data that is corrupt
    or truncated."""
    rgbx = out is not None and channels == 3 and out.ndim == 3 and out.shape[2] == 4
    if header.format == JPEG:
        if scale > 1 and not dct_coded(data):  # checked on the data itself: a file may change on disk
            # (libjpeg-turbo ignores the scale of a lossless JPEG and would overrun a buffer of the scaled size)
            raise DecodeFailed(f"a lossless JPEG has no 1/{scale} decode")
        h, w = scaled(header.height, header.width, scale)
        colorspace = "GRAY" if channels == 1 else "RGBX" if rgbx else "RGB"
        try:
            pixels: np.ndarray = simplejpeg.decode_jpeg(data, colorspace, min_height=h, min_width=w,
                                                        min_factor=scale, buffer=out, strict=True)
        except ValueError as exc:
            if channels == 1 or dct_coded(data):
                raise DecodeFailed(f"corrupt or truncated JPEG data ({exc})") from None
            # libjpeg-turbo converts no lossless gray JPEG to colour: its gray on every channel,
            # as its conversion of a DCT-coded gray file gives
            target = np.empty((h, w, 3), np.uint8) if out is None else out
            target[:, :, :3] = decode(data, header, 1, scale)
            return target[:, :, :3]
        return pixels[:, :, :3] if rgbx else pixels
    pixels = _png_pixels(data, channels)
    if pixels.shape[:2] != (header.height, header.width):
        raise DecodeFailed(f"decoded as {pixels.shape[:2]}, its header says {(header.height, header.width)}")
    if out is None:
        return pixels
    target = out[:, :, :3] if rgbx else out
    target[...] = pixels
    return target


def decode_region(data: bytes | memoryview, header: Header, scale: int, out: np.ndarray,
                  box: tuple[int, int, int, int]) -> bool:
    """Decode only the rectangle `box` = (x0, y0, x1, y1) of a JPEG, at 1/`scale`, into `out`: the
    C-contiguous (H, W, depth) array a full `decode(..., out=out)` would fill (depth 4 for RGBX,
    3, or 1 for gray). Inside the rectangle the bytes are those of a full decode; outside it, `out`
    holds anything. False, with nothing decoded, when this path does not take the image (a PNG, a
    progressive, multi-scan, arithmetic-coded or CMYK JPEG, data without an end marker such as a
    truncated file's, a header the system's libjpeg-turbo does not read — a lossless JPEG, which
    the full decoder reads — or no `_jpegregion` here): decode it whole. DecodeFailed for scan
    data libjpeg-turbo refuses. Bytes after
    the end marker (a phone's "motion photo" video) are left out, as a full decode ignores them."""
    h, w, depth = out.shape
    x0, y0, x1, y1 = box
    if (header.format != JPEG or not out.flags.c_contiguous or not out.flags.writeable
            or not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h) or not regions_available()):
        return False
    jpeg = through_end_marker(data)
    if jpeg is None or not dct_coded(jpeg):
        return False
    try:
        return bool(_jpegregion.decode_region(jpeg, out, h, w, depth, scale, x0, y0, x1, y1))
    except ValueError as exc:
        raise DecodeFailed(f"corrupt or truncated JPEG data ({exc})") from None


#: In entropy-coded data, an FF followed by a marker code: not a stuffed 00, a restart marker or a fill byte.
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _markers(view: memoryview) -> Iterator[tuple[int, int]]:
    """(marker code, position of its FF) of each marker of a JPEG after SOI, in order, until the
    data stops making sense. Segments are skipped by their lengths (an APP1 segment may hold a
    thumbnail with its own markers, a table may hold the bytes FF D9), and a scan's entropy-coded
    data up to the next marker (an FF there is followed by 00 or a restart marker)."""
    n, pos = len(view), 2
    while pos + 2 <= n and view[pos] == 0xFF:
        marker = view[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        yield marker, pos
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
            pos += 2
        elif pos + 4 > n:
            return
        else:
            pos += 2 + (view[pos + 2] << 8 | view[pos + 3])
            if marker == 0xDA:  # a scan: its entropy-coded data runs to the next marker
                found = _MARKER_IN_SCAN.search(view, pos)
                if found is None:
                    return
                pos = found.start()


def through_end_marker(data: bytes | memoryview) -> bytes | memoryview | None:
    """A JPEG's bytes through its end-of-image marker (FF D9): `data` itself when it ends with one;
    for a file with bytes after it (a phone's "motion photo" video), the part before them; None
    when it has none (a truncated file)."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n >= 4 and view[n - 2] == 0xFF and view[n - 1] == 0xD9:
        return data
    scanned = False
    for marker, pos in _markers(view):
        if marker == 0xD9:
            return view[:pos + 2] if scanned else None
        scanned = scanned or marker == 0xDA
    return None


#: Start-of-frame markers of the lossless processes (SOF3, SOF7, SOF11, SOF15): no DCT.
_LOSSLESS_FRAMES = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
#: Every start-of-frame marker (C0-CF but DHT C4, JPG C8 and DAC CC).
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _frame(data: bytes | memoryview) -> tuple[int, int] | None:
    """(start-of-frame marker, sample precision in bits) of a JPEG's first frame; None for data with
    no frame before its first scan (which no decoder reads)."""
    view = memoryview(data).cast("B")
    for marker, pos in _markers(view):
        if marker in _FRAMES:
            return marker, view[pos + 4] if pos + 4 < len(view) else 0
        if marker == 0xDA:
            break
    return None


def dct_coded(data: bytes | memoryview) -> bool:
    """Whether a JPEG's frame is DCT-coded (baseline, extended, progressive; Huffman or arithmetic),
    read from its first start-of-frame marker: False for a lossless JPEG, and for data with no
    frame before its first scan (which no decoder reads)."""
    frame = _frame(data)
    return frame is not None and frame[0] not in _LOSSLESS_FRAMES


def regions_available() -> bool:
    """Whether `decode_region` decodes regions in this process (the module is built and agrees)."""
    return _jpegregion is not None and _region_decoder_agrees()


@functools.cache
def _region_decoder_agrees() -> bool:
    """Whether `_jpegregion` (built against the system's libjpeg-turbo) gives the bytes of the
    pinned decoder here, checked once per process on small JPEGs of every chroma subsampling made
    with OpenCV: where it does not (another libjpeg-turbo, another build), regions are not used
    and images decode whole — slower, never different."""
    import cv2

    y, x = np.mgrid[0:45, 0:61]
    image = np.stack([(x * 4 + y) % 256, (y * 5 + 3 * x) % 256, (x * y) % 256], axis=2).astype(np.uint8)
    kinds = [(cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444, 0), (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422, 0),
             (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, 2), (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440, 0), (None, 0)]
    boxes = [(0, 0, 61, 45), (17, 9, 40, 30), (1, 20, 2, 45), (33, 0, 61, 17)]
    for factor, restart in kinds:  # 4 chroma subsamplings (one with restart markers) and a gray file
        params = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_RST_INTERVAL, restart]
        source = image[:, :, 0] if factor is None else image
        ok, encoded = cv2.imencode(".jpg", source, params if factor is None else
                                   [*params, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor])
        data = encoded.tobytes()
        header = probe(data)
        for scale, depth in [(1, 4), (2, 4), (4, 4), (8, 4), (1, 3), (2, 1), (1, 1)]:
            full = decode(data, header, 1 if depth == 1 else 3, scale)
            h, w = full.shape[:2]
            for x0, y0, x1, y1 in boxes:
                x0, y0, x1, y1 = min(x0, w - 1), min(y0, h - 1), min(x1, w), min(y1, h)
                out = np.zeros((h, w, depth), np.uint8)
                try:
                    taken = _jpegregion.decode_region(data, out, h, w, depth, scale, x0, y0, x1, y1)
                except (ValueError, IndexError):
                    taken = False
                if not (ok and taken and np.array_equal(out[y0:y1, x0:x1, :min(depth, 3)], full[y0:y1, x0:x1])):
                    log.warning("JPEG region decoding is off: %s does not give %s's bytes here",
                                REGION_DECODER, JPEG_DECODER)
                    return False
    return True


def _png_pixels(data: bytes | memoryview, channels: int) -> np.ndarray:
    try:
        with _open_png(data) as img:
            if img.mode.startswith("I"):  # 16- (or 32-) bit gray: the high byte of 16 bits
                gray = (np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
                arr = gray if channels == 1 else np.repeat(gray[:, :, None], 3, axis=2)
            else:
                arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except DecodeFailed:
        raise
    except Exception:
        raise DecodeFailed("corrupt or truncated PNG data") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_images(blobs: Sequence[bytes | memoryview], *, limits: Limits | None = None,
                  field: str = "encoded_images") -> list[np.ndarray]:
    """Decode PNG/JPEG bytes (a request's encoded images) to (H, W, C) uint8 at full size; C=1 only
    when every image is grayscale.

    Only headers are read first; with `limits`, an image side or a batch whose headers claim more
    decoded pixels than allowed is refused (LimitExceededError) before any pixel is decoded."""
    headers = []
    for i, blob in enumerate(blobs):
        try:
            header = probe(blob)
        except TooManyPixels as exc:
            raise LimitExceededError(f"{field}[{i}]: {exc}") from None
        except DecodeFailed:
            raise InvalidInputError(f"{field}[{i}]: not a decodable PNG/JPEG image") from None
        if limits is not None:
            limits.check_header_side(f"{field}[{i}]", header.width, header.height)
        headers.append(header)
    channels = 1 if headers and all(h.gray for h in headers) else 3
    if limits is not None:
        claimed = sum(h.height * h.width for h in headers) * channels
        limits.check_batch_bytes(field, claimed, "the images decode to ")
    images = []
    for i, (blob, header) in enumerate(zip(blobs, headers, strict=True)):
        try:
            images.append(decode(blob, header, channels))
        except DecodeFailed:
            raise InvalidInputError(f"{field}[{i}]: not a decodable PNG/JPEG image") from None
    return images

