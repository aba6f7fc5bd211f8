"""Contract tests for the spec: one schema (the Pipeline proto), many spellings, and errors that
name the offending path (DESIGN "Spec, file form", contract 4; STYLE habit 2)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from augsvc import Spec, SpecError, load_spec
from augsvc.v1 import augment_pb2 as pb

# Every transform kind, written with a mix of explicit values and defaults.
FULL = {
    "transforms": [
        {"hflip": {"p": 0.5}},
        {"vflip": {"p": 0.25}},
        {"rotate": {"limit_range": [-15, 15], "p": 1.0}},
        {"scale": {"scale_range": [0.9, 1.1]}},
        {"color": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05, "p": 0.8}},
        {"random_resized_crop": {"height": 40, "width": 40, "scale_range": [0.5, 1.0]}},
        {"coarse_dropout": {"num_holes_range": [1, 3], "p": 0.5}},
        {"gaussian_blur": {"sigma_range": [0.5, 1.0], "p": 0.3}},
        {"resize": {"height": 32, "width": 32}},
    ],
    "border": "constant",
    "fill": 7,
}


# ---------------------------------------------------------------------------------------------
# invalid specs: (id, source, the path the message must start with)
# ---------------------------------------------------------------------------------------------

def _t(item: object) -> dict[str, object]:
    """A spec with one transform item."""
    return {"transforms": [item]}


BAD_SPECS = [
    ("unknown-top-key", {"transforms": [], "augment": 1}, "augment"),
    ("unknown-transform", _t({"shear": {"angle": 3}}), "transforms[0]"),
    ("unknown-transform-second-item", {"transforms": [{"hflip": {}}, {"zoom": {}}]}, "transforms[1]"),
    ("unknown-param-key", _t({"rotate": {"limit_range": [-1, 1], "angle": 3}}), "transforms[0].rotate.angle"),
    ("string-for-number", _t({"hflip": {"p": "0.5"}}), "transforms[0].hflip.p"),
    ("bool-for-number", _t({"hflip": {"p": True}}), "transforms[0].hflip.p"),
    ("bool-for-integer", _t({"resize": {"height": True, "width": 8}}), "transforms[0].resize.height"),
    ("float-for-integer", _t({"resize": {"height": 8.5, "width": 8}}), "transforms[0].resize.height"),
    ("string-in-range", _t({"rotate": {"limit_range": [-1, "1"]}}), "transforms[0].rotate.limit_range[1]"),
    ("list-where-scalar", _t({"hflip": {"p": [0.5]}}), "transforms[0].hflip.p"),
    ("scalar-where-list", _t({"rotate": {"limit_range": 15}}), "transforms[0].rotate.limit_range"),
    ("dict-where-list", {"transforms": {"hflip": {"p": 0.5}}}, "transforms"),
    ("dict-where-range", _t({"scale": {"scale_range": {"low": 0.9, "high": 1.1}}}),
     "transforms[0].scale.scale_range"),
    ("params-not-mapping", _t({"rotate": [-15, 15]}), "transforms[0].rotate"),
    ("nan", _t({"rotate": {"limit_range": [math.nan, 15]}}), "transforms[0].rotate.limit_range[0]"),
    ("yaml-nan", "transforms:\n  - hflip: {p: .nan}\n", "transforms[0].hflip.p"),
    ("inf", _t({"color": {"brightness": math.inf}}), "transforms[0].color.brightness"),
    ("yaml-minus-inf", "transforms:\n  - scale: {scale_range: [-.inf, 1]}\n",
     "transforms[0].scale.scale_range[0]"),
    ("p-above-1", _t({"hflip": {"p": 1.5}}), "transforms[0].hflip.p"),
    ("p-below-0", _t({"vflip": {"p": -0.1}}), "transforms[0].vflip.p"),
    ("angle-400", _t({"rotate": {"limit_range": [-15, 400]}}), "transforms[0].rotate.limit_range"),
    ("scale-0", _t({"scale": {"scale_range": [0, 1.1]}}), "transforms[0].scale.scale_range"),
    ("hue-0.6", _t({"color": {"hue": 0.6}}), "transforms[0].color.hue"),
    ("resize-height-0", _t({"resize": {"height": 0, "width": 32}}), "transforms[0].resize.height"),
    ("resize-height-5000", _t({"resize": {"height": 5000, "width": 32}}), "transforms[0].resize.height"),
    ("resize-width-negative", _t({"resize": {"height": 8, "width": -1}}), "transforms[0].resize.width"),
    ("rrc-scale-0", _t({"random_resized_crop": {"height": 8, "width": 8, "scale_range": [0, 1]}}),
     "transforms[0].random_resized_crop.scale_range"),
    ("blur-sigma-6", _t({"gaussian_blur": {"sigma_range": [1, 6]}}),
     "transforms[0].gaussian_blur.sigma_range"),
    ("dropout-holes-17", _t({"coarse_dropout": {"num_holes_range": [1, 17]}}),
     "transforms[0].coarse_dropout.num_holes_range"),
    ("fill-300", {"transforms": [], "fill": 300}, "fill"),
    ("reversed-range", _t({"rotate": {"limit_range": [15, -15]}}), "transforms[0].rotate.limit_range"),
    ("range-length-3", _t({"rotate": {"limit_range": [-15, 0, 15]}}), "transforms[0].rotate.limit_range"),
    ("range-length-1", _t({"scale": {"scale_range": [1.0]}}), "transforms[0].scale.scale_range"),
    ("rotate-without-limit-range", _t({"rotate": {"p": 1.0}}), "transforms[0].rotate.limit_range"),
    ("resize-without-width", _t({"resize": {"height": 32}}), "transforms[0].resize.width"),
    ("rrc-without-size", _t({"random_resized_crop": {}}), "transforms[0].random_resized_crop.height"),
    ("empty-transform-item", _t({}), "transforms[0]"),
    ("two-keys-in-item", _t({"hflip": {}, "vflip": {}}), "transforms[0]"),
    ("number-as-item", _t(5), "transforms[0]"),
    ("bad-border", {"transforms": [], "border": "wrap"}, "border"),
    ("border-not-string", {"transforms": [], "border": 1}, "border"),
    ("non-mapping-yaml", "42", "spec"),
    ("plain-word", "hflip", "spec"),
    ("invalid-yaml", "transforms: [hflip: {p: 0.5", "spec"),
    ("invalid-json", '{"transforms": [}', "spec"),
    ("yaml-bad-value", "transforms:\n  - rotate: {limit_range: [-15, 400]}\n",
     "transforms[0].rotate.limit_range"),
    ("missing-file", "/nonexistent/augsvc/spec.yaml", "spec"),
    ("not-a-spec-type", 3.5, "spec"),
]


def test_bad_spec_table_is_large_and_distinct() -> None:
    ids = [row[0] for row in BAD_SPECS]
    assert len(ids) == len(set(ids)) >= 20
    assert len({repr(row[1]) for row in BAD_SPECS}) == len(BAD_SPECS)


@pytest.mark.parametrize(("source", "path"), [row[1:] for row in BAD_SPECS],
                         ids=[row[0] for row in BAD_SPECS])
def test_bad_spec_raises_spec_error_naming_the_path(source: object, path: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(source)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith(path + ":") or message.startswith(path + " "), message
    assert len(message) > len(path) + 5, "the message should also say what is allowed"


@pytest.mark.parametrize(("source", "allowed"), [
    (_t({"rotate": {"limit_range": [-15, 400]}}), "[-180, 180]"),
    (_t({"hflip": {"p": 2}}), "[0, 1]"),
    (_t({"color": {"hue": 0.6}}), "[0, 0.5]"),
    (_t({"resize": {"height": 5000, "width": 32}}), "[1, 4096]"),
    ({"transforms": [], "border": "wrap"}, "reflect_101"),
    (_t({"shear": {}}), "rotate"),
    ({"transforms": [], "augment": 1}, "transforms"),
])
def test_bad_spec_message_names_the_allowed_values(source: object, allowed: str) -> None:
    with pytest.raises(SpecError, match=allowed.replace("[", r"\[").replace("]", r"\]")):
        load_spec(source)


def test_bad_spec_on_disk_raises_with_the_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text("transforms:\n  - hflip: {p: 3}\n")
    with pytest.raises(SpecError, match=r"^transforms\[0\]\.hflip\.p:"):
        load_spec(bad)
    with pytest.raises(SpecError, match=r"^transforms\[0\]\.hflip\.p:"):
        load_spec(str(bad))


# ---------------------------------------------------------------------------------------------
# valid specs: every spelling gives the same Spec
# ---------------------------------------------------------------------------------------------

def test_every_spelling_gives_the_same_spec(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from_dict = load_spec(FULL)
    yaml_text = yaml.safe_dump(FULL, sort_keys=False)
    json_text = json.dumps(FULL)
    (tmp_path / "spec.yaml").write_text(yaml_text)
    (tmp_path / "spec.yml").write_text(yaml_text)
    (tmp_path / "spec.json").write_text(json_text)
    spellings = {
        "yaml-string": yaml_text,
        "json-string": json_text,
        "yaml-path-str": str(tmp_path / "spec.yaml"),
        "yml-pathlike": tmp_path / "spec.yml",
        "json-path": tmp_path / "spec.json",
        "spec": from_dict,
        "proto": from_dict.to_proto(),
    }
    for name, source in spellings.items():
        assert load_spec(source) == from_dict, name


def test_list_of_transforms_is_the_transforms_key() -> None:
    items = FULL["transforms"]
    assert load_spec(items) == load_spec({"transforms": items})
    assert load_spec(yaml.safe_dump(items)) == load_spec({"transforms": items})


def test_defaults_are_filled_and_equal_to_explicit_values() -> None:
    implicit = load_spec({"transforms": [{"hflip": {}}, {"rotate": {"limit_range": [-5, 5]}},
                                         {"gaussian_blur": {}}]})
    explicit = load_spec({"transforms": [{"hflip": {"p": 0.5}},
                                         {"rotate": {"limit_range": [-5, 5], "p": 1.0}},
                                         {"gaussian_blur": {"sigma_range": [0.5, 1.5], "p": 0.5}}],
                          "border": "reflect_101", "fill": 0})
    assert implicit == explicit
    assert implicit.fingerprint == explicit.fingerprint
    assert implicit.border == "reflect_101"
    names = [name for name, _ in implicit.steps]
    assert names == ["hflip", "rotate", "gaussian_blur"]
    assert implicit.steps[0][1].p == 0.5


def test_string_shorthand_for_a_transform_with_defaults() -> None:
    assert load_spec({"transforms": ["hflip"]}) == load_spec({"transforms": [{"hflip": {"p": 0.5}}]})


def test_order_and_values_matter() -> None:
    a = load_spec([{"hflip": {}}, {"vflip": {}}])
    assert a != load_spec([{"vflip": {}}, {"hflip": {}}])
    assert a != load_spec([{"hflip": {"p": 0.4}}, {"vflip": {}}])
    assert len({a, load_spec([{"hflip": {}}, {"vflip": {}}])}) == 1  # hashable, equal specs collide


@pytest.mark.parametrize("writer", ["to_dict", "to_json", "to_yaml"])
def test_spec_round_trips_through_its_file_forms(writer: str) -> None:
    spec = load_spec(FULL)
    assert load_spec(getattr(spec, writer)()) == spec


def test_to_dict_is_plain_data_with_defaults() -> None:
    data = load_spec([{"hflip": {}}, {"resize": {"height": 8, "width": 9}}]).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["transforms"][0] == {"hflip": {"p": 0.5}}
    assert data["transforms"][1] == {"resize": {"height": 8, "width": 9}}
    assert data["border"] == "reflect_101"


def test_proto_round_trip() -> None:
    spec = load_spec(FULL)
    assert Spec.from_proto(spec.to_proto()) == spec
    wire = pb.Pipeline.FromString(spec.to_bytes())
    assert Spec.from_proto(wire) == spec
    # to_proto hands out a copy: editing it leaves the spec alone.
    msg = spec.to_proto()
    msg.transforms[0].hflip.p = 0.0
    assert spec.steps[0][1].p == 0.5


@pytest.mark.parametrize(("build", "path"), [
    (lambda m: m.transforms.add().rotate.limit_range.extend([-400.0, 0.0]),
     "transforms[0].rotate.limit_range"),
    (lambda m: setattr(m.transforms.add().hflip, "p", 1.5), "transforms[0].hflip.p"),
    (lambda m: m.transforms.add().rotate.SetInParent(), "transforms[0].rotate.limit_range"),
    (lambda m: setattr(m.transforms.add().resize, "height", 0), "transforms[0].resize"),
    (lambda m: m.transforms.add(), "transforms[0]"),
    (lambda m: setattr(m, "border", "mirror"), "border"),
    (lambda m: setattr(m.transforms.add().color, "hue", math.nan), "transforms[0].color.hue"),
])
def test_wire_pipeline_out_of_range_is_rejected(build, path: str) -> None:  # type: ignore[no-untyped-def]
    msg = pb.Pipeline()
    build(msg)
    with pytest.raises(SpecError) as info:
        Spec.from_proto(msg)
    assert str(info.value).startswith(path), str(info.value)
    with pytest.raises(SpecError):
        load_spec(msg)


def test_from_proto_rejects_other_messages() -> None:
    with pytest.raises(SpecError, match="^spec"):
        Spec.from_proto(pb.Transform())  # type: ignore[arg-type]


def test_spec_cannot_be_built_unvalidated() -> None:
    with pytest.raises(TypeError):
        Spec(pb.Pipeline())


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "+1e-3", "0.001", "1.0e-3"])
def test_yaml_exponent_without_dot_is_a_float(text: str) -> None:
    spec = load_spec(f"transforms:\n  - color: {{hue: {text}, brightness: 2e-1}}\n")
    params = spec.steps[0][1]
    assert params.hue == pytest.approx(0.001)
    assert params.brightness == pytest.approx(0.2)


def test_integers_written_as_whole_floats_are_accepted() -> None:
    assert load_spec(_t({"resize": {"height": 32.0, "width": 16}})).output_size == (32, 16)


def test_output_size_is_the_last_sizing_step() -> None:
    assert load_spec([{"hflip": {}}]).output_size is None
    spec = load_spec([{"random_resized_crop": {"height": 40, "width": 30}},
                      {"resize": {"height": 8, "width": 9}}])
    assert spec.output_size == (8, 9)


def test_empty_pipeline_is_valid() -> None:
    for source in ({}, {"transforms": []}, [], "transforms: []"):
        spec = load_spec(source)
        assert spec.steps == ()
        assert spec.output_size is None
