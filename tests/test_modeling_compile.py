"""`torch.compile` of the ImageBERT models on CPU: whole graphs (`fullgraph=True`) for training and inference, the
same numbers as eager, and no recompilation for every new batch length.

Inductor compiles are slow on a small CPU, so the models are tiny and each property is proven with the cheapest
backend that shows it: inductor once for the numbers, `aot_eager` (forward and backward graphs, no code generation)
for the recompile counts.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from imagebert_hf import ImageBERTConfig, ImageBERTForPreTraining, ImageBERTModel

from .test_modeling_imagebert import ImageBERTModelTester
from .testing_utils import tiny_config_kwargs


# Inductor may reorder float32 reductions and fuse kernels; eager and compiled agree to this.
ATOL, RTOL = 1e-4, 1e-4


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pretraining_batch(batch_size=3, text_length=7, num_regions=5, seed=0):
    tester = ImageBERTModelTester(batch_size=batch_size, text_length=text_length, num_regions=num_regions, seed=seed)
    config = ImageBERTConfig(**tiny_config_kwargs(num_hidden_layers=1))
    inputs = tester.prepare_inputs(config)
    return config, {**inputs, **tester.prepare_pretraining_targets(config, inputs)}


def test_inductor_fullgraph_training_step_matches_eager():
    """Forward and backward of the sparse pretraining heads, as pretraining runs them, compiled by inductor."""
    config, batch = _pretraining_batch()
    torch.manual_seed(0)
    eager = ImageBERTForPreTraining(config).train()  # dropout is 0 in the tiny config: the runs are comparable
    compiled = ImageBERTForPreTraining(config).train()
    compiled.load_state_dict(eager.state_dict())
    expected = eager(**batch, sparse_prediction=True)
    got = torch.compile(compiled, fullgraph=True, backend="inductor")(**batch, sparse_prediction=True)
    for name in ("loss", "mlm_loss", "moc_loss", "mrfr_loss", "itm_loss", "mlm_logits", "itm_logits"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=ATOL, rtol=RTOL, msg=name)
    expected.loss.backward()
    got.loss.backward()
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=ATOL, rtol=RTOL, msg=name)


@pytest.mark.parametrize("sparse", [True, False])
def test_masked_row_feature_targets_compile_in_one_graph(sparse):
    """The MRFR targets as the collator gives them, the masked rows only (M, F): the count check they take is one
    graph with the rest (aot_eager), the losses equal eager's, and a wrong count still raises (compiled, as a runtime
    assertion of the graph: eager names the argument, `test_mrfr_targets_of_the_masked_rows_equal_full_targets`)."""
    config, batch = _pretraining_batch()
    batch["region_feature_targets"] = batch["region_feature_targets"][batch["masked_regions"].bool()]
    model = ImageBERTForPreTraining(config).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    expected, got = model(**batch, sparse_prediction=sparse), compiled(**batch, sparse_prediction=sparse)
    torch.testing.assert_close(got.mrfr_loss, expected.mrfr_loss, atol=ATOL, rtol=RTOL)
    batch["region_feature_targets"] = batch["region_feature_targets"][:1]
    with pytest.raises(RuntimeError):
        compiled(**batch, sparse_prediction=sparse)


def test_fullgraph_inference_matches_eager():
    """The dense outputs of a model without targets, in one graph (aot_eager: the graph, not the kernels)."""
    config, batch = _pretraining_batch()
    model = ImageBERTForPreTraining(config).eval()
    inputs = {key: batch[key] for key in ImageBERTModelTester().prepare_inputs(config)}
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected, got = model(**inputs), compiled(**inputs)
    for name in ("mlm_logits", "moc_logits", "mrfr_predictions", "itm_logits"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=ATOL, rtol=RTOL, msg=name)


def _lengths():
    """Batches of new text lengths and region counts (never 0 or 1, which torch always specialises)."""
    return [(7, 5), (9, 6), (12, 3), (5, 8)]


def test_no_recompile_for_every_new_batch_length():
    """`torch.compile`'s automatic dynamic shapes: one recompile, on the first new length, then none."""
    counter = CompileCounterWithBackend("aot_eager")
    model = ImageBERTForPreTraining(_pretraining_batch()[0]).train()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for seed, (text_length, num_regions) in enumerate(_lengths()):
        _, batch = _pretraining_batch(text_length=text_length, num_regions=num_regions, seed=seed)
        compiled(**batch, sparse_prediction=True).loss.backward()
    assert counter.frame_count == 2


def test_no_recompile_for_new_batch_sizes_with_mark_dynamic(make_tiny_config):
    counter = CompileCounterWithBackend("aot_eager")
    config = make_tiny_config(num_hidden_layers=1)
    compiled = torch.compile(ImageBERTModel(config).eval(), fullgraph=True, backend=counter)
    for seed, (batch_size, text_length) in enumerate([(2, 7), (3, 9), (5, 6), (4, 11)]):
        tester = ImageBERTModelTester(batch_size=batch_size, text_length=text_length, seed=seed)
        inputs = tester.prepare_inputs(config)
        for name, value in inputs.items():
            torch._dynamo.mark_dynamic(value, 0)
            if name in ("input_ids", "attention_mask", "token_type_ids"):
                torch._dynamo.mark_dynamic(value, 1)
        with torch.no_grad():
            compiled(**inputs)
    assert counter.frame_count == 1
