"""The augmentation spec: one schema (the `Pipeline` proto message) for files, dicts and the wire.

A spec is written as YAML, JSON or a Python dict::

    transforms:
      - hflip: {p: 0.5}
      - rotate: {limit_range: [-15, 15], p: 1.0}
      - scale: {scale_range: [0.9, 1.1]}
      - color: {brightness: 0.2, contrast: 0.2, saturation: 0.2, hue: 0.05, p: 0.8}
      - resize: {height: 32, width: 32}

The structure, types and bounds come from `protos/augsvc/v1/augment.proto` (the `bounds` field
option); this module walks the message descriptors, so there is no second hand-kept copy.
Every problem raises `SpecError` whose message starts with the path, e.g.
``transforms[0].rotate.limit_range: 400 is outside [-180, 180]``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from .errors import SpecError
from .v1 import augment_pb2 as pb

__all__ = ["Spec", "load_spec", "TRANSFORM_NAMES"]

_TRANSFORM_ONEOF = pb.Transform.DESCRIPTOR.oneofs_by_name["op"]
#: Transform names (spec keys) in the order of the proto's oneof.
TRANSFORM_NAMES: tuple[str, ...] = tuple(f.name for f in _TRANSFORM_ONEOF.fields)

_DEFAULT_BORDER = "reflect_101"
#: Most steps a spec may hold: each step costs a pass over the batch, and a running job cannot be
#: cancelled, so an unbounded list would let a few KB of request hold a worker for minutes.
MAX_STEPS = 64
_INT_TYPES = {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_INT32,
              FieldDescriptor.TYPE_INT64}
_FLOAT_TYPES = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


def _bounds(field: FieldDescriptor) -> pb.Bounds | None:
    options = field.GetOptions()
    if options.HasExtension(pb.bounds):
        return options.Extensions[pb.bounds]  # type: ignore[no-any-return]
    return None


def _allowed(b: pb.Bounds) -> str:
    lo = ("(" if b.exclusive_min else "[") + _fmt(b.min)
    return f"{lo}, {_fmt(b.max)}]"


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


# ---------------------------------------------------------------------------------------------
# dict -> message: structure and types
# ---------------------------------------------------------------------------------------------

def _scalar(value: Any, field: FieldDescriptor, path: str) -> Any:
    if field.type in _FLOAT_TYPES:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise SpecError(f"{path}: {value!r} is not a finite number")
        return float(value)
    if field.type in _INT_TYPES:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        if value < 0 or value >= 2**32:
            b = _bounds(field)
            allowed = _allowed(b) if b else "[0, 4294967295]"
            raise SpecError(f"{path}: {value} is outside {allowed}")
        return value
    if field.type == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise SpecError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if field.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise SpecError(f"{path}: expected true or false, got {value!r}")
        return value
    raise SpecError(f"{path}: unsupported field type")  # pragma: no cover - schema has none


def _fill_message(msg: Message, data: Any, path: str) -> None:
    desc: Descriptor = msg.DESCRIPTOR
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        where = path or "spec"
        raise SpecError(f"{where}: expected a mapping of keys {sorted(desc.fields_by_name)}, "
                        f"got {type(data).__name__} {data!r}")
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        field = desc.fields_by_name.get(key) if isinstance(key, str) else None
        if field is None:
            raise SpecError(f"{sub}: unknown key; allowed keys: {', '.join(sorted(desc.fields_by_name))}")
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if _is_repeated(field):
                if not isinstance(value, (list, tuple)):
                    raise SpecError(f"{sub}: expected a list, got {type(value).__name__} {value!r}")
                container = getattr(msg, key)
                for i, item in enumerate(value):
                    child = container.add()
                    if field.message_type is pb.Transform.DESCRIPTOR:
                        _fill_transform(child, item, f"{sub}[{i}]")
                    else:  # pragma: no cover - the schema has no other repeated message
                        _fill_message(child, item, f"{sub}[{i}]")
            else:
                _fill_message(getattr(msg, key), value, sub)
                getattr(msg, key).SetInParent()
        elif _is_repeated(field):
            if not isinstance(value, (list, tuple)):
                b = _bounds(field)
                want = f"a list of {b.length} numbers" if b and b.length else "a list"
                raise SpecError(f"{sub}: expected {want}, got {type(value).__name__} {value!r}")
            getattr(msg, key).extend(_scalar(v, field, f"{sub}[{i}]") for i, v in enumerate(value))
        else:
            setattr(msg, key, _scalar(value, field, sub))


def _fill_transform(msg: pb.Transform, item: Any, path: str) -> None:
    names = ", ".join(TRANSFORM_NAMES)
    if isinstance(item, str):  # "- hflip" is shorthand for "- hflip: {}"
        item = {item: None}
    if not isinstance(item, Mapping) or len(item) != 1:
        raise SpecError(f"{path}: expected one transform written as {{name: {{params}}}}; names: {names}")
    ((name, params),) = item.items()
    if name not in TRANSFORM_NAMES:
        raise SpecError(f"{path}: unknown transform {name!r}; allowed: {names}")
    child = getattr(msg, name)
    _fill_message(child, params, f"{path}.{name}")
    child.SetInParent()


# ---------------------------------------------------------------------------------------------
# bounds, required fields and defaults (shared by dicts and wire messages)
# ---------------------------------------------------------------------------------------------

def _check_value(x: float, b: pb.Bounds, path: str) -> None:
    if not math.isfinite(x):
        raise SpecError(f"{path}: {x!r} is not a finite number")
    too_low = x <= b.min if b.exclusive_min else x < b.min
    if too_low or x > b.max:
        raise SpecError(f"{path}: {_fmt(x)} is outside {_allowed(b)}")


def _check_field(msg: Message, field: FieldDescriptor, b: pb.Bounds, path: str) -> None:
    name = field.name
    if _is_repeated(field):
        values = list(getattr(msg, name))
        if not values:
            if b.required:
                raise SpecError(f"{path}: required; expected [low, high] within {_allowed(b)}")
            if b.default_range:
                cast = int if field.type in _INT_TYPES else float
                getattr(msg, name).extend(cast(v) for v in b.default_range)
            return
        if b.length and len(values) != b.length:
            raise SpecError(f"{path}: expected {b.length} numbers [low, high], got {len(values)}")
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise SpecError(f"{path}[{i}]: {v!r} is not a finite number")
            _check_value(v, b, path)
        if b.ordered and any(a > c for a, c in zip(values, values[1:], strict=False)):
            raise SpecError(f"{path}: low {_fmt(values[0])} is greater than high {_fmt(values[-1])}")
        return
    if not msg.HasField(name):
        if b.required:
            raise SpecError(f"{path}: required; expected a value in {_allowed(b)}")
        if b.HasField("default"):
            setattr(msg, name, b.default)
        return
    value = getattr(msg, name)
    if b.choices:
        if value not in b.choices:
            raise SpecError(f"{path}: {value!r} is not allowed; allowed: {', '.join(b.choices)}")
        return
    _check_value(float(value), b, path)


def _check_message(msg: Message, path: str) -> None:
    for field in msg.DESCRIPTOR.fields:
        sub = f"{path}.{field.name}" if path else field.name
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if _is_repeated(field):
                for i, child in enumerate(getattr(msg, field.name)):
                    _check_message(child, f"{sub}[{i}]")
            elif msg.HasField(field.name):
                _check_message(getattr(msg, field.name), sub)
            continue
        b = _bounds(field)
        if b is not None:
            _check_field(msg, field, b, sub)
    if isinstance(msg, pb.Transform) and msg.WhichOneof("op") is None:
        raise SpecError(f"{path}: empty transform; expected one of: {', '.join(TRANSFORM_NAMES)}")


# ---------------------------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------------------------

class Spec:
    """A validated augmentation pipeline with every default filled in. Build it with `load_spec`."""

    __slots__ = ("_message", "_steps", "_fingerprint", "_identity", "_wire", "_output_size", "_keeps_size")

    def __init__(self, message: pb.Pipeline, *, _validated: bool = False) -> None:
        if not _validated:
            raise TypeError("build a Spec with augsvc.load_spec(...)")
        self._message = message
        self._steps: tuple[tuple[str, Any], ...] = tuple(
            (name, getattr(t, name)) for t in message.transforms for name in [t.WhichOneof("op")]
        )
        self._wire = message.SerializeToString(deterministic=True)
        self._fingerprint = hashlib.sha256(self._wire).hexdigest()[:16]
        unscaled = pb.Pipeline()
        unscaled.CopyFrom(message)
        unscaled.ClearField("strength")
        self._identity = hashlib.sha256(unscaled.SerializeToString(deterministic=True)).hexdigest()[:16]
        self._output_size: tuple[int, int] | None = None
        self._keeps_size = True  # no step sets or changes the size
        for _name, params in self._steps:
            effect = params.DESCRIPTOR.GetOptions().Extensions[pb.output_size]
            if effect == pb.SETS_SIZE:
                self._output_size = (int(params.height), int(params.width))
            elif effect == pb.CHANGES_SIZE:
                self._output_size = None
            self._keeps_size = self._keeps_size and effect == pb.KEEPS_SIZE

    @classmethod
    def from_proto(cls, message: pb.Pipeline) -> Spec:
        """Validate a wire message (untrusted) and fill its defaults."""
        if not isinstance(message, pb.Pipeline):
            raise SpecError(f"spec: expected an augsvc.v1.Pipeline message, got {type(message).__name__}")
        msg = pb.Pipeline()
        msg.CopyFrom(message)
        return cls._validated(msg)

    @classmethod
    def from_dict(cls, data: Any) -> Spec:
        if isinstance(data, (list, tuple)):
            data = {"transforms": list(data)}
        msg = pb.Pipeline()
        _fill_message(msg, data, "")
        return cls._validated(msg)

    @classmethod
    def _validated(cls, msg: pb.Pipeline) -> Spec:
        if len(msg.transforms) > MAX_STEPS:
            raise SpecError(f"transforms: {len(msg.transforms)} steps; at most {MAX_STEPS} are allowed")
        _check_message(msg, "")
        if not msg.HasField("border"):
            msg.border = _DEFAULT_BORDER
        return cls(msg, _validated=True)

    # -- views --------------------------------------------------------------------------------
    @property
    def steps(self) -> tuple[tuple[str, Any], ...]:
        """(name, params message) per transform, in order, defaults filled."""
        return self._steps

    @property
    def border(self) -> str:
        return str(self._message.border)

    @property
    def fill(self) -> float:
        return float(self._message.fill)

    @property
    def strength(self) -> float:
        """The magnitude multiplier in [0, 1] (1: the spec as written)."""
        return float(self._message.strength)

    @property
    def fingerprint(self) -> str:
        """Short hex digest of the canonical wire form; equal specs have equal fingerprints."""
        return self._fingerprint

    @property
    def identity(self) -> str:
        """`fingerprint` without the strength: what a resumed stream must match (strength is
        per-call state that a training run changes as it goes)."""
        return self._identity

    def with_strength(self, strength: float) -> Spec:
        """This spec at another strength (validated like any field)."""
        message = self.to_proto()
        message.strength = strength
        return Spec.from_proto(message)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) set by the last step that sets the size (`output_size = SETS_SIZE` on
        its proto message), or None if the input size is kept or depends on the input."""
        return self._output_size

    def output_size_for(self, input_size: tuple[int, int] | None) -> tuple[int, int] | None:
        """The output size of images of `input_size`, where the spec alone says it: the size the
        spec sets, or the input's when every step keeps it; None when a step's output depends on
        its input in a way only the draws know (a shorter-side resize), or the input is unknown."""
        if self._output_size is not None:
            return self._output_size
        return input_size if self._keeps_size else None

    def to_proto(self) -> pb.Pipeline:
        msg = pb.Pipeline()
        msg.CopyFrom(self._message)
        return msg

    def to_bytes(self) -> bytes:
        """The canonical serialized Pipeline (what workers receive)."""
        return bytes(self._wire)

    def to_dict(self) -> dict[str, Any]:
        """The file form: {"transforms": [{name: {params}}], "border": ..., "fill": ...}."""
        data: dict[str, Any] = json_format.MessageToDict(self._message, preserving_proto_field_name=True)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Spec) and other._wire == self._wire

    def __hash__(self) -> int:
        return hash(self._wire)

    def __repr__(self) -> str:
        names = ", ".join(name for name, _ in self._steps)
        return f"Spec([{names}], border={self.border!r}, fingerprint={self._fingerprint})"


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 as a float (YAML 1.1 wants a dot in the mantissa)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)

_SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def _parse_text(text: str, origin: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise SpecError(f"spec: {origin} is not valid YAML/JSON: {exc}") from None


def load_spec(source: Any) -> Spec:
    """A validated `Spec` from a Spec, a Pipeline message, a dict, a list of transforms,
    a path (.yaml/.yml/.json), or a YAML/JSON string. Invalid input raises `SpecError`."""
    if isinstance(source, Spec):
        return source
    if isinstance(source, pb.Pipeline):
        return Spec.from_proto(source)
    if isinstance(source, (Mapping, list, tuple)):
        return Spec.from_dict(source)
    if isinstance(source, os.PathLike) or (
        isinstance(source, str) and "\n" not in source and source.strip().lower().endswith(_SPEC_SUFFIXES)
    ):
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as exc:
            raise SpecError(f"spec: cannot read spec file {str(path)!r}: {exc.strerror}") from None
        return Spec.from_dict(_parse_text(text, repr(str(path))))
    if isinstance(source, str):
        data = _parse_text(source, "the spec string")
        if data is None or isinstance(data, str):
            raise SpecError("spec: expected a mapping with a 'transforms' list (or a path ending in "
                            f".yaml/.yml/.json), got {source[:60]!r}")
        return Spec.from_dict(data)
    raise SpecError(f"spec: expected a Spec, dict, path or YAML/JSON string, got {type(source).__name__}")
