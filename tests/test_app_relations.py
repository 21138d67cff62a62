"""The app's relations view without a browser: the examples built from a gallery's annotations (the probe's own
captions), their scores against the pipeline's and the unimodal embeddings, the verdict's wording, the gallery's
rate against the per-photo scores, and the page's Markdown and pictures.

Everything runs on the tiny random-weight ImageBERT and 12-photo synthetic gallery of `test_app.py`."""

import numpy as np
import pytest
import torch
from PIL import Image

from imagebert_hf.app.engine import AppInputError, GalleryImage, RetrievalDemo
from imagebert_hf.app.relations import (
    KIND_NAMES,
    TIE_TOLERANCE,
    RelationView,
    ScorerComparison,
    relation_examples,
    share_sentence,
)
from imagebert_hf.data.synthetic import synthetic_swap_captions
from imagebert_hf.evaluation.relation_swaps import manifest_swap_probes
from imagebert_hf.formats.manifest import ManifestRecord

from .test_app import make_tiny_demo, manifest_examples
from .testing_utils import require_module


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tokenizer, make_tiny_extractor, make_tiny_config):
    return make_tiny_demo(tmp_path_factory.mktemp("relations"), tokenizer, make_tiny_extractor, make_tiny_config)


@pytest.fixture(scope="module")
def view(demo):
    return RelationView(demo)


def test_examples_are_the_probes_captions_of_each_annotated_photo(demo, view):
    manifest = demo.gallery[0].path.parents[1] / "captions.jsonl"
    expected = {}
    for example in manifest_examples(manifest):
        captions = synthetic_swap_captions(example)
        if captions is None:
            continue
        twins = {"object_swap": captions["object_swap"]}
        if captions.get("attribute_swap", captions["object_swap"]) != captions["object_swap"]:
            twins["attribute_swap"] = captions["attribute_swap"]
        expected.update({(example["image"], kind): (captions["true"], twin) for kind, twin in twins.items()})
    got = {(e.key, e.kind): (e.true_caption, e.swapped_caption) for e in view.examples}
    assert got == expected and len(view.photos()) >= 6
    for example in view.examples:
        image, record = demo.gallery_image(example.key)
        boxes = np.asarray(record["region_boxes"]).reshape(-1, 4)
        # The true caption's first object is where it says: left of (or above) the second, on the regions' boxes.
        axis = 0 if example.relation == "to the left of" else 1
        assert boxes[example.first, axis + 2] <= boxes[example.second, axis]
        first, second = (image.box_labels[i] for i in (example.first, example.second))
        assert example.true_caption.index(first) < example.true_caption.index(second)
        assert example.swapped_caption != example.true_caption
        assert sorted(example.swapped_caption.split()) == sorted(example.true_caption.split())
        assert view.where(example).startswith(f"the {first} (region centre {'xy'[axis]} = ")


def test_real_photo_labels_give_the_coco_probes_left_right_pair(demo):
    """Labels that are not the synthetic shapes (COCO's) take the real-photo probe's path; a box past the model's
    regions is not used; a photo without boxes has no example."""
    path = demo.gallery[0].path
    boxes = ((2.0, 10.0, 14.0, 30.0), (30.0, 8.0, 46.0, 40.0), (20.0, 0.0, 28.0, 6.0), (0.0, 0.0, 48.0, 48.0))
    labels = ("dog", "person", "kite", "whole image")
    record = {"region_boxes": np.asarray(boxes[:3]), "image_width": 48, "image_height": 48}
    [example] = relation_examples(GalleryImage("street.jpg", path, (), boxes, labels), record)
    manifest = ManifestRecord("street.jpg", path, (), boxes[:3], labels[:3], width=48, height=48)
    [probe], _ = manifest_swap_probes([manifest], min_area_fraction=0.01, control=False)
    assert (example.true_caption, example.swapped_caption) == (probe.true_caption, probe.swapped_caption)
    assert example.true_caption == "a dog to the left of a person" and (example.first, example.second) == (0, 1)
    # Only the first two boxes are regions the model sees: no "kite" pair, and with one box no example at all.
    assert (
        relation_examples(
            GalleryImage("street.jpg", path, (), boxes, labels), {**record, "region_boxes": np.asarray(boxes[:1])}
        )
        == []
    )
    assert relation_examples(GalleryImage("plain.png", path), record) == []


def test_compare_scores_each_caption_as_the_pipeline_and_the_embeddings_do(demo, view):
    example = view.examples[0]
    _, record = demo.gallery_image(example.key)
    comparison = view.compare(example)
    assert [score.scorer for score in comparison.scores] == ["cross_encoder", "dual_encoder"]
    cross, dual = comparison.scores
    for caption, value in ((example.true_caption, cross.true_score), (example.swapped_caption, cross.swapped_score)):
        assert value == pytest.approx(demo.retriever(images=record, texts=caption)["score"], abs=1e-4)
    model = demo.retriever.model
    regions = demo.processor(regions=[record], return_tensors="pt")
    with torch.no_grad():
        image = model.get_region_embeddings(
            regions["region_features"], regions["region_locations"], regions["region_attention_mask"]
        )
        for caption, value in ((example.true_caption, dual.true_score), (example.swapped_caption, dual.swapped_score)):
            text = demo.processor(text=[caption], return_tensors="pt")
            embedding = model.get_text_embeddings(text["input_ids"], text["attention_mask"], text["token_type_ids"])
            assert value == pytest.approx(float((embedding * image).sum()), abs=1e-4)
    # The random model does score the twins differently, and the region importance is the engine's, per caption.
    assert cross.true_score != cross.swapped_score
    assert comparison.true_importance.score == pytest.approx(cross.true_score, abs=1e-4)
    assert comparison.swapped_importance.score == pytest.approx(cross.swapped_score, abs=1e-4)
    np.testing.assert_allclose(
        comparison.swapped_importance.drops, demo.region_importance(example.swapped_caption, record).drops, atol=1e-5
    )


def test_the_verdict_says_who_wins_by_how_much_or_that_they_tie():
    assert ScorerComparison("cross_encoder", 2.5, 1.7).verdict() == "the true caption wins by 0.800"
    assert ScorerComparison("cross_encoder", 0.1, 0.35).verdict() == "the swapped caption wins by 0.250"
    tie = ScorerComparison("dual_encoder", 0.3, 0.3 + TIE_TOLERANCE / 2)
    assert tie.verdict() == "the model cannot tell these apart (equal scores to 3 decimals)"
    assert ScorerComparison("cross_encoder", 1.0, 1.0).margin == 0.0


def test_the_gallery_rate_counts_the_photos_whose_true_caption_wins(view):
    summary = view.summary()
    for kind in ("object_swap", "attribute_swap"):
        mine = [example for example in view.examples if example.kind == kind]
        comparisons = [view.compare(example) for example in mine]
        for position, scorer in enumerate(("cross_encoder", "dual_encoder")):
            margins = [comparison.scores[position].margin for comparison in comparisons]
            result = summary[kind][scorer]
            assert result["n"] == len(mine) and result["wins"] == sum(margin > 0 for margin in margins)
        lines = view.summary_lines(kind)
        assert len(lines) == 2 and lines[0].startswith("cross-encoder (ITM head): the true caption wins for ")


def test_the_rate_is_read_against_its_interval():
    def result(wins, n, low, high, ties=0):
        return {"wins": wins, "n": n, "accuracy": wins / n, "ci_low": low, "ci_high": high, "ties": ties}

    assert "better than chance" in share_sentence(result(90, 100, 0.82, 0.94), "cross_encoder")
    assert "worse than chance: it prefers the twin" in share_sentence(result(10, 100, 0.06, 0.18), "cross_encoder")
    # A low rate made of ties (a tie counts as a loss) is no preference for the twin.
    tied = share_sentence(result(2, 36, 0.015, 0.18, ties=28), "cross_encoder")
    assert "28 ties" in tied and "below chance through ties" in tied and "prefers the twin" not in tied
    chance = share_sentence(result(52, 100, 0.42, 0.62, ties=3), "dual_encoder")
    assert chance == (
        "dual encoder (cosine of embeddings): the true caption wins for 52 of 100 photos (52%, 95% interval 42-62%, "
        "3 ties; chance 50%), no better than chance: the model cannot tell these twins apart."
    )


def test_unknown_words_make_identical_twins_and_the_view_says_so(demo):
    """Labels outside the tokenizer's words ("dog", "person") both become [UNK]: the two captions are the same
    tokens, every scorer gives them one score (up to float noise between batch rows), and the verdict is that the
    model cannot tell them apart."""
    gallery = [
        GalleryImage(
            "street.png",
            demo.gallery[0].path,
            (),
            ((2.0, 10.0, 14.0, 30.0), (30.0, 8.0, 46.0, 40.0), (0.0, 0.0, 48.0, 48.0)),
            ("dog", "person", "whole image"),
        )
    ]
    view = RelationView(RetrievalDemo(demo.retriever, gallery))
    [example] = view.examples
    comparison = view.compare(example)
    text = demo.processor(text=[example.true_caption, example.swapped_caption])["input_ids"]
    assert torch.equal(text[0], text[1])
    assert all(abs(score.margin) < 1e-5 for score in comparison.scores)
    assert all("cannot tell these apart" in score.verdict() for score in comparison.scores)


def test_a_pretraining_checkpoint_is_compared_by_the_cross_encoder_only(demo, tmp_path):
    from transformers import pipeline

    from imagebert_hf import ImageBERTConfig, ImageBERTForPreTraining

    folder = demo.retriever.model.name_or_path
    ImageBERTForPreTraining(ImageBERTConfig.from_pretrained(folder)).save_pretrained(tmp_path)
    demo.processor.save_pretrained(tmp_path)
    pretrained = RetrievalDemo(
        pipeline("image-text-retrieval", model=str(tmp_path)), demo.gallery, records=demo.records
    )
    view = RelationView(pretrained)
    assert list(view.scorers) == ["cross_encoder"]
    assert [score.scorer for score in view.compare(view.examples[0]).scores] == ["cross_encoder"]
    assert set(view.summary()["object_swap"]) == {"chance", "cross_encoder", "indistinguishable"}


def test_picking_an_example(view):
    first = view.examples[0]
    assert view.example(first.key) == first
    both = next(key for key in view.photos() if len(view.kinds(key)) == 2)
    assert view.example(both, "attribute_swap").kind == "attribute_swap"
    only = next((key for key in view.photos() if view.kinds(key) == ["object_swap"]), None)
    if only is not None:  # a photo of two shapes of one kind has no separate colour swap: its object swap instead
        assert view.example(only, "attribute_swap").kind == "object_swap"
    with pytest.raises(AppInputError, match="Pick a gallery photo first"):
        view.example(None)
    with pytest.raises(AppInputError, match="'nope.png' has no relation example"):
        view.example("nope.png")


@require_module("gradio")
def test_relation_view_shows_both_captions_their_scores_and_pictures(demo, view):
    from imagebert_hf.app.ui import relation_view

    example = view.examples[0]
    text, true_picture, twin_picture, error = relation_view(view, example.key, KIND_NAMES[example.kind])
    assert error == "" and isinstance(true_picture, Image.Image) and isinstance(twin_picture, Image.Image)
    comparison = view.compare(example)
    for score in comparison.scores:
        assert f"{score.true_score:.3f}" in text and f"{score.swapped_score:.3f}" in text and score.verdict() in text
    assert f"| true | {example.true_caption} |" in text and f"| twin | {example.swapped_caption} |" in text
    assert view.where(example) in text and "On this gallery" in text and "Dual encoder not shown" not in text
    assert true_picture.size == twin_picture.size and true_picture.tobytes() != twin_picture.tobytes()
    text, true_picture, _, error = relation_view(view, None, None)
    assert text == "" and true_picture is None and "Pick a gallery photo first" in error


@require_module("gradio")
def test_the_page_has_a_relations_tab_only_for_a_gallery_with_relations(demo, tmp_path):
    from imagebert_hf.app import build_app

    def ids(blocks):
        return {block.elem_id for block in blocks.blocks.values() if getattr(block, "elem_id", None)}

    assert {"relations-tab", "relation-pick", "relation-examples", "relation-results"} <= ids(build_app(demo))
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(folder / "plain.png")
    from imagebert_hf.app.engine import read_gallery

    plain = RetrievalDemo(demo.retriever, read_gallery(folder))
    assert RelationView(plain).examples == [] and "relations-tab" not in ids(build_app(plain))


def test_the_gallery_rate_of_a_large_gallery_takes_its_first_photos(demo, monkeypatch):
    import imagebert_hf.app.relations as relations

    monkeypatch.setattr(relations, "MAX_SUMMARY_PHOTOS", 2)
    view = RelationView(demo)
    first = view.photos()[:2]
    summary = view.summary()
    for kind in ("object_swap", "attribute_swap"):
        expected = sum(1 for e in view.examples if e.key in first and e.kind == kind)
        if expected:
            assert summary[kind]["cross_encoder"]["n"] == expected
        else:
            assert kind not in summary
