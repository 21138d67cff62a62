"""`pipeline("image-text-retrieval")`: every mode, prebuilt indexes, bad input and remote-code loading."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imagebert_hf import ImageBERTConfig, ImageBERTForImageTextRetrieval
from imagebert_hf.data.synthetic import make_synthetic_examples
from imagebert_hf.models.imagebert.pipeline_image_text_retrieval import (
    ImageTextRetrievalPipeline,
    RetrievalIndex,
    register_pipeline,
)

from .testing_utils import require_module, run_without_the_package


TEXTS = ["a red circle", "a blue square above a green cross", "there is a yellow triangle", "an orange cross"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer, make_tiny_extractor, make_tiny_config):
    from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor, register_processing

    register_processing()
    register_pipeline()
    extractor = make_tiny_extractor(max_regions=10, return_class_probs=False)
    config = make_tiny_config(vocab_size=len(tokenizer), **extractor.config_kwargs())
    torch.manual_seed(0)
    model = ImageBERTForImageTextRetrieval(config)
    processor = ImageBERTProcessor.from_model_config(config, tokenizer, extractor)
    folder = tmp_path_factory.mktemp("retrieval-model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    images_dir = tmp_path_factory.mktemp("images")
    paths = []
    for i, example in enumerate(make_synthetic_examples(3, seed=5, image_size=48)):
        path = images_dir / f"image{i}.png"
        example["image"].save(path)
        paths.append(str(path))
    return folder, paths


@pytest.fixture(scope="module")
def retriever(saved_model):
    from transformers import pipeline

    return pipeline("image-text-retrieval", model=str(saved_model[0]), device=-1)


def _direct_scores(retriever, images, texts):
    """Scores of (images[i], texts[i]) computed by hand: processor, then the model."""
    inputs = retriever.processor(images=images, text=texts, return_tensors="pt")
    with torch.no_grad():
        return retriever.model(**inputs).logits


def test_pipeline_loads_from_a_path_alone(retriever):
    assert isinstance(retriever, ImageTextRetrievalPipeline)
    assert isinstance(retriever.model, ImageBERTForImageTextRetrieval)
    assert retriever.processor.image_processor is not None


def test_rank_texts_for_an_image(retriever, saved_model):
    _, paths = saved_model
    results = retriever(images=paths[0], texts=TEXTS)
    assert [r["text"] for r in results] == [TEXTS[r["index"]] for r in results]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    expected = _direct_scores(retriever, [paths[0]] * len(TEXTS), TEXTS)
    for r in results:
        assert r["score"] == pytest.approx(expected[r["index"]].item(), abs=1e-5)
        assert r["probability"] == pytest.approx(torch.sigmoid(expected[r["index"]]).item(), abs=1e-6)
    top = retriever(images=paths[0], texts=TEXTS, top_k=2)
    assert top == results[:2]


def test_rank_images_for_a_text_with_mixed_image_kinds(retriever, saved_model):
    _, paths = saved_model
    pil = Image.open(paths[1]).convert("RGB")
    record = retriever.processor.image_processor.extract([paths[2]])[0]
    results = retriever(images=[paths[0], pil, record], texts=TEXTS[1], top_k=10)
    assert len(results) == 3  # top_k beyond the gallery is clamped to it
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    by_index = {r["index"]: r for r in results}
    assert by_index[1]["image"] is pil and by_index[2]["image"] is record
    expected = _direct_scores(retriever, paths, [TEXTS[1]] * 3)
    for index, r in by_index.items():
        assert r["score"] == pytest.approx(expected[index].item(), abs=1e-5)


def test_several_queries_and_pairs(retriever, saved_model):
    _, paths = saved_model
    per_image = retriever(images=paths, texts=TEXTS, mode="rank_texts", top_k=1, batch_size=3)
    assert len(per_image) == 3 and all(len(r) == 1 for r in per_image)
    per_text = retriever(images=paths, texts=TEXTS, mode="rank_images")
    assert len(per_text) == 4 and all(len(r) == 3 for r in per_text)
    pairs = retriever(images=paths, texts=TEXTS[:3], mode="pairs")
    expected = _direct_scores(retriever, paths, TEXTS[:3])
    assert [p["score"] for p in pairs] == pytest.approx(expected.tolist(), abs=1e-5)
    single = retriever(images=paths[0], texts=TEXTS[0])
    assert single["score"] == pytest.approx(pairs[0]["score"], abs=1e-5)
    # The best text of image 0 over the whole gallery is the best of its own full ranking.
    assert per_image[0][0]["index"] == retriever(images=paths[0], texts=TEXTS)[0]["index"]


def test_prebuilt_index_and_shortlist(retriever, saved_model):
    _, paths = saved_model
    gallery = retriever.build_index(images=paths)
    assert isinstance(gallery, RetrievalIndex) and len(gallery) == 3 and gallery.kind == "images"
    full = retriever(images=paths, texts=TEXTS, mode="rank_images")
    indexed = retriever(texts=TEXTS, index=gallery, shortlist_k=3)
    assert [[r["index"] for r in q] for q in indexed] == [[r["index"] for r in q] for q in full]
    shortlisted = retriever(texts=TEXTS[0], index=gallery, shortlist_k=1)
    assert len(shortlisted) == 1
    # The one candidate is the nearest image by the unimodal embeddings.
    with torch.no_grad():
        query = retriever.model.get_text_embeddings(**retriever.processor(text=[TEXTS[0]], return_tensors="pt"))
    assert shortlisted[0]["index"] == int((query @ gallery.embeddings.T).argmax())
    texts_index = retriever.build_index(texts=TEXTS)
    assert len(retriever(images=paths[1], index=texts_index, top_k=2)) == 2


def test_building_a_gallery_of_several_batches_shows_its_progress(retriever, saved_model, capsys):
    _, paths = saved_model
    retriever.build_index(images=paths, batch_size=8)  # one pass: no bar
    retriever.build_index(texts=TEXTS, batch_size=8)
    assert capsys.readouterr().err == ""
    gallery = retriever.build_index(images=paths * 3, batch_size=2)
    err = capsys.readouterr().err
    assert "extracting regions: 100%" in err and "embedding the gallery's images: 100%" in err and "9/9" in err
    torch.testing.assert_close(gallery.embeddings[:3], retriever.build_index(images=paths).embeddings)
    retriever.build_index(texts=TEXTS * 3, batch_size=2)
    assert "embedding the gallery's texts: 100%" in capsys.readouterr().err


def test_lists_generators_and_datasets_stream_like_any_pipeline(retriever, saved_model):
    _, paths = saved_model
    queries = [{"images": paths[0], "texts": TEXTS}, {"images": paths[1], "texts": TEXTS[:2], "mode": None}]
    queries[1].pop("mode")
    one_by_one = [retriever(images=query["images"], texts=query["texts"]) for query in queries]
    assert retriever(queries) == one_by_one
    streamed = retriever(query for query in queries)
    assert not isinstance(streamed, list) and list(streamed) == one_by_one
    # A dataset's rows name their columns image / text.
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict({"image": paths[:2], "text": [TEXTS[0], TEXTS[1]]})
    assert list(retriever(rows, top_k=1)) == [retriever(images=paths[i], texts=TEXTS[i], top_k=1) for i in range(2)]
    # Positional images, as before.
    assert retriever(paths[0], texts=TEXTS) == one_by_one[0]


def test_a_prebuilt_gallery_stays_out_of_the_per_query_inputs(retriever, saved_model):
    _, paths = saved_model
    gallery = retriever.build_index(images=paths)
    inputs = retriever.preprocess({"texts": TEXTS[0]}, index=gallery)
    # Pipeline.forward copies the per-query inputs to the device and back: the gallery is not among them.
    assert inputs["region_inputs"] is None and inputs["index"] is gallery
    assert all(value.device == retriever.device for value in gallery.inputs.values())


def test_a_pretraining_checkpoint_says_once_which_heads_are_untrained(saved_model, tmp_path, caplog):
    import logging

    from transformers import pipeline

    from imagebert_hf import ImageBERTForPreTraining, ImageBERTProcessor

    folder, paths = saved_model
    pretrained = tmp_path / "pretrained"
    config = ImageBERTConfig.from_pretrained(folder)
    ImageBERTForPreTraining(config).save_pretrained(pretrained)
    ImageBERTProcessor.from_pretrained(folder).save_pretrained(pretrained)
    with caplog.at_level(logging.WARNING):
        pipe = pipeline("image-text-retrieval", model=str(pretrained), device=-1)
        full = pipe(images=paths[0], texts=TEXTS)
        shortlisted = pipe(images=paths[0], texts=TEXTS, shortlist_k=1)
    notices = [r.getMessage() for r in caplog.records if "untrained heads" in r.getMessage()]
    assert len(notices) == 1 and "cls.text_projection, cls.region_projection" in notices[0]
    # transformers' own load report goes to its logger's handler, not to caplog: tests/test_published_folders.py
    # checks that it is left out.
    # No shortlist through random projections: every text is ranked by the cross-encoder.
    assert len(shortlisted) == len(full) == len(TEXTS) and shortlisted == full
    # A prebuilt gallery is ranked whole as well, whatever shortlist_k says.
    gallery = pipe.build_index(texts=TEXTS)
    assert pipe(images=paths[0], index=gallery, shortlist_k=1) == full


def test_a_base_model_folder_is_refused_rather_than_scored_by_a_random_head(saved_model, tmp_path):
    """`AutoModel` loads and saves the base `ImageBERTModel`, which has no ITM head: served, its scores would come
    from a head initialised anew at every load. Refused, naming the head, for the folder and for the pipeline given
    the model loaded from it."""
    from transformers import AutoModel, pipeline

    from imagebert_hf import ImageBERTProcessor

    folder, _ = saved_model
    base = tmp_path / "base"
    AutoModel.from_pretrained(folder).save_pretrained(base)
    ImageBERTProcessor.from_pretrained(folder).save_pretrained(base)
    with pytest.raises(ValueError, match=r"holds no image-text matching head \(cls.seq_relationship\)"):
        pipeline("image-text-retrieval", model=str(base), device=-1)
    with pytest.raises(ValueError, match="base ImageBERTModel checkpoint"):
        pipeline(
            "image-text-retrieval",
            model=ImageBERTForImageTextRetrieval.from_pretrained(base),
            processor=ImageBERTProcessor.from_pretrained(base),
            device=-1,
        )


@require_module("faiss")
def test_approximate_index(retriever):
    gallery = retriever.build_index(texts=TEXTS * 5, index_type="hnsw")
    assert gallery.index.backend == "faiss" and gallery.index.factory == "HNSW32,Flat"
    record = {
        "region_features": np.ones((2, retriever.model.config.region_feature_size)),
        "region_locations": [[0.0, 0.0, 1.0, 1.0, 1.0]] * 2,
    }
    results = retriever(images=record, index=gallery, top_k=4, shortlist_k=8)
    assert len(results) == 4


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"images": [], "texts": TEXTS}, ValueError, "images is an empty list"),
        ({"images": "IMG", "texts": []}, ValueError, "texts is an empty list"),
        ({"texts": TEXTS}, ValueError, "without images"),
        ({"images": "IMG"}, ValueError, "without texts"),
        ({}, ValueError, "got neither"),
        ({"images": ["IMG", "IMG"], "texts": TEXTS}, ValueError, "mode="),
        ({"images": ["IMG", "IMG"], "texts": TEXTS, "mode": "pairs"}, ValueError, "2 images and 4 texts"),
        ({"images": "IMG", "texts": TEXTS, "top_k": 0}, ValueError, "top_k"),
        ({"images": "IMG", "texts": TEXTS, "mode": "both"}, ValueError, "mode must be one of"),
        ({"images": "IMG", "texts": [TEXTS[0], 3]}, TypeError, r"texts\[1\]"),
        ({"images": [42], "texts": TEXTS[0]}, ValueError, r"images\[0\].*int"),
        ({"images": "IMG", "texts": TEXTS, "colour": 1}, TypeError, "colour"),
    ],
)
def test_bad_input_is_named(retriever, saved_model, kwargs, error, message):
    _, paths = saved_model
    if kwargs.get("images") == "IMG":
        kwargs = {**kwargs, "images": paths[0]}
    elif isinstance(kwargs.get("images"), list) and "IMG" in kwargs["images"]:
        kwargs = {**kwargs, "images": [paths[0] if item == "IMG" else item for item in kwargs["images"]]}
    with pytest.raises(error, match=message):
        retriever(**kwargs)


def test_unreadable_images_are_all_named_and_nothing_is_scored(retriever, saved_model, tmp_path):
    _, paths = saved_model
    truncated = tmp_path / "truncated.jpg"
    with open(paths[0], "rb") as handle:
        truncated.write_bytes(handle.read()[:60])
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not an image")
    images = [paths[0], str(truncated), paths[1], str(text_file), str(tmp_path / "missing.png")]
    with pytest.raises(ValueError) as caught:
        retriever(images=images, texts=TEXTS[0])
    message = str(caught.value)
    assert "3 of 5 image(s)" in message
    for position, path in ((1, truncated), (3, text_file), (4, tmp_path / "missing.png")):
        assert f"images[{position}]" in message and str(path) in message
    assert "images[0]" not in message and "images[2]" not in message


def test_index_and_inputs_must_agree(retriever, saved_model):
    _, paths = saved_model
    gallery = retriever.build_index(images=paths[:2])
    with pytest.raises(ValueError, match="already holds the images"):
        retriever(images=paths[0], texts=TEXTS[0], index=gallery)
    with pytest.raises(ValueError, match="give texts"):
        retriever(index=gallery)
    with pytest.raises(ValueError, match="serves mode"):
        retriever(texts=TEXTS[0], index=gallery, mode="rank_texts")
    with pytest.raises(ValueError, match="either images= or texts="):
        retriever.build_index(images=paths, texts=TEXTS)
    with pytest.raises(TypeError, match="RetrievalIndex"):
        retriever(texts=TEXTS[0], index=[1, 2])


def test_saved_pipeline_loads_as_remote_code_without_the_package(retriever, tmp_path):
    saved = tmp_path / "saved"
    retriever.save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    assert config["custom_pipelines"]["image-text-retrieval"]["pt"] == ["AutoModelForZeroShotImageClassification"]
    assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == (
        "modeling_imagebert.ImageBERTForImageTextRetrieval"
    )
    assert config["auto_map"]["AutoModel"] == "modeling_imagebert.ImageBERTModel"
    processor_config = json.loads((saved / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_imagebert.ImageBERTProcessor"
    assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == (
        "image_processing_imagebert.ImageBERTRoIExtractor"
    )
    code = {
        "pipeline_image_text_retrieval.py",
        "processing_imagebert.py",
        "image_processing_imagebert.py",
        "roi_boxes.py",
        "retrieval_index.py",
        "folder_publishing.py",
    }
    code |= {"roi_backends.py", "roi_image_loading.py", "roi_offline_weights.py", "roi_precomputed.py"}
    assert code <= {path.name for path in saved.iterdir()}
    assert (saved / "roi_extractor.safetensors").is_file()
    rng = np.random.default_rng(0)
    record = {
        "region_features": rng.standard_normal((3, retriever.model.config.region_feature_size)).tolist(),
        "region_locations": [[0.0, 0.0, 0.5, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0, 0.25], [0.0, 0.0, 1.0, 1.0, 1.0]],
    }
    image_path = tmp_path / "raw.png"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(image_path)
    expected_record = retriever(images=record, texts=TEXTS)
    expected_image = retriever(images=str(image_path), texts=TEXTS)
    script = f"""
import json, sys
from transformers import pipeline
pipe = pipeline(model={str(saved)!r}, trust_remote_code=True, device=-1)
for part in (pipe, pipe.model, pipe.processor, pipe.processor.image_processor):
    assert type(part).__module__.startswith("transformers_modules"), type(part).__module__
print(json.dumps([
    pipe(images=json.loads({json.dumps(json.dumps(record))}), texts={TEXTS!r}),
    pipe(images={str(image_path)!r}, texts={TEXTS!r}),
]))
"""
    remote_record, remote_image = run_without_the_package(script, tmp_path)
    for remote, expected in ((remote_record, expected_record), (remote_image, expected_image)):
        assert [r["text"] for r in remote] == [r["text"] for r in expected]
        assert [r["score"] for r in remote] == pytest.approx([r["score"] for r in expected], abs=1e-5)


def test_a_pipeline_served_from_remote_code_saves_a_folder_that_serves_again(retriever, saved_model, tmp_path):
    """Where the package is not installed, the pipeline runs from a folder's code and carries no registration of
    its own: saved again, the new folder must still hold the pipeline's code and its `custom_pipelines` entry."""
    _, paths = saved_model
    retriever.save_pretrained(tmp_path / "published")
    script = f"""
import json, os
from transformers import pipeline
pipe = pipeline(model={str(tmp_path / "published")!r}, trust_remote_code=True, device=-1)
pipe.save_pretrained({str(tmp_path / "again")!r})
again = pipeline("image-text-retrieval", model={str(tmp_path / "again")!r}, trust_remote_code=True, device=-1)
assert type(again).__module__.startswith("transformers_modules"), type(again).__module__
print(json.dumps([sorted(os.listdir({str(tmp_path / "published")!r})), sorted(os.listdir({str(tmp_path / "again")!r})),
                  again(images={paths[0]!r}, texts={TEXTS!r})]))
"""
    published, again, ranked = run_without_the_package(script, tmp_path)
    assert set(published) <= set(again)
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["custom_pipelines"]["image-text-retrieval"]["pt"] == ["AutoModelForZeroShotImageClassification"]
    expected = retriever(images=paths[0], texts=TEXTS)
    assert [r["text"] for r in ranked] == [r["text"] for r in expected]
    assert [r["score"] for r in ranked] == pytest.approx([r["score"] for r in expected], abs=1e-5)


def test_a_shortlist_without_a_prebuilt_index_ranks_as_one_built_for_the_query(retriever, saved_model):
    _, paths = saved_model
    texts = TEXTS * 2
    for k in (1, 3):
        shortlisted = retriever(images=paths[0], texts=texts, shortlist_k=k)
        assert shortlisted == retriever(images=paths[0], index=retriever.build_index(texts=texts), shortlist_k=k)
        assert len(shortlisted) == k and all(texts[r["index"]] == r["text"] for r in shortlisted)
    shortlisted = retriever(images=paths, texts=TEXTS[1], shortlist_k=2)
    assert shortlisted == retriever(texts=TEXTS[1], index=retriever.build_index(images=paths), shortlist_k=2)
    assert len(shortlisted) == 2 and all(paths[r["index"]] == r["image"] for r in shortlisted)


def test_regions_are_extracted_on_the_pipelines_device_not_the_first_gpu(saved_model, monkeypatch, tmp_path):
    # On a machine with GPUs, an extractor left at device None went to CUDA whatever device the pipeline was given
    # (`device="cpu"`, or each serving process's own GPU). Simulated here: the CPU pipeline on a "GPU machine".
    from transformers import pipeline

    folder, paths = saved_model
    on_cpu = pipeline("image-text-retrieval", model=str(folder), device="cpu")
    assert on_cpu.processor.image_processor.device is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    results = on_cpu(images=paths[0], texts=TEXTS)
    assert len(results) == len(TEXTS)
    backend = on_cpu.processor.image_processor.get_backend()
    assert backend.device == "cpu" and {p.device.type for p in backend.model.parameters()} == {"cpu"}
    # The device is the pipeline's at run time, never written into the saved processor.
    on_cpu.processor.save_pretrained(tmp_path)
    saved = "".join(path.read_text() for path in tmp_path.glob("*.json"))
    assert '"device": null' in saved and '"cpu"' not in saved
