"""Bad input at the manifest boundary: every malformed line fails with `file:line` and the field, a string where the
list of captions belongs never becomes a list of characters, and image paths stay inside the image root unless
`allow_outside_root=True`."""

import json
import math

import pytest

from imagebert_hf.formats.manifest import ManifestError, parse_manifest_line, read_manifest


GOOD = {"image": "images/a.jpg", "captions": ["A dog on a sofa."], "width": 640, "height": 480}

# (id, the line's JSON (a dict is merged into GOOD, None deletes a key), the field the error must name)
BAD_LINES = [
    ("captions as a string", {"captions": "A dog on a sofa."}, "'captions'"),
    ("captions empty", {"captions": []}, "'captions'"),
    ("captions null", {"captions": None}, "'captions'"),
    ("captions a number", {"captions": 3}, "'captions'"),
    ("captions a mapping", {"captions": {"en": "x"}}, "'captions'"),
    ("caption empty string", {"captions": ["ok", ""]}, "captions[1]"),
    ("caption blank", {"captions": ["   "]}, "captions[0]"),
    ("caption a number", {"captions": ["ok", 7]}, "captions[1]"),
    ("caption a list", {"captions": [["nested"]]}, "captions[0]"),
    ("caption null", {"captions": [None]}, "captions[0]"),
    ("single caption empty", {"captions": None, "caption": ""}, "caption"),
    ("single caption a list", {"captions": None, "caption": ["x"]}, "caption"),
    ("no captions at all", {"captions": None}, "'captions'"),
    ("no image", {"image": None}, "'image'"),
    ("image a number", {"image": 17}, "'image'"),
    ("image empty", {"image": ""}, "'image'"),
    ("image escapes with ../", {"image": "../../etc/passwd"}, "'image'"),
    ("image escapes in the middle", {"image": "images/../../secret.jpg"}, "'image'"),
    ("image absolute", {"image": "/etc/passwd"}, "'image'"),
    ("width zero", {"width": 0}, "'width'"),
    ("height negative", {"height": -3}, "'height'"),
    ("width a string", {"width": "640"}, "'width'"),
    ("width a float", {"width": 640.5}, "'width'"),
    ("objects a mapping", {"objects": {"label": "dog"}}, "'objects'"),
    ("objects a string", {"objects": "dog"}, "'objects'"),
    ("object a string", {"objects": ["dog"]}, "objects[0]"),
    ("object without a box", {"objects": [{"label": "dog"}]}, "objects[0]"),
    ("box of 3 numbers", {"objects": [{"bbox_xywh": [1, 2, 3]}]}, "objects[0].bbox_xywh"),
    ("box a string", {"objects": [{"bbox_xyxy": "1,2,3,4"}]}, "objects[0].bbox_xyxy"),
    ("box with a string", {"objects": [{"bbox_xywh": [1, "2", 3, 4]}]}, "objects[0].bbox_xywh[1]"),
    ("box with NaN", {"objects": [{"bbox_xywh": [1, 2, math.nan, 4]}]}, "objects[0].bbox_xywh[2]"),
    ("box with infinity", {"objects": [{"bbox_xyxy": [0, 0, math.inf, 4]}]}, "objects[0].bbox_xyxy[2]"),
    ("box inverted", {"objects": [{"bbox_xyxy": [10, 10, 5, 20]}]}, "objects[0].bbox_xyxy"),
    ("box negative size", {"objects": [{"bbox_xywh": [10, 10, 5, -2]}]}, "objects[0].bbox_xywh"),
    ("second object bad", {"objects": [{"bbox_xywh": [0, 0, 1, 1]}, {"bbox_xywh": None}]}, "objects[1].bbox_xywh"),
    ("label a number", {"objects": [{"bbox_xywh": [0, 0, 1, 1], "label": 5}]}, "objects[0].label"),
    ("class id a string", {"objects": [{"bbox_xywh": [0, 0, 1, 1], "class_id": "62"}]}, "objects[0].class_id"),
    ("class id a float", {"objects": [{"bbox_xywh": [0, 0, 1, 1], "class_id": 6.5}]}, "objects[0].class_id"),
]
RAW_LINES = [
    ("not JSON", "not json", "invalid JSON"),
    ("truncated JSON", '{"image": "a.jpg", "captions": ["x"]', "invalid JSON"),
    ("a list", '["a.jpg", ["x"]]', "JSON object"),
    ("a string", '"a.jpg"', "JSON object"),
    ("a number", "3", "JSON object"),
]


def _line(edit: dict) -> str:
    item = {**GOOD, **edit}
    return json.dumps({key: value for key, value in item.items() if value is not None})


def _write(tmp_path, bad_line: str, line_number: int = 3):
    good = json.dumps(GOOD)
    lines = [good] * (line_number - 1) + [bad_line, good]
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(("edit", "field"), [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES])
def test_bad_line_names_file_line_and_field(tmp_path, edit, field):
    path = _write(tmp_path, _line(edit), line_number=3)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ") and field in message, message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("raw", "named"), [c[1:] for c in RAW_LINES], ids=[c[0] for c in RAW_LINES])
def test_malformed_json_names_file_and_line(tmp_path, raw, named):
    path = _write(tmp_path, raw, line_number=2)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert str(info.value).startswith(f"{path}:2: ") and named in str(info.value)


def test_a_string_of_captions_never_becomes_characters(tmp_path):
    with pytest.raises(ManifestError, match="got the string 'A dog"):
        parse_manifest_line({"image": "a.jpg", "captions": "A dog on a sofa."}, tmp_path, "m.jsonl:1")


def test_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps(GOOD).encode() + b"\n" + '{"image": "b.jpg", "captions": ["caf\xe9"]}'.encode("latin-1")
    )
    with pytest.raises(ManifestError, match="latin1.jsonl: not UTF-8"):
        read_manifest(path)


@pytest.mark.parametrize("image", ["../outside.jpg", "/tmp/outside.jpg", "images/../../outside.jpg"])
def test_paths_outside_the_root_only_with_the_option(tmp_path, image):
    root = tmp_path / "root"
    with pytest.raises(ManifestError, match="allow_outside_root=True"):
        parse_manifest_line({"image": image, "captions": ["x"]}, root, "m.jsonl:1")
    record = parse_manifest_line({"image": image, "captions": ["x"]}, root, "m.jsonl:1", allow_outside_root=True)
    assert record.image == image and record.image_path == root / image


@pytest.mark.parametrize("image", ["images/a.jpg", "a.jpg", "images/./sub/../a.jpg", "dir with spaces/a b.jpg"])
def test_paths_inside_the_root_are_accepted(tmp_path, image):
    record = parse_manifest_line({"image": image, "caption": "one"}, tmp_path, "m.jsonl:1")
    assert record.image_path == tmp_path / image and record.captions == ("one",)


def test_a_good_manifest_reads_with_boxes(tmp_path):
    path = _write(tmp_path, _line({"objects": [{"bbox_xywh": [1, 2, 3, 4], "label": "dog", "class_id": 17}]}))
    records = read_manifest(path)
    assert len(records) == 4 and records[2].boxes == ((1.0, 2.0, 4.0, 6.0),) and records[2].box_class_ids == (17,)


def test_pretraining_sources_follow_outside_paths_only_with_the_option(tmp_path):
    from imagebert_hf.data.pair_sources import ManifestPairSource

    path = tmp_path / "data" / "captions.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"image": str(tmp_path / "elsewhere.jpg"), "captions": ["A dog."]}) + "\n")
    with pytest.raises(ManifestError, match="captions.jsonl:1: 'image' .* allow_outside_root"):
        ManifestPairSource(path)
    source = ManifestPairSource(path, allow_outside_root=True)
    assert len(source) == 1


def test_a_caption_with_a_lone_surrogate_is_named_at_its_line(tmp_path):
    """JSON's "\\ud800" escape reads as a lone surrogate, which no tokenizer takes: refused with the line, not at the
    training batch that holds it."""
    with pytest.raises(ManifestError, match=r"m.jsonl:1: captions\[1\] holds a lone surrogate"):
        parse_manifest_line('{"image": "a.jpg", "captions": ["a dog", "a red \\ud800 circle"]}', tmp_path, "m.jsonl:1")


def test_a_number_of_more_digits_than_python_converts_is_named_at_its_line(tmp_path):
    line = '{"image": "a.jpg", "captions": ["a dog"], "coco_id": ' + "9" * 5000 + "}"
    with pytest.raises(ManifestError, match=r"m.jsonl:3: invalid JSON \(Exceeds the limit"):
        parse_manifest_line(line, tmp_path, "m.jsonl:3")


def test_a_manifest_source_checks_its_arguments_and_keeps_a_caption_once(tmp_path):
    from imagebert_hf.data.pair_sources import ManifestPairSource

    manifest = tmp_path / "captions.jsonl"
    lines = [
        {"image": "a.jpg", "captions": ["a dog", "a cat", "a  dog"], "split": "val"},
        {"image": "b.jpg", "captions": ["a bird"], "split": "validation"},
    ]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(TypeError, match="splits must be a list of split names, got 'validation'"):
        ManifestPairSource(manifest, splits="validation")
    with pytest.raises(ValueError, match="max_captions_per_image must be a positive integer or None, got -1"):
        ManifestPairSource(manifest, max_captions_per_image=-1)
    source = ManifestPairSource(manifest, splits=["val"])
    assert source.pairs == [("a.jpg", "a dog"), ("a.jpg", "a cat")]
