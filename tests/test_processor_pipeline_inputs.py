"""Settings and inputs of the processor, the extractor and the retrieval pipeline that used to pass unchecked: saved
lengths beyond the model, sizes and grids that would exhaust memory, region locations outside [0, 1], non-finite
scores, and `build_index` arguments. Each fails with the setting or the item named."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from imagebert_hf import ImageBERTForImageTextRetrieval
from imagebert_hf.models.imagebert.pipeline_image_text_retrieval import ImageTextRetrievalPipeline
from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor

from .test_bad_input_pipeline import _record
from .test_pipeline_retrieval import TEXTS, retriever, saved_model  # noqa: F401 - fixtures


@pytest.fixture
def folder(saved_model, tmp_path):  # noqa: F811
    """A copy of the saved retrieval model and processor whose files a test may edit."""
    copy = tmp_path / "model"
    shutil.copytree(saved_model[0], copy)
    return copy


def _edit_processor_config(folder, change) -> None:
    path = folder / "processor_config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------ processor lengths

LENGTH_CASES = [
    ("max_text_length", -1, ValueError, "max_text_length must be >= 2"),
    ("max_text_length", 2.5, TypeError, "max_text_length must be an integer"),
    ("max_regions", 0, ValueError, "max_regions must be >= 1"),
    ("max_regions", "4", TypeError, "max_regions must be an integer"),
]


@pytest.mark.parametrize(("name", "value", "error", "message"), LENGTH_CASES)
def test_processor_lengths_are_checked_when_built(retriever, name, value, error, message):  # noqa: F811
    processor = retriever.processor
    lengths = {"max_text_length": 16, "max_regions": 10, name: value}
    with pytest.raises(error, match=message):
        ImageBERTProcessor(processor.image_processor, processor.tokenizer, **lengths)


@pytest.mark.parametrize(("name", "value", "error", "message"), LENGTH_CASES[:2])
def test_saved_processor_lengths_are_checked_on_load(folder, name, value, error, message):
    from transformers import AutoProcessor

    _edit_processor_config(folder, lambda data: data.update({name: value}))
    with pytest.raises(error, match=message):
        AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("name", ["max_text_length", "max_regions"])
def test_saved_processor_lengths_beyond_the_model_are_refused(folder, name):
    from transformers import AutoProcessor

    _edit_processor_config(folder, lambda data: data.update({name: 1_000_000}))
    limit = json.loads((folder / "config.json").read_text())[name]
    with pytest.raises(ValueError, match=rf"processor's {name} 1000000 exceeds the model config's {name} {limit}"):
        AutoProcessor.from_pretrained(folder)


def test_pipeline_refuses_a_processor_that_pads_beyond_the_model(retriever):  # noqa: F811
    processor = retriever.processor
    wide = ImageBERTProcessor(processor.image_processor, processor.tokenizer, max_text_length=16, max_regions=500)
    limit = retriever.model.config.max_regions
    with pytest.raises(
        ValueError, match=rf"processor's max_regions 500 exceeds the model config's max_regions {limit}"
    ):
        ImageTextRetrievalPipeline(model=retriever.model, processor=wide, task="image-text-retrieval", device=-1)


@pytest.mark.parametrize(("value", "error"), [(-1, ValueError), (2.5, TypeError), (1000, ValueError)])
def test_pipeline_names_a_bad_saved_length_rather_than_serving_without_its_processor(folder, value, error):
    from transformers import pipeline

    _edit_processor_config(folder, lambda data: data.update(max_text_length=value))
    with pytest.raises(error, match="max_text_length"):
        pipeline("image-text-retrieval", model=str(folder), device=-1)


def test_a_saved_tokenizer_without_its_vocabulary_is_refused_not_served(folder):
    from transformers import AutoProcessor, pipeline

    assert len(AutoProcessor.from_pretrained(folder).tokenizer) > 5
    for name in ("tokenizer.json", "vocab.txt"):
        (folder / name).unlink(missing_ok=True)
    message = r"knows only its \d+ special tokens .* every word would become '\[UNK\]'"
    with pytest.raises(ValueError, match=message):
        AutoProcessor.from_pretrained(folder)
    with pytest.raises(ValueError, match=message):
        pipeline("image-text-retrieval", model=str(folder), device=-1)


# ------------------------------------------------------------------------------------ extractor settings


def test_a_size_beyond_max_image_pixels_is_refused(make_tiny_extractor):
    with pytest.raises(ValueError, match=r"size \{'height': 30000, 'width': 30000\} .* max_image_pixels=64000000"):
        make_tiny_extractor(size={"height": 30000, "width": 30000})
    with pytest.raises(ValueError, match=r"size \{'shortest_edge': 9000\} .* max_image_pixels"):
        make_tiny_extractor(size={"shortest_edge": 9000})


def test_a_saved_size_beyond_max_image_pixels_is_refused_on_load(folder):
    from transformers import AutoProcessor

    _edit_processor_config(folder, lambda data: data["image_processor"].update(size={"height": 30000, "width": 30000}))
    with pytest.raises(ValueError, match="max_image_pixels"):
        AutoProcessor.from_pretrained(folder)


def test_a_grid_with_more_cells_than_input_pixels_is_refused(make_tiny_extractor, retriever):  # noqa: F811
    with pytest.raises(
        ValueError, match=r"grid_sizes \[10000\] tile an image into 100000000 cells, more than the 4096"
    ):
        make_tiny_extractor(grid_sizes=[10000])
    image = Image.new("RGB", (48, 48), (200, 30, 30))
    with pytest.raises(ValueError, match=r"grid_sizes \[10000\]"):
        retriever.processor(images=image, text="a red circle", grid_sizes=[10000])


def test_the_default_grid_still_serves_fewer_regions(make_tiny_extractor):
    extractor = make_tiny_extractor(grid_sizes=[1, 2, 3, 4, 5, 6], max_regions=6)
    record = extractor.extract(Image.new("RGB", (48, 48), (0, 90, 200)), return_class_probs=False)[0]
    assert record["num_regions"] == 6


# ------------------------------------------------------------------------------------ region values


@pytest.mark.parametrize("value", [7.0, -3.0])
def test_locations_outside_the_unit_box_are_refused_by_the_pipeline(retriever, value):  # noqa: F811
    size = retriever.processor.image_processor.region_feature_size
    bad = _record(size, region_locations=np.full((3, 5), value, np.float32))
    with pytest.raises(ValueError, match=r"images\[1\] .*: region_locations hold values outside \[0, 1\]"):
        retriever(images=[_record(size), bad], texts=TEXTS[0])


@pytest.mark.parametrize("value", [7.0, -3.0])
def test_locations_outside_the_unit_box_are_refused_by_the_processor(retriever, value):  # noqa: F811
    size = retriever.processor.image_processor.region_feature_size
    bad = _record(size, region_locations=np.full((3, 5), value, np.float32))
    with pytest.raises(ValueError, match=r"regions\[1\] \(cached\).*: region_locations hold values outside \[0, 1\]"):
        retriever.processor(regions=[_record(size), bad], text=TEXTS[:2])


def test_string_features_are_named(retriever):  # noqa: F811
    size = retriever.processor.image_processor.region_feature_size
    bad = _record(size, region_features=[["a"] * size] * 3)
    with pytest.raises(
        ValueError, match=r"images\[1\] \(cached regions 'cached'\): region_features must hold numbers"
    ):
        retriever(images=[_record(size), bad], texts=TEXTS[0])
    with pytest.raises(ValueError, match=r"regions\[1\] \(cached\): region_features must hold numbers"):
        retriever.processor(regions=[_record(size), bad], text=TEXTS[:2])


# ------------------------------------------------------------------------------------ non-finite scores


def test_scores_that_overflow_are_refused_not_ranked(retriever):  # noqa: F811
    size = retriever.processor.image_processor.region_feature_size
    huge = _record(size, region_features=np.full((3, size), 1e30, np.float32))
    with pytest.raises(ValueError, match=r"non-finite scores .* for images\[0\] with texts\[0\], images\[1\]"):
        retriever(images=[huge, huge], texts=TEXTS[0])


def test_nan_weights_are_refused_not_ranked(saved_model, retriever):  # noqa: F811
    _, paths = saved_model
    model = ImageBERTForImageTextRetrieval.from_pretrained(saved_model[0])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "pooler" in name:
                parameter.fill_(float("nan"))
    broken = ImageTextRetrievalPipeline(
        model=model, processor=retriever.processor, task="image-text-retrieval", device=-1
    )
    with pytest.raises(ValueError, match=r"non-finite scores .* images\[0\] with texts\[0\].*outputs are not finite"):
        broken(images=paths[0], texts=TEXTS[:3])


# ------------------------------------------------------------------------------------ build_index

BATCH_SIZES = [(-1, ValueError, "batch_size must be at least 1"), (0, ValueError, "batch_size must be at least 1")]
BATCH_SIZES += [(2.5, TypeError, "batch_size must be a positive integer"), ("2", TypeError, "batch_size must be a")]


@pytest.mark.parametrize(("value", "error", "message"), BATCH_SIZES)
def test_build_index_checks_batch_size(retriever, saved_model, value, error, message):  # noqa: F811
    with pytest.raises(error, match=message):
        retriever.build_index(images=saved_model[1][:2], batch_size=value)


@pytest.mark.parametrize("texts", [123, {"a": 1}, b"a red circle"])
def test_build_index_checks_texts(retriever, texts):  # noqa: F811
    with pytest.raises(TypeError, match="texts must be a string or a list of strings"):
        retriever.build_index(texts=texts)


def test_build_index_takes_a_positive_batch_size(retriever, saved_model):  # noqa: F811
    assert len(retriever.build_index(images=saved_model[1], batch_size=1)) == 3
