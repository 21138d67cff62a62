"""The app's gallery is the evaluation's (an image on several manifest lines is one photo), every view draws the
photo the model saw, text the tokenizer makes no word of counts as no text, and a split that matches nothing names
the manifest's splits.

Everything runs on the tiny random-weight ImageBERT and synthetic gallery of `test_app`."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from imagebert_hf.app import ui
from imagebert_hf.app.engine import AppInputError, RetrievalDemo, has_visible_text, parse_caption_list, read_gallery
from imagebert_hf.app.relations import RelationView
from imagebert_hf.data.retrieval_corpus import load_manifest_records, merge_duplicate_images

from .test_app import QUERY, make_tiny_app_files


@pytest.fixture(scope="module")
def app_files(tmp_path_factory, tokenizer, make_tiny_extractor, make_tiny_config):
    """The tiny model's pipeline and its 12-photo synthetic manifest (9 train, 3 test)."""
    from transformers import pipeline

    model_dir, manifest = make_tiny_app_files(
        tmp_path_factory.mktemp("app"), tokenizer, make_tiny_extractor, make_tiny_config
    )
    torch.manual_seed(0)
    return pipeline("image-text-retrieval", model=str(model_dir), device=-1), manifest


def one_line_per_caption(manifest, name="per_caption.jsonl"):
    """The manifest rewritten with one line per caption (the layout of Flickr and COCO caption files)."""
    split = manifest.parent / name
    with open(split, "w", encoding="utf-8") as handle:
        for line in manifest.read_text(encoding="utf-8").splitlines():
            line = json.loads(line)
            for caption in line["captions"]:
                handle.write(json.dumps({**line, "captions": [caption]}) + "\n")
    return split


# ------------------------------------------------------------------------------------------------ the gallery


@pytest.mark.parametrize("split", [None, "test"])
def test_an_image_on_several_manifest_lines_is_one_photo_as_in_the_evaluation(app_files, split, caplog):
    _, manifest = app_files
    per_caption = one_line_per_caption(manifest)
    with caplog.at_level(logging.WARNING):
        gallery = read_gallery(per_caption, split=split)
    assert "repeat an image listed earlier" in caplog.text
    evaluated = merge_duplicate_images(load_manifest_records(per_caption, split, None))
    assert [image.key for image in gallery] == [entry["manifest_image"] for entry in evaluated]
    assert [list(image.captions) for image in gallery] == [entry["captions"] for entry in evaluated]
    # The same photos, boxes and pooled captions as the manifest with one line per image.
    assert gallery == read_gallery(manifest, split=split)
    assert len(gallery) == (3 if split else 12)


def test_the_gallery_limit_counts_photos_not_lines(app_files):
    _, manifest = app_files
    limited = read_gallery(one_line_per_caption(manifest), limit=5)
    assert limited == read_gallery(manifest)[:5]
    assert all(len(image.captions) == 2 for image in limited)


def test_the_page_search_and_relations_see_each_photo_once(app_files):
    retriever, manifest = app_files
    merged = RetrievalDemo(retriever, read_gallery(one_line_per_caption(manifest)))
    single = RetrievalDemo(retriever, read_gallery(manifest))
    assert "gallery of 12 photos with 24 captions" in ui.page_header(merged, "t")
    keys = [hit.image.key for hit in merged.search_images(QUERY, 12)]
    assert len(set(keys)) == len(keys) == 12
    counts = {kind: rates["cross_encoder"]["n"] for kind, rates in RelationView(merged).summary().items()}
    assert counts == {kind: rates["cross_encoder"]["n"] for kind, rates in RelationView(single).summary().items()}


def test_a_split_that_matches_no_line_names_the_manifests_splits(app_files, tmp_path):
    _, manifest = app_files
    with pytest.raises(
        AppInputError, match=r"^split 'val' matches no line of the manifest .*: its splits are 'test', "
    ):
        read_gallery(manifest, split="val")
    no_splits = tmp_path / "no_splits.jsonl"
    lines = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    no_splits.write_text("".join(json.dumps({k: v for k, v in line.items() if k != "split"}) + "\n" for line in lines))
    with pytest.raises(AppInputError, match=r"split 'test' matches no line .*: its lines have no 'split' field\.$"):
        read_gallery(no_splits, split="test")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(AppInputError, match=r"^the manifest .*empty\.jsonl has no lines\.$"):
        read_gallery(empty)


# ------------------------------------------------------------------------------------------------ the pictures


@pytest.fixture
def drawn_photos(monkeypatch):
    """The pixels of every photo a view hands to `render_regions`, in order."""
    drawn = []

    def spy(photo, *args, **kwargs):
        drawn.append(np.asarray(photo.convert("RGB")).copy())
        return render(photo, *args, **kwargs)

    render = ui.render_regions
    monkeypatch.setattr(ui, "render_regions", spy)
    return drawn


def test_the_text_search_draws_the_photo_as_the_model_saw_it(app_files, tmp_path, drawn_photos):
    retriever, _ = app_files
    folder = tmp_path / "photos"
    folder.mkdir()
    # Stored 96 wide, 48 high, red left and blue right; EXIF orientation 6 shows it turned a quarter clockwise:
    # 48 wide, 96 high, red above blue, the frame the extractor's boxes are in.
    stored = np.zeros((48, 96, 3), np.uint8)
    stored[:, :48] = (255, 0, 0)
    stored[:, 48:] = (0, 0, 255)
    photo = Image.fromarray(stored)
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(folder / "phone.jpg", exif=exif, quality=95)
    demo = RetrievalDemo(retriever, read_gallery(folder))
    assert (demo.records[0]["image_width"], demo.records[0]["image_height"]) == (48, 96)

    items, _, picture, error = ui.search_view(demo, QUERY, 1)
    assert error == "" and picture is not None
    seen = np.asarray(demo.load_photo(str(folder / "phone.jpg")))
    assert len(drawn_photos) == 1 and np.array_equal(drawn_photos[0], seen)
    assert drawn_photos[0].shape[:2] == (96, 48) and drawn_photos[0][10, 24, 0] > 200 > drawn_photos[0][10, 24, 2]


def test_the_relations_view_draws_the_photo_as_the_model_saw_it(app_files, tmp_path, drawn_photos):
    retriever, manifest = app_files
    first = json.loads(manifest.read_text(encoding="utf-8").splitlines()[0])
    # The photo as 16-bit grey: a plain RGB conversion clips it to white, where the image loader rescales it.
    grey = np.asarray(Image.open(manifest.parent / first["image"]).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(tmp_path / "scan16.png")
    line = tmp_path / "scan16.jsonl"
    line.write_text(json.dumps({**first, "image": "scan16.png"}) + "\n")
    demo = RetrievalDemo(retriever, read_gallery(line))
    view = RelationView(demo)
    assert view.examples, "the photo's two shapes make a relation example"

    text, true_picture, twin_picture, error = ui.relation_view(view, "scan16.png", None)
    assert error == "" and true_picture is not None and twin_picture is not None
    seen = np.asarray(demo.load_photo(str(tmp_path / "scan16.png")))
    assert len(drawn_photos) == 2 and all(np.array_equal(drawn, seen) for drawn in drawn_photos)
    assert seen.min() < 200  # not the white of a clipped conversion


# ------------------------------------------------------------------------------------------------ text

NO_WORDS = ["\u0301", "\u0301\u0302", "\ufe0f", " \ufe0f\u200b ", "\ufffd", "\U000e0041"]


def test_visible_text_is_text_the_tokenizer_makes_a_word_of(tokenizer):
    # Latin, Greek, Cyrillic, combining marks, CJK punctuation, variation selectors, the replacement character, tags.
    codes = [*range(0x3000), *range(0xFE00, 0xFE10), 0xFFFD, *range(0xE0000, 0xE0080)]
    visible = [chr(code) for code in codes if has_visible_text(chr(code))]
    assert len(visible) > 2000
    no_word = [
        text for text, ids in zip(visible, tokenizer(visible, add_special_tokens=False)["input_ids"]) if not ids
    ]
    assert no_word == []
    for text in NO_WORDS:
        assert not has_visible_text(text)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == []


def test_text_of_marks_and_selectors_only_is_no_text_in_every_view(app_files):
    retriever, manifest = app_files
    demo = RetrievalDemo(retriever, read_gallery(manifest, split="test"))
    assert parse_caption_list("\n".join([*NO_WORDS, "a red circle", "a red circle \u0301"])) == [
        "a red circle",
        "a red circle \u0301",
    ]
    for text in NO_WORDS:
        with pytest.raises(AppInputError, match="Type a query first"):
            demo.search_images(text, 3)
        _, _, _, error = ui.search_view(demo, text, 3)
        assert "Type a query first" in error and "went wrong" not in error
        _, _, error = ui.photo_view(demo, None, demo.gallery[0].key, f"{text}\na red circle\n{text}", 2)
        assert error == ""


def test_a_lone_surrogate_is_a_user_input_message(app_files):
    retriever, manifest = app_files
    demo = RetrievalDemo(retriever, read_gallery(manifest, split="test"))
    for query in ("\ud83d", "a red circle \ud83d"):
        with pytest.raises(AppInputError, match=r"^the query holds U\+D83D, half of a UTF-16 surrogate pair"):
            demo.search_images(query, 3)
        _, _, _, error = ui.search_view(demo, query, 3)
        assert "the query holds U+D83D" in error and "went wrong" not in error
    with pytest.raises(AppInputError, match=r"^line 2 of the pasted captions holds U\+DE42"):
        parse_caption_list("a red circle\n\ude42")
    _, _, error = ui.photo_view(demo, None, demo.gallery[0].key, "a red circle\na blue \ud83d square", 2)
    assert "line 2 of the pasted captions holds U+D83D" in error and "went wrong" not in error
