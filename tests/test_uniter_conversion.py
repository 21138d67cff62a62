"""UNITER checkpoints converted into ImageBERT classes: the same function as UNITER's own equations.

The state dicts here carry exactly the key names of UNITER's `UniterForPretraining` and `UniterForImageTextRetrieval`
(`ChenRocks/UNITER`, model/pretrain.py and model/itm.py), at tiny sizes. `uniter_reference` is UNITER's forward
written out from its modules (text and image embeddings, BERT layers, pooler, heads), one sample at a time without
padding, as UNITER's `gather_index` compacts it.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imagebert_hf import ImageBERTConfig, ImageBERTForImageTextRetrieval, ImageBERTForPreTraining, ImageBERTModel
from imagebert_hf.models.imagebert.convert_uniter_checkpoint import (
    convert_uniter_state_dict,
    load_uniter_model,
    main,
)
from imagebert_hf.models.imagebert.roi_boxes import box_locations

from .testing_utils import tiny_config_kwargs


VOCAB, HIDDEN, LAYERS, HEADS, INTERMEDIATE, IMG_DIM, LABELS, POSITIONS = 50, 32, 2, 4, 37, 24, 12, 64


def uniter_state_dict(task: str = "pretraining", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under UNITER's key names and shapes (LABELS = classes + background, as IMG_LABEL_DIM=1601)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=generator) * scale

    def norm(prefix):
        return {f"{prefix}.weight": 1 + rand(HIDDEN, scale=0.1), f"{prefix}.bias": rand(HIDDEN, scale=0.1)}

    def linear(prefix, out_features, in_features):
        return {f"{prefix}.weight": rand(out_features, in_features), f"{prefix}.bias": rand(out_features, scale=0.1)}

    sd = {
        "uniter.embeddings.word_embeddings.weight": rand(VOCAB, HIDDEN),
        "uniter.embeddings.position_embeddings.weight": rand(POSITIONS, HIDDEN),
        "uniter.embeddings.token_type_embeddings.weight": rand(2, HIDDEN),
        **norm("uniter.embeddings.LayerNorm"),
        **linear("uniter.img_embeddings.img_linear", HIDDEN, IMG_DIM),
        **norm("uniter.img_embeddings.img_layer_norm"),
        **norm("uniter.img_embeddings.pos_layer_norm"),
        **linear("uniter.img_embeddings.pos_linear", HIDDEN, 7),
        "uniter.img_embeddings.mask_embedding.weight": rand(2, IMG_DIM),
        **norm("uniter.img_embeddings.LayerNorm"),
    }
    for i in range(LAYERS):
        p = f"uniter.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            sd.update(linear(p + f"attention.self.{name}", HIDDEN, HIDDEN))
        sd.update(linear(p + "attention.output.dense", HIDDEN, HIDDEN))
        sd.update(norm(p + "attention.output.LayerNorm"))
        sd.update(linear(p + "intermediate.dense", INTERMEDIATE, HIDDEN))
        sd.update(linear(p + "output.dense", HIDDEN, INTERMEDIATE))
        sd.update(norm(p + "output.LayerNorm"))
    sd.update(linear("uniter.pooler.dense", HIDDEN, HIDDEN))
    sd.update(linear("itm_output", 2, HIDDEN))
    if task == "retrieval":
        sd.update(linear("rank_output", 1, HIDDEN))
        return sd
    sd.update(linear("cls.predictions.transform.dense", HIDDEN, HIDDEN))
    sd.update(norm("cls.predictions.transform.LayerNorm"))
    sd["cls.predictions.bias"] = rand(VOCAB, scale=0.1)
    # Tied parameters appear in a state dict under both names.
    sd["cls.predictions.decoder.weight"] = sd["uniter.embeddings.word_embeddings.weight"]
    sd.update(linear("feat_regress.net.0", HIDDEN, HIDDEN))
    sd.update(norm("feat_regress.net.2"))
    sd["feat_regress.weight"] = sd["uniter.img_embeddings.img_linear.weight"]
    sd["feat_regress.bias"] = rand(IMG_DIM, scale=0.1)
    sd.update(linear("region_classifier.net.0", HIDDEN, HIDDEN))
    sd.update(norm("region_classifier.net.2"))
    sd.update(linear("region_classifier.net.3", LABELS, HIDDEN))
    return sd


def gelu(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def uniter_reference(sd, input_ids, img_feat, img_pos):
    """UNITER's forward for one unpadded sample: (sequence output, pooled, heads)."""

    def ln(x, p):
        return F.layer_norm(x, (HIDDEN,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-12)

    def lin(x, p):
        return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])

    text = (
        sd["uniter.embeddings.word_embeddings.weight"][input_ids]
        + sd["uniter.embeddings.position_embeddings.weight"][torch.arange(len(input_ids))]
        + sd["uniter.embeddings.token_type_embeddings.weight"][0]
    )
    text = ln(text, "uniter.embeddings.LayerNorm")
    image = (
        ln(lin(img_feat, "uniter.img_embeddings.img_linear"), "uniter.img_embeddings.img_layer_norm")
        + ln(lin(img_pos, "uniter.img_embeddings.pos_linear"), "uniter.img_embeddings.pos_layer_norm")
        + sd["uniter.embeddings.token_type_embeddings.weight"][1]
    )
    image = ln(image, "uniter.img_embeddings.LayerNorm")
    hidden = torch.cat([text, image])
    head_size = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"uniter.encoder.layer.{i}."
        q, k, v = (
            lin(hidden, p + f"attention.self.{name}").view(-1, HEADS, head_size).transpose(0, 1)
            for name in ("query", "key", "value")
        )
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_size), dim=-1)
        context = (probs @ v).transpose(0, 1).reshape(-1, HIDDEN)
        attention = ln(lin(context, p + "attention.output.dense") + hidden, p + "attention.output.LayerNorm")
        hidden = ln(
            lin(gelu(lin(attention, p + "intermediate.dense")), p + "output.dense") + attention,
            p + "output.LayerNorm",
        )
    pooled = torch.tanh(lin(hidden[0], "uniter.pooler.dense"))
    out = {"hidden": hidden, "itm": lin(pooled, "itm_output")}
    if "rank_output.weight" in sd:
        out["rank"] = lin(pooled, "rank_output")[0]
    if "cls.predictions.bias" in sd:
        text_hidden, image_hidden = hidden[: len(input_ids)], hidden[len(input_ids) :]
        transform = ln(
            gelu(lin(text_hidden, "cls.predictions.transform.dense")), "cls.predictions.transform.LayerNorm"
        )
        out["mlm"] = F.linear(transform, sd["cls.predictions.decoder.weight"]) + sd["cls.predictions.bias"]
        mrfr = ln(gelu(lin(image_hidden, "feat_regress.net.0")), "feat_regress.net.2")
        out["mrfr"] = F.linear(mrfr, sd["feat_regress.weight"].t(), sd["feat_regress.bias"])
        mrc = ln(gelu(lin(image_hidden, "region_classifier.net.0")), "region_classifier.net.2")
        out["mrc"] = lin(mrc, "region_classifier.net.3")
    return out


@pytest.fixture(scope="module")
def batch():
    """Two samples of different text and region counts, padded as our processor pads them."""
    rng = np.random.default_rng(1)
    text_lengths, region_counts, text_width, region_width = (5, 3), (4, 2), 6, 5
    input_ids = torch.zeros(2, text_width, dtype=torch.long)
    attention_mask = torch.zeros(2, text_width, dtype=torch.long)
    features = torch.zeros(2, region_width, IMG_DIM)
    locations = torch.zeros(2, region_width, 7)
    region_mask = torch.zeros(2, region_width, dtype=torch.long)
    samples = []
    for i, (length, count) in enumerate(zip(text_lengths, region_counts)):
        ids = torch.as_tensor(rng.integers(1, VOCAB, length))
        feat = torch.as_tensor(rng.standard_normal((count, IMG_DIM)), dtype=torch.float32)
        corners = np.sort(rng.uniform(0, 1, (count, 2, 2)), axis=1)
        boxes = np.concatenate([corners[:, 0], corners[:, 1]], axis=1) * [200, 100, 200, 100]
        pos = torch.as_tensor(box_locations(boxes, 200, 100, size=7))
        input_ids[i, :length], attention_mask[i, :length] = ids, 1
        features[i, :count], locations[i, :count], region_mask[i, :count] = feat, pos, 1
        samples.append((ids, feat, pos))
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "region_features": features,
        "region_locations": locations,
        "region_attention_mask": region_mask,
    }
    return inputs, samples, text_width


def test_uniter_box_position_is_seven_dimensional():
    boxes = np.array([[10.0, 20.0, 50.0, 100.0]])
    expected = [[0.05, 0.2, 0.25, 1.0, 0.2, 0.8, 0.16]]
    np.testing.assert_allclose(box_locations(boxes, 200, 100, size=7), expected, rtol=1e-6)
    np.testing.assert_allclose(box_locations(boxes, 200, 100), [[0.05, 0.2, 0.25, 1.0, 0.16]], rtol=1e-6)
    with pytest.raises(ValueError, match="location size"):
        box_locations(boxes, 200, 100, size=6)


def test_paper_defaults_are_unchanged_and_the_uniter_fields_are_checked(make_tiny_config):
    config = ImageBERTConfig()
    assert (config.region_location_size, config.region_position_embedding) == (5, True)
    assert not config.region_projection_layer_norm and not config.separate_region_layer_norm
    keys = set(ImageBERTModel(make_tiny_config()).state_dict())
    assert not any("region_layer_norm" in key or "region_feature_layer_norm" in key for key in keys)
    with pytest.raises(ValueError, match="region_location_size must be one of"):
        ImageBERTConfig(region_location_size=6)


def test_uniter_layout_changes_the_region_embedding():
    """Each UNITER switch changes what a region embeds to (none of them is a no-op)."""
    torch.manual_seed(0)
    base = tiny_config_kwargs(region_location_size=7)
    features, locations = torch.randn(1, 3, 24), torch.rand(1, 3, 7)
    outputs = []
    for switches in ({}, {"region_position_embedding": False}, {"region_projection_layer_norm": True}):
        torch.manual_seed(0)
        model = ImageBERTModel(ImageBERTConfig(**base, **switches)).eval()
        with torch.no_grad():
            outputs.append(model.embeddings(region_features=features, region_locations=locations))
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[0], outputs[2])


def test_pretraining_checkpoint_computes_uniter_forward(batch):
    sd = uniter_state_dict("pretraining")
    model = load_uniter_model(sd, uniter_config={"num_attention_heads": HEADS}, max_text_length=10, max_regions=8)
    assert isinstance(model, ImageBERTForPreTraining)
    config = model.config
    assert (config.region_location_size, config.num_object_classes, config.region_feature_size) == (7, 11, IMG_DIM)
    inputs, samples, text_width = batch
    with torch.no_grad():
        hidden = model.bert(**inputs).last_hidden_state
        out = model(**inputs)
    for i, (ids, feat, pos) in enumerate(samples):
        ref = uniter_reference(sd, ids, feat, pos)
        ours = torch.cat([hidden[i, : len(ids)], hidden[i, text_width : text_width + len(feat)]])
        torch.testing.assert_close(ours, ref["hidden"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.itm_logits[i], ref["itm"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.mlm_logits[i, : len(ids)], ref["mlm"], atol=1e-4, rtol=1e-4)
        # UNITER's background column (class 0) has no ImageBERT counterpart.
        torch.testing.assert_close(out.moc_logits[i, : len(feat)], ref["mrc"][:, 1:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.mrfr_predictions[i, : len(feat)], ref["mrfr"], atol=1e-4, rtol=1e-4)


def test_finetuned_retrieval_checkpoint_scores_with_rank_output(batch):
    sd = uniter_state_dict("retrieval", seed=3)
    model = load_uniter_model(sd, uniter_config={"num_attention_heads": HEADS}, max_text_length=10, max_regions=8)
    assert isinstance(model, ImageBERTForImageTextRetrieval)
    inputs, samples, _ = batch
    with torch.no_grad():
        scores = model(**inputs).logits
    reference = torch.stack([uniter_reference(sd, *sample)["rank"] for sample in samples])
    torch.testing.assert_close(scores, reference, atol=1e-4, rtol=1e-4)
    # A pretrained checkpoint converted for retrieval scores with its ITM head instead.
    pretrained = uniter_state_dict("pretraining")
    model = load_uniter_model(
        pretrained, task="retrieval", uniter_config={"num_attention_heads": HEADS}, max_text_length=10, max_regions=8
    )
    with torch.no_grad():
        scores = model(**inputs).logits
    itm = torch.stack([uniter_reference(pretrained, *sample)["itm"] for sample in samples])
    torch.testing.assert_close(scores, itm[:, 1] - itm[:, 0], atol=1e-4, rtol=1e-4)


def test_conversion_names_unknown_and_missing_keys():
    sd = uniter_state_dict("pretraining")
    with pytest.raises(ValueError, match="no ImageBERT counterpart.*uniter.extra.weight"):
        convert_uniter_state_dict({**sd, "uniter.extra.weight": torch.zeros(1)}, "pretraining")
    incomplete = {k: v for k, v in sd.items() if k != "uniter.encoder.layer.1.output.dense.bias"}
    with pytest.raises(ValueError, match=r"missing \['bert.encoder.layer.1.output.dense.bias'\]"):
        load_uniter_model(incomplete, uniter_config={"num_attention_heads": HEADS})
    retrieval_only = uniter_state_dict("retrieval")
    with pytest.raises(ValueError, match="lacks the pretraining heads"):
        load_uniter_model(retrieval_only, task="pretraining", uniter_config={"num_attention_heads": HEADS})


def conversion_flags(tmp_path, output, checkpoint=None, **uniter_config) -> tuple[list[str], dict]:
    """The command line converting a tiny UNITER retrieval checkpoint (written at `checkpoint`, in `tmp_path` by
    default, with its JSON config) to `output`, and the checkpoint's state dict."""
    state_dict = uniter_state_dict("retrieval", seed=5)
    checkpoint = checkpoint or tmp_path / "uniter-itr.pt"
    torch.save(state_dict, checkpoint)
    config = tmp_path / "uniter-tiny.json"
    config.write_text(json.dumps({"num_attention_heads": HEADS, **uniter_config}))
    return ["--checkpoint", str(checkpoint), "--output", str(output), "--uniter_config", str(config)], state_dict


def test_cli_converts_a_checkpoint_file_that_loads_with_from_pretrained(tmp_path, batch):
    output = tmp_path / "converted"
    args, sd = conversion_flags(tmp_path, output, hidden_act="gelu")
    assert main([*args, "--max_text_length", "10"]) == 0
    model = ImageBERTForImageTextRetrieval.from_pretrained(output).eval()
    assert model.config.separate_region_layer_norm and not model.config.region_position_embedding
    inputs, samples, _ = batch
    with torch.no_grad():
        scores = model(**inputs).logits
    reference = torch.stack([uniter_reference(sd, *sample)["rank"] for sample in samples])
    torch.testing.assert_close(scores, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("where", ["a_folder_of_other_files", "the_folder_of_its_checkpoint", "an_earlier_conversion"])
def test_the_converter_replaces_only_an_earlier_conversion_never_other_files(tmp_path, capsys, where):
    """The output folder is replaced whole: a folder of other models or notes, or the one the checkpoint lies in,
    would be deleted; refused in one line before anything is converted, while an earlier conversion is replaced."""
    output = tmp_path / "models"
    output.mkdir()
    checkpoint = tmp_path / "uniter-itr.pt"
    if where == "a_folder_of_other_files":
        (output / "notes.txt").write_text("keep me")
        (output / "other_model").mkdir()
    elif where == "the_folder_of_its_checkpoint":
        checkpoint = output / "uniter-itr.pt"
    args, _ = conversion_flags(tmp_path, output, checkpoint)
    if where == "an_earlier_conversion":
        assert main(args) == 0
        (output / "stale.txt").write_text("from the earlier conversion")
        assert main(args) == 0
        assert sorted(path.name for path in output.iterdir()) == ["config.json", "model.safetensors"]
        return
    before = sorted(path.name for path in output.iterdir())
    with pytest.raises(SystemExit) as error:
        main(args)
    message = str(error.value)
    assert message.startswith(f"imagebert-convert-uniter: error: --output {output} ") and "\n" not in message
    expected = (
        "is a folder holding other files (notes.txt, other_model)"
        if where == "a_folder_of_other_files"
        else "holds " + str(checkpoint)
    )
    assert expected in message
    assert sorted(path.name for path in output.iterdir()) == before


def test_a_converted_model_reads_as_having_untrained_projection_heads(tmp_path):
    """UNITER has no unimodal heads: the conversion leaves them out of the saved weights, so the pipeline and the
    evaluation see them untrained (no shortlist through random heads) rather than as trained ones."""
    from imagebert_hf.evaluation.full_ranking import check_shortlist_heads
    from imagebert_hf.models.imagebert.pipeline_image_text_retrieval import PROJECTION_HEADS, untrained_heads

    output = tmp_path / "converted"
    assert main(conversion_flags(tmp_path, output)[0]) == 0
    from safetensors.torch import load_file

    saved = load_file(output / "model.safetensors")
    assert not [key for key in saved if key.startswith(tuple(head + "." for head in PROJECTION_HEADS))]
    model = ImageBERTForImageTextRetrieval.from_pretrained(output)
    assert untrained_heads(model) == list(PROJECTION_HEADS)
    with pytest.raises(ValueError, match="has no trained projection heads"):
        check_shortlist_heads(model, 16, str(output))
