"""A saved index is taken back with the same gallery and the same checkpoint whatever float noise separates them (the
photos extracted again with another batch size, thread count or device; the model loaded in float16), and still
refused with other photos, another order or another model; an index of an earlier version is read, or refused with
a rebuild hint; `score_pairs` names an index outside its range (the -1 of an empty search slot) instead of scoring
the last item; and a region record that also names its photo is used as the record it is."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from imagebert_hf.models.imagebert import pipeline_image_text_retrieval as retrieval_pipeline
from imagebert_hf.models.imagebert.pipeline_image_text_retrieval import (
    RetrievalIndex,
    embedding_fingerprint,
    same_gallery_fingerprint,
    same_model_fingerprint,
)
from imagebert_hf.models.imagebert.retrieval_index import EmbeddingIndex, encode_images, score_pairs

from . import test_index_save_fill_and_provenance as provenance
from .test_index_save_fill_and_provenance import TEXTS, _records


pipelines = provenance.pipelines  # the three retrieval pipelines A, B (other weights) and C (another size)


# A float32 value whose bfloat16 rounding a change of 2**-20 (the float noise of extracting again) flips: exactly
# halfway between the bfloat16 values 1 and 1 + 2**-7, which rounds to the even one, 1.
BFLOAT16_TIE = 1.0 + 2.0**-8
# A float32 value that rounds to bfloat16 one way and, through float16 first, the other: float16 rounds it to the
# tie above, which goes to 1, while float32 rounds it straight up to 1 + 2**-7.
DOUBLE_ROUNDING = 1.0 + 2.0**-8 + 2.0**-12


def _with_first_feature(records, value):
    """Copies of `records` whose first image's first region starts with `value` (a value every fingerprint reads)."""
    records = [dict(record) for record in records]
    features = records[0]["region_features"].copy()
    features[0, 0] = value
    records[0]["region_features"] = features
    return records


def _pipeline_of(retriever, model):
    return type(retriever)(model=model, tokenizer=retriever.tokenizer, image_processor=retriever.image_processor)


def _model_with_first_bias(retriever, value, dtype=torch.float32):
    model = copy.deepcopy(retriever.model)
    with torch.no_grad():
        model.cls.region_projection.bias[0] = value
    return model.to(dtype).eval()


# ------------------------------------------------------------------------------------------------ the gallery


def test_the_same_photos_extracted_again_are_taken_and_other_photos_or_orders_refused(pipelines, tmp_path):
    retriever = pipelines["A"]
    records = _with_first_feature(_records(retriever, 12), BFLOAT16_TIE)
    built = retriever.build_index(images=records)
    built.index.save(tmp_path / "index")
    loaded = EmbeddingIndex.load(tmp_path / "index")
    # The same photos, their features moved by float noise: one value now rounds to another bfloat16 value.
    again = retriever.build_index(images=_with_first_feature(records, BFLOAT16_TIE + 2.0**-20))
    assert again.inputs["region_features"][0, 0, 0] != built.inputs["region_features"][0, 0, 0]
    paired = RetrievalIndex("images", again.items, again.inputs, loaded)
    assert retriever(texts=TEXTS[0], index=paired, shortlist_k=5) == retriever(
        texts=TEXTS[0], index=built, shortlist_k=5
    )
    # Relative noise of a GPU's convolutions, and a float16 region cache of the same photos.
    noisy = {key: value.clone() for key, value in again.inputs.items()}
    generator = torch.Generator().manual_seed(0)
    noisy["region_features"] *= 1 + 1e-4 * torch.randn(noisy["region_features"].shape, generator=generator)
    RetrievalIndex("images", again.items, noisy, loaded)
    as_float16 = {**again.inputs, "region_features": again.inputs["region_features"].half()}
    RetrievalIndex("images", again.items, as_float16, loaded)

    # Still refused: other photos, the same two exchanged, and features scaled by half again (far beyond noise; a few
    # percent is within it).
    others = retriever.build_index(images=_records(retriever, 12, seed=1))
    swapped = [records[1], records[0], *records[2:]]
    swapped = retriever.build_index(images=_with_first_feature(swapped, BFLOAT16_TIE + 2.0**-20))
    scaled = {**again.inputs, "region_features": again.inputs["region_features"] * 1.5}
    for inputs in (others.inputs, swapped.inputs, scaled):
        with pytest.raises(ValueError, match="built from another gallery: its images are other images, or the same"):
            RetrievalIndex("images", records, inputs, loaded)


def test_the_gallery_fingerprint_keeps_a_bounded_sample_and_texts_stay_exact(pipelines):
    retriever = pipelines["A"]
    many = retriever.build_index(images=_records(retriever, 300))
    recorded = many.index.gallery_fingerprint
    assert recorded.startswith("images:") and ":f32items:" in recorded
    assert len(recorded) < 50000  # 33 values for each of at most 256 read items, however large the gallery
    assert same_gallery_fingerprint(recorded, "images", many.inputs)
    assert not same_gallery_fingerprint(recorded, "texts", many.inputs)
    texts = retriever.build_index(texts=TEXTS)
    assert ":f32" not in texts.index.gallery_fingerprint
    assert same_gallery_fingerprint(texts.index.gallery_fingerprint, "texts", texts.inputs)
    reordered = retriever.build_index(texts=TEXTS[1:] + TEXTS[:1])
    assert not same_gallery_fingerprint(texts.index.gallery_fingerprint, "texts", reordered.inputs)


def test_an_image_index_of_an_earlier_version_is_compared_as_it_was_with_a_rebuild_hint(pipelines, tmp_path):
    retriever = pipelines["A"]
    records = _with_first_feature(_records(retriever, 12), BFLOAT16_TIE)
    built = retriever.build_index(images=records)
    # An earlier version recorded a hash of the values rounded to bfloat16.
    earlier = retrieval_pipeline._earlier_gallery_fingerprint("images", built.inputs)
    built.index.gallery_fingerprint = earlier
    built.index.save(tmp_path / "index")
    loaded = EmbeddingIndex.load(tmp_path / "index")
    assert loaded.gallery_fingerprint == earlier
    RetrievalIndex("images", built.items, built.inputs, loaded)  # its own gallery still matches
    again = retriever.build_index(images=_with_first_feature(records, BFLOAT16_TIE + 2.0**-20))
    with pytest.raises(ValueError, match="saved by an earlier version.* build the index again"):
        RetrievalIndex("images", again.items, again.inputs, loaded)


def test_a_damaged_fingerprint_is_named(pipelines, tmp_path):
    retriever = pipelines["A"]
    built = retriever.build_index(images=_records(retriever, 12))
    built.index.save(tmp_path / "index")
    config_path = tmp_path / "index" / "index_config.json"
    config = json.loads(config_path.read_text())
    config["gallery_fingerprint"] = config["gallery_fingerprint"][:-5] + "!!!!!"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="this index's gallery_fingerprint is damaged: its values cannot be read"):
        RetrievalIndex("images", built.items, built.inputs, EmbeddingIndex.load(tmp_path / "index"))


# ------------------------------------------------------------------------------------------------ the model


def test_an_index_built_in_float32_is_taken_by_the_same_checkpoint_in_float16(pipelines):
    retriever = pipelines["A"]
    records = _records(retriever, 12)
    float32 = _pipeline_of(retriever, _model_with_first_bias(retriever, DOUBLE_ROUNDING))
    gallery = float32.build_index(images=records)
    for dtype in (torch.float16, torch.bfloat16):
        model = _model_with_first_bias(retriever, DOUBLE_ROUNDING, dtype)
        assert same_model_fingerprint(gallery.index.model_fingerprint, model)
        results = _pipeline_of(retriever, model)(texts=TEXTS[0], index=gallery, top_k=3, shortlist_k=5)
        assert len(results) == 3
    # A weight near zero, where float16 keeps fewer digits, is no other model either.
    tiny = copy.deepcopy(retriever.model)
    with torch.no_grad():
        tiny.cls.text_projection.bias[:3] = torch.tensor([1e-7, -3e-6, 2e-5])
    assert same_model_fingerprint(embedding_fingerprint(tiny), copy.deepcopy(tiny).half())


def test_another_or_a_fine_tuned_checkpoint_in_float16_is_still_refused(pipelines):
    retriever = pipelines["A"]
    gallery = retriever.build_index(images=_records(retriever, 12))
    tuned = copy.deepcopy(retriever.model)
    with torch.no_grad():
        tuned.bert.encoder.layer[0].output.dense.weight.mul_(1.05)
    for model in (copy.deepcopy(pipelines["B"].model).half(), tuned.half()):
        assert not same_model_fingerprint(gallery.index.model_fingerprint, model)
        with pytest.raises(ValueError, match="this index was built by another model: it holds 16-d embeddings"):
            _pipeline_of(retriever, model)(texts=TEXTS[0], index=gallery, shortlist_k=5)
    recorded = gallery.index.model_fingerprint
    assert recorded.startswith("encoder+heads:") and ":bf16:" in recorded and len(recorded) < 8000


def test_a_model_record_of_an_earlier_version_is_compared_as_it_was_with_a_rebuild_hint(pipelines):
    retriever = pipelines["A"]
    float32 = _model_with_first_bias(retriever, DOUBLE_ROUNDING)
    gallery = _pipeline_of(retriever, float32).build_index(images=_records(retriever, 12))
    gallery.index.model_fingerprint = retrieval_pipeline._earlier_embedding_fingerprint(float32)
    assert len(_pipeline_of(retriever, float32)(texts=TEXTS[0], index=gallery, top_k=3, shortlist_k=5)) == 3
    float16 = _model_with_first_bias(retriever, DOUBLE_ROUNDING, torch.float16)
    with pytest.raises(ValueError, match="saved by an earlier version.* build the index again"):
        _pipeline_of(retriever, float16)(texts=TEXTS[0], index=gallery, shortlist_k=5)


# ------------------------------------------------------------------------------------------------ pair indices


class _Gallery:
    """A minimal `RegionBatches` gallery over stacked regions."""

    def __init__(self, regions):
        self.regions = regions

    def __len__(self):
        return int(self.regions["region_features"].shape[0])

    def batch(self, indices):
        return {key: value[torch.as_tensor(indices)] for key, value in self.regions.items()}


def test_score_pairs_names_an_index_outside_its_range_and_the_empty_search_slot(pipelines):
    retriever = pipelines["A"]
    built = retriever.build_index(images=_records(retriever, 4))
    texts = retriever._text_inputs(TEXTS[:3])
    for regions in (built.inputs, _Gallery(built.inputs)):
        scores = score_pairs(retriever.model, texts, regions, [3, 0], [0, 2])
        assert scores.shape == (2,)
        cases = (
            (([0, -1], [0, 1]), r"image_indices holds -1, outside the valid range 0..3 \(the 4 images"),
            (([0, 4], [0, 1]), r"image_indices holds 4, outside the valid range 0..3 \(the 4 images"),
            (([0, 1], [-2, 1]), r"text_indices holds -2, outside the valid range 0..2 \(the 3 texts"),
            (([0, 1], [0, 3]), r"text_indices holds 3, outside the valid range 0..2 \(the 3 texts"),
        )
        for (images, text_indices), message in cases:
            with pytest.raises(ValueError, match=message):
                score_pairs(retriever.model, texts, regions, images, text_indices)
        with pytest.raises(ValueError, match="-1 marks an empty slot of EmbeddingIndex.search"):
            score_pairs(retriever.model, texts, regions, torch.tensor([-1]), torch.tensor([0]))


def test_scores_and_embeddings_do_not_depend_on_where_a_rows_region_padding_sits(pipelines):
    # The model reads regions as a set; the scoring batches once kept each row's first mask-sum columns, so real
    # regions after a padded one were dropped and the pair scored as another image.
    retriever = pipelines["A"]
    regions = {
        key: value[:2].clone() for key, value in retriever.build_index(images=_records(retriever, 2)).inputs.items()
    }
    count = int(regions["region_attention_mask"][0].sum())
    assert count >= 2
    moved = {key: value.clone() for key, value in regions.items()}
    # Image 0 with a padded column first: its real regions moved one column right, the freed column padding.
    width = regions["region_attention_mask"].shape[1]
    if count == width:
        moved = {key: torch.cat([value[:, :1] * 0, value], dim=1) for key, value in moved.items()}
        regions = {key: torch.cat([value, value[:, :1] * 0], dim=1) for key, value in regions.items()}
    else:
        moved = {key: value.roll(1, dims=1) for key, value in moved.items()}
        moved = {key: torch.cat([value[:1], regions[key][1:]]) for key, value in moved.items()}
    texts = retriever._text_inputs(TEXTS[:2])
    pairs = ([0, 0, 1], [0, 1, 1])
    torch.testing.assert_close(score_pairs(retriever.model, texts, moved, *pairs),
                               score_pairs(retriever.model, texts, regions, *pairs), rtol=1e-5, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(encode_images(retriever.model, moved), encode_images(retriever.model, regions),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_texts_padded_on_the_left_are_refused_naming_the_row(pipelines):
    retriever = pipelines["A"]
    texts = retriever._text_inputs(TEXTS[:2])
    regions = retriever.build_index(images=_records(retriever, 1)).inputs
    mask = texts["attention_mask"].clone()
    length = int(mask[1].sum())
    assert length < mask.shape[1]
    left = {key: value.clone() for key, value in texts.items()}
    for key in left:
        left[key][1] = left[key][1].roll(mask.shape[1] - length)
    with pytest.raises(
        ValueError, match=r"attention_mask'\] row 1 has padding before real tokens; .*padding_side='right'"
    ):
        score_pairs(retriever.model, left, regions, [0], [1])


# ------------------------------------------------------------------------------------------------ region records


def test_a_region_record_that_names_its_photo_is_used_as_a_record(pipelines, tmp_path):
    retriever = pipelines["A"]
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(photo)
    record = _records(retriever, 1)[0]
    alone = retriever(images=record, texts=TEXTS)
    for extra in ({"path": str(photo)}, {"bytes": photo.read_bytes()}, {"path": str(photo), "bytes": None}):
        assert retriever(images={**record, **extra}, texts=TEXTS) == alone, sorted(extra)
        broken = {**record, **extra, "region_features": np.full_like(record["region_features"], np.nan)}
        with pytest.raises(ValueError, match=r"images\[0\] \(cached regions 'img0'\): region_features contain NaN"):
            retriever(images=broken, texts=TEXTS)
    # A photo given as a dict with no regions is still read as a photo.
    assert len(retriever(images={"path": str(photo)}, texts=TEXTS)) == len(TEXTS)


def test_items_of_mostly_zero_or_tiny_features_are_told_apart_and_tf32_noise_is_taken():
    generator = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e-4):
        # ReLU features, most of them exact zeros, over grid boxes every photo shares.
        features = (torch.randn(40, 9, 1280, generator=generator) - 1.0).clamp(min=0) * scale
        boxes = torch.rand(1, 9, 5, generator=generator).expand(40, 9, 5).clone()
        gallery = {"region_features": features, "region_locations": boxes, "region_attention_mask": torch.ones(40, 9)}
        recorded = retrieval_pipeline.gallery_fingerprint("images", gallery)
        noisy = features * (1 + 6e-3 * torch.randn(features.shape, generator=generator))
        assert same_gallery_fingerprint(recorded, "images", {**gallery, "region_features": noisy})
        for first, second in ((0, 1), (5, 17)):
            swapped = features.clone()
            swapped[[first, second]] = features[[second, first]]
            assert not same_gallery_fingerprint(recorded, "images", {**gallery, "region_features": swapped})
        zeroed = features.clone()
        zeroed[3] = 0
        assert not same_gallery_fingerprint(recorded, "images", {**gallery, "region_features": zeroed})
        other = (torch.randn(40, 9, 1280, generator=generator) - 1.0).clamp(min=0) * scale
        assert not same_gallery_fingerprint(recorded, "images", {**gallery, "region_features": other})


def test_score_pairs_refuses_float_and_bool_indices_and_hints_only_at_minus_one(pipelines):
    retriever = pipelines["A"]
    built = retriever.build_index(images=_records(retriever, 4))
    texts = retriever._text_inputs(TEXTS[:3])
    for bad, dtype in ((torch.tensor([1.7]), "float32"), (torch.tensor([float("nan")]), "float32"), ([True], "bool")):
        with pytest.raises(ValueError, match=f"image_indices must hold integer item positions, got {dtype} values"):
            score_pairs(retriever.model, texts, built.inputs, bad, [0])
    whole = score_pairs(
        retriever.model, texts, built.inputs, torch.tensor([1.0, 3.0]), [0, 2]
    )  # positions all the same
    assert torch.equal(whole, score_pairs(retriever.model, texts, built.inputs, [1, 3], [0, 2]))
    with pytest.raises(ValueError, match=r"text_indices holds -2, outside the valid range 0..2 \(the 3 texts[^(]*\.$"):
        score_pairs(retriever.model, texts, built.inputs, [0], [-2])
    assert score_pairs(retriever.model, texts, built.inputs, [], []).shape == (0,)


def test_a_photo_dict_with_null_or_empty_region_cells_is_read_as_its_photo(pipelines, tmp_path):
    retriever = pipelines["A"]
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(photo)
    alone = retriever(images={"path": str(photo)}, texts=TEXTS)
    for cells in (
        {"region_features": None, "region_locations": None},
        {"region_features": None},
        {"bytes": None, "region_features": [], "region_locations": []},
        {"region_features": np.zeros((0, 24), np.float32), "region_locations": np.zeros((0, 5), np.float32)},
    ):
        assert retriever(images={"path": str(photo), **cells}, texts=TEXTS) == alone, sorted(cells)


def test_an_image_record_of_kept_values_in_an_earlier_layout_asks_for_a_rebuild(pipelines):
    retriever = pipelines["A"]
    built = retriever.build_index(images=_records(retriever, 12))
    exact = built.index.gallery_fingerprint.split(":")[1]
    built.index.gallery_fingerprint = f"images:{exact}:f32:" + retrieval_pipeline._encode_values(np.ones(24, "<f4"))
    with pytest.raises(ValueError, match="saved by an earlier version.* build the index again"):
        RetrievalIndex("images", built.items, built.inputs, built.index)
