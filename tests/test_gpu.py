"""Checks that need a CUDA device; skipped elsewhere. Run with `pytest -m gpu tests/test_gpu.py`."""

import pytest
import torch

from imagebert_hf import ImageBERTConfig, ImageBERTForImageTextRetrieval, ImageBERTForPreTraining

from .test_modeling_imagebert import ImageBERTModelTester


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _batch(config, tester):
    inputs = tester.prepare_inputs(config)
    return {**inputs, **tester.prepare_pretraining_targets(config, inputs)}


def test_cuda_matches_cpu(make_tiny_config):
    tester = ImageBERTModelTester()
    config = make_tiny_config()
    torch.manual_seed(0)
    model = ImageBERTForPreTraining(config).eval()
    batch = _batch(config, tester)
    expected = model(**batch)
    model = model.cuda()
    got = model(**{k: v.cuda() for k, v in batch.items()})
    torch.testing.assert_close(got.loss.cpu(), expected.loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.itm_logits.cpu(), expected.itm_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_bf16_autocast_training_step(make_tiny_config, attn_implementation):
    tester = ImageBERTModelTester(batch_size=4)
    config = make_tiny_config()
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = ImageBERTForPreTraining(config).cuda().train()
    model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = {k: v.cuda() for k, v in _batch(config, tester).items()}
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


def test_base_size_bf16_retrieval_forward():
    config = ImageBERTConfig(retrieval_loss_weights={"binary": 1.0, "multiclass": 1.0})
    model = ImageBERTForImageTextRetrieval(config).cuda().to(torch.bfloat16).eval()
    tester = ImageBERTModelTester(batch_size=8, text_length=44, num_regions=100)
    inputs = {k: v.cuda() for k, v in tester.prepare_inputs(config).items()}
    with torch.no_grad():
        out = model(**inputs, group_size=4)
    assert out.logits.shape == (8,) and torch.isfinite(out.loss)
