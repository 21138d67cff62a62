"""The retrieval app without a browser: gallery reading, both searches, region importance and labels, the region
picture, readable errors for bad inputs, the page's construction and the command line.

Everything runs on a tiny random-weight ImageBERT, the synthetic tokenizer and a 12-photo synthetic gallery."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from imagebert_hf import ImageBERTForImageTextRetrieval, ImageBERTProcessor
from imagebert_hf.app.drawing import importance_colour, render_regions
from imagebert_hf.app.engine import (
    AppInputError,
    RegionImportance,
    RetrievalDemo,
    gallery_captions,
    parse_caption_list,
    read_gallery,
    region_labels,
)
from imagebert_hf.data.synthetic import write_synthetic_manifest

from .test_bad_images import png_header_only
from .testing_utils import require_module


QUERY = "a red circle to the left of a blue square"


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


def test_region_labels_name_objects_and_classes(demo):
    image, record = demo.gallery_image(demo.gallery[0].key)
    labels = demo.labels_for(record, image)
    assert [label.name for label in labels] == list(image.box_labels[: len(labels)])
    # The test backbone's classifier is 1000-way: the ImageNet names, with the class probability as the score.
    assert demo.class_names is not None and len(demo.class_names) == 1000 and demo.class_names[0] == "tench"
    grid = demo.photo_regions(demo.load_photo(str(image.path)))
    grid_labels = demo.labels_for(grid)
    assert grid_labels[0].name == "whole image"
    label = int(grid["region_class_labels"][1])
    assert grid_labels[1].name == demo.class_names[label]
    assert grid_labels[1].score == pytest.approx(float(grid["region_class_probs"][1, label]))
    no_classes = region_labels({**grid, "region_class_probs": None}, None)
    assert no_classes[1].name == f"class {label}" and no_classes[1].score is None
    with pytest.raises(AppInputError, match="not a photo of the gallery"):
        demo.gallery_image("nope.png")


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
    table, picture, error = photo_view(demo, str(demo.gallery[3].path), demo.gallery[0].key, "", 2)
    assert error == "" and table.count("\n") == 3

    def broken(*args, **kwargs):
        raise RuntimeError("index went away")

    monkeypatch.setattr(demo, "search_images", broken)
    _, _, _, error = search_view(demo, QUERY, 4)
    assert "something went wrong on the server (RuntimeError: index went away)" in error


@require_module("gradio")
def test_build_app_gives_the_page(demo):
    import gradio as gr

    from imagebert_hf.app import build_app

    blocks = build_app(demo)
    assert isinstance(blocks, gr.Blocks)
    ids = {block.elem_id for block in blocks.blocks.values() if getattr(block, "elem_id", None)}
    assert {"query", "search-button", "result-gallery", "search-regions", "photo-upload", "photo-pick"} <= ids
    assert {"caption-results", "photo-regions", "photo-error", "search-error"} <= ids


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

    from .testing_utils import PROJECT_ROOT

    manifest = demo.gallery[0].path.parents[1] / "captions.jsonl"
    monkeypatch.setenv("IMAGEBERT_MODEL", demo.retriever.model.name_or_path)
    monkeypatch.setenv("IMAGEBERT_GALLERY", str(manifest))
    monkeypatch.setenv("IMAGEBERT_SPLIT", "")
    monkeypatch.setenv("IMAGEBERT_MAX_GALLERY", "4")
    space = runpy.run_path(str(PROJECT_ROOT / "spaces" / "app.py"), run_name="space_app")
    assert isinstance(space["demo"], gr.Blocks) and space["args"].max_gallery == 4 and space["args"].split is None
    header = (PROJECT_ROOT / "spaces" / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in header and "app_file: app.py" in header
