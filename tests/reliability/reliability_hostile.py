"""Hypothesis strategies for hostile augsvc requests, built as raw protos (load_spec bypassed).

Most values are plausible, so that many requests reach the workers and their answers can be
checked; the rest are hostile: wrong shapes and dtypes, size/shape mismatches, zero and huge
dimensions, truncated and corrupt PNG/JPEG (baseline, progressive and lossless JPEG), NaN and
out-of-bound spec values (drawn from the `bounds` options of the proto, so new fields are fuzzed
too), enormous batch ranges and sizes, unknown datasets, long strings, many sample ids, and
well-formed protobuf wire data with arbitrary fields.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from typing import Any

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from helpers.jpeg import lossless_jpeg
from hypothesis import strategies as st
from PIL import Image

from augsvc.spec import Spec
from augsvc.v1 import augment_pb2 as pb

#: The fuzz server's max_image_side: sides up to a little over it are drawn.
MAX_SIDE = 64
NUM_DIGITS = 1797
U64 = 2**64 - 1
I64 = 2**63 - 1
#: RPC name -> kind, for the raw (identity-serializer) calls.
METHODS = {
    "Augment": "unary_unary",
    "AugmentStream": "stream_stream",
    "StreamBatches": "unary_stream",
    "ListDatasets": "unary_unary",
    "GetServerInfo": "unary_unary",
}

#: A valid spec for the calls that must succeed.
GOOD_SPEC = Spec.from_dict(
    {
        "transforms": [
            {"hflip": {"p": 0.5}},
            {"rotate": {"limit_range": [-20, 20]}},
            {"color": {"brightness": 0.3, "contrast": 0.3, "p": 0.8}},
        ],
        "border": "constant",
    }
)


def tensor(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(data=array.tobytes(), shape=list(array.shape), dtype=str(array.dtype))


def to_array(msg: pb.Tensor) -> np.ndarray:
    """The pixels of a reply, after checking that its shape and byte count agree."""
    assert msg.dtype == "uint8", msg.dtype
    shape = tuple(msg.shape)
    assert len(msg.data) == math.prod(shape), (len(msg.data), shape)
    return np.frombuffer(msg.data, np.uint8).reshape(shape)


def text(max_size: int = 40) -> st.SearchStrategy[str]:
    return st.text(max_size=max_size)


def long_text() -> st.SearchStrategy[str]:
    return st.integers(200, 5000).map(lambda n: "x" * n)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries (almost) no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def encode(array: np.ndarray, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _blobs() -> list[bytes]:
    rng = np.random.default_rng(1)
    out = []
    for h, w, c in [(8, 8, 1), (16, 12, 3), (1, 1, 3), (64, 64, 3), (33, 7, 1)]:
        img = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        out += [encode(img, "PNG"), encode(img, "JPEG", quality=80), lossless_jpeg(img[..., 0] if c == 1 else img)]
    out.append(encode(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8), "JPEG", quality=80, progressive=True))
    rgba = Image.fromarray(rng.integers(0, 256, (6, 6, 4), dtype=np.uint8), "RGBA")
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    out.append(buf.getvalue())
    pal = Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    out.append(buf.getvalue())
    gif = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(gif, format="GIF")
    out += [
        gif.getvalue(),
        png_header(65, 8),
        png_header(2**31 - 1, 2**31 - 1),
        png_header(0, 0),
        png_header(20000, 20000),
        b"",
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff\xe0",
        b"BM" + bytes(60),
    ]
    return out


BLOBS = _blobs()


@st.composite
def encoded_blob(draw: st.DrawFn) -> bytes:
    blob = bytearray(draw(st.sampled_from(BLOBS)))
    how = draw(st.sampled_from(["as_is", "as_is", "truncate", "flip", "random"]))
    if how == "truncate" and blob:
        del blob[draw(st.integers(0, len(blob) - 1)) :]
    elif how == "flip" and blob:
        for _ in range(draw(st.integers(1, 8))):
            blob[draw(st.integers(0, len(blob) - 1))] ^= draw(st.integers(1, 255))
    elif how == "random":
        blob = bytearray(draw(st.binary(max_size=200)))
    return bytes(blob)


def dim() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(-3, 70),
        st.sampled_from([0, 1, 64, 65, 4096, 2**31, 2**40, I64, -I64 - 1]),
        st.integers(-I64 - 1, I64),
    )


def often(p: float, yes: st.SearchStrategy[Any], no: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`yes` with probability about p (in tenths), else `no`."""
    tenths = round(p * 10)
    return st.integers(0, 9).flatmap(lambda i: yes if i < tenths else no)


@st.composite
def tensors(draw: st.DrawFn) -> tuple[pb.Tensor, int | None]:
    """A Tensor message, and its image count when it is (nearly) well-formed."""
    mode = draw(st.sampled_from(["valid"] * 6 + ["off_by", "off_by", "wild", "wild"]))
    dtype = draw(
        often(
            0.85,
            st.just("uint8"),
            st.one_of(
                st.sampled_from(
                    ["", "float32", "int8", "uint16", "UINT8", "uint8 ", "u1", "|u1", "bool", "object"]
                ),
                text(12),
            ),
        )
    )
    if mode == "wild":
        shape = draw(st.lists(dim(), max_size=7))
        data = draw(st.binary(max_size=256))
        return pb.Tensor(data=data, shape=shape, dtype=dtype), None
    n = draw(often(0.9, st.integers(1, 4), st.just(0)))
    h, w = (draw(often(0.9, st.integers(1, MAX_SIDE), st.integers(MAX_SIDE + 1, MAX_SIDE + 2))) for _ in "hw")
    c = draw(often(0.9, st.sampled_from([1, 3]), st.sampled_from([0, 2, 4])))
    array = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(
        0, 256, (n, h, w, c), dtype=np.uint8
    )
    data = array.tobytes()
    if mode == "off_by":
        delta = draw(st.sampled_from([-1, 1, -len(data), 7]))
        data = data[: max(0, len(data) + delta)] if delta < 0 else data + bytes(delta)
        return pb.Tensor(data=data, shape=[n, h, w, c], dtype=dtype), n
    return pb.Tensor(data=data, shape=[n, h, w, c], dtype=dtype), n


def hostile_number(field: FieldDescriptor) -> st.SearchStrategy[float | int]:
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(
            st.floats(-2, 2),
            st.floats(-400, 400),
            st.floats(allow_nan=True, allow_infinity=True),
            st.sampled_from(
                [
                    math.nan,
                    math.inf,
                    -math.inf,
                    0.0,
                    -0.0,
                    1e308,
                    -1e308,
                    5e-324,
                    0.05,
                    20.0,
                    0.5,
                    1.0,
                    180.0,
                    -180.0,
                    255.0,
                    256.0,
                ]
            ),
        )
    return st.one_of(
        st.integers(0, 70), st.sampled_from([0, 1, 16, 17, 4096, 4097, 2**32 - 1]), st.integers(0, 2**32 - 1)
    )


def plausible_number(field: FieldDescriptor, b: pb.Bounds) -> st.SearchStrategy[float | int]:
    """Within the field's bounds (output sides up to a little over the server's MAX_SIDE)."""
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        low = math.nextafter(b.min, math.inf) if b.exclusive_min else b.min
        return st.floats(low, b.max, allow_nan=False)
    high = min(int(b.max), MAX_SIDE + 4) if field.name in ("height", "width") else int(b.max)
    return st.integers(max(int(b.min), 1 if b.exclusive_min else 0), high)


@st.composite
def transform_params(draw: st.DrawFn, desc: Descriptor, hostile: bool) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for f in desc.fields:
        b = f.GetOptions().Extensions[pb.bounds]
        if not b.required and draw(st.booleans()):
            continue
        if hostile:
            params[f.name] = (
                draw(st.lists(hostile_number(f), max_size=4)) if f.is_repeated else draw(hostile_number(f))
            )
        elif f.is_repeated:
            params[f.name] = sorted(
                draw(st.lists(plausible_number(f, b), min_size=b.length or 2, max_size=b.length or 2))
            )
        else:
            params[f.name] = draw(plausible_number(f, b))
    return params


TRANSFORMS = {f.name: f.message_type for f in pb.Transform.DESCRIPTOR.oneofs_by_name["op"].fields}


@st.composite
def pipelines(draw: st.DrawFn) -> pb.Pipeline:
    """Raw Pipeline protos, bypassing load_spec: two thirds within bounds, a third hostile (out of
    bounds, NaN and infinities, wrong lengths, unknown borders, empty steps)."""
    hostile = draw(st.integers(0, 2)) == 0
    msg = pb.Pipeline()
    for _ in range(draw(st.integers(0, 3))):
        step = msg.transforms.add()
        name = draw(st.sampled_from([*TRANSFORMS, None] if hostile else list(TRANSFORMS)))
        if name is None:
            continue  # an empty Transform (no oneof set)
        sub = getattr(step, name)
        sub.SetInParent()
        for key, value in draw(transform_params(TRANSFORMS[name], hostile)).items():
            if isinstance(value, list):
                getattr(sub, key).extend(value)
            else:
                setattr(sub, key, value)
    if draw(st.booleans()):
        choices = st.sampled_from(["reflect_101", "constant", "replicate"])
        msg.border = draw(st.one_of(choices, st.just("wrap"), text(30)) if hostile else choices)
    if draw(st.booleans()):
        fill = pb.Pipeline.DESCRIPTOR.fields_by_name["fill"]
        msg.fill = draw(hostile_number(fill) if hostile else st.floats(0, 255))
    return msg


def sample_id_lists(count: int | None) -> st.SearchStrategy[list[int]]:
    plausible = st.lists(st.integers(0, NUM_DIGITS - 1), min_size=count or 0, max_size=count or 8)
    hostile = st.one_of(
        st.lists(st.integers(0, U64), max_size=8),
        st.lists(st.integers(NUM_DIGITS - 2, NUM_DIGITS + 2), min_size=1, max_size=8),
        st.integers(1000, 20000).map(lambda n: [i % NUM_DIGITS for i in range(n)]),
    )
    return often(0.8, plausible, hostile)


def backends() -> st.SearchStrategy[str]:
    return often(
        0.8,
        st.sampled_from(["", "fused", "albumentations"]),
        st.one_of(st.sampled_from(["torch", "FUSED", "/etc/passwd"]), text(20), long_text()),
    )


@st.composite
def augment_requests(draw: st.DrawFn) -> pb.AugmentRequest:
    msg = pb.AugmentRequest(
        spec=draw(pipelines()),
        seed=draw(st.integers(0, U64)),
        epoch=draw(st.integers(0, U64)),
        backend=draw(backends()),
        tag=draw(st.integers(-I64 - 1, I64)),
    )
    count: int | None
    if draw(st.integers(0, 3)) == 0:
        msg.encoded_images.extend(draw(st.lists(encoded_blob(), max_size=4)))
        if draw(st.integers(0, 4)) == 0:
            msg.images.CopyFrom(draw(tensors())[0])
        count = len(msg.encoded_images)
    else:
        t, count = draw(tensors())
        msg.images.CopyFrom(t)
    msg.sample_ids.extend(
        draw(
            often(
                0.8,
                st.lists(st.integers(0, U64), min_size=count or 0, max_size=count or 0),
                sample_id_lists(count),
            )
        )
    )
    return msg


@st.composite
def stream_requests(draw: st.DrawFn) -> pb.StreamBatchesRequest:
    msg = pb.StreamBatchesRequest(
        dataset=draw(
            often(
                0.8,
                st.just("digits"),
                st.one_of(
                    st.sampled_from(
                        ["", "nope", "DIGITS", "digits ", "/etc/passwd", "../digits", "digits\x00"]
                    ),
                    text(30),
                    long_text(),
                ),
            )
        ),
        spec=draw(pipelines()),
        seed=draw(st.integers(0, U64)),
        epoch=draw(st.integers(0, U64)),
        batch_size=draw(
            often(
                0.8,
                st.integers(1, 256),
                st.one_of(st.sampled_from([0, 1797, 1798, 2**32 - 1]), st.integers(0, 2**32 - 1)),
            )
        ),
        drop_last=draw(st.booleans()),
        start=draw(often(0.8, st.integers(0, 8), st.integers(0, U64))),
        stride=draw(often(0.8, st.integers(0, 3), st.integers(0, U64))),
        backend=draw(backends()),
    )
    if draw(st.booleans()):
        msg.shuffle = draw(st.booleans())
    if draw(st.booleans()):
        msg.end = draw(often(0.8, st.integers(0, 30), st.integers(0, U64)))
    if draw(st.integers(0, 2)) == 0:
        msg.sample_ids.extend(draw(sample_id_lists(None)))
    return msg


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def wire_garbage(draw: st.DrawFn) -> bytes:
    """Well-formed protobuf wire data with arbitrary field numbers and types (unknown fields)."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        number_, kind = draw(st.integers(1, 2**29 - 1)), draw(st.sampled_from([0, 1, 2, 5]))
        if 19000 <= number_ <= 19999:
            number_ = 1  # reserved numbers do not parse
        out += _varint(number_ << 3 | kind)
        if kind == 0:
            out += _varint(draw(st.integers(0, U64)))
        elif kind == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif kind == 5:
            out += draw(st.binary(min_size=4, max_size=4))
        else:
            payload = draw(st.binary(max_size=64))
            out += _varint(len(payload)) + payload
    return bytes(out)


@st.composite
def raw_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(sorted(METHODS)))
    how = draw(st.sampled_from(["random", "mutated", "truncated", "wire"]))
    if how == "random":
        return method, draw(st.binary(max_size=300))
    if how == "wire":
        return method, draw(wire_garbage())
    valid = {
        "Augment": lambda: draw(augment_requests()),
        "AugmentStream": lambda: draw(augment_requests()),
        "StreamBatches": lambda: draw(stream_requests()),
        "ListDatasets": pb.ListDatasetsRequest,
        "GetServerInfo": pb.ServerInfoRequest,
    }[method]().SerializeToString()
    body = bytearray(valid)
    if how == "truncated" and body:
        del body[draw(st.integers(0, len(body) - 1)) :]
    elif body:
        for _ in range(draw(st.integers(1, 6))):
            body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
    return method, bytes(body)
