"""Decoding only the part of a JPEG that a random crop reads: `engine.source_boxes` says which
rectangle of each image the fused engine reads, `datasets.decode_region` decodes just it
(libjpeg-turbo's partial decompression), and the output must be the bytes of whole images.
Counts pixels and events, never time."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers.jpeg import assert_augments_alike
from PIL import Image

from augsvc import augment_batch
from augsvc.datasets import attach, load_dataset
from augsvc.datasets import decode as decode_module
from augsvc.datasets.decode import REGION_DECODER, DecodeFailed, decode, decode_region, probe, scaled
from augsvc.engine import source_boxes
from augsvc.samples import sample_photo

needs_module = pytest.mark.skipif(REGION_DECODER is None, reason="augsvc.datasets._jpegregion is not built here")

TRAIN = {"transforms": [{"random_resized_crop": {"height": 32, "width": 32}}, {"hflip": {"p": 0.5}},
                        {"color": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05, "p": 0.8}}]}
#: Specs whose first steps are geometric (the engine reads a part of each image), with every border.
GEOMETRIC = [
    TRAIN,
    {"transforms": [{"random_resized_crop": {"height": 24, "width": 28}},
                    {"rotate": {"limit_range": [-40, 40], "p": 1.0}}], "border": "reflect_101"},
    {"transforms": [{"translate": {"x_range": [-0.4, 0.4], "y_range": [-0.3, 0.3], "p": 1.0}},
                    {"random_resized_crop": {"height": 16, "width": 16}}], "border": "reflect_101"},
    {"transforms": [{"translate": {"x_range": [-0.4, 0.4], "y_range": [-0.3, 0.3], "p": 1.0}},
                    {"random_resized_crop": {"height": 16, "width": 16}}], "border": "constant", "fill": 7},
    {"transforms": [{"scale": {"scale_range": [0.5, 1.6], "p": 1.0}}, {"vflip": {"p": 0.5}},
                    {"center_crop": {"height": 20, "width": 20}}], "border": "replicate"},
    {"transforms": [{"center_crop": {"height": 30, "width": 30}}, {"hflip": {"p": 1.0}}]},
    {"transforms": [{"resize_shorter": {"side": 40}}, {"center_crop": {"height": 32, "width": 32}}]},
    # a crop, then steps that read past it: the border applies at the crop's edges
    {"transforms": [{"center_crop": {"height": 30, "width": 30}},
                    {"rotate": {"limit_range": [-40, 40], "p": 1.0}}], "border": "reflect_101"},
    {"transforms": [{"hflip": {"p": 0.5}}, {"center_crop": {"height": 30, "width": 30}},
                    {"scale": {"scale_range": [0.5, 0.8], "p": 1.0}}], "border": "constant", "fill": 3},
    {"transforms": [{"random_resized_crop": {"height": 90, "width": 90, "scale_range": [0.05, 0.2]}}]},
    # flips before the crop: still one warp of a view of the crop's box (mapped back through the flips)
    {"transforms": [{"vflip": {"p": 0.5}}, {"hflip": {"p": 0.5}},
                    {"random_resized_crop": {"height": 24, "width": 24, "scale_range": [0.1, 0.4]}}]},
    # reads whole images: the rotated output's corners map outside the image
    {"transforms": [{"rotate": {"limit_range": [-40, 40], "p": 1.0}},
                    {"random_resized_crop": {"height": 24, "width": 28}}], "border": "constant", "fill": 7},
]
READS_PART = 11  # GEOMETRIC[:READS_PART] leave pixels out


def photo(h: int, w: int, seed: int) -> np.ndarray:
    src = sample_photo()
    rng = np.random.default_rng(seed)
    y, x = int(rng.integers(0, 100)), int(rng.integers(0, 100))
    return cv2.resize(src[y:y + 220, x:x + 220], (w, h), interpolation=cv2.INTER_AREA)


def encode(image: np.ndarray, sampling: str, restart: int = 0) -> bytes:
    """JPEG bytes with the given chroma subsampling ("gray" for a one-channel file)."""
    factors = {"444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444, "422": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
               "420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, "440": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440,
               "411": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411}
    params = [cv2.IMWRITE_JPEG_QUALITY, 88, cv2.IMWRITE_JPEG_RST_INTERVAL, restart]
    if sampling == "gray":
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    else:
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factors[sampling]]
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", image, params)
    assert ok
    return bytes(data.tobytes())


def boxes_of(h: int, w: int, rng: np.random.Generator, count: int) -> list[tuple[int, int, int, int]]:
    """Random rectangles, plus the whole image, single pixels at the corners and thin strips."""
    out = [(0, 0, w, h), (0, 0, 1, 1), (w - 1, h - 1, w, h), (w - 1, 0, w, h), (0, h - 1, w, h)]
    for _ in range(count):
        cw, ch = int(rng.integers(1, w + 1)), int(rng.integers(1, h + 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out.append((x, y, x + cw, y + ch))
    return out


@needs_module
@pytest.mark.parametrize("sampling", ["444", "422", "420", "440", "411", "gray"])
@pytest.mark.parametrize("restart", [0, 2])
def test_a_region_has_the_bytes_of_the_full_decode(sampling: str, restart: int) -> None:
    rng = np.random.default_rng(len(sampling) * 7 + restart)
    compared = 0
    for k, (h, w) in enumerate([(77, 101), (64, 48), (131, 90), (33, 250)]):
        data = encode(photo(h, w, k), sampling, restart)
        header = probe(data)
        for scale in (1, 2, 4, 8):
            sh, sw = scaled(h, w, scale)
            for depth in (1, 3, 4):
                full = decode(data, header, 1 if depth == 1 else 3, scale)
                for x0, y0, x1, y1 in boxes_of(sh, sw, rng, 6):
                    out = np.zeros((sh, sw, depth), np.uint8)
                    assert decode_region(data, header, scale, out, (x0, y0, x1, y1))
                    np.testing.assert_array_equal(out[y0:y1, x0:x1, :min(depth, 3)], full[y0:y1, x0:x1])
                    compared += 1
    assert compared > 500


@needs_module
def test_files_it_does_not_take_are_left_to_the_full_decode() -> None:
    image = photo(60, 80, 3)
    progressive, cmyk, png = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(progressive, format="JPEG", quality=90, progressive=True)
    Image.fromarray(image).convert("CMYK").save(cmyk, format="JPEG", quality=90)
    Image.fromarray(image).save(png, format="PNG")
    truncated = encode(image, "420")[:-200]
    for data in (progressive.getvalue(), cmyk.getvalue(), png.getvalue(), truncated):
        header = probe(data)
        out = np.full((60, 80, 4), 9, np.uint8)
        assert not decode_region(data, header, 1, out, (10, 10, 50, 40))
        assert (out == 9).all()  # nothing written: the caller decodes the whole image
    with pytest.raises(DecodeFailed):  # ... and the full decode refuses the truncated file
        decode(truncated, probe(truncated), 3)
    good = encode(image, "420")
    for box in [(0, 0, 81, 60), (10, 10, 10, 20), (-1, 0, 5, 5), (0, 0, 80, 61)]:  # not a rectangle of the image
        assert not decode_region(good, probe(good), 1, np.zeros((60, 80, 4), np.uint8), box)


def _as_arithmetic(data: bytes) -> bytes:
    """The file with its baseline frame marker (SOF0) made SOF9: a header that says arithmetic coding
    (no encoder for it here; its Huffman-coded data then reads as corrupt arithmetic-coded data)."""
    frame = data.index(b"\xff\xc0")
    return data[:frame] + b"\xff\xc9" + data[frame + 2:]


def _first_scan_one_component(data: bytes) -> bytes:
    """The file with its first scan header cut to its first component: a non-interleaved,
    multi-scan sequential file as far as the header says (libjpeg's jpeg_has_multiple_scans)."""
    sos = data.index(b"\xff\xda")
    count = data[sos + 4]
    assert count == 3, "a three-component file"
    first = data[sos + 5:sos + 7]  # the first component's selector and tables
    spectral = data[sos + 5 + 2 * count:sos + 8 + 2 * count]  # Ss, Se, Ah/Al
    header = b"\xff\xda" + (8).to_bytes(2, "big") + b"\x01" + first + spectral
    return data[:sos] + header + data[sos + 8 + 2 * count:]


@needs_module
def test_arithmetic_and_multi_scan_files_are_left_to_the_full_decode() -> None:
    """The C module's own guard (the self-check only covers single-scan Huffman files): it reads the
    header and declines, writing nothing. Without the guard (checked by removing it): the region path
    returned the "arithmetic" file as decoded, with wrong pixels, where the full decode refuses it,
    and raised on the multi-scan one."""
    good = encode(photo(64, 80, 5), "420")
    for data in (_as_arithmetic(good), _first_scan_one_component(good)):
        header = probe(data)
        assert (header.height, header.width) == (64, 80)
        out = np.full((64, 80, 4), 9, np.uint8)
        assert not decode_module._jpegregion.decode_region(data, out, 64, 80, 4, 1, 8, 8, 40, 30)
        assert not decode_region(data, header, 1, out, (8, 8, 40, 30))
        assert (out == 9).all()
    out = np.full((64, 80, 4), 9, np.uint8)  # the unedited file is taken, so the edits are what is declined
    assert decode_module._jpegregion.decode_region(good, out, 64, 80, 4, 1, 8, 8, 40, 30)


@needs_module
def test_corrupt_data_in_the_region_is_refused() -> None:
    data = bytearray(encode(photo(96, 96, 4), "420"))
    scan = data.index(b"\xff\xda") + 20  # inside the entropy-coded data of the first rows
    data[scan:scan + 40] = b"\xff\xd7" * 20  # restart markers where none belong: libjpeg-turbo warns
    header = probe(bytes(data))
    with pytest.raises(DecodeFailed):
        decode(bytes(data), header, 3)
    with pytest.raises(DecodeFailed):
        decode_region(bytes(data), header, 1, np.zeros((96, 96, 4), np.uint8), (0, 0, 40, 40))


@pytest.mark.parametrize("k", range(len(GEOMETRIC)))
def test_pixels_outside_the_source_boxes_never_reach_the_output(k: int) -> None:
    """What `source_boxes` leaves out may hold anything: the engine's output does not change."""
    spec = GEOMETRIC[k]
    rng = np.random.default_rng(0)
    images = [photo(int(h), int(w), i) for i, (h, w) in enumerate(rng.integers(34, 120, (24, 2)))]
    ids = np.arange(100, 124)
    heights = np.array([im.shape[0] for im in images])
    widths = np.array([im.shape[1] for im in images])
    partial_seen = False
    for epoch in range(3):
        expected = augment_batch(images, spec, seed=5, epoch=epoch, sample_ids=ids)
        boxes = source_boxes(spec, seed=5, epoch=epoch, sample_ids=ids, heights=heights, widths=widths)
        assert boxes is not None and boxes.shape == (24, 4)
        scrambled = []
        for im, (x0, y0, x1, y1) in zip(images, boxes, strict=True):
            assert 0 <= x0 < x1 <= im.shape[1] and 0 <= y0 < y1 <= im.shape[0]
            partial_seen |= (x1 - x0) * (y1 - y0) < im.shape[0] * im.shape[1]
            noise = rng.integers(0, 256, im.shape, np.uint8)
            noise[y0:y1, x0:x1] = im[y0:y1, x0:x1]
            scrambled.append(noise)
        np.testing.assert_array_equal(augment_batch(scrambled, spec, seed=5, epoch=epoch, sample_ids=ids), expected)
    assert partial_seen == (k < READS_PART)  # the test is about something: some boxes leave pixels out


def test_specs_that_read_whole_images_have_no_boxes() -> None:
    color_first = {"transforms": [{"color": {"brightness": 0.3}}, {"random_resized_crop": {"height": 8, "width": 8}}]}
    sizes = {"heights": np.array([40, 50]), "widths": np.array([60, 30])}
    assert source_boxes(color_first, seed=0, epoch=0, sample_ids=[0, 1], **sizes) is None
    assert source_boxes(TRAIN, seed=0, epoch=0, sample_ids=[0, 1], backend="albumentations", **sizes) is None


def _folder(root: Path) -> list[bytes]:
    """Six photos (4:2:0 and 4:2:2 JPEGs of mixed sizes, one progressive) and a PNG, in two classes."""
    blobs = []
    sizes = [(70, 90), (120, 64), (64, 64), (99, 131), (80, 80), (150, 100), (72, 56)]
    for i, (h, w) in enumerate(sizes):
        image = photo(h, w, 10 + i)
        path = root / ("a" if i % 2 else "b") / f"{i:02d}.{'png' if i == 6 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i == 6:
            Image.fromarray(image).save(path, format="PNG")
        elif i == 5:
            Image.fromarray(image).save(path, format="JPEG", quality=90, progressive=True)
        else:
            path.write_bytes(encode(image, "420" if i % 2 else "422"))
        blobs.append(path.read_bytes())
    return blobs


@needs_module
@pytest.mark.parametrize("layout", ["encoded", "files"])
@pytest.mark.parametrize("size", [None, "shorter:32"])
def test_a_worker_reads_regions_and_augments_to_the_decoded_layouts_bytes(tmp_path: Path, layout: str,
                                                                          size: str | None) -> None:
    _folder(tmp_path)
    ids = np.array([6, 0, 5, 3, 1, 4, 2])
    with load_dataset("d", str(tmp_path), layout="decoded", decode_size=size) as decoded, \
            load_dataset("p", str(tmp_path), layout=layout, decode_size=size) as parted:
        whole, part = attach(decoded.handle()), attach(parted.handle())
        try:
            for spec in GEOMETRIC[:3]:
                assert_augments_alike(whole, part, ids, spec, seed=1, epochs=2)
            # every baseline JPEG went through the region path after its first, whole decode (the
            # first call); the PNG and the progressive file never did
            assert part.region_decodes == (3 * 2 - 1) * 5
            assert whole.gather_deferred(ids)[1] is None  # the decoded layout has its pixels already
        finally:
            whole.close()
            part.close()


@needs_module
def test_a_region_decoder_that_disagrees_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    class OffByOne:
        """A stand-in for a libjpeg-turbo whose bytes differ from the pinned decoder's."""

        real = decode_module._jpegregion

        @classmethod
        def decode_region(cls, data: bytes, out: np.ndarray, *args: int) -> bool:
            taken = bool(cls.real.decode_region(data, out, *args))
            np.add(out, 1, out=out)
            return taken

    monkeypatch.setattr(decode_module, "_jpegregion", OffByOne)
    decode_module._region_decoder_agrees.cache_clear()
    try:
        data = encode(photo(40, 40, 0), "420")
        assert not decode_region(data, probe(data), 1, np.zeros((40, 40, 4), np.uint8), (0, 0, 40, 40))
    finally:
        monkeypatch.undo()
        decode_module._region_decoder_agrees.cache_clear()
    assert decode_region(data, probe(data), 1, np.zeros((40, 40, 4), np.uint8), (0, 0, 40, 40))


@pytest.mark.parametrize("spec", [TRAIN, {"transforms": [{"color": {"contrast": 0.4, "p": 1.0}},
                                                         {"random_resized_crop": {"height": 16, "width": 16}}]}],
                         ids=["crop-first", "color-first"])
@pytest.mark.parametrize("backend", ["fused", "albumentations"])
@pytest.mark.parametrize("one_shape", [False, True])
def test_deferred_images_are_read_once_each_before_their_pixels_are(spec: dict[str, object], backend: str,
                                                                    one_shape: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`augment_batch(read=...)`: each image is filled once; the fused backend fills image i just
    before it warps it (read, warp, read, warp, ...) when the spec starts with a geometric step,
    everything first otherwise; the output is that of the filled images."""
    from augsvc.engine import fused

    rng = np.random.default_rng(3)
    sizes = [(40, 40)] * 5 if one_shape else [(int(h), int(w)) for h, w in rng.integers(30, 70, (5, 2))]
    sources = [photo(h, w, i) for i, (h, w) in enumerate(sizes)]
    ids = np.arange(5)
    expected = augment_batch(sources, spec, seed=2, epoch=1, sample_ids=ids, backend=backend)
    images = [np.zeros_like(s) for s in sources]
    events: list[str] = []

    def read(i: int, box: tuple[int, int, int, int] | None) -> None:
        events.append(f"read {i}")
        images[i][...] = sources[i]

    real = fused._warp_one

    def warp_one(*args: object, **kwargs: object) -> np.ndarray:
        events.append("warp")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fused, "_warp_one", warp_one)
    got = augment_batch(images, spec, seed=2, epoch=1, sample_ids=ids, backend=backend, read=read)
    np.testing.assert_array_equal(got, expected)
    reads = [e for e in events if e != "warp"]
    assert reads == [f"read {i}" for i in range(5)]
    interleaved = backend == "fused" and spec is TRAIN and not one_shape
    first_warp = events.index("warp") if "warp" in events else len(events)
    if interleaved:
        assert events[:10] == [x for i in range(5) for x in (f"read {i}", "warp")]
    else:
        assert first_warp >= 5  # every image was read before any warp


def test_without_the_compiled_module_images_decode_whole_to_the_same_bytes(tmp_path: Path) -> None:
    """Where `_jpegregion` is not built (no compiler or headers), a worker decodes whole images:
    REGION_DECODER is None, no region is decoded, and the output is the same."""
    import subprocess
    import sys

    _folder(tmp_path)
    script = f"""
import sys
sys.modules["augsvc.datasets._jpegregion"] = None  # the import fails, as where it was never built
import numpy as np
from augsvc import augment_batch
from augsvc.datasets import attach, load_dataset
from augsvc.datasets.decode import REGION_DECODER
assert REGION_DECODER is None
spec = {TRAIN!r}
ids = np.arange(7)
folder = {str(tmp_path)!r}
with load_dataset("d", folder, layout="decoded") as d, load_dataset("e", folder, layout="encoded") as e:
    whole, part = attach(d.handle()), attach(e.handle())
    expected = augment_batch(whole.gather(ids), spec, seed=1, epoch=0, sample_ids=ids)
    images, read = part.gather_deferred(ids)
    got = augment_batch(images, spec, seed=1, epoch=0, sample_ids=ids, read=read)
    assert np.array_equal(got, expected) and part.region_decodes == 0
    del images, read
    whole.close(); part.close()
print("same bytes")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "same bytes" in proc.stdout, proc.stderr[-3000:]


@needs_module
@pytest.mark.parametrize("layout", ["encoded", "files"])
def test_damage_below_every_crop_fails_the_sample_in_every_epoch(tmp_path: Path, layout: str) -> None:
    """A region leaves the rows below it undecoded; a file damaged only there would fail for some
    crops and not others. A sample's first decode in a process is whole, so it fails every time,
    as in the decoded layout, which finds it at load."""
    from augsvc.errors import BadSampleError

    image = photo(256, 256, 8)
    for k in range(2):
        data = bytearray(encode(image, "420"))
        if k == 0:  # restart markers where none belong, in the last rows; the end marker stays
            data[len(data) - 300:len(data) - 260] = b"\xff\xd7" * 20
        (tmp_path / f"c{k}").mkdir()
        (tmp_path / f"c{k}" / "x.jpg").write_bytes(bytes(data))
    damaged = (tmp_path / "c0" / "x.jpg").read_bytes()
    header = probe(damaged)
    assert decode_region(damaged, header, 1, np.zeros((256, 256, 4), np.uint8), (0, 0, 256, 40))  # the top is fine
    with pytest.raises(DecodeFailed):
        decode(damaged, header, 3)
    spec = {"transforms": [{"random_resized_crop": {"height": 32, "width": 32, "scale_range": [0.05, 0.1]}}]}
    with load_dataset("p", str(tmp_path), layout=layout) as ds:
        reader = attach(ds.handle())
        try:
            for epoch in range(6):
                for ids, fails in (([1], False), ([0], True)):
                    images, read = reader.gather_deferred(ids)
                    if fails:
                        with pytest.raises(BadSampleError, match="sample 0"):
                            augment_batch(images, spec, seed=1, epoch=epoch, sample_ids=ids, read=read)
                    else:
                        augment_batch(images, spec, seed=1, epoch=epoch, sample_ids=ids, read=read)
                    del images, read
            assert reader.region_decodes == 5  # the good file, after its first decode
        finally:
            reader.close()


def _with_thumbnail(data: bytes, thumbnail: bytes) -> bytes:
    """`data` with an APP1 segment right after SOI holding another JPEG (as EXIF holds a thumbnail)."""
    payload = b"Exif\x00\x00" + thumbnail
    return data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


@needs_module
@pytest.mark.parametrize("restart", [0, 2])
def test_bytes_after_the_end_marker_are_left_out_and_truncation_still_refused(restart: int) -> None:
    """A "motion photo" (a video after the JPEG's end marker, itself holding FF D9) decodes by
    region to the full decode's bytes; a thumbnail's end marker in APP1 is not taken for the
    file's; a file cut anywhere after its header has no end marker and is left to the full decode."""
    from augsvc.datasets.decode import through_end_marker

    image = photo(70, 90, 11)
    plain = _with_thumbnail(encode(image, "420", restart), encode(photo(16, 16, 1), "444"))
    trailer = b"\x00\x00\x00\x18ftypmp42" + b"\xff\xd9\x00\xff\xd9" + bytes(range(256)) * 4
    motion = plain + trailer
    assert through_end_marker(plain) is plain
    assert bytes(through_end_marker(motion)) == plain  # type: ignore[arg-type]
    assert bytes(through_end_marker(memoryview(motion))) == plain  # type: ignore[arg-type]
    header = probe(motion)
    full = decode(motion, header, 3)
    np.testing.assert_array_equal(full, decode(plain, probe(plain), 3))
    for box in [(0, 0, 90, 70), (13, 20, 61, 55), (40, 50, 90, 70)]:
        out = np.zeros((70, 90, 4), np.uint8)
        assert decode_region(motion, header, 1, out, box)
        x0, y0, x1, y1 = box
        np.testing.assert_array_equal(out[y0:y1, x0:x1, :3], full[y0:y1, x0:x1])
    sos = plain.rindex(b"\xff\xda")  # the image's scan, after the thumbnail's
    for cut in (sos + 4, sos + 40, len(plain) // 2, len(plain) - 2, len(plain) - 1):
        truncated = plain[:cut]
        assert through_end_marker(truncated) is None, cut
        assert not decode_region(truncated, header, 1, np.zeros((70, 90, 4), np.uint8), (13, 20, 61, 55))
    broken = plain[:sos] + b"\x00" + plain[sos:] + trailer  # no marker where one must be: not walked past
    assert through_end_marker(broken) is None
    # a segment holding the bytes FF D9 (a comment, as a table could) is skipped by its length
    comment = b"\xff\xfe\x00\x06a\xff\xd9b"
    commented = plain[:sos] + comment + plain[sos:]
    assert bytes(through_end_marker(commented + trailer)) == commented  # type: ignore[arg-type]
    eoi = len(plain) - 2  # ... and one between the scan and the end marker
    after_scan = plain[:eoi] + comment + plain[eoi:]
    assert bytes(through_end_marker(after_scan + trailer)) == after_scan  # type: ignore[arg-type]
