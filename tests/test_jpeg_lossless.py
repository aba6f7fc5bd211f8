"""Lossless JPEGs (SOF3): no DCT, so no scaled decode and no region decode — libjpeg-turbo ignores
the scale of a lossless file and decoded it whole into a buffer of the scaled size (a heap overrun:
the process died), and the system's older libjpeg-turbo behind the region path does not read them
at all. They decode whole, to their exact pixels, whatever the dataset's decode size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.jpeg import assert_augments_alike, lossless_jpeg
from PIL import Image

from augsvc.datasets import attach, load_dataset
from augsvc.datasets import decode as decode_module
from augsvc.datasets.decode import REGION_DECODER, DecodeFailed, dct_coded, decode, decode_region, probe
from augsvc.errors import InvalidInputError
from augsvc.samples import sample_photo


def photo(h: int, w: int, gray: bool = False) -> np.ndarray:
    image = np.ascontiguousarray(sample_photo()[:h, 7:7 + w])
    return np.ascontiguousarray(image.mean(axis=2).astype(np.uint8)) if gray else image


def jpeg(image: np.ndarray, **params: object) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90, **params)
    return buffer.getvalue()


def test_a_lossless_jpeg_decodes_to_its_exact_pixels() -> None:
    colour, gray = photo(45, 61), photo(40, 56, gray=True)
    for image in (colour, gray):
        data = lossless_jpeg(image)
        header = probe(data)
        assert (header.height, header.width, header.gray, header.dct) == (*image.shape[:2], image.ndim == 2, False)
        expected = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)  # gray on every channel
        np.testing.assert_array_equal(decode(data, header, 3), expected)
        rgbx = np.zeros((*image.shape[:2], 4), np.uint8)
        np.testing.assert_array_equal(decode(data, header, 3, out=rgbx), expected)
        np.testing.assert_array_equal(rgbx[:, :, :3], expected)
    np.testing.assert_array_equal(decode(lossless_jpeg(gray), probe(lossless_jpeg(gray)), 1)[:, :, 0], gray)
    # the DCT-coded kinds, for contrast; and data with no frame at all
    assert dct_coded(jpeg(colour)) and dct_coded(jpeg(colour, progressive=True)) and dct_coded(jpeg(gray))
    assert not dct_coded(b"\xff\xd8\xff\xd9") and not dct_coded(b"")


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_a_lossless_jpeg_has_no_scaled_decode(scale: int) -> None:
    data = lossless_jpeg(photo(64, 64))
    with pytest.raises(DecodeFailed, match="lossless"):
        decode(data, probe(data), 3, scale)  # before: a heap overrun in libjpeg-turbo, and the process died


@pytest.mark.skipif(REGION_DECODER is None, reason="augsvc.datasets._jpegregion is not built here")
def test_the_region_path_leaves_a_lossless_jpeg_to_the_full_decode() -> None:
    for image in (photo(48, 64), photo(48, 64, gray=True)):
        data = lossless_jpeg(image)
        out = np.full((48, 64, 4 if image.ndim == 3 else 1), 9, np.uint8)
        assert not decode_region(data, probe(data), 1, out, (8, 8, 40, 30))  # not DecodeFailed: it is not corrupt
        # the module itself, asked directly: a header its libjpeg-turbo does not read is not taken
        # (it is not corrupt data: a newer full decoder may read it)
        assert not decode_module._jpegregion.decode_region(data, out, 48, 64, out.shape[2], 1, 8, 8, 40, 30)
        assert (out == 9).all()


@pytest.mark.parametrize("layout", ["decoded", "encoded", "files"])
def test_a_folder_with_lossless_files_decodes_them_whole_under_a_decode_size(tmp_path: Path, layout: str) -> None:
    images = {"a/0.jpg": photo(64, 96), "a/1.jpg": photo(64, 96), "b/2.jpg": photo(48, 64, gray=True),
              "b/3.jpg": photo(80, 80)}
    for name, image in images.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(lossless_jpeg(image) if name in ("a/1.jpg", "b/2.jpg") else jpeg(image))
    spec = {"transforms": [{"random_resized_crop": {"height": 16, "width": 16}}]}
    ids = np.arange(4)
    with load_dataset("d", str(tmp_path), layout="decoded", decode_size="shorter:16") as whole_set, \
            load_dataset("p", str(tmp_path), layout=layout, decode_size="shorter:16") as parted_set:
        whole, part = attach(whole_set.handle()), attach(parted_set.handle())
        try:
            pixels = whole.gather(ids)
            # at 1/4 (DCT scaling), whole (lossless), whole (lossless), 1/4
            assert [p.shape for p in pixels] == [(16, 24, 3), (64, 96, 3), (48, 64, 3), (20, 20, 3)]
            np.testing.assert_array_equal(pixels[1], images["a/1.jpg"])
            np.testing.assert_array_equal(pixels[2], np.repeat(images["b/2.jpg"][:, :, None], 3, axis=2))
            assert_augments_alike(whole, part, ids, spec, seed=0, epochs=3)
        finally:
            whole.close()
            part.close()


@pytest.mark.parametrize("precision", [12, 16])
def test_a_jpeg_of_more_than_8_bits_is_a_bad_file_that_says_so(tmp_path: Path, precision: int) -> None:
    """The decoder reads 8-bit samples. A 12- or 16-bit lossless JPEG (medical images often are) or
    a 12-bit DCT one is refused from its header, at start, with a message naming the bit depth —
    before, its header read fine and each decode failed as "corrupt or truncated JPEG data"."""
    deep = (photo(40, 56, gray=True).astype(np.uint16) << (precision - 9)) | 5  # differences below 2**15
    data = lossless_jpeg(deep, precision)
    with pytest.raises(DecodeFailed, match=rf"a {precision}-bit JPEG: only 8-bit JPEGs are read"):
        probe(data)
    baseline = bytearray(jpeg(photo(40, 56)))
    baseline[baseline.index(b"\xff\xc0") + 4] = 12  # SOF0's precision byte: a 12-bit header
    with pytest.raises(DecodeFailed, match="a 12-bit JPEG"):
        probe(bytes(baseline))
    shallow = photo(40, 56, gray=True) >> 2
    six = lossless_jpeg(shallow, 6)  # fewer bits than 8 are read (2-8): to their exact values
    assert probe(six).dct is False
    np.testing.assert_array_equal(decode(six, probe(six), 1)[:, :, 0], shallow)

    for name, content in (("a/one.jpg", jpeg(photo(40, 56))), ("a/two.jpg", jpeg(photo(40, 56, gray=True))),
                          ("b/deep.jpg", data)):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content)
    with pytest.raises(InvalidInputError, match=rf"deep\.jpg.*a {precision}-bit JPEG"):
        load_dataset("d", str(tmp_path))
    with load_dataset("d", str(tmp_path), on_bad_file="skip", layout="files") as ds:
        assert ds.num_samples == 2
