"""The app over a region cache (`imagebert-app --region_cache`): the gallery's regions are read from the cache's
memory-mapped shards rather than extracted at start, rank as the same regions extracted, keep a record's annotated
names only where its regions are the annotated boxes, and a cache that lacks photos or fits another model is named.

A tiny random-weight model and a 12-photo synthetic gallery, as in test_app.py."""

import socket

import datasets
import numpy as np
import pytest
import torch
from transformers import pipeline

from imagebert_hf.app.cli import load_demo, main, parse_args
from imagebert_hf.app.engine import (
    AppInputError,
    CachedGalleryRecords,
    GalleryImage,
    RetrievalDemo,
    annotated_labels,
    fit_regions,
    read_gallery,
)
from imagebert_hf.app.relations import RelationView
from imagebert_hf.regions import extract_regions, load_region_cache
from imagebert_hf.regions.cache_reader import RegionCache

from .test_app import QUERY, make_tiny_app_files
from .testing_utils import PROJECT_ROOT, require_module


MAX_REGIONS = 6


@pytest.fixture(scope="module")
def app_files(tmp_path_factory, tokenizer, make_tiny_extractor, make_tiny_config):
    return make_tiny_app_files(tmp_path_factory.mktemp("app"), tokenizer, make_tiny_extractor, make_tiny_config)


@pytest.fixture(scope="module")
def retriever(app_files):
    torch.manual_seed(0)
    return pipeline("image-text-retrieval", model=str(app_files[0]), device=-1)


def extract_gallery_boxes(manifest, output_dir, extractor, lines=None) -> None:
    """A float32 cache of the manifest's photos over the boxes the app pools them over when it extracts them itself
    (the annotated objects and the whole image, `fit_regions`), keyed by the manifest's image paths."""
    gallery = [fit_regions(image, MAX_REGIONS) for image in read_gallery(manifest)][:lines]
    table = datasets.Dataset.from_dict(
        {
            "image": [str(image.path) for image in gallery],
            "key": [image.key for image in gallery],
            "boxes": [[list(box) for box in image.boxes] for image in gallery],
        }
    )
    extract_regions(
        table, output_dir, extractor, key_column="key", boxes_column="boxes", storage_dtype="float32", progress=False
    )


@pytest.fixture(scope="module")
def box_cache(app_files, retriever, tmp_path_factory):
    folder = tmp_path_factory.mktemp("regions") / "boxes"
    extract_gallery_boxes(app_files[1], folder, retriever.processor.image_processor)
    return folder


def no_extraction(*args, **kwargs):
    raise AssertionError("the gallery was extracted although its regions are in the cache")


def test_a_cached_gallery_ranks_as_the_same_regions_extracted_without_extracting(
    app_files, retriever, box_cache, monkeypatch
):
    extracted = RetrievalDemo(retriever, read_gallery(app_files[1]))
    monkeypatch.setattr(retriever.processor.image_processor, "extract", no_extraction)
    cached = RetrievalDemo(retriever, read_gallery(app_files[1]), region_cache=load_region_cache(box_cache))

    assert isinstance(cached.records, CachedGalleryRecords)
    for query in (QUERY, "a green triangle above a yellow cross"):
        want = extracted.search_images(query, top_k=12)
        got = cached.search_images(query, top_k=12)
        assert [hit.image.key for hit in got] == [hit.image.key for hit in want]
        np.testing.assert_allclose([hit.score for hit in got], [hit.score for hit in want], atol=1e-4)
    photo, record = cached.gallery_image(extracted.gallery[3].key)
    want_photo, want_record = extracted.gallery_image(photo.key)
    np.testing.assert_allclose(record["region_features"], want_record["region_features"], atol=1e-5)
    np.testing.assert_array_equal(record["region_boxes"], want_record["region_boxes"])
    assert cached.labels_for(record, photo) == extracted.labels_for(want_record, want_photo)
    assert [label.source for label in cached.labels_for(record, photo)][-1] == "whole image"
    assert "annotation" in {label.source for label in cached.labels_for(record, photo)}
    assert RelationView(cached).examples == RelationView(extracted).examples
    captions = cached.rank_captions(record, top_k=3)
    assert [hit.text for hit in captions] == [hit.text for hit in extracted.rank_captions(want_record, top_k=3)]


def test_a_folder_gallery_reads_no_record_until_a_photo_is_shown(app_files, retriever, tmp_path, monkeypatch):
    """The gallery holds keys: building the indexes and the relation view decodes no record (the index reads the
    mapped shards in batches), and a hit decodes only its own."""
    folder = app_files[1].parent / "images"
    photos = read_gallery(folder)
    table = datasets.Dataset.from_dict({"image": [str(image.path) for image in photos]})
    extract_regions(table, tmp_path / "cache", retriever.processor.image_processor, progress=False)
    reads = []
    original = RegionCache.__getitem__
    monkeypatch.setattr(RegionCache, "__getitem__", lambda cache, key: reads.append(key) or original(cache, key))

    demo = RetrievalDemo(retriever, photos, region_cache=load_region_cache(tmp_path / "cache"))
    RelationView(demo)
    assert reads == []
    hits = demo.search_images(QUERY, top_k=2)
    assert len(reads) == 2 and reads == [str(hit.image.path) for hit in hits]
    # Grid cells are named by their place; the cache's regions are the model's first MAX_REGIONS.
    assert {label.source for label in demo.labels_for(hits[0].record, hits[0].image)} <= {"grid", "whole image"}


def test_a_cache_over_other_boxes_gets_no_annotated_names(app_files, retriever, tmp_path):
    """A manifest gallery (annotated boxes) over a cache extracted on the extractor's grid: the regions are grid
    cells, so the manifest's object names must not be written on them, nor relation examples made of them."""
    extract_regions(app_files[1], tmp_path / "grid", retriever.processor.image_processor, progress=False)
    demo = RetrievalDemo(retriever, read_gallery(app_files[1]), region_cache=load_region_cache(tmp_path / "grid"))

    photo, record = demo.gallery_image(demo.gallery[0].key)
    assert photo.box_labels and len(record["region_boxes"]) == 5  # the 1x1 and 2x2 grids
    sources = [label.source for label in demo.labels_for(record, photo)]
    assert "annotation" not in sources and set(sources) <= {"grid", "whole image"}
    assert RelationView(demo).examples == []


def test_annotated_labels_follow_the_boxes_of_the_record():
    image = GalleryImage(
        "a.png",
        None,
        boxes=((10.0, 10.0, 30.0, 30.0), (40.0, 0.0, 120.0, 50.0), (0.0, 0.0, 100.0, 50.0)),
        box_labels=("red circle", "blue square", "whole image"),
    )
    # The second box leaves the 100x50 photo: the extractor clipped it. The third region is not the third box.
    record = {
        "region_boxes": np.array([[10, 10, 30, 30], [40, 0, 100, 50], [0, 0, 50, 25]], dtype=np.float32),
        "image_width": 100,
        "image_height": 50,
    }
    assert annotated_labels(image, record) == ["red circle", "blue square", None]
    # A region the extractor dropped shifts the rest: no name follows a box to another region.
    record["region_boxes"] = record["region_boxes"][1:]
    assert annotated_labels(image, record) == [None, None]
    assert annotated_labels(GalleryImage("b.png", None), record) == [None, None]


def test_cached_records_are_cut_to_the_regions_the_model_reads(app_files, retriever, tmp_path):
    """A cache made with more regions than the model reads: the records the app shows and re-ranks hold the first
    `max_regions`, as an evaluation over the cache cuts them."""
    wide = retriever.processor.image_processor.__class__(
        **{**retriever.processor.image_processor.to_dict(), "max_regions": 10, "grid_sizes": [1, 2, 3]}
    )
    extract_regions(app_files[1], tmp_path / "wide", wide, progress=False)
    cache = load_region_cache(tmp_path / "wide")
    assert cache.num_regions(cache.keys()[0]) == 10
    demo = RetrievalDemo(retriever, read_gallery(app_files[1]), region_cache=cache)

    record = demo.records[0]
    assert record["num_regions"] == MAX_REGIONS
    assert all(len(record[name]) == MAX_REGIONS for name in ("region_features", "region_boxes", "region_locations"))
    np.testing.assert_array_equal(record["region_features"], cache[demo.records.keys[0]]["region_features"][:6])
    assert len(demo.records[:3]) == 3 and len(demo.records) == 12


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_command_serves_a_cached_gallery_and_names_a_cache_that_lacks_photos(app_files, retriever, tmp_path):
    model, manifest = app_files
    part = tmp_path / "part"
    extract_gallery_boxes(manifest, part, retriever.processor.image_processor, lines=5)
    with pytest.raises(AppInputError) as error:
        load_demo(parse_args(["--model", str(model), "--gallery", str(manifest), "--region_cache", str(part)]))
    message = str(error.value)
    assert message.startswith(f"--region_cache {part}: 7 of 12 gallery photo(s) have no regions there: ")
    assert read_gallery(manifest)[5].key in message and "imagebert-extract-regions" in message

    flags = ["--model", str(model), "--gallery", str(manifest), "--max_gallery", "5", "--region_cache", str(part)]
    demo = load_demo(parse_args(flags))
    assert len(demo.gallery) == 5 and isinstance(demo.records, CachedGalleryRecords)
    assert demo.search_images(QUERY, top_k=5)[0].image.key in {image.key for image in demo.gallery}


@pytest.mark.parametrize("problem", ["not_a_cache", "other_feature_size"])
def test_the_command_refuses_a_region_cache_it_cannot_use_in_one_line(
    app_files, retriever, tmp_path, problem, make_tiny_extractor
):
    model, manifest = app_files
    cache = tmp_path / "cache"
    if problem == "not_a_cache":
        cache.mkdir()
        expected = f"--region_cache {cache}: not a region cache"
    else:
        other = make_tiny_extractor(max_regions=MAX_REGIONS, backbone_out_indices=(2,))
        assert other.region_feature_size != retriever.model.config.region_feature_size
        extract_regions(manifest, cache, other, progress=False)
        expected = f"--region_cache {cache} holds regions of {other.region_feature_size} features"
    flags = ["--model", str(model), "--gallery", str(manifest), "--region_cache", str(cache)]
    with pytest.raises(SystemExit) as exit_:
        main([*flags, "--port", str(free_port())])
    assert str(exit_.value).startswith(f"imagebert-app: error: {expected}")
    assert "\n" not in str(exit_.value)


def test_the_documented_commands_extract_with_the_models_extractor_and_serve_from_the_cache(
    app_files, retriever, tmp_path, monkeypatch
):
    from imagebert_hf.regions.cli import main as extract_main

    model, manifest = app_files
    cache = tmp_path / "regions"
    assert extract_main(["--manifest", str(manifest), "--extractor", str(model), "--output_dir", str(cache)]) == 0
    extracted = load_demo(parse_args(["--model", str(model), "--gallery", str(manifest)]))
    monkeypatch.setattr(retriever.processor.image_processor.__class__, "extract", no_extraction)
    served = load_demo(parse_args(["--model", str(model), "--gallery", str(manifest), "--region_cache", str(cache)]))
    want, got = extracted.search_images(QUERY, top_k=12), served.search_images(QUERY, top_k=12)
    assert [hit.image.key for hit in got] == [hit.image.key for hit in want]
    # The cache stores float16 features: the scores agree to that precision.
    np.testing.assert_allclose([hit.score for hit in got], [hit.score for hit in want], atol=0.02)


@require_module("gradio")
def test_the_space_reads_its_gallery_regions_from_the_cache_its_variable_names(
    app_files, box_cache, retriever, monkeypatch
):
    import runpy

    from imagebert_hf.app import cli

    model, manifest = app_files
    monkeypatch.setenv("IMAGEBERT_MODEL", str(model))
    monkeypatch.setenv("IMAGEBERT_GALLERY", str(manifest))
    monkeypatch.setenv("IMAGEBERT_SPLIT", "")
    monkeypatch.setenv("IMAGEBERT_REGION_CACHE", str(box_cache))
    built, load = [], cli.load_demo
    monkeypatch.setattr(cli, "load_demo", lambda args: built.append(load(args)) or built[-1])
    monkeypatch.setattr(retriever.processor.image_processor.__class__, "extract", no_extraction)
    space = runpy.run_path(str(PROJECT_ROOT / "spaces" / "app.py"), run_name="space_app")
    assert space["args"].region_cache == str(box_cache)
    (served,) = built
    assert isinstance(served.records, CachedGalleryRecords) and len(served.gallery) == 12


@require_module("gradio")
def test_a_large_gallerys_picker_lists_its_first_photos_and_takes_any_name_typed(
    app_files, retriever, box_cache, monkeypatch
):
    """A page listing every photo of a gallery of millions would not load: the picker lists the first ones, says
    how many there are, and any other photo is picked by typing its name (a name that is no photo is named)."""
    from imagebert_hf.app import ui

    monkeypatch.setattr(ui, "MAX_PICKER_CHOICES", 5)
    demo = RetrievalDemo(retriever, read_gallery(app_files[1]), region_cache=load_region_cache(box_cache))
    blocks = ui.build_app(demo)
    [pick] = [block for block in blocks.blocks.values() if getattr(block, "elem_id", None) == "photo-pick"]
    assert [choice[1] for choice in pick.choices] == [image.key for image in demo.gallery[:5]]
    assert pick.allow_custom_value and "first 5 of 12 are listed" in pick.info
    unlisted = demo.gallery[9].key
    table, _, error = ui.photo_view(demo, None, unlisted, "", 3)[:3]
    assert not error and unlisted.rsplit("/", 1)[-1] in table
    assert "is not a photo of the gallery" in ui.photo_view(demo, None, "images/nothing.png", "", 3)[2]
    small = ui.picker_settings(["a.png", "b.png"])
    assert small == {"choices": ["a.png", "b.png"], "info": None}
