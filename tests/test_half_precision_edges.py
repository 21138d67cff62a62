"""Half precision at the edges: retrieval scores of a bfloat16 model or under autocast, the load dtype of
`from_text_pretrained`, bfloat16 region records in the processor, and the dtype of batches made from list rows."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining
from imagebert_hf.models.imagebert.modeling_imagebert import ImageBERTForImageTextRetrieval, ImageBERTForPreTraining
from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor
from imagebert_hf.regions import load_region_cache, load_region_dataset

from .test_modeling_imagebert import _tiny_bert_with_nsp_head
from .test_region_cache_scale import build


# ------------------------------------------------------------------------------------------------ retrieval scores


def _retrieval_model_and_pairs(make_tiny_config, num_pairs=24):
    """A tiny retrieval model whose ITM logits sit near 64 for every pair (equal biases), while the pairs' scores
    differ by a few hundredths: in bfloat16, logits near 64 are multiples of 0.5."""
    config = make_tiny_config()
    torch.manual_seed(0)
    model = ImageBERTForImageTextRetrieval(config).eval()
    with torch.no_grad():
        model.cls.seq_relationship.bias.fill_(64.0)
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.randint(1, config.vocab_size, (num_pairs, 8), generator=generator),
        "region_features": torch.randn(num_pairs, 5, config.region_feature_size, generator=generator),
        "region_locations": torch.rand(num_pairs, 5, 5, generator=generator),
    }
    return model, inputs


def _ties(scores: torch.Tensor) -> int:
    return scores.numel() - len(set(scores.tolist()))


def test_bfloat16_retrieval_scores_tie_no_more_than_float32(make_tiny_config):
    model, inputs = _retrieval_model_and_pairs(make_tiny_config)
    with torch.no_grad():
        float32_scores = model(**inputs).logits
        bfloat16_scores = model.to(torch.bfloat16)(**inputs).logits
    assert float32_scores.dtype == bfloat16_scores.dtype == torch.float32
    assert _ties(float32_scores) == 0
    assert _ties(bfloat16_scores) == 0
    # Only the encoder's rounding is left: the scores stay close to float32's.
    torch.testing.assert_close(bfloat16_scores, float32_scores, atol=0.05, rtol=0)
    # The bfloat16 head still trains, its gradients in its own dtype.
    model.train()
    model(**inputs, labels=(torch.arange(len(bfloat16_scores)) % 2)).loss.backward()
    head = model.cls.seq_relationship
    assert head.weight.grad.dtype == torch.bfloat16 and head.weight.grad.abs().sum() > 0


def test_retrieval_score_head_runs_in_float32_under_autocast(make_tiny_config):
    model, inputs = _retrieval_model_and_pairs(make_tiny_config)
    head = model.cls.seq_relationship
    with torch.no_grad():
        # Without autocast, float32 scores are the head's own product, bit for bit.
        logits = head(model.bert(**inputs).pooler_output)
        assert torch.equal(model(**inputs).logits, logits[:, 1] - logits[:, 0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pooled = model.bert(**inputs).pooler_output
            scores = model(**inputs).logits
    logits = F.linear(pooled.float(), head.weight, head.bias)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, logits[:, 1] - logits[:, 0])
    assert _ties(scores) == 0


# ------------------------------------------------------------------------------------------ from_text_pretrained


def test_from_text_pretrained_loads_in_the_dtype_asked_for(tmp_path):
    """`dtype`, or its older name `torch_dtype`, as in `from_pretrained`; by default the checkpoint's dtype."""
    bert = _tiny_bert_with_nsp_head(tmp_path)
    cases = [
        ({"torch_dtype": torch.float16}, torch.float16),
        ({"dtype": torch.float16}, torch.float16),
        ({"dtype": "bfloat16"}, torch.bfloat16),
        ({}, torch.float32),
    ]
    for load_dtype, expected in cases:
        ours, info = ImageBERTForPreTraining.from_text_pretrained(
            tmp_path, output_loading_info=True, region_feature_size=24, num_object_classes=11, **load_dtype
        )
        assert {parameter.dtype for parameter in ours.parameters()} == {expected}, load_dtype
        assert ours.config.dtype == expected, load_dtype
        assert info["itm_head"] == "mapped from NSP"
        assert torch.equal(ours.cls.seq_relationship.bias, bert.cls.seq_relationship.bias.flip(0).to(expected))


# ------------------------------------------------------------------------------------------------ region records


def test_processor_takes_bfloat16_records_as_their_float32_values(tokenizer, make_tiny_extractor):
    processor = ImageBERTProcessor(make_tiny_extractor(), tokenizer, max_text_length=16, max_regions=10)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4, processor.image_processor.region_feature_size, generator=generator)
    locations = torch.rand(4, 5, generator=generator)
    halves = {
        "image_id": "img0",
        "region_features": features.to(torch.bfloat16),
        "region_locations": locations.to(torch.bfloat16),
    }
    exact = {name: value.float() if isinstance(value, torch.Tensor) else value for name, value in halves.items()}
    from_halves = processor(regions=halves, text="a red circle")
    from_floats = processor(regions=exact, text="a red circle")
    assert from_halves["region_features"].dtype == torch.float32
    for name in from_floats:
        assert torch.equal(from_halves[name], from_floats[name]), name
    # Data that is not numbers is still refused, naming the record.
    with pytest.raises(ValueError, match=r"regions\[0\] \(img0\): region_features must hold numbers"):
        processor(regions={**halves, "region_features": [["a"] * features.shape[1]] * 4}, text="a red circle")


def test_dataset_rows_give_a_float32_batch_of_the_cache_values(tmp_path, tokenizer):
    """A region-cache row read as a dataset holds lists, which numpy makes float64: the batch is float32 (the
    values of a float16 or float32 cache are float32 numbers), equal to the batch of the cache's own arrays."""
    build(tmp_path, num_images=3, shard_size=3)  # float16 features
    cache, rows = load_region_cache(tmp_path), load_region_dataset(tmp_path)

    def sample(regions):
        return {
            "input_ids": tokenizer("a red circle")["input_ids"],
            "region_features": regions["region_features"],
            "region_locations": regions["region_locations"],
            "image_id": regions["image_id"],
        }

    def collate(features):
        return DataCollatorForImageBERTPretraining(tokenizer, seed=0, return_region_class_probs=False)(features)

    from_rows = collate([sample(rows[i]) for i in range(3)])
    assert isinstance(rows[0]["region_features"], list)
    assert from_rows["region_features"].dtype == from_rows["region_feature_targets"].dtype == torch.float32
    as_arrays = [
        {**sample(rows[i]), "region_features": np.asarray(cache[rows[i]["cache_key"]]["region_features"], np.float32)}
        for i in range(3)
    ]
    from_arrays = collate(as_arrays)
    for name in from_arrays:
        assert torch.equal(from_rows[name], from_arrays[name]), name
    # float64 arrays become float32 as well; float16 stays float16.
    doubles = [{**f, "region_features": f["region_features"].astype(np.float64)} for f in as_arrays]
    assert collate(doubles)["region_features"].dtype == torch.float32
    halves = [{**f, "region_features": f["region_features"].astype(np.float16)} for f in as_arrays]
    assert collate(halves)["region_features"].dtype == torch.float16
