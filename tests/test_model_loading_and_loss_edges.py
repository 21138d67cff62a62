"""Edges of loading text checkpoints (an ImageBERT folder, non-BERT layouts), of the masked losses with non-finite
values where no target counts, of the loss weights a config accepts, and of a regions-only pass without regions."""

import json

import pytest
import torch
from transformers import BertConfig, BertModel

from imagebert_hf import ImageBERTConfig, ImageBERTForImageTextRetrieval, ImageBERTForPreTraining, ImageBERTModel
from imagebert_hf.models.imagebert.convert_uniter_checkpoint import prepare_uniter_state_dict

from .test_modeling_imagebert import ImageBERTModelTester, _bert_text_inputs, _eval
from .testing_utils import tiny_config_kwargs


REGION_FIELDS = {"region_feature_size": 24, "num_object_classes": 11}


# ------------------------------------------------------------------------------- from_text_pretrained: ImageBERT


@pytest.mark.parametrize("model_class", [ImageBERTForPreTraining, ImageBERTForImageTextRetrieval, ImageBERTModel])
def test_from_text_pretrained_refuses_an_imagebert_checkpoint(tmp_path, model_class):
    """A trained ImageBERT folder (a stage's final model given as a recipe's text_pretrained) would have its ITM head
    read as BERT's next-sentence head and its rows swapped: refused, pointing to from_pretrained."""
    config = ImageBERTConfig(**tiny_config_kwargs())
    model = ImageBERTForPreTraining(config)
    with torch.no_grad():
        model.cls.seq_relationship.bias.copy_(torch.tensor([-3.0, 3.0]))  # a head that says "matched"
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError) as refused:
        model_class.from_text_pretrained(tmp_path)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path} is an ImageBERT checkpoint (model_type 'imagebert'), not a text-only BERT")
    assert f"Load it with {model_class.__name__}.from_pretrained (in a recipe: model.init_from" in message
    # What the message points to keeps the trained head as it is.
    reloaded = ImageBERTForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(reloaded.cls.seq_relationship.bias, torch.tensor([-3.0, 3.0]))


def test_the_converter_sends_a_plain_bert_checkpoint_to_from_text_pretrained():
    """from_pretrained on a BERT folder keeps NSP's rows (ITM inverted); from_text_pretrained swaps them."""
    with pytest.raises(ValueError) as refused:
        prepare_uniter_state_dict({"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)}, "bert.pt")
    message = str(refused.value)
    assert "ImageBERTForPreTraining.from_text_pretrained" in message
    assert ".from_pretrained" not in message.replace(".from_text_pretrained", "")


# --------------------------------------------------------------------------- from_text_pretrained: other layouts


def _tiny_roberta(folder):
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=66, type_vocab_size=2, pad_token_id=1,
    )  # fmt: skip
    RobertaForMaskedLM(config).save_pretrained(folder)
    return "roberta", ("roberta.embeddings", "roberta.encoder", "lm_head.dense")


def _tiny_distilbert(folder):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    config = DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64)
    DistilBertForMaskedLM(config).save_pretrained(folder)
    return "distilbert", ("distilbert.embeddings", "distilbert.transformer")


@pytest.mark.parametrize("make_checkpoint", [_tiny_roberta, _tiny_distilbert])
@pytest.mark.parametrize("model_class", [ImageBERTForPreTraining, ImageBERTModel])
def test_from_text_pretrained_refuses_a_checkpoint_not_in_bert_layout(tmp_path, make_checkpoint, model_class):
    """Weights not named as BERT's leave the word embeddings and the encoder random: refused, not logged as new."""
    model_type, prefixes = make_checkpoint(tmp_path)
    # The sizes a DistilBERT config names its own way; RoBERTa's are the same.
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
    with pytest.raises(ValueError) as refused:
        model_class.from_text_pretrained(tmp_path, max_text_length=16, **sizes, **REGION_FIELDS)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path} (model_type {model_type!r}) is not a BERT-layout checkpoint")
    assert "embeddings.word_embeddings.weight" in message
    assert all(prefix in message for prefix in prefixes), message
    assert "from_text_pretrained loads checkpoints whose weights carry BERT's names" in message


@pytest.mark.parametrize("model_class", [ImageBERTForPreTraining, ImageBERTForImageTextRetrieval])
def test_a_bare_bert_model_still_loads_into_the_head_models(tmp_path, model_class):
    """A `BertModel` folder (MiniLM's layout: no `bert.` prefix, no heads) loads its text side into every class."""
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37)).save_pretrained(tmp_path)  # fmt: skip
    bert = BertModel.from_pretrained(tmp_path).eval()
    ours, info = model_class.from_text_pretrained(tmp_path, output_loading_info=True, **REGION_FIELDS)
    assert not any(key.startswith(("bert.encoder", "bert.embeddings.word")) for key in info["new_keys"])
    inputs = _bert_text_inputs(99)
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        got = ours.bert.eval()(**inputs).last_hidden_state[mask]
        expected = bert(**inputs).last_hidden_state[mask]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- masked losses: unselected targets


def _gradients(model, inputs, targets, sparse_prediction):
    model.zero_grad()
    out = model(**inputs, **targets, sparse_prediction=sparse_prediction)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("moc_loss_type", ["cross_entropy", "kl"])
def test_non_finite_targets_where_no_loss_counts_change_no_gradient(moc_loss_type):
    """NaN and inf in the targets of padded regions, unmasked regions and the masked regions of a negative pair:
    dense and sparse prediction give the same finite losses and gradients, equal to those with zeros there."""
    tester = ImageBERTModelTester()
    config = tester.get_config(moc_loss_type=moc_loss_type)
    torch.manual_seed(0)
    model = ImageBERTForPreTraining(config).train()
    inputs = tester.prepare_inputs(config)  # sample 1 has its last 2 regions padded
    batch, regions = inputs["region_features"].shape[:2]
    masked = torch.zeros(batch, regions, dtype=torch.bool)
    masked[:, :2] = True
    masked[1, -1] = True  # masked, but padded
    itm_labels = torch.tensor([1, 1, 0])  # sample 2 is a negative: its targets never count
    generator = torch.Generator().manual_seed(1)
    feature_targets = torch.randn(batch, regions, config.region_feature_size, generator=generator)
    class_probs = torch.rand(batch, regions, config.num_object_classes, generator=generator).softmax(-1)
    class_labels = torch.randint(0, config.num_object_classes, (batch, regions), generator=generator)
    counted = masked & inputs["region_attention_mask"].bool() & (itm_labels == 1)[:, None]
    clean = {
        "masked_regions": masked, "itm_labels": itm_labels, "region_feature_targets": feature_targets,
        "region_class_probs": class_probs, "region_class_labels": class_labels,
    }  # fmt: skip
    hostile = {**clean, "region_feature_targets": feature_targets.clone(), "region_class_probs": class_probs.clone()}
    for name in ("region_feature_targets", "region_class_probs"):
        hostile[name][1, -1] = float("nan")  # padded and masked
        hostile[name][0, -1] = float("inf")  # real, unmasked
        hostile[name][2, 0] = float("nan")  # masked, in a negative pair
        hostile[name][~counted] = torch.where(torch.rand(hostile[name][~counted].shape) < 0.5, float("nan"), 0.0)
        clean[name] = clean[name].masked_fill(~counted[..., None], 0.0)

    reference, expected = _gradients(model, inputs, clean, sparse_prediction=True)
    for sparse_prediction in (False, True):
        out, grads = _gradients(model, inputs, hostile, sparse_prediction)
        for loss in ("loss", "moc_loss", "mrfr_loss"):
            assert torch.isfinite(getattr(out, loss)), (loss, sparse_prediction)
            torch.testing.assert_close(getattr(out, loss), getattr(reference, loss), msg=loss)
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            assert torch.isfinite(grad).all(), (name, sparse_prediction)
            torch.testing.assert_close(grad, expected[name], msg=name)


# ----------------------------------------------------------------------------------------------- loss weights


def _saved_retrieval_folder(tmp_path):
    folder = tmp_path / "saved"
    ImageBERTForImageTextRetrieval(ImageBERTConfig(**tiny_config_kwargs())).save_pretrained(folder)
    return folder


def _with_fields(folder, **fields):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return folder


@pytest.mark.parametrize("weights", [{"binary": 0.0}, {"binary": 0.0, "multiclass": 0, "triplet": 0.0}])
def test_retrieval_loss_weights_all_zero_are_refused(tmp_path, weights):
    """All zero, `forward(labels=...)` would return no loss at all, without a word."""
    expected = rf"^retrieval_loss_weights are all zero \({weights}\): retrieval would train on no loss; give at least"
    expected = expected.replace("{", r"\{").replace("}", r"\}")
    with pytest.raises(ValueError, match=expected):
        ImageBERTConfig(**tiny_config_kwargs(retrieval_loss_weights=weights))
    folder = _saved_retrieval_folder(tmp_path)
    with pytest.raises(ValueError, match="^retrieval_loss_weights are all zero"):
        ImageBERTForImageTextRetrieval.from_pretrained(folder, retrieval_loss_weights=weights)
    with pytest.raises(ValueError, match="^retrieval_loss_weights are all zero"):
        ImageBERTForImageTextRetrieval.from_pretrained(_with_fields(folder, retrieval_loss_weights=weights))


def test_pretraining_loss_weights_all_zero_are_refused(tmp_path):
    """All zero, the pretraining loss would be a constant 0."""
    zero = dict.fromkeys(("mlm_loss_weight", "moc_loss_weight", "mrfr_loss_weight", "itm_loss_weight"), 0.0)
    expected = r"^mlm_loss_weight, moc_loss_weight, mrfr_loss_weight, itm_loss_weight are all zero: pretraining"
    with pytest.raises(ValueError, match=expected):
        ImageBERTConfig(**tiny_config_kwargs(**zero))
    folder = _saved_retrieval_folder(tmp_path)
    with pytest.raises(ValueError, match=expected):
        ImageBERTForPreTraining.from_pretrained(folder, **zero)
    with pytest.raises(ValueError, match=expected):
        ImageBERTForPreTraining.from_pretrained(_with_fields(folder, **zero))


def test_some_zero_loss_weights_are_still_accepted(tmp_path):
    """A stage may train on one task, and fine-tuning on one retrieval loss: only all zero is refused."""
    tester = ImageBERTModelTester(batch_size=4)
    some_zero = {"mlm_loss_weight": 0.0, "moc_loss_weight": 0.0, "mrfr_loss_weight": 0.0, "itm_loss_weight": 1.0}
    config = tester.get_config(retrieval_loss_weights={"binary": 0.0, "triplet": 1.0}, **some_zero)
    model = _eval(ImageBERTForImageTextRetrieval(config))
    out = model(**tester.prepare_inputs(config), group_size=2)
    assert out.binary_loss is None and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.triplet_loss)
    model.save_pretrained(tmp_path)
    assert ImageBERTConfig.from_pretrained(tmp_path).retrieval_loss_weights == {"binary": 0.0, "triplet": 1.0}


# --------------------------------------------------------------------------------------------- zero regions


def test_a_regions_only_pass_without_regions_is_refused_naming_the_argument():
    tester = ImageBERTModelTester(num_regions=0)
    config = tester.get_config()
    inputs = tester.prepare_inputs(config)
    regions_only = {name: inputs[name] for name in ("region_features", "region_locations", "region_attention_mask")}
    expected = r"^region_features has shape \(3, 0, 24\) and no input_ids were given; a regions-only pass needs"
    with pytest.raises(ValueError, match=expected):
        ImageBERTModel(config)(**regions_only)
    retrieval = ImageBERTForImageTextRetrieval(config)
    with pytest.raises(ValueError, match=expected):
        retrieval.get_region_embeddings(inputs["region_features"], inputs["region_locations"])
    # Text with no regions is a text-only sequence.
    assert _eval(ImageBERTModel(config))(**inputs).last_hidden_state.shape == (3, tester.text_length, 32)
