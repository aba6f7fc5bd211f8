"""JPEG datasets: the decoder, the decode-size rule, the three layouts (same pixels from each),
manifests and bad files. Small files made here from the sample photos; every test counts pixels
and events, never time."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from helpers.servers import serve
from PIL import Image

from augsvc import augment_batch
from augsvc.datasets import (
    JPEG_DECODER,
    LAYOUTS,
    Dataset,
    DecodeSize,
    attach,
    dct_scale,
    decode_images,
    load_dataset,
)
from augsvc.datasets.decode import DecodeFailed, decode, probe
from augsvc.errors import BadSampleError, InvalidInputError
from augsvc.pool import WorkerPool
from augsvc.samples import sample_photo
from augsvc.server import ServerSettings, create_server
from augsvc.v1 import augment_pb2 as pb

SPEC = {"transforms": [{"random_resized_crop": {"height": 24, "width": 24}}, {"hflip": {"p": 0.5}},
                       {"color": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05, "p": 0.8}}]}
EVAL_SPEC = {"transforms": [{"resize_shorter": {"side": 32}}, {"center_crop": {"height": 28, "width": 28}}]}
#: (height, width) of the test files: some reach 2x, 4x the declared size below, some do not.
SIZES = [(40, 52), (97, 61), (130, 200), (48, 48), (75, 110), (200, 130)]
SIZE = DecodeSize(24)


def jpeg(arr: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def photo(h: int, w: int, seed: int) -> np.ndarray:
    src = sample_photo()
    rng = np.random.default_rng(seed)
    y, x = int(rng.integers(0, 120)), int(rng.integers(0, 120))
    return cv2.resize(src[y:y + 200, x:x + 200], (w, h), interpolation=cv2.INTER_AREA)


def make_jpeg_folder(root: Path, sizes: list[tuple[int, int]] = SIZES) -> list[bytes]:
    """Class "a" gets the first half, "b" the rest; returns the files' bytes in sample order."""
    blobs = []
    for i, (h, w) in enumerate(sizes):
        path = root / ("a" if i < len(sizes) // 2 else "b") / f"{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(photo(h, w, i)))
        blobs.append(path.read_bytes())
    return blobs


def gather(ds: Dataset, ids: list[int]) -> list[np.ndarray]:
    reader = attach(ds.handle())
    try:
        got = reader.gather(np.array(ids))
        return list(got)
    finally:
        reader.close()


# -- the decode-size rule ------------------------------------------------------------------------

@pytest.mark.parametrize("h, w, size, scale", [
    (480, 640, None, 1),                          # no declared size: full
    (480, 640, DecodeSize(256), 1),               # 1/2 would give 240 < 256
    (512, 640, DecodeSize(256), 2),               # exactly 256 at 1/2
    (513, 700, DecodeSize(256), 2),               # 1/2 rounds up to 257
    (1024, 2048, DecodeSize(256), 4),
    (2048, 4096, DecodeSize(256), 8),             # the smallest scale is 1/8
    (4096, 8192, DecodeSize(256), 8),             # never below 1/8
    (2041, 4096, DecodeSize(256), 8),             # 1/8 rounds 2041 up to 256
    (2040, 4096, DecodeSize(256), 4),             # ... but 2040 / 8 is 255
    (100, 1000, DecodeSize(256, "max"), 2),       # the longer side: 500 at 1/2, 250 at 1/4
    (100, 1000, DecodeSize(250, "max"), 4),
    (255, 255, DecodeSize(256), 1),               # smaller than the size: full
])
def test_dct_scale_rule(h: int, w: int, size: DecodeSize | None, scale: int) -> None:
    assert dct_scale(h, w, size) == scale


@pytest.mark.parametrize("text, expected", [("shorter:256", DecodeSize(256)), ("max:512", DecodeSize(512, "max"))])
def test_decode_size_parse(text: str, expected: DecodeSize) -> None:
    assert DecodeSize.parse(text) == expected and str(expected) == text


@pytest.mark.parametrize("text", ["256", "longer:256", "shorter:", "shorter:-1", "shorter:0"])
def test_decode_size_parse_errors(text: str) -> None:
    with pytest.raises(InvalidInputError, match="decode size"):
        DecodeSize.parse(text)


def test_scaled_decode_is_the_dct_size_and_close_to_full_decode_resized() -> None:
    data = jpeg(photo(400, 600, 0))
    header = probe(data)
    full = decode(data, header, 3)
    for scale in (2, 4, 8):
        small = decode(data, header, 3, scale)
        assert small.shape == (-(-400 // scale), -(-600 // scale), 3)
        size = (small.shape[1], small.shape[0])
        a = cv2.resize(small, (64, 64), interpolation=cv2.INTER_AREA).astype(np.int16)
        b = cv2.resize(cv2.resize(full, size, interpolation=cv2.INTER_AREA), (64, 64),
                       interpolation=cv2.INTER_AREA).astype(np.int16)
        assert np.abs(a - b).mean() <= 2.0, scale


def test_decoder_matches_pillow_at_full_size() -> None:
    data = jpeg(photo(61, 97, 3))
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode(data, probe(data), 3), want)
    from importlib.metadata import version

    assert JPEG_DECODER == f"simplejpeg {version('simplejpeg')}"  # what ServerInfo.decoder reports


# -- layouts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [None, SIZE], ids=["full", "sized"])
def test_every_layout_holds_the_same_pixels(tmp_path: Path, size: DecodeSize | None) -> None:
    blobs = make_jpeg_folder(tmp_path)
    loaded = [load_dataset(f"d_{layout}", str(tmp_path), layout=layout, decode_size=size) for layout in LAYOUTS]
    try:
        assert [ds.layout for ds in loaded] == list(LAYOUTS)
        assert loaded[1].nbytes > loaded[2].nbytes  # files' bytes > paths
        assert size is not None or loaded[0].nbytes > loaded[1].nbytes  # full-size pixels > files' bytes
        ids = [5, 0, 3, 3, 1, 4, 2]
        results = [gather(ds, ids) for ds in loaded]
    finally:
        for ds in loaded:
            ds.close()
    for i, k in enumerate(ids):
        header = probe(blobs[k])
        want = decode(blobs[k], header, 3, dct_scale(header.height, header.width, size))
        for got in results:
            np.testing.assert_array_equal(got[i], want)
    if size is not None:  # the rule did scale some files
        assert {dct_scale(*SIZES[k], size) for k in ids} == {1, 2, 4}


def test_auto_layout_follows_the_cache_budget(tmp_path: Path) -> None:
    blobs = make_jpeg_folder(tmp_path)
    pixels = sum(h * w * 3 for h, w in SIZES)
    encoded = sum(len(b) for b in blobs)
    for budget, layout in [(pixels, "decoded"), (pixels - 1, "encoded"), (encoded, "encoded"),
                           (encoded - 1, "files"), (0, "files")]:
        with load_dataset("d", str(tmp_path), cache_budget_bytes=budget) as ds:
            assert ds.layout == layout, budget


def test_auto_layout_leaves_half_of_dev_shm_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A container's small /dev/shm (docker's default is 64 MB) caps the automatic choice as the
    cache budget does, at half its free space: before, a folder over it but under the budget
    chose "decoded" and the server refused to start."""
    import augsvc.datasets.dataset as dataset_module

    blobs = make_jpeg_folder(tmp_path)
    pixels = sum(h * w * 3 for h, w in SIZES)
    encoded = sum(len(b) for b in blobs)
    for free, layout in [(2 * pixels, "decoded"), (2 * pixels - 2, "encoded"), (2 * encoded - 2, "files"),
                         (None, "decoded")]:  # None: /dev/shm cannot be asked; the budget alone decides
        monkeypatch.setattr(dataset_module, "shm_free_bytes", lambda free=free: free)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="augsvc.datasets"), load_dataset("d", str(tmp_path)) as ds:
            assert ds.layout == layout, free
        assert (f"layout {layout}, not decoded, because /dev/shm has room for" in caplog.text) == (
            layout != "decoded"), free
    monkeypatch.setattr(dataset_module, "shm_free_bytes", lambda: 0)
    with load_dataset("d", str(tmp_path), layout="encoded") as ds:  # asked for by name: not capped
        assert ds.layout == "encoded"


def test_an_image_over_the_side_limit_is_a_bad_file_at_start(tmp_path: Path) -> None:
    """No request could read a file whose decoded side is over --max-image-side: it is a bad file
    at start (before, the server started and every epoch failed on it). --decode-size can bring a
    JPEG under the limit; pixel sources over it are refused."""
    make_jpeg_folder(tmp_path)  # sides up to 200
    with pytest.raises(InvalidInputError, match=r"2 of 6 files .*02\.jpg: its decoded side 200 is over "
                                                r"--max-image-side 128 \(raise it or decode JPEGs smaller "
                                                r"\(--decode-size d=shorter:N\)\)"):
        load_dataset("d", str(tmp_path), max_image_side=128)
    with load_dataset("d", str(tmp_path), max_image_side=128, on_bad_file="skip") as ds:
        assert ds.num_samples == 4 and max(max(x.shape[:2]) for x in gather(ds, [0, 1, 2, 3])) <= 128
    with load_dataset("d", str(tmp_path), max_image_side=128, decode_size="shorter:24") as ds:
        assert ds.num_samples == len(SIZES)  # each decodes at a DCT scale that brings it under 128
    with pytest.raises(InvalidInputError, match="its images are 32x32, over --max-image-side 16"):
        load_dataset("d", "builtin:digits", max_image_side=16)
    settings = ServerSettings(workers=1, datasets={"p": str(tmp_path)}, max_image_side=128)
    with pytest.raises(InvalidInputError, match="decoded side 200 is over --max-image-side 128"):
        create_server("127.0.0.1:0", settings)  # the server's limit reaches the loading


def test_pool_output_is_bit_identical_across_layouts_sizes_and_worker_counts(tmp_path: Path) -> None:
    make_jpeg_folder(tmp_path)
    names = {f"{layout}_{tag}": (layout, size) for layout in LAYOUTS for tag, size in [("full", None), ("sized", SIZE)]}
    outputs: dict[tuple[str, int], np.ndarray] = {}
    for workers in (1, 2):
        datasets = {name: load_dataset(name, str(tmp_path), layout=layout, decode_size=size)
                    for name, (layout, size) in names.items()}
        try:
            with WorkerPool(workers, datasets=datasets, max_batch_bytes=1 << 20) as pool:
                for name in names:
                    futures = [pool.submit_batch(name, ids, SPEC, seed=7, epoch=1) for ids in ([0, 1, 2], [3, 4, 5])]
                    outputs[name, workers] = np.concatenate([f.result(timeout=60)[0] for f in futures])
        finally:
            for ds in datasets.values():
                ds.close()
    for tag in ("full", "sized"):
        reference = outputs[f"decoded_{tag}", 1]
        for layout in LAYOUTS:
            for workers in (1, 2):
                np.testing.assert_array_equal(outputs[f"{layout}_{tag}", workers], reference)
    assert not np.array_equal(outputs["decoded_full", 1], outputs["decoded_sized", 1])  # the size is an input


def test_two_servers_with_different_layouts_and_workers_agree(tmp_path: Path) -> None:
    """Server 1 (1 worker) holds the folder as files, server 2 (2 workers) decoded, both with the
    declared size; each batch of an epoch is the same bytes from either, and what augment_batch
    makes of the decoded pixels."""
    blobs = make_jpeg_folder(tmp_path)
    first = ServerSettings(workers=1, datasets={"p": str(tmp_path)}, layouts={"p": "files"},
                           decode_sizes={"p": str(SIZE)})
    second = ServerSettings(workers=2, datasets={"p": str(tmp_path)}, layouts={"p": "decoded"},
                            decode_sizes={"p": str(SIZE)})
    spec = augment_spec = {"transforms": SPEC["transforms"]}
    request = pb.StreamBatchesRequest(dataset="p", spec=_pipeline(spec), batch_size=4, seed=3, epoch=2)
    with serve(first) as one, serve(second) as two:
        replies = [list(s.stub.StreamBatches(request, timeout=60)) for s in (one, two)]
        infos = [s.stub.ListDatasets(pb.ListDatasetsRequest(), timeout=30).datasets[0] for s in (one, two)]
    assert [(i.layout, i.decode_size, i.source) for i in infos] == [("files", "shorter:24", "folder"),
                                                                    ("decoded", "shorter:24", "folder")]
    assert [len(r) for r in replies] == [2, 2]
    for a, b in zip(*replies, strict=True):
        assert a == b
        ids = np.array(a.sample_ids)
        inputs = []
        for k in ids:
            header = probe(blobs[k])
            inputs.append(decode(blobs[k], header, 3, dct_scale(header.height, header.width, SIZE)))
        want = augment_batch(inputs, augment_spec, seed=3, epoch=2, sample_ids=ids)
        np.testing.assert_array_equal(np.frombuffer(a.images.data, np.uint8).reshape(want.shape), want)


def _pipeline(spec: dict[str, object]) -> pb.Pipeline:
    from augsvc.spec import load_spec

    return load_spec(spec).to_proto()


def test_eval_pipeline_over_a_jpeg_folder(tmp_path: Path) -> None:
    """resize_shorter + center_crop (the standard eval pipeline, scaled down) over the files and
    encoded layouts gives every image the same crop, equal to the decoded layout's."""
    make_jpeg_folder(tmp_path)
    datasets = {layout: load_dataset(layout, str(tmp_path), layout=layout) for layout in LAYOUTS}
    try:
        with WorkerPool(1, datasets=datasets, max_batch_bytes=1 << 20) as pool:
            out = {name: pool.submit_batch(name, list(range(6)), EVAL_SPEC, seed=0, epoch=0).result(timeout=60)[0]
                   for name in datasets}
    finally:
        for ds in datasets.values():
            ds.close()
    assert out["decoded"].shape == (6, 28, 28, 3)
    for layout in LAYOUTS:
        np.testing.assert_array_equal(out[layout], out["decoded"])


# -- manifests ----------------------------------------------------------------------------------

def test_csv_manifest_with_class_names_and_relative_paths(tmp_path: Path) -> None:
    blobs = make_jpeg_folder(tmp_path / "imgs")
    rows = ["path,label", "imgs/b/05.jpg,dog", "imgs/a/00.jpg,cat", f"{tmp_path}/imgs/a/01.jpg,dog"]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    with load_dataset("t", str(tmp_path / "train.csv"), layout="files") as ds:
        assert (ds.kind, ds.num_samples, ds.class_names, ds.labels.tolist()) == ("manifest", 3, ["cat", "dog"],
                                                                               [1, 0, 1])
        got = gather(ds, [0, 1, 2])
    for g, k in zip(got, [5, 0, 1], strict=True):
        np.testing.assert_array_equal(g, decode(blobs[k], probe(blobs[k]), 3))


def test_jsonl_manifest_with_integer_labels(tmp_path: Path) -> None:
    make_jpeg_folder(tmp_path)
    lines = [json.dumps({"path": "a/00.jpg", "label": 2}), "", json.dumps({"path": "b/04.jpg", "label": 0})]
    (tmp_path / "val.jsonl").write_text("\n".join(lines))
    with load_dataset("v", str(tmp_path / "val.jsonl")) as ds:
        assert (ds.num_samples, ds.class_names, ds.labels.tolist()) == (2, ["0", "1", "2"], [2, 0])


@pytest.mark.parametrize("name, text, fragment", [
    ("m.csv", "a.jpg\n", r"line 1: expected path,label"),
    ("m.csv", "path,label\n", "lists no files"),
    ("m.jsonl", '{"path": "a.jpg"}\n', r"line 1: expected \{"),
    ("m.jsonl", "[1, 2]\n", "line 1: expected"),
    ("m.jsonl", "{not json\n", "line 1: not a JSON object"),
])
def test_bad_manifests(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(InvalidInputError, match=fragment):
        load_dataset("m", str(tmp_path / name))


# -- bad files ----------------------------------------------------------------------------------

def _unreadable(tmp_path: Path) -> dict[str, Path]:
    """Files whose header cannot be read, one of each kind, in class "z"."""
    z = tmp_path / "z"
    z.mkdir()
    files = {"empty": z / "0.jpg", "text": z / "1.jpg", "gif": z / "2.jpg", "header_only": z / "3.png"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("not an image")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    files["gif"].write_bytes(gif.getvalue())
    files["header_only"].write_bytes(b"\x89PNG\r\n\x1a\n")
    return files


def test_on_bad_file_fail_lists_every_offender(tmp_path: Path) -> None:
    make_jpeg_folder(tmp_path)
    bad = _unreadable(tmp_path)
    with pytest.raises(InvalidInputError) as info:
        load_dataset("d", str(tmp_path))
    message = str(info.value)
    assert "4 of 10 files are not readable PNG/JPEG images" in message
    for path in bad.values():
        assert str(path) in message
    for why in ("the file is empty", "not a PNG/JPEG image", "not a readable PNG header"):
        assert why in message


@pytest.mark.parametrize("layout", LAYOUTS)
def test_on_bad_file_skip_numbers_the_good_files(tmp_path: Path, layout: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    blobs = make_jpeg_folder(tmp_path)
    _unreadable(tmp_path)
    with caplog.at_level(logging.WARNING, logger="augsvc.datasets"), \
            load_dataset("d", str(tmp_path), on_bad_file="skip", layout=layout) as ds:
        assert ds.num_samples == 6 and ds.class_names == ["a", "b", "z"] and ds.labels.tolist() == [0] * 3 + [1] * 3
        got = gather(ds, [5])
    assert "left out 4 of 10 files" in caplog.text
    np.testing.assert_array_equal(got[0], decode(blobs[5], probe(blobs[5]), 3))


def test_a_jpeg_claiming_too_many_pixels_is_a_bad_file(tmp_path: Path) -> None:
    """A header edited to claim 40000 x 40000: refused from its header, as a PNG bomb is (before,
    each decode filled a 4.8 GB buffer and took seconds before finding the data short)."""
    import struct

    from augsvc.datasets.decode import TooManyPixels, decode_images
    from augsvc.errors import LimitExceededError

    make_jpeg_folder(tmp_path)
    data = bytearray(jpeg(photo(64, 64, 0)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 40000, 40000)
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "big.jpg").write_bytes(bytes(data))
    with pytest.raises(TooManyPixels):
        probe(bytes(data))
    assert probe(jpeg(photo(64, 64, 0))).height == 64
    with pytest.raises(InvalidInputError, match=r"big\.jpg.*the image has too many pixels"):
        load_dataset("d", str(tmp_path))
    with load_dataset("d", str(tmp_path), on_bad_file="skip") as ds:
        assert ds.num_samples == len(SIZES) and ds.class_names == ["a", "b", "z"]  # z keeps its name, no files
    with pytest.raises(LimitExceededError, match=r"encoded_images\[0\]: the image has too many pixels"):
        decode_images([bytes(data)])


def test_a_class_folder_named_in_another_encoding(tmp_path: Path) -> None:
    """A class folder whose name is not UTF-8 (Latin-1 "café") is published with the odd byte as
    \\xe9 (class names are protobuf strings; before, ListDatasets failed for every dataset of
    the server); two names that would become one are refused at start."""
    make_jpeg_folder(tmp_path)
    latin = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(latin)
    with open(os.path.join(latin, b"x.jpg"), "wb") as f:
        f.write(jpeg(photo(30, 30, 5)))
    with load_dataset("d", str(tmp_path)) as ds:
        assert ds.class_names == ["a", "b", "caf\\xe9"] and ds.num_samples == len(SIZES) + 1
    settings = ServerSettings(workers=1, datasets={"p": str(tmp_path), "digits": "builtin:digits"})
    with serve(settings) as s:
        listed = s.stub.ListDatasets(pb.ListDatasetsRequest(), timeout=30)
        assert {d.name: list(d.class_names) for d in listed.datasets}["p"] == ["a", "b", "caf\\xe9"]
    (tmp_path / "caf\\xe9").mkdir()
    (tmp_path / "caf\\xe9" / "y.jpg").write_bytes(jpeg(photo(30, 30, 6)))
    with pytest.raises(InvalidInputError, match=r"class names \['caf\\\\xe9'\] are each two classes"):
        load_dataset("d", str(tmp_path))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_truncated_jpeg_names_the_sample_not_the_path(tmp_path: Path, layout: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    make_jpeg_folder(tmp_path)
    _truncate(tmp_path / "b" / "04.jpg")
    with caplog.at_level(logging.WARNING, logger="augsvc.datasets"), \
            load_dataset("pets", str(tmp_path), layout=layout) as ds:  # the header reads: not found at start
        reader = attach(ds.handle())
        try:
            assert len(reader.gather([0, 5])) == 2
            with pytest.raises(BadSampleError, match="sample 4 of dataset 'pets': corrupt or truncated") as info:
                reader.gather([3, 4])
        finally:
            reader.close()
    assert str(tmp_path) not in str(info.value)
    assert isinstance(info.value, InvalidInputError)
    assert f"sample 4 ({tmp_path / 'b' / '04.jpg'})" in caplog.text  # the log has the path


def test_verify_finds_truncated_files_at_start(tmp_path: Path) -> None:
    make_jpeg_folder(tmp_path)
    _truncate(tmp_path / "b" / "04.jpg")
    with pytest.raises(InvalidInputError, match=r"1 of 6 files .*04.jpg: corrupt or truncated JPEG data"):
        load_dataset("d", str(tmp_path), verify=True)
    for layout in LAYOUTS:  # skip: the same good files in every layout
        with load_dataset("d", str(tmp_path), verify=True, on_bad_file="skip", layout=layout) as ds:
            assert ds.num_samples == 5


def test_truncated_sample_is_invalid_argument_counted_by_the_server(tmp_path: Path) -> None:
    make_jpeg_folder(tmp_path)
    _truncate(tmp_path / "a" / "01.jpg")
    settings = ServerSettings(workers=1, datasets={"p": str(tmp_path)}, layouts={"p": "encoded"})
    request = pb.StreamBatchesRequest(dataset="p", spec=_pipeline(SPEC), batch_size=3, seed=0, epoch=0,
                                      shuffle=False)
    with serve(settings) as s:
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as info:
                list(s.stub.StreamBatches(request, timeout=60))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "sample 1 of dataset 'p'" in info.value.details() and str(tmp_path) not in info.value.details()
        ok = list(s.stub.StreamBatches(pb.StreamBatchesRequest(
            dataset="p", spec=_pipeline(SPEC), batch_size=3, seed=0, epoch=0, shuffle=False, start=1), timeout=60))
        count = s.server.metrics.registry.get_sample_value("augsvc_bad_samples_total")
    assert len(ok) == 1 and count == 2


def test_the_file_changed_since_loading(tmp_path: Path) -> None:
    """The files layout reads a file per request: one replaced, edited in place or removed since
    the start has its sample refused — also when the new image has the old one's size (before,
    its new pixels were served silently)."""
    make_jpeg_folder(tmp_path)
    with load_dataset("d", str(tmp_path), layout="files") as ds:
        (tmp_path / "a" / "00.jpg").write_bytes(jpeg(photo(33, 44, 9)))
        with pytest.raises(BadSampleError, match="sample 0 of dataset 'd': the file changed since"):
            gather(ds, [0])
        same_size = tmp_path / "b" / "03.jpg"
        old = same_size.read_bytes()
        new = jpeg(photo(*SIZES[3], 99))
        assert (probe(new).height, probe(new).width) == (probe(old).height, probe(old).width) != (0, 0)
        assert len(new) != len(old)
        same_size.write_bytes(new)
        with pytest.raises(BadSampleError, match=rf"sample 3 of dataset 'd': the file changed since the dataset "
                                                 rf"was loaded \({len(new)} bytes, it was {len(old)}\)"):
            gather(ds, [3])
        edited = tmp_path / "b" / "04.jpg"  # the same length, other bytes: only the time tells
        data = bytearray(edited.read_bytes())
        data[-3] ^= 1
        before = edited.stat().st_mtime_ns
        edited.write_bytes(bytes(data))
        os.utime(edited, ns=(before + 10**9, before + 10**9))
        with pytest.raises(BadSampleError, match=r"sample 4 of dataset 'd': the file changed since the dataset "
                                                 r"was loaded \(modified since\)"):
            gather(ds, [4])
        os.remove(tmp_path / "a" / "01.jpg")
        with pytest.raises(BadSampleError, match="sample 1 of dataset 'd': the file cannot be read"):
            gather(ds, [1])
        assert len(gather(ds, [2, 5])) == 2  # the others are served as before


def _odd_images() -> dict[str, tuple[bytes, np.ndarray]]:
    """Decodable oddities and the pixels the policy gives them (RGB unless gray)."""
    rgb = photo(20, 30, 1)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    out: dict[str, tuple[bytes, np.ndarray]] = {}
    cmyk = jpeg(Image.fromarray(rgb).convert("CMYK"))
    out["cmyk_jpeg"] = cmyk, np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB"))  # checked within 1 level
    g16 = gray.astype(np.uint16) * 257 + 3
    out["png_16bit_gray"] = png(Image.fromarray(g16)), gray[..., None]
    ok, enc = cv2.imencode(".png", (rgb[..., ::-1].astype(np.uint16) * 257))
    out["png_16bit_rgb"] = enc.tobytes(), rgb
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out["png_palette"] = png(pal), np.asarray(pal.convert("RGB"))
    out["png_rgba"] = png(Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]))), rgb
    out["png_gray_alpha"] = png(Image.fromarray(np.dstack([gray, gray // 2])).convert("LA")), gray[..., None]
    out["jpeg_gray"] = jpeg(gray), np.asarray(Image.open(io.BytesIO(jpeg(gray))))[..., None]
    return out


@pytest.mark.parametrize("kind", sorted(_odd_images()))
def test_decodable_oddities_are_converted(tmp_path: Path, kind: str) -> None:
    data, want = _odd_images()[kind]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "img").with_suffix(".png" if kind.startswith("png") else ".jpg").write_bytes(data)
    for layout in LAYOUTS:
        with load_dataset("d", str(tmp_path), layout=layout) as ds:
            got = gather(ds, [0])[0]
        assert got.shape == want.shape and ds.channels == want.shape[2]
        tolerance = 1 if kind == "cmyk_jpeg" else 0
        assert np.abs(got.astype(np.int16) - want).max() <= tolerance, layout


def test_gray_files_become_rgb_beside_colour_ones(tmp_path: Path) -> None:
    data, gray = _odd_images()["jpeg_gray"]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.jpg").write_bytes(data)
    (tmp_path / "a" / "1.jpg").write_bytes(jpeg(photo(20, 30, 1)))
    with load_dataset("d", str(tmp_path)) as ds:
        assert ds.channels == 3
        np.testing.assert_array_equal(gather(ds, [0])[0], np.repeat(gray, 3, axis=2))


def test_decode_images_refuses_corrupt_requests() -> None:
    data = jpeg(photo(20, 30, 1))
    assert decode_images([data])[0].shape == (20, 30, 3)
    with pytest.raises(InvalidInputError, match=r"encoded_images\[0\]: not a decodable"):
        decode_images([data[:len(data) // 2]])
    with pytest.raises(DecodeFailed, match="the file is empty"):
        probe(b"")


@pytest.mark.parametrize("kind", ["photo", *sorted(_odd_images())])
def test_decoding_into_rgbx_gives_the_rgb_bytes(kind: str) -> None:
    data = jpeg(photo(37, 53, 2)) if kind == "photo" else _odd_images()[kind][0]
    header = probe(data)
    want = decode(data, header, 3)
    buffer = np.full((header.height, header.width, 4), 9, np.uint8)
    got = decode(data, header, 3, 1, buffer)
    assert got.shape == want.shape and got.strides == (4 * header.width, 4, 1) and np.shares_memory(got, buffer)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", ["encoded", "files"])
@pytest.mark.parametrize("sizes", [SIZES, [(40, 52)] * 4], ids=["mixed", "one_shape"])
def test_gather_without_copy_decodes_into_one_reused_buffer(tmp_path: Path, layout: str,
                                                            sizes: list[tuple[int, int]]) -> None:
    make_jpeg_folder(tmp_path, sizes)
    with load_dataset("d", str(tmp_path), layout=layout) as ds:
        reader = attach(ds.handle())
        try:
            ids = np.array([3, 0, 2, 1])
            want = [im.copy() for im in reader.gather(ids)]
            first = reader.gather(ids, copy=False)
            assert all(not im.flags.writeable for im in first)
            for got, expected in zip(first, want, strict=True):
                np.testing.assert_array_equal(got, expected)
            second = reader.gather(ids[::-1], copy=False)  # the same memory, now the other images
            assert np.shares_memory(first[0], second[0])
            for got, expected in zip(second, want[::-1], strict=True):
                np.testing.assert_array_equal(got, expected)
        finally:
            reader.close()


def test_workers_give_every_layout_the_same_bytes_at_rgba_warp_sizes(tmp_path: Path) -> None:
    # Outputs of 48x48 and more are warped as RGBA: the encoded and files layouts then hand the
    # warp RGBX pixels as decoded (no conversion), the decoded layout RGB converted to RGBA.
    make_jpeg_folder(tmp_path)
    big = {"transforms": [{"random_resized_crop": {"height": 64, "width": 56}}, {"hflip": {"p": 0.5}},
                          {"color": {"brightness": 0.2, "saturation": 0.2, "hue": 0.1, "p": 1.0}}]}
    datasets = {layout: load_dataset(layout, str(tmp_path), layout=layout) for layout in LAYOUTS}
    try:
        with WorkerPool(2, datasets=datasets, max_batch_bytes=1 << 20) as pool:
            futures = {layout: [pool.submit_batch(layout, ids, big, seed=3, epoch=2) for ids in ([5, 1, 0], [2, 4, 3])]
                       for layout in LAYOUTS}
            outputs = {layout: np.concatenate([f.result(timeout=60)[0] for f in fs]) for layout, fs in futures.items()}
        pixels = gather(datasets["decoded"], [5, 1, 0, 2, 4, 3])
    finally:
        for ds in datasets.values():
            ds.close()
    want = augment_batch(pixels, big, seed=3, epoch=2, sample_ids=[5, 1, 0, 2, 4, 3])
    for layout in LAYOUTS:
        np.testing.assert_array_equal(outputs[layout], want, err_msg=layout)


@pytest.mark.parametrize("layout", ["encoded", "files"])
def test_gather_without_copy_of_gray_files_of_mixed_sizes(tmp_path: Path, layout: str) -> None:
    # A dataset whose every image is gray decodes to one channel: its images share the reader's
    # buffer as (H, W, 1), with no RGBX padding.
    (tmp_path / "a").mkdir()
    for i, (h, w) in enumerate([(20, 30), (33, 17), (40, 41)]):
        (tmp_path / "a" / f"{i}.jpg").write_bytes(jpeg(cv2.cvtColor(photo(h, w, i), cv2.COLOR_RGB2GRAY)))
    with load_dataset("g", str(tmp_path), layout=layout) as ds:
        reader = attach(ds.handle())
        try:
            want = [im.copy() for im in reader.gather([2, 0, 1])]
            got = reader.gather([2, 0, 1], copy=False)
            assert ds.channels == 1 and [im.shape for im in got] == [(40, 41, 1), (20, 30, 1), (33, 17, 1)]
            assert all(im.flags.c_contiguous for im in got) and len({id(im.base) for im in got}) == 1  # one buffer
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b)
        finally:
            reader.close()
