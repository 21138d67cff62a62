"""The relation-swap probe: captions and their swaps from annotations, COCO pair selection, the Wilson interval, the
scoring (stub scorers with known answers, and the tiny model against a direct computation) and the script."""

import dataclasses
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imagebert_hf.data.synthetic import (
    make_synthetic_examples,
    relation_caption,
    synthetic_region_record,
    synthetic_relation,
    synthetic_swap_captions,
)
from imagebert_hf.evaluation.relation_swaps import (
    CONTROL_KIND,
    SCORERS,
    SwapProbe,
    clear_left_right_pair,
    cross_encoder_scores,
    format_relation_swap_table,
    manifest_swap_probes,
    relation_swap_accuracy,
    synthetic_swap_probes,
    wilson_interval,
)
from imagebert_hf.formats.manifest import ManifestRecord, read_manifest
from imagebert_hf.models.imagebert import ImageBERTForImageTextRetrieval, ImageBERTForPreTraining
from imagebert_hf.models.imagebert.region_batching import pad_region_records

from .testing_utils import COCO_DIR, PROJECT_ROOT, require_shared_data


SCRIPT = PROJECT_ROOT / "examples" / "evaluate_relation_swaps.py"


def shapes(first_label, first_box, second_label, second_box):
    """A synthetic-like example of two objects with `bbox_xywh` boxes."""
    return {
        "image_id": "constructed",
        "width": 96,
        "height": 96,
        "objects": [
            {"label": first_label, "class_id": 0, "bbox_xywh": first_box},
            {"label": second_label, "class_id": 1, "bbox_xywh": second_box},
        ],
    }


# ------------------------------------------------------------------------------------------------ captions


def test_horizontal_swaps():
    example = shapes("red circle", [0, 10, 30, 30], "blue square", [50, 40, 30, 30])
    assert synthetic_relation(example) == (0, "to the left of", 1)
    assert synthetic_swap_captions(example) == {
        "true": "a red circle to the left of a blue square",
        "object_swap": "a blue square to the left of a red circle",
        "attribute_swap": "a blue circle to the left of a red square",
    }
    # The same image with the objects listed the other way round gives the same captions.
    flipped = shapes("blue square", [50, 40, 30, 30], "red circle", [0, 10, 30, 30])
    assert synthetic_relation(flipped) == (1, "to the left of", 0)
    assert synthetic_swap_captions(flipped) == synthetic_swap_captions(example)


def test_vertical_swaps_with_articles():
    # Overlapping horizontally, the orange cross below the yellow triangle.
    example = shapes("orange cross", [20, 60, 30, 30], "yellow triangle", [30, 5, 30, 30])
    assert synthetic_relation(example) == (1, "above", 0)
    assert synthetic_swap_captions(example) == {
        "true": "a yellow triangle above an orange cross",
        "object_swap": "an orange cross above a yellow triangle",
        "attribute_swap": "an orange triangle above a yellow cross",
    }


def test_no_relation_and_missing_twins():
    overlapping = shapes("red circle", [10, 10, 40, 40], "blue square", [30, 30, 40, 40])
    assert synthetic_relation(overlapping) is None and synthetic_swap_captions(overlapping) is None
    # Same colour: exchanging colours changes nothing, so there is no attribute swap.
    same_color = shapes("red circle", [0, 0, 30, 30], "red square", [60, 0, 30, 30])
    assert set(synthetic_swap_captions(same_color)) == {"true", "object_swap"}
    # The same label twice: neither twin differs from the true caption.
    twins = shapes("red circle", [0, 0, 30, 30], "red circle", [60, 0, 30, 30])
    assert synthetic_swap_captions(twins) == {"true": "a red circle to the left of a red circle"}
    assert synthetic_relation({"objects": []}) is None


def test_generated_examples_agree_with_their_own_captions():
    examples = make_synthetic_examples(60, seed=3, captions_per_image=3)
    checked = 0
    for example in examples:
        captions = synthetic_swap_captions(example)
        assert captions is not None, example["image_id"]
        assert len({captions["true"], captions["object_swap"], captions["attribute_swap"]}) >= 2
        given = [c for c in example["captions"] if "to the left of" in c or "above" in c]
        # The generator's own left-of caption is the one read from the boxes; its "above" caption too whenever
        # the boxes overlap horizontally (otherwise left-of is also true, and is the one chosen).
        if "to the left of" in given[0] or synthetic_relation(example)[1] == "above":
            assert captions["true"] == given[0], example["image_id"]
            checked += 1
    assert checked >= 40


def test_synthetic_probes():
    examples = [
        shapes("red circle", [0, 10, 30, 30], "blue square", [50, 40, 30, 30]),
        shapes("red circle", [10, 10, 40, 40], "blue square", [30, 30, 40, 40]),  # no relation: no probe
        shapes("green cross", [0, 60, 30, 30], "yellow triangle", [5, 0, 30, 30]),
        shapes("red cross", [0, 0, 30, 30], "purple circle", [60, 0, 30, 30]),
    ]
    probes = synthetic_swap_probes(examples)
    assert [(p.image, p.kind) for p in probes] == [
        (0, "object_swap"),
        (0, "attribute_swap"),
        (0, CONTROL_KIND),
        (2, "object_swap"),
        (2, "attribute_swap"),
        (2, CONTROL_KIND),
        (3, "object_swap"),
        (3, "attribute_swap"),
        (3, CONTROL_KIND),
    ]
    control = {p.image: p.swapped_caption for p in probes if p.kind == CONTROL_KIND}
    # Image 0's control skips no one (image 2 shares no label); image 3 (red cross) skips image 0 (nothing shared
    # either: the first image after it, cyclically, is image 0).
    assert control[0] == "a yellow triangle above a green cross"
    assert control[3] == "a red circle to the left of a blue square"
    assert [p.kind for p in synthetic_swap_probes(examples, kinds=["object_swap"])] == ["object_swap"] * 3
    with pytest.raises(ValueError, match="kinds holds \\['colour_swap'\\]"):
        synthetic_swap_probes(examples, kinds=["colour_swap"])


# ------------------------------------------------------------------------------------------------ COCO pairs


def test_clear_left_right_pair():
    w, h = 200, 100
    dog, person = (10, 10, 60, 90), (120, 5, 180, 95)
    assert clear_left_right_pair(["dog", "person"], [dog, person], w, h) == (0, 1)
    assert clear_left_right_pair(["person", "dog"], [person, dog], w, h) == (1, 0)
    # Same label, too small, or centres inside each other: no pair.
    assert clear_left_right_pair(["dog", "dog"], [dog, person], w, h) is None
    assert clear_left_right_pair(["dog", "person"], [dog, (120, 5, 124, 9)], w, h) is None
    assert clear_left_right_pair(["dog", "person"], [(10, 10, 150, 90), (100, 5, 180, 95)], w, h) is None
    # A second dog right of the person makes "a person to the left of a dog" true too: ambiguous, refused.
    assert clear_left_right_pair(["dog", "person", "dog"], [dog, (80, 5, 120, 95), (150, 10, 195, 90)], w, h) is None
    # The most salient pair wins: the cat pair's smaller box is larger than the cup's.
    labels = ["cup", "cat", "person"]
    boxes = [(0, 0, 20, 20), (20, 0, 80, 100), (120, 0, 200, 100)]
    assert clear_left_right_pair(labels, boxes, w, h) == (1, 2)
    assert clear_left_right_pair(labels, boxes, w, h, min_area_fraction=0.5) is None
    with pytest.raises(ValueError, match="labels has 1 entries and boxes 2"):
        clear_left_right_pair(["dog"], [dog, person], w, h)


def test_manifest_probes():
    def record(name, labels, boxes):
        return ManifestRecord(name, Path(name), ("x",), tuple(boxes), tuple(labels), (0,) * len(labels), 200, 100)

    records = [
        record("a.jpg", ["elephant", "person"], [(10, 10, 60, 90), (120, 5, 180, 95)]),
        record("b.jpg", ["dog", "dog"], [(10, 10, 60, 90), (120, 5, 180, 95)]),  # no pair
        ManifestRecord("c.jpg", Path("c.jpg"), ("x",)),  # no boxes
        record("d.jpg", ["umbrella", "cat"], [(0, 0, 90, 100), (110, 0, 200, 100)]),
    ]
    probes, kept = manifest_swap_probes(records)
    assert [r.image for r in kept] == ["a.jpg", "d.jpg"]
    assert probes == [
        SwapProbe(0, "an elephant to the left of a person", "a person to the left of an elephant", "object_swap"),
        SwapProbe(1, "an umbrella to the left of a cat", "a cat to the left of an umbrella", "object_swap"),
        SwapProbe(0, "an elephant to the left of a person", "an umbrella to the left of a cat", CONTROL_KIND),
        SwapProbe(1, "an umbrella to the left of a cat", "an elephant to the left of a person", CONTROL_KIND),
    ]
    assert len(manifest_swap_probes(records, control=False)[0]) == 2
    assert relation_caption("orange", "above", "apple") == "an orange above an apple"


@require_shared_data
def test_coco_probes_are_captioned_from_their_boxes():
    records = read_manifest(COCO_DIR / "captions.jsonl")
    probes, kept = manifest_swap_probes(records, min_area_fraction=0.01, control=False)
    assert len(probes) >= 30, len(probes)
    for probe, record in zip(probes, kept):
        left, right = probe.true_caption.split(" to the left of ")
        assert left.split(" ", 1)[1] in record.box_labels and right.split(" ", 1)[1] in record.box_labels
        assert probe.swapped_caption == f"{right} to the left of {left}"


# ------------------------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize(
    ("wins", "trials", "expected"),
    [(5, 10, (0.2366, 0.7634)), (0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0)), (500, 1000, (0.4691, 0.5309))],
)
def test_wilson_interval(wins, trials, expected):
    assert wilson_interval(wins, trials) == pytest.approx(expected, abs=1e-4)


def test_wilson_interval_refuses_impossible_counts():
    with pytest.raises(ValueError, match="got 3/2"):
        wilson_interval(3, 2)


PROBES = [
    SwapProbe(0, "a red circle to the left of a blue square", "a blue square to the left of a red circle", "object_swap"),
    SwapProbe(0, "a red circle to the left of a blue square", "a blue circle to the left of a red square", "attribute_swap"),
    SwapProbe(1, "a green cross above a yellow circle", "a yellow circle above a green cross", "object_swap"),
    SwapProbe(1, "a green cross above a yellow circle", "a red circle to the left of a blue square", CONTROL_KIND),
]  # fmt: skip
TRUE = {probe.true_caption for probe in PROBES}


def stub_scorer(prefer_true: bool):
    """Scores a pair by whether its caption is a true one (decoded from the token ids the scorer is given)."""

    def score(model, text_inputs, region_inputs, image_indices, text_indices, batch_size):
        tokenizer = model.tokenizer
        texts = tokenizer.batch_decode(text_inputs["input_ids"][text_indices], skip_special_tokens=True)
        return torch.tensor([float((text in TRUE) == prefer_true) for text in texts])

    return score


class StubModel:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


def test_accuracy_with_stub_scorers(tokenizer):
    scorers = {"right": stub_scorer(True), "wrong": stub_scorer(False), "flat": lambda *args: torch.zeros(8)}
    results = relation_swap_accuracy(StubModel(tokenizer), PROBES, tokenizer, region_inputs=None, scorers=scorers)
    assert set(results) == {"object_swap", "attribute_swap", CONTROL_KIND, "all_swaps"}
    assert results["object_swap"]["right"] == {
        "accuracy": 1.0, "ci_low": pytest.approx(0.3424, abs=1e-4), "ci_high": 1.0, "wins": 2, "n": 2, "ties": 0,
    }  # fmt: skip
    assert results["all_swaps"]["right"]["n"] == 3 and results["all_swaps"]["right"]["accuracy"] == 1.0
    assert results["all_swaps"]["wrong"]["accuracy"] == 0.0 and results[CONTROL_KIND]["wrong"]["wins"] == 0
    # A tie is no win.
    assert results["all_swaps"]["flat"]["accuracy"] == 0.0 and results["all_swaps"]["flat"]["ties"] == 3
    assert results["object_swap"]["chance"] == 0.5


def test_scores_a_few_float32_units_apart_are_ties(tokenizer):
    """The same pair in two rows of a batch can score 1e-7 apart; that decides nothing."""
    nearly_flat = torch.tensor([-1.1696841, -1.1696839] * 4)
    clear = torch.tensor([0.5, 0.4] * 4)
    scorers = {"nearly_flat": lambda *args: nearly_flat, "clear": lambda *args: clear}
    results = relation_swap_accuracy(StubModel(tokenizer), PROBES, tokenizer, region_inputs=None, scorers=scorers)
    assert results["all_swaps"]["nearly_flat"]["ties"] == 3 and results["all_swaps"]["nearly_flat"]["wins"] == 0
    assert results["all_swaps"]["clear"]["wins"] == 3 and results["all_swaps"]["clear"]["ties"] == 0


def test_accuracy_refuses_bad_input(tokenizer):
    with pytest.raises(ValueError, match="probes is empty"):
        relation_swap_accuracy(None, [], tokenizer, None)
    with pytest.raises(ValueError, match="kinds \\['shuffle'\\]"):
        relation_swap_accuracy(None, [SwapProbe(0, "a", "b", "shuffle")], tokenizer, None)
    with pytest.raises(ValueError, match="scorer 'short' returned shape \\(3,\\); expected \\(8,\\)"):
        relation_swap_accuracy(None, PROBES, tokenizer, None, scorers={"short": lambda *args: torch.zeros(3)})


@pytest.fixture
def tiny_model(tokenizer, make_tiny_config):
    torch.manual_seed(0)
    config = make_tiny_config(vocab_size=len(tokenizer), max_regions=4, max_text_length=24)
    return ImageBERTForImageTextRetrieval(config).eval()


def test_tiny_model_scores_match_a_direct_computation(tiny_model, tokenizer):
    examples = make_synthetic_examples(12, seed=5)
    probes = synthetic_swap_probes(examples)
    records = [synthetic_region_record(example, tiny_model.config.region_feature_size) for example in examples]
    regions = pad_region_records(records)
    results = relation_swap_accuracy(tiny_model, probes, tokenizer, regions, batch_size=5)

    expected = {"cross_encoder": {}, "dual_encoder": {}}
    with torch.no_grad():
        for probe in probes:
            row = {key: regions[key][probe.image : probe.image + 1] for key in regions}
            scores = {"cross_encoder": [], "dual_encoder": []}
            for caption in (probe.true_caption, probe.swapped_caption):
                text = dict(tokenizer([caption], return_tensors="pt"))
                scores["cross_encoder"].append(float(tiny_model(**text, **row).logits))
                text_embedding = tiny_model.get_text_embeddings(**text)
                region_embedding = tiny_model.get_region_embeddings(**row)
                scores["dual_encoder"].append(float((text_embedding * region_embedding).sum()))
            for name, (true, swapped) in scores.items():
                expected[name].setdefault(probe.kind, []).append(true > swapped)
    for name, kinds in expected.items():
        for kind, wins in kinds.items():
            assert results[kind][name]["n"] == len(wins) == 12
            assert results[kind][name]["wins"] == sum(wins), (kind, name)
            low, high = results[kind][name]["ci_low"], results[kind][name]["ci_high"]
            assert low <= results[kind][name]["accuracy"] <= high
    assert results["all_swaps"]["cross_encoder"]["n"] == 24
    # The one pair scorer is the retrieval index's: same scores whatever the batch size.
    images, texts = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2])
    text_inputs = dict(tokenizer([p.true_caption for p in probes[:3]], padding=True, return_tensors="pt"))
    assert torch.allclose(
        cross_encoder_scores(tiny_model, text_inputs, regions, images, texts, 1),
        cross_encoder_scores(tiny_model, text_inputs, regions, images, texts, 3),
        atol=1e-5,
    )


# ------------------------------------------------------------------------------------------------ the script


def test_script_help_is_fast_and_exits_zero():
    """--help answers before torch is imported (the library loads once the flags are read)."""
    probe = (
        "import runpy, sys\n"
        f"main = runpy.run_path({str(SCRIPT)!r})['main']\n"
        "try:\n    main(['--help'])\nexcept SystemExit as stop:\n    print('exit', stop.code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "--synthetic_first_index" in done.stdout, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "exit 0 False"


def test_script_end_to_end(tmp_path, tiny_model, tokenizer, make_tiny_config, capsys):
    main = runpy.run_path(str(SCRIPT))["main"]
    tiny_model.save_pretrained(tmp_path / "retrieval")
    tokenizer.save_pretrained(tmp_path / "retrieval")
    summary = main([
        "--model_name_or_path", str(tmp_path / "retrieval"), "--num_images", "6", "--synthetic_first_index", "4",
        "--output_file", str(tmp_path / "swaps.json"),
    ])  # fmt: skip
    assert summary["dual_encoder_heads_trained"] is True and summary["images"] == 6
    assert summary["results"]["object_swap"]["dual_encoder"]["n"] == 6
    assert (tmp_path / "swaps.json").is_file()
    assert "| object_swap | cross_encoder |" in capsys.readouterr().out

    # A pretraining checkpoint has no trained projection heads: only the cross-encoder is scored.
    torch.manual_seed(0)
    pretrained = ImageBERTForPreTraining(make_tiny_config(vocab_size=len(tokenizer), max_text_length=24))
    pretrained.save_pretrained(tmp_path / "pretrained")
    tokenizer.save_pretrained(tmp_path / "pretrained")
    summary = main(["--model_name_or_path", str(tmp_path / "pretrained"), "--num_images", "4"])
    assert summary["dual_encoder_heads_trained"] is False
    assert set(summary["results"]["object_swap"]) == {"chance", "cross_encoder", "indistinguishable"}


def test_the_script_checks_its_output_file_first_and_names_damaged_weights_in_one_line(
    tmp_path, tiny_model, tokenizer, capsys
):
    """An output file that cannot be written was found only after every probe was scored (the work lost, a traceback
    naming a temporary file); a damaged weights file gave a traceback. Both end in one line, before any scoring; a
    file in a folder that does not exist yet is written, its folder made."""
    main = runpy.run_path(str(SCRIPT))["main"]
    tiny_model.save_pretrained(tmp_path / "retrieval")
    tokenizer.save_pretrained(tmp_path / "retrieval")
    flags = ["--model_name_or_path", str(tmp_path / "retrieval"), "--num_images", "4"]
    (tmp_path / "a_folder").mkdir()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([*flags, "--output_file", str(tmp_path / "a_folder")])
    said = capsys.readouterr()
    assert stop.value.code == 1 and "object_swap" not in said.out
    assert (
        said.err.strip()
        == f"evaluate_relation_swaps: error: output_file {tmp_path / 'a_folder'} is a folder; expected a file path."
    )
    main([*flags, "--output_file", str(tmp_path / "new" / "folder" / "swaps.json")])
    assert json.loads((tmp_path / "new" / "folder" / "swaps.json").read_text())["images"] == 4

    weights = tmp_path / "retrieval" / "model.safetensors"
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(SystemExit) as stop:
        main(flags)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 1
    assert err.startswith(
        f"evaluate_relation_swaps: error: --model_name_or_path {tmp_path / 'retrieval'}: a weights file is damaged"
    )


def test_script_on_a_manifest_with_a_region_cache(tmp_path, tokenizer, make_tiny_config, make_tiny_extractor, capsys):
    """The real-photo path end to end, on generated images written as a manifest with boxes and labels."""
    from imagebert_hf.data.synthetic import write_synthetic_manifest
    from imagebert_hf.regions import extract_regions

    main = runpy.run_path(str(SCRIPT))["main"]
    manifest = write_synthetic_manifest(tmp_path / "data", 8, seed=1)
    extractor = make_tiny_extractor()
    extract_regions(manifest, tmp_path / "regions", extractor, progress=False)
    config = make_tiny_config(
        vocab_size=len(tokenizer), region_feature_size=extractor.region_feature_size, max_text_length=24
    )
    torch.manual_seed(0)
    ImageBERTForImageTextRetrieval(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    probes, kept = manifest_swap_probes(read_manifest(manifest), min_area_fraction=0.01)
    summary = main([
        "--model_name_or_path", str(tmp_path / "model"), "--probe", "manifest", "--manifest", str(manifest),
        "--region_cache", str(tmp_path / "regions"),
    ])  # fmt: skip
    assert summary["images"] == len(kept) >= 2
    assert summary["results"]["object_swap"]["cross_encoder"]["n"] == len(kept)
    assert summary["results"]["object_swap"]["dual_encoder"]["n"] == len(kept)
    assert summary["examples"][0]["true"] == probes[0].true_caption

    # The same manifest with its paths spelt `./images/...`: its regions are found as the evaluation finds them.
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    dotted = manifest.with_name("dotted.jsonl")
    dotted.write_text("".join(json.dumps({**line, "image": "./" + line["image"]}) + "\n" for line in lines))
    again = main([
        "--model_name_or_path", str(tmp_path / "model"), "--probe", "manifest", "--manifest", str(dotted),
        "--region_cache", str(tmp_path / "regions"),
    ])  # fmt: skip
    assert again["results"] == summary["results"]

    # A cache of another feature size is named as the cache that does not fit the model.
    other = make_tiny_config(vocab_size=len(tokenizer), region_feature_size=extractor.region_feature_size + 1)
    ImageBERTForImageTextRetrieval(other).save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([
            "--model_name_or_path", str(tmp_path / "other"), "--probe", "manifest", "--manifest", str(manifest),
            "--region_cache", str(tmp_path / "regions"),
        ])  # fmt: skip
    size = extractor.region_feature_size
    said = f"regions holds regions of {size} features; the model takes region_feature_size={size + 1}"
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--probe", "coco"], "probe is 'coco'; expected one of ('synthetic', 'manifest')"),
        (["--scorers", "bag"], "scorers is 'bag'; expected a comma-separated list"),
        (["--probe", "manifest"], "probe 'manifest' needs manifest; got none"),
        (
            ["--probe", "manifest", "--manifest", "nowhere.jsonl", "--region_cache", "."],
            "manifest nowhere.jsonl does not exist",
        ),
    ],
)
def test_script_names_a_bad_argument(flags, message, tmp_path, tiny_model, tokenizer, capsys):
    main = runpy.run_path(str(SCRIPT))["main"]
    tiny_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["--model_name_or_path", str(tmp_path), *flags])
    assert stop.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error


def test_probes_the_tokenizer_reads_as_one_input_are_left_out_and_counted(tiny_model, tokenizer):
    # Both captions `a [UNK] to the left of a [UNK]` for a tokenizer without the object names: the model saw one
    # input twice, and these ties once made the accuracy "significantly below chance".
    probes = [
        SwapProbe(0, "a red circle to the left of a blue square", "a blue square to the left of a red circle", "object_swap"),
        SwapProbe(1, "a zebra to the left of a giraffe", "a giraffe to the left of a zebra", "object_swap"),
        SwapProbe(2, "a kite to the left of a dog", "a dog to the left of a kite", "object_swap"),
    ]  # fmt: skip
    regions = {
        "region_features": torch.randn(3, 4, tiny_model.config.region_feature_size),
        "region_locations": torch.rand(3, 4, 5),
    }
    results = relation_swap_accuracy(
        tiny_model, probes, tokenizer, regions, {"cross_encoder": SCORERS["cross_encoder"]}
    )
    assert results["object_swap"]["indistinguishable"] == 2
    assert results["object_swap"]["cross_encoder"]["n"] == 1
    table = format_relation_swap_table(results)
    assert "| ties | left out (same tokens) |" in table and table.splitlines()[2].endswith(" | 2 |")
    with pytest.raises(ValueError, match=r"all 2 probes give the model the same tokens .*\[UNK\]"):
        relation_swap_accuracy(tiny_model, probes[1:], tokenizer, regions)


def test_the_functions_the_script_and_the_app_share_one_smallest_box_share():
    # The functions once defaulted to 2%, the script and the app to 1%: Python callers got 29 of COCO-128's images
    # where the script got 40.
    import inspect

    from imagebert_hf.app.relations import MIN_AREA_FRACTION as app_share
    from imagebert_hf.evaluation.relation_swaps import MIN_AREA_FRACTION

    arguments = runpy.run_path(str(SCRIPT))["RelationSwapArguments"]
    script_share = next(f.default for f in dataclasses.fields(arguments) if f.name == "min_area_fraction")
    function_shares = {
        inspect.signature(function).parameters["min_area_fraction"].default
        for function in (clear_left_right_pair, manifest_swap_probes)
    }
    assert function_shares == {script_share} == {app_share} == {MIN_AREA_FRACTION} == {0.01}
