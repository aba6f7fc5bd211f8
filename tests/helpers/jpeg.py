"""JPEG files the usual encoders do not write."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np


def lossless_jpeg(image: np.ndarray, precision: int = 8) -> bytes:
    """A lossless JPEG (SOF3, predictor 1: the sample to the left) of an (H, W) or (H, W, 3) image of
    `precision`-bit samples (uint8, or uint16 for more than 8 bits): one interleaved Huffman-coded
    scan, coding each difference with the standard DC luminance table (T.81 K.3, categories 0-11)
    extended by one code each for categories 12-16 (the first twelve codes are unchanged)."""
    x = (image[:, :, None] if image.ndim == 2 else image).astype(np.int32)
    assert 2 <= precision <= 16 and int(x.max()) < 1 << precision
    h, w, c = x.shape
    bits_per_length = [0, 1, 5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    codes, code, size = {}, 0, 0
    for length, count in enumerate(bits_per_length, 1):
        for _ in range(count):
            codes[size] = format(code, f"0{length}b")
            code, size = code + 1, size + 1
        code <<= 1
    pred = np.empty_like(x)
    pred[0, 0], pred[0, 1:], pred[1:, 0], pred[1:, 1:] = 1 << (precision - 1), x[0, :-1], x[:-1, 0], x[1:, :-1]
    assert int(np.abs(x - pred).max()) < 1 << 15, "category 16 (a difference of 32768) is not written here"
    bits = []
    for d in (x - pred).ravel().tolist():  # interleaved: each pixel's components in turn
        n = abs(d).bit_length()
        bits.append(codes[n] + (format(d if d > 0 else d + (1 << n) - 1, f"0{n}b") if n else ""))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = bytearray()
    for i in range(0, len(stream), 8):
        data.append(int(stream[i:i + 8], 2))
        if data[-1] == 0xFF:
            data.append(0)

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    frame = struct.pack(">BHHB", precision, h, w, c) + b"".join(bytes([k + 1, 0x11, 0]) for k in range(c))
    scan = bytes([c]) + b"".join(bytes([k + 1, 0x00]) for k in range(c)) + bytes([1, 0, 0])
    return (b"\xff\xd8" + segment(0xC4, bytes([0]) + bytes(bits_per_length) + bytes(range(17)))
            + segment(0xC3, frame) + segment(0xDA, scan) + bytes(data) + b"\xff\xd9")


def assert_augments_alike(whole: Any, part: Any, ids: np.ndarray, spec: dict[str, Any], *, seed: int,
                          epochs: int) -> None:
    """`part` (a reader of the encoded or files layout, its images read by the worker's deferred
    path: regions where it can) augments `ids` to the bytes `whole` (the decoded layout) gives."""
    from augsvc import augment_batch

    for epoch in range(epochs):
        expected = augment_batch(whole.gather(ids), spec, seed=seed, epoch=epoch, sample_ids=ids)
        images, read = part.gather_deferred(ids)
        got = augment_batch(images, spec, seed=seed, epoch=epoch, sample_ids=ids, read=read)
        np.testing.assert_array_equal(got, expected)
