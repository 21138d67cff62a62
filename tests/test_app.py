"""The retrieval app without a browser: gallery reading, both searches, region importance and labels, the region
picture, readable errors for bad inputs, the page's construction and the command line.

Everything runs on a tiny random-weight ImageBERT, the synthetic tokenizer and a 12-photo synthetic gallery."""

import json
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from imagebert_hf import ImageBERTForImageTextRetrieval, ImageBERTProcessor
from imagebert_hf.app.drawing import importance_colour, region_weights, render_regions
from imagebert_hf.app.engine import (
    MAX_PASTED_CAPTIONS,
    MAX_RESULTS,
    MAX_TEXT_CHARACTERS,
    AppInputError,
    GalleryImage,
    RegionImportance,
    RetrievalDemo,
    covering_grid,
    gallery_captions,
    grid_cell_name,
    parse_caption_list,
    read_gallery,
    region_labels,
)
from imagebert_hf.data.synthetic import (
    CLASS_NAMES,
    COLORS,
    SHAPES,
    make_synthetic_examples,
    synthetic_region_record,
    write_synthetic_manifest,
)

from .test_bad_images import png_header_only
from .testing_utils import require_module


QUERY = "a red circle to the left of a blue square"
QUARTERS = ("top-left quarter", "top-right quarter", "bottom-left quarter", "bottom-right quarter")


def make_tiny_app_files(folder, tokenizer, make_tiny_extractor, make_tiny_config):
    """A tiny retrieval model folder (model + processor) and a 12-photo synthetic manifest under `folder` (the
    other arguments are the conftest fixtures)."""
    # A randomly initialised test backbone with its 1000-way classifier: regions mean nothing, but carry classes.
    extractor = make_tiny_extractor(max_regions=6)
    sizes = {**extractor.config_kwargs(), "max_regions": 6}
    # A wide initialisation spreads the random scores apart, so that rankings are not ties.
    config = make_tiny_config(vocab_size=len(tokenizer), initializer_range=0.5, **sizes)
    torch.manual_seed(0)
    model = ImageBERTForImageTextRetrieval(config)
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    ImageBERTProcessor.from_model_config(config, tokenizer, extractor).save_pretrained(model_dir)
    manifest = write_synthetic_manifest(folder / "data", 12, seed=3, image_size=48, test_fraction=0.25)
    return model_dir, manifest


def make_tiny_demo(folder, tokenizer, make_tiny_extractor, make_tiny_config, **kwargs) -> RetrievalDemo:
    from transformers import pipeline

    model_dir, manifest = make_tiny_app_files(folder, tokenizer, make_tiny_extractor, make_tiny_config)
    torch.manual_seed(0)
    retriever = pipeline("image-text-retrieval", model=str(model_dir), device=-1)
    return RetrievalDemo(retriever, read_gallery(manifest), **kwargs)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tokenizer, make_tiny_extractor, make_tiny_config):
    return make_tiny_demo(tmp_path_factory.mktemp("app"), tokenizer, make_tiny_extractor, make_tiny_config)


def test_a_backbone_gallery_keeps_no_class_distributions(demo):
    """Grid cells and annotated boxes are named without classes: a 1,000-class distribution per region would take
    more of a large gallery's memory than its features."""
    assert demo.extractor.backend == "backbone" and demo.extractor.return_class_probs
    photo = demo.extractor.extract([str(demo.gallery[0].path)])[0]
    assert photo["region_class_probs"].shape[-1] == demo.extractor.num_object_classes
    assert not any("region_class_probs" in record for record in demo.records)


def test_read_gallery_from_a_manifest_and_a_folder(demo, tmp_path):
    manifest = demo.gallery[0].path.parents[1] / "captions.jsonl"
    test_split = read_gallery(manifest, split="test")
    assert len(demo.gallery) == 12 and len(test_split) == 3
    assert [image.key for image in test_split] == [image.key for image in demo.gallery[-3:]]
    first = demo.gallery[0]
    # The manifest's objects, then the whole image as one more region, as the demo trains on.
    assert first.boxes[-1] == (0.0, 0.0, 48.0, 48.0) and first.box_labels[-1] == "whole image"
    assert len(first.boxes) == len(first.box_labels) >= 2 and first.captions
    assert read_gallery(manifest, limit=5) == demo.gallery[:5]

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.png", "a.jpg"):
        Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / name)
    (folder / "notes.txt").write_text("not a photo")
    photos = read_gallery(folder)
    assert [p.key for p in photos] == ["a.jpg", "b.png"] and photos[0].boxes is None and photos[0].captions == ()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AppInputError, match="holds no images"):
        read_gallery(empty)
    with pytest.raises(AppInputError, match="folder of images or a .jsonl manifest"):
        read_gallery(tmp_path / "missing.csv")


def test_an_unreadable_gallery_photo_is_named_at_start(demo, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(AppInputError, match=r"1 gallery image\(s\) could not be read:\n  broken.png: "):
        RetrievalDemo(demo.retriever, read_gallery(folder))


def test_caption_helpers():
    assert parse_caption_list(" a red circle \n\n  a blue square\n") == ["a red circle", "a blue square"]
    assert parse_caption_list(None) == []


def test_a_gallery_photo_declaring_a_bomb_size_is_named_at_start(demo, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(folder / "good.png")
    # Beyond PIL's own limit (twice its warning size), where opening the header raises rather than warns.
    (folder / "bomb.png").write_bytes(png_header_only(20000, 20000))
    with pytest.raises(AppInputError, match=r"1 gallery image\(s\) could not be read:\n  bomb.png: .*bomb"):
        RetrievalDemo(demo.retriever, read_gallery(folder))


INVISIBLE = ["\u200b", "\ufeff", "\u2060", "\x00\x07", " \u200b\t"]


def test_lines_of_invisible_characters_are_not_captions(demo):
    assert parse_caption_list("\n".join([*INVISIBLE, "a red circle"])) == ["a red circle"]
    for query in INVISIBLE:
        with pytest.raises(AppInputError, match="Type a query first"):
            demo.search_images(query, 3)


def test_a_request_too_large_for_a_shared_server_is_refused_in_words(demo):
    most = "\n".join(f"a red circle number {i}" for i in range(MAX_PASTED_CAPTIONS))
    assert len(parse_caption_list(most)) == MAX_PASTED_CAPTIONS
    with pytest.raises(AppInputError, match=rf"^{MAX_PASTED_CAPTIONS + 1} captions pasted; at most"):
        parse_caption_list(most + "\none more")
    long = "a red circle " * 200
    with pytest.raises(AppInputError, match=r"^caption 2 has 2,599 characters; at most 2,000 are accepted"):
        parse_caption_list(f"a blue square\n{long}")
    with pytest.raises(AppInputError, match=r"^the query has 2,599 characters; at most 2,000"):
        demo.search_images(long)
    assert len(demo.search_images(long[:MAX_TEXT_CHARACTERS], 2)) == 2


@pytest.mark.parametrize(
    ("top_k", "expected"),
    [
        (MAX_RESULTS + 1, f"must be from 1 to {MAX_RESULTS}, got {MAX_RESULTS + 1}"),
        (10**9, f"must be from 1 to {MAX_RESULTS}, got 1e"),
        (0, f"must be from 1 to {MAX_RESULTS}, got 0"),
        (2.5, "must be a whole number, got 2.5"),
        ("8", "must be a whole number, got '8'"),
        (float("nan"), "must be a whole number, got nan"),
    ],
)
def test_a_result_count_the_page_would_not_send_is_refused_in_words(demo, top_k, expected):
    """The page's API takes any value a client sends; a large one would widen the shortlist the cross-encoder
    re-ranks to the whole gallery."""
    with pytest.raises(AppInputError, match=re.escape(f"the number of photos {expected}")):
        demo.search_images(QUERY, top_k)
    with pytest.raises(AppInputError, match=re.escape(f"the number of captions {expected}")):
        demo.rank_captions(demo.records[0], ["a red circle"], top_k)
    assert len(demo.search_images(QUERY, float(MAX_RESULTS))) == min(MAX_RESULTS, len(demo.gallery))


def test_gallery_index_is_prebuilt_from_region_records(demo):
    assert len(demo.image_index) == len(demo.records) == 12
    assert demo.image_index.items is not None and demo.image_index.kind == "images"
    assert demo.captions == gallery_captions(demo.gallery) and len(demo.caption_index) == len(demo.captions)
    for image, record in zip(demo.gallery, demo.records):
        assert record["image_id"] == image.key and record["error"] is None
        # The annotated boxes (plus the whole image) are the regions, capped at the model's max_regions.
        np.testing.assert_allclose(record["region_boxes"], np.asarray(image.boxes)[: demo.max_regions], atol=1e-4)


def test_search_images_is_the_pipelines_full_ranking(demo):
    hits = demo.search_images(QUERY, top_k=5)
    assert [hit.rank for hit in hits] == [1, 2, 3, 4, 5]
    scores = [hit.score for hit in hits]
    assert scores == sorted(scores, reverse=True) and len(set(np.round(scores, 4))) > 1
    full = demo.retriever(images=demo.records, texts=QUERY)
    assert [demo.records[r["index"]]["image_id"] for r in full[:5]] == [hit.image.key for hit in hits]
    assert scores == pytest.approx([r["score"] for r in full[:5]], abs=1e-5)
    assert all(hit.record is demo.records[demo.gallery.index(hit.image)] for hit in hits)


def test_a_small_shortlist_re_ranks_the_index_neighbours(demo):
    small = RetrievalDemo(demo.retriever, demo.gallery, shortlist_k=4)
    hits = small.search_images(QUERY, top_k=3)
    text = demo.processor(text=[QUERY], return_tensors="pt")
    with torch.no_grad():
        embedding = demo.retriever.model.get_text_embeddings(
            text["input_ids"], text["attention_mask"], text["token_type_ids"]
        )
    shortlist = {demo.gallery[i].key for i in small.image_index.search(embedding, 4)[0].tolist()}
    assert len(hits) == 3 and {hit.image.key for hit in hits} <= shortlist
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)


def test_rank_captions_of_the_gallery_or_pasted(demo):
    record = demo.records[0]
    hits = demo.rank_captions(record, top_k=4)
    full = demo.retriever(images=record, texts=demo.captions)
    assert [hit.text for hit in hits] == [r["text"] for r in full[:4]]
    pasted = ["a green cross", "an orange circle above a purple square"]
    mine = demo.rank_captions(record, pasted, top_k=10)
    assert sorted(hit.text for hit in mine) == sorted(pasted) and mine[0].score >= mine[1].score
    photo = demo.load_photo(str(demo.gallery[1].path))
    uploaded = demo.photo_regions(photo)
    # An upload gets the extractor's own regions (the 1 + 4 grid), not the annotations.
    assert uploaded["num_regions"] == 5 and demo.rank_captions(uploaded, top_k=2)[0].rank == 1


def test_region_importance_is_the_score_drop_of_each_region_removed(demo):
    record = demo.records[2]
    importance = demo.region_importance(QUERY, record)
    count = int(record["num_regions"])
    assert importance.drops.shape == (count,)
    assert importance.score == pytest.approx(demo.retriever(images=record, texts=QUERY)["score"], abs=1e-5)
    for region in range(count):
        keep = [i for i in range(count) if i != region]
        fewer = {
            key: (value[keep] if isinstance(value, np.ndarray) and len(value) == count else value)
            for key, value in record.items()
        }
        without = demo.retriever(images=fewer, texts=QUERY)["score"]
        assert importance.drops[region] == pytest.approx(importance.score - without, abs=1e-4)
    assert importance.ranking()[0] == int(np.argmax(importance.drops))


def test_region_labels_say_where_each_name_comes_from(demo):
    image, record = demo.gallery_image(demo.gallery[0].key)
    labels = demo.labels_for(record, image)
    # A gallery photo: the manifest's object names, then the whole image; no number, since nothing was predicted.
    assert [label.name for label in labels] == list(image.box_labels[: len(labels)])
    assert [label.source for label in labels] == ["annotation"] * (len(labels) - 1) + ["whole image"]
    assert all(label.score is None for label in labels)
    # An upload: grid cells named by their place, never by the backbone's ImageNet guess for the cell.
    grid = demo.photo_regions(demo.load_photo(str(image.path)))
    grid_labels = demo.labels_for(grid)
    assert [label.name for label in grid_labels] == ["whole image", *QUARTERS]
    assert [label.source for label in grid_labels] == ["whole image"] + ["grid"] * 4
    assert demo.class_names is None and all(label.score is None for label in grid_labels)
    # A detector's regions: its class and the probability of that class.
    detections = {
        "region_boxes": np.array([[0, 0, 10, 10], [5, 5, 30, 20]], dtype=np.float32),
        "region_class_labels": np.array([1, 2]),
        "region_class_probs": np.array([[0.1, 0.7, 0.2], [0.0, 0.1, 0.9]], dtype=np.float32),
        "image_width": 40,
        "image_height": 40,
    }
    named = region_labels(detections, "detector", ["cat", "dog", "kite"])
    assert [(label.name, label.source) for label in named] == [("dog", "detector"), ("kite", "detector")]
    assert [label.score for label in named] == pytest.approx([0.7, 0.9])
    unnamed = region_labels({**detections, "region_class_probs": None}, "detector")
    assert [label.name for label in unnamed] == ["class 1", "class 2"] and unnamed[0].score is None
    with pytest.raises(AppInputError, match="not a photo of the gallery"):
        demo.gallery_image("nope.png")


def test_grid_cells_are_named_by_their_place():
    assert grid_cell_name((0, 0, 90, 60), 90, 60) == "whole image"
    assert grid_cell_name((45, 0, 90, 60), 90, 60) == "right half"
    assert grid_cell_name((0, 30, 90, 60), 90, 60) == "bottom half"
    assert grid_cell_name((45, 0, 90, 30), 90, 60) == "top-right quarter"
    assert grid_cell_name((30, 20, 60, 40), 90, 60) == "row 2, col 2 of 3x3"
    assert grid_cell_name((10, 10, 50, 33), 90, 60) is None


def _covered(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    covered = np.zeros((height, width), dtype=bool)
    for x1, y1, x2, y2 in np.round(boxes).astype(int):
        covered[y1:y2, x1:x2] = True
    return covered


@pytest.mark.parametrize("max_regions", range(1, 16))
@pytest.mark.parametrize("size", [(64, 48), (48, 64)])
def test_an_uploads_regions_cover_the_whole_photo_whatever_max_regions(max_regions, size):
    width, height = size
    boxes = covering_grid(width, height, (1, 2, 3, 4, 5, 6), max_regions)
    assert 1 <= len(boxes) <= max_regions and _covered(boxes, width, height).all()
    assert grid_cell_name(boxes[0], width, height) == "whole image"
    assert all(grid_cell_name(box, width, height) for box in boxes)  # every box is a grid cell or a half
    # Beyond the whole image: only finer cells, each level whole (4 quarters, 9 thirds...) or two halves.
    expected = {1: 1, 2: 1, 3: 3, 4: 3, 5: 5, 14: 14, 15: 14}.get(max_regions)
    assert expected is None or len(boxes) == expected
    if max_regions in (3, 4):
        halves = ("left half", "right half") if width >= height else ("top half", "bottom half")
        assert [grid_cell_name(box, width, height) for box in boxes[1:]] == list(halves)


def test_the_extractors_own_grid_would_leave_a_quarter_out():
    """The bug `covering_grid` fixes: the grid cut at 4 regions is the whole image and three quarters, so a
    photo whose objects sit in the fourth quarter is described by the whole image alone there."""
    from imagebert_hf.models.imagebert.roi_boxes import grid_boxes

    cut = grid_boxes(64, 64, (1, 2, 3))[:4]
    assert _covered(cut[1:], 64, 64).mean() == pytest.approx(0.75)
    assert _covered(covering_grid(64, 64, (1, 2, 3), 4)[1:], 64, 64).all()


def test_an_upload_is_seen_whole_with_a_small_max_regions(demo, monkeypatch):
    photo = demo.load_photo(str(demo.gallery[5].path))
    monkeypatch.setattr(demo.processor, "max_regions", 4)
    record = demo.photo_regions(photo)
    assert record["num_regions"] == 3 and _covered(record["region_boxes"][1:], photo.width, photo.height).all()
    assert [label.name for label in demo.labels_for(record)] == ["whole image", "left half", "right half"]
    # The scores go through: each of the three regions has its importance.
    assert demo.region_importance(QUERY, record).drops.shape == (3,)


def test_region_picture_colours_boxes_by_importance(demo):
    image, record = demo.gallery[0], demo.records[0]
    count = int(record["num_regions"])
    drops = np.zeros(count, dtype=np.float32)
    drops[0] = 2.0  # the first object supported the match strongly, the others not at all
    importance = RegionImportance(1.0, drops)
    with Image.open(image.path) as photo:
        picture = render_regions(photo, record, demo.labels_for(record, image), importance, text=QUERY)
        plain = render_regions(photo, record, demo.labels_for(record, image))
    assert picture.width > 448 and picture.height >= 448 and plain.size[0] == picture.size[0]
    scale = 448 / 48
    x1, y1, x2, y2 = (float(v) * scale for v in record["region_boxes"][0])
    # The left edge of the most important box, halfway down, is drawn in the "supported" red.
    edge = picture.getpixel((int(x1) + 2, int((y1 + y2) / 2)))
    assert edge == importance_colour(1.0) and edge[0] > 150 > edge[2]
    assert importance_colour(0.0) == (150, 150, 150) and importance_colour(-1.0)[2] > importance_colour(-1.0)[0]


# ------------------------------------------------------------------------------------------ a model with known answers


def with_article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def manifest_examples(manifest) -> list[dict]:
    """The manifest's lines as synthetic examples (`image_id`, `objects`, `width`, `height`, `captions`)."""
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


def train_grounded_model(folder, tokenizer, make_tiny_extractor, make_tiny_config, steps: int = 800):
    """A tiny retrieval model whose scores depend on the regions a text names, saved with its processor in `folder`.

    It learns on region records made from the synthetic annotations (`synthetic_region_record`: each object's feature
    is its colour's direction plus its shape's), from its own images (seed 11, not the gallery's): a caption or an
    object name is a match for its photo (1), not for the same photo with a region it names masked out (0),
    while masking a region it does not name keeps the match (1); not a match for an object whose colour is absent
    (0); and a match for another photo only when that photo holds every object it names. So the known answer:
    masking the region a text names lowers the text's score, more than masking another object does.
    """
    extractor = make_tiny_extractor(max_regions=6)
    config = make_tiny_config(vocab_size=len(tokenizer), **{**extractor.config_kwargs(), "max_regions": 6})
    processor = ImageBERTProcessor.from_model_config(config, tokenizer, extractor)
    train = make_synthetic_examples(200, seed=11, image_size=48)
    # Every image has two objects and the whole image: three regions, so the batches need no region padding.
    regions = processor(
        text=[example["captions"][0] for example in train],
        regions=[synthetic_region_record(example, extractor.region_feature_size) for example in train],
        return_tensors="pt",
    )
    ids = {}

    def token_ids(text: str) -> list[int]:
        if text not in ids:
            ids[text] = tokenizer(text)["input_ids"]
        return ids[text]

    torch.manual_seed(0)
    model = ImageBERTForImageTextRetrieval(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = random.Random(0)
    for _ in range(steps):
        texts, images, labels, masked = [], [], [], []
        for _ in range(16):
            i = rng.randrange(len(train))
            names = [obj["label"] for obj in train[i]["objects"]]
            text = with_article(rng.choice(names)) if rng.random() < 0.5 else rng.choice(train[i]["captions"])
            named = [k for k, name in enumerate(names) if name in text]
            unnamed = [k for k in range(len(names) + 1) if k not in named]  # the last region is the whole image
            colours = {name.split()[0] for name in names}
            absent = rng.choice([name for name in CLASS_NAMES if name.split()[0] not in colours])
            j = rng.randrange(len(train))
            other = {obj["label"] for obj in train[j]["objects"]}
            texts += [text, text, text, with_article(absent), text]
            images += [i, i, i, i, j]
            labels += [1, 0, 1, 0, int(all(names[k] in other for k in named))]
            masked += [None, rng.choice(named), rng.choice(unnamed), None, None]
        length = max(len(token_ids(text)) for text in texts)
        input_ids = torch.tensor([token_ids(text) + [0] * (length - len(token_ids(text))) for text in texts])
        region_mask = regions["region_attention_mask"][images].clone()
        for row, region in enumerate(masked):
            if region is not None:
                region_mask[row, region] = 0
        loss = model(
            input_ids=input_ids,
            attention_mask=(input_ids != 0).long(),
            region_features=regions["region_features"][images],
            region_locations=regions["region_locations"][images],
            region_attention_mask=region_mask,
            labels=torch.tensor(labels),
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def grounded_demo(demo, tmp_path_factory, tokenizer, make_tiny_extractor, make_tiny_config):
    """The 12-photo gallery over `train_grounded_model`, its regions made from the annotations the same way."""
    from transformers import pipeline

    folder = train_grounded_model(
        tmp_path_factory.mktemp("grounded"), tokenizer, make_tiny_extractor, make_tiny_config
    )
    retriever = pipeline("image-text-retrieval", model=str(folder), device=-1)
    manifest = demo.gallery[0].path.parents[1] / "captions.jsonl"
    feature_size = retriever.processor.image_processor.region_feature_size
    records = [synthetic_region_record(example, feature_size) for example in manifest_examples(manifest)]
    return RetrievalDemo(retriever, read_gallery(manifest), records=records)


def named_objects(text: str) -> list[str]:
    """The "colour shape" names a synthetic caption or query mentions."""
    words = text.split()
    return [f"{a} {b}" for a, b in zip(words, words[1:]) if a in COLORS and b in SHAPES]


@require_module("gradio")
def test_the_placeholder_query_is_answered_by_the_gallery(grounded_demo):
    from imagebert_hf.app import build_app

    demo = grounded_demo
    examples = demo.example_queries()
    assert len(examples) == 3 and len(set(examples)) == 3
    for query in examples:
        top = demo.search_images(query, 1)[0]
        # The best match holds every object the query names (the annotations say so), and carries the caption.
        assert query in top.image.captions
        assert set(named_objects(query)) <= set(top.image.box_labels) and named_objects(query)
    blocks = build_app(demo)
    [box] = [block for block in blocks.blocks.values() if getattr(block, "elem_id", None) == "query"]
    assert box.placeholder == examples[0]


def test_masking_the_region_a_text_names_lowers_its_score(grounded_demo):
    demo = grounded_demo
    for image, record in zip(demo.gallery, demo.records):
        objects = image.box_labels[:-1]  # the last region is the whole image
        for text in (*image.captions, *(with_article(name) for name in objects)):
            importance = demo.region_importance(text, record)
            named = [k for k, name in enumerate(objects) if name in named_objects(text)]
            assert named and all(importance.drops[k] > 0 for k in named), (text, importance.drops)
            if len(named) == 1:  # one object named: it matters more than the other one
                other = 1 - named[0]
                assert importance.drops[named[0]] > importance.drops[other], (text, importance.drops)
            if text == image.captions[0]:
                # The picture draws the named regions red (masking them lowers the score), never blue.
                weights = region_weights(importance, len(importance.drops))
                assert all(importance_colour(weights[k])[0] > importance_colour(weights[k])[2] for k in named)


@pytest.fixture
def bad_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a photo\n")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(30000, 30000))
    return text, bomb


@require_module("gradio")
def test_views_show_readable_messages_for_bad_inputs(demo, bad_files):
    from imagebert_hf.app.ui import photo_view, search_view

    text, bomb = bad_files
    items, table, picture, error = search_view(demo, "   ", 4)
    assert items == [] and picture is None and "Type a query first" in error
    table, picture, error = photo_view(demo, str(text), None, "", 3)
    assert picture is None and "notes.txt is not a usable image" in error and "Traceback" not in error
    table, picture, error = photo_view(demo, str(bomb), None, "", 3)
    assert picture is None and "bomb.png is not a usable image" in error and "decompression bomb" in error
    table, picture, error = photo_view(demo, None, None, "", 3)
    assert "Upload a photo or pick one" in error


@require_module("gradio")
def test_views_on_good_inputs(demo, monkeypatch):
    from imagebert_hf.app.ui import photo_view, search_view

    items, table, picture, error = search_view(demo, QUERY, 4)
    assert error == "" and len(items) == 4 and isinstance(picture, Image.Image)
    hits = demo.search_images(QUERY, 4)
    assert [caption for _, caption in items] == [f"#{hit.rank}  {hit.score:.3f}" for hit in hits]
    assert [path for path, _ in items] == [str(hit.image.path) for hit in hits]
    assert table.count("\n") == 5 and hits[0].image.path.name in table
    table, picture, error = photo_view(demo, None, demo.gallery[3].key, "a green cross\nan orange circle", 5)
    assert error == "" and "a green cross" in table and isinstance(picture, Image.Image)
    assert table.startswith(f"Captions ranked for the gallery photo **{demo.gallery[3].path.name}**")
    # An upload wins over a pick, and the table says which photo it ranked.
    table, picture, error = photo_view(demo, str(demo.gallery[3].path), demo.gallery[0].key, "", 2)
    assert error == "" and table.startswith(f"Captions ranked for the uploaded photo **{demo.gallery[3].path.name}**")
    assert table.count("\n") == 5  # the line naming the photo, a blank line, the header, the rule and two captions

    def broken(*args, **kwargs):
        raise RuntimeError("index went away")

    monkeypatch.setattr(demo, "search_images", broken)
    _, _, _, error = search_view(demo, QUERY, 4)
    assert "something went wrong on the server (RuntimeError: index went away)" in error


@require_module("gradio")
def test_build_app_gives_the_page(demo):
    import gradio as gr

    from imagebert_hf.app import build_app, launch_app

    blocks = build_app(demo)
    assert isinstance(blocks, gr.Blocks)
    ids = {block.elem_id for block in blocks.blocks.values() if getattr(block, "elem_id", None)}
    assert {"query", "search-button", "result-gallery", "search-regions", "photo-upload", "photo-pick"} <= ids
    assert {"caption-results", "photo-regions", "photo-error", "search-error"} <= ids
    # Uploads are refused by gradio at the extractor's own file size limit, not at a size of the page's.
    demo.extractor.max_file_bytes, default = 1_000_000, demo.extractor.max_file_bytes
    try:
        launched = {}
        blocks = build_app(demo)
        blocks.launch = lambda **kwargs: launched.update(kwargs)
        launch_app(blocks)
        assert launched["max_file_size"] == 1_000_000
    finally:
        demo.extractor.max_file_bytes = default


def test_the_header_says_how_queries_are_ranked_and_counts_the_captions(demo, tmp_path):
    from imagebert_hf import ImageBERTConfig, ImageBERTForPreTraining
    from imagebert_hf.app.ui import page_header

    # A retrieval checkpoint with its unimodal heads: a shortlist only where the gallery is larger than shortlist_k.
    assert demo.untrained_heads == [] and not demo.uses_shortlist(12)
    assert "all 12 photos are scored by the cross-encoder" in demo.ranking_summary()
    small = RetrievalDemo(demo.retriever, demo.gallery, shortlist_k=4, records=demo.records)
    assert small.uses_shortlist(12) and "the 4 photos nearest by the unimodal embeddings" in small.ranking_summary()

    # A pretraining checkpoint (untrained unimodal heads): the pipeline ranks everything, and the header says so.
    from transformers import pipeline

    folder = demo.retriever.model.name_or_path
    pretrained = tmp_path / "pretrained"
    ImageBERTForPreTraining(ImageBERTConfig.from_pretrained(folder)).save_pretrained(pretrained)
    demo.processor.save_pretrained(pretrained)
    untrained = RetrievalDemo(pipeline("image-text-retrieval", model=str(pretrained)), demo.gallery, shortlist_k=4)
    assert untrained.untrained_heads and not untrained.uses_shortlist(12)
    summary = untrained.ranking_summary()
    assert "no index shortlist is used" in summary and "nearest" not in summary
    # The pipeline agrees: its ranking is the full one, whatever shortlist_k is.
    full = untrained.retriever(images=untrained.records, texts=QUERY)
    assert [hit.image.key for hit in untrained.search_images(QUERY, 3)] == [
        untrained.gallery[r["index"]].key for r in full[:3]
    ]

    # Captions counted per photo, as an evaluation of the split counts them, and the distinct texts ranked.
    twins = [
        GalleryImage(f"{i}.png", image.path, ("a red circle", f"caption {i}"))
        for i, image in enumerate(demo.gallery[:3])
    ]
    shared = RetrievalDemo(demo.retriever, twins, records=demo.records[:3])
    assert shared.num_caption_lines == 6 and len(shared.captions) == 4
    assert "gallery of 3 photos with 6 captions (4 distinct texts, each ranked once)" in page_header(shared, "T")
    distinct = len(demo.captions)
    counts = "24 captions" + (f" ({distinct} distinct texts, each ranked once)" if distinct != 24 else "")
    assert demo.num_caption_lines == 24 and f"gallery of 12 photos with {counts} ·" in page_header(demo, "T")


def test_command_line_loads_a_model_and_a_gallery(demo, tmp_path, monkeypatch):
    from imagebert_hf.app import cli

    model_dir = demo.retriever.model.name_or_path
    manifest = demo.gallery[0].path.parents[1] / "captions.jsonl"
    (args,) = cli.HfArgumentParser(cli.AppArguments).parse_args_into_dataclasses(
        args=["--model", model_dir, "--gallery", str(manifest), "--split", "test", "--shortlist_k", "2"]
    )
    loaded = cli.load_demo(args)
    assert [image.key for image in loaded.gallery] == [image.key for image in demo.gallery[-3:]]
    assert loaded.shortlist_k == 2 and args.host == "127.0.0.1"
    with pytest.raises(SystemExit, match="--gallery is needed"):
        cli.load_demo(cli.AppArguments(model=model_dir))

    # The default model: an existing demo folder is used as it is; a missing one without the script says why.
    demo_dir = tmp_path / "demo"
    (demo_dir / cli.DEMO_MODEL).mkdir(parents=True)
    (demo_dir / cli.DEMO_MODEL / "config.json").write_text("{}")
    (demo_dir / cli.DEMO_GALLERY).parent.mkdir(parents=True)
    (demo_dir / cli.DEMO_GALLERY).write_text("")
    assert cli.ensure_demo_model(demo_dir) == demo_dir / cli.DEMO_MODEL
    monkeypatch.setattr(cli, "find_demo_script", lambda: None)
    with pytest.raises(SystemExit, match="pass --model and --gallery"):
        cli.ensure_demo_model(tmp_path / "elsewhere")
    assert cli.find_demo_script is not None


def test_the_package_imports_without_gradio():
    code = "import sys; sys.modules['gradio'] = None; import imagebert_hf, imagebert_hf.app; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@require_module("gradio")
def test_the_space_app_builds_the_page_from_its_folder(demo, monkeypatch):
    import runpy

    import gradio as gr

    from imagebert_hf.app import cli

    from .testing_utils import PROJECT_ROOT

    load_demo = cli.load_demo
    manifest = demo.gallery[0].path.parents[1] / "captions.jsonl"
    monkeypatch.setenv("IMAGEBERT_MODEL", demo.retriever.model.name_or_path)
    monkeypatch.setenv("IMAGEBERT_GALLERY", str(manifest))
    monkeypatch.setenv("IMAGEBERT_SPLIT", "")
    monkeypatch.setenv("IMAGEBERT_MAX_GALLERY", "4")
    built = []
    monkeypatch.setattr(cli, "load_demo", lambda args: built.append(load_demo(args)) or built[-1])
    space = runpy.run_path(str(PROJECT_ROOT / "spaces" / "app.py"), run_name="space_app")
    assert isinstance(space["demo"], gr.Blocks) and space["args"].max_gallery == 4 and space["args"].split is None
    # The manifest's boxes (and the whole photo), as `make app` pools the demo checkpoint's gallery: not a grid.
    (served,) = built
    for photo, record in zip(served.gallery, served.records, strict=True):
        assert photo.boxes and record["region_boxes"].tolist() == [list(box) for box in photo.boxes]
    monkeypatch.setenv("IMAGEBERT_GALLERY_REGIONS", "grid")
    with pytest.raises(ValueError, match="--gallery_regions must be one of"):
        runpy.run_path(str(PROJECT_ROOT / "spaces" / "app.py"), run_name="space_app")
    header = (PROJECT_ROOT / "spaces" / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in header and "app_file: app.py" in header
