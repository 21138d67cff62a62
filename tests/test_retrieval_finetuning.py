"""Retrieval fine-tuning: data sources, negatives, grouped batches, each loss, and the example script."""

import dataclasses
import importlib.util
import json
import math
import shutil
import sys
from copy import copy as copy_of

import pytest
import torch
from safetensors.torch import load_file

from imagebert_hf import ImageBERTConfig, ImageBERTForImageTextRetrieval
from imagebert_hf.data.retrieval_corpus import (
    DataCollatorForImageTextRetrieval,
    HardNegativeSampler,
    RandomNegativeSampler,
    RetrievalCorpus,
    RetrievalPairDataset,
    load_karpathy_split,
    load_manifest_records,
)
from imagebert_hf.data.synthetic import make_synthetic_examples, synthetic_region_record
from imagebert_hf.training.retrieval_finetuning import parse_loss_weights
from imagebert_hf.training.retrieval_objective import RetrievalTrainingModel, mine_contrastive_negatives

from .testing_utils import FLICKR_DIR, PROJECT_ROOT, require_shared_data, tiny_config_kwargs


def _load_example(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the module runs.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tokenizer):
    examples = make_synthetic_examples(12, seed=1, image_size=32, captions_per_image=2)
    # Two images share a caption: neither may serve as the other's negative.
    examples[5]["captions"][0] = examples[4]["captions"][0]
    regions = [synthetic_region_record(example, 24) for example in examples]
    return RetrievalCorpus.from_records(examples, tokenizer, regions, max_text_length=16)


def _model(corpus, **overrides):
    torch.manual_seed(0)
    config = ImageBERTConfig(**tiny_config_kwargs(vocab_size=99, **overrides))
    return ImageBERTForImageTextRetrieval(config)


def test_karpathy_split_reader(tmp_path):
    data = {
        "images": [
            {"filepath": "val2014", "filename": "a.jpg", "split": "test", "cocoid": 1, "sentences": [{"raw": " A dog. "}]},
            {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "cocoid": 2, "sentences": [{"raw": "b"}]},
            {"filepath": "train2014", "filename": "c.jpg", "split": "train", "cocoid": 3, "sentences": [{"raw": "c"}]},
        ],
        "dataset": "coco",
    }  # fmt: skip
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    test = load_karpathy_split(path, "test", image_root=tmp_path / "coco")
    image = str(tmp_path / "coco" / "val2014" / "a.jpg")
    assert test == [{"image_id": "1", "image": image, "manifest_image": "val2014/a.jpg", "captions": ["A dog."]}]
    train = load_karpathy_split(path, ("train", "restval"))
    assert [r["image_id"] for r in train] == ["2", "3"]
    assert train[1]["image"] == str(tmp_path / "train2014" / "c.jpg")
    with pytest.raises(ValueError, match="unknown split"):
        load_karpathy_split(path, "dev")
    with pytest.raises(ValueError, match="no image in split"):
        load_karpathy_split(path, "val")


@require_shared_data
def test_manifest_reader_on_real_data():
    records = load_manifest_records(FLICKR_DIR / "captions.jsonl", split="dev", max_images=5)
    assert len(records) == 5 and all(len(r["captions"]) == 5 for r in records)
    assert all(str(r["image"]).startswith(str(FLICKR_DIR)) for r in records)


def test_corpus_layout_and_folds(corpus):
    assert corpus.num_images == 12 and corpus.num_texts == 24
    assert corpus.text_to_image.tolist() == [i // 2 for i in range(24)]
    assert corpus.text_inputs["input_ids"].shape == (24, 16)
    assert corpus.region_inputs["region_features"].shape == (12, 3, 24)
    fold = corpus.subset([4, 5, 6])
    assert fold.image_ids == corpus.image_ids[4:7] and fold.texts == corpus.texts[8:14]
    assert fold.text_to_image.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(fold.region_inputs["region_features"], corpus.region_inputs["region_features"][4:7])


@pytest.mark.parametrize("negative_type", ["text", "image", "both"])
def test_random_negatives_are_never_positives(corpus, negative_type):
    sampler = RandomNegativeSampler(corpus, num_negatives=5, negative_type=negative_type, seed=0)
    groups = sampler(list(range(corpus.num_texts)))
    kinds = set()
    for text, negatives in zip(range(corpus.num_texts), groups):
        image = int(corpus.text_to_image[text])
        assert len(negatives) == 5 and len(set(negatives)) == 5
        for negative_image, negative_text in negatives:
            assert (negative_image, negative_text) != (image, text)
            assert corpus.texts[negative_text] != corpus.texts[text] or negative_image != image
            # A caption shared by images 4 and 5 is a positive for both.
            assert not (corpus.texts[negative_text] == corpus.texts[8] and negative_image in (4, 5))
            assert int(corpus.text_to_image[negative_text]) != negative_image
        kinds |= {"text" if negative_image == image else "image" for negative_image, _ in negatives}
    assert kinds == ({"text", "image"} if negative_type == "both" else {negative_type})
    # Per-sample seeds make the negatives reproducible whatever the batch.
    assert sampler([3, 7], seeds=[11, 12])[1] == sampler([7], seeds=[12])[0]


def test_hard_negatives_are_the_highest_scored_of_the_pool(corpus):
    model = _model(corpus).eval()
    sampler = HardNegativeSampler(corpus, num_negatives=2, pool_size=6, negative_type="text", model=model, seed=0)
    [kept] = sampler([0], seeds=[5])
    pool = RandomNegativeSampler(corpus, 6, "text", seed=0)([0], seeds=[5])[0]
    from imagebert_hf.models.imagebert.retrieval_index import score_pairs

    scores = score_pairs(model, corpus.text_inputs, corpus.region_inputs, [p[0] for p in pool], [p[1] for p in pool])
    assert kept == [pool[i] for i in scores.topk(2).indices.tolist()]
    with pytest.raises(ValueError, match="pool_size"):
        HardNegativeSampler(corpus, num_negatives=4, pool_size=2)


def test_collator_builds_groups(corpus):
    collator = DataCollatorForImageTextRetrieval(corpus, RandomNegativeSampler(corpus, 3, "both", seed=0))
    dataset = RetrievalPairDataset(corpus)
    batch = collator([dataset[(5, 99)], dataset[(10, 7)]])
    assert batch["group_size"] == 4
    assert batch["labels"].tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
    assert batch["positive_index"].tolist() == [0, 4]
    assert batch["input_ids"].shape[0] == 8 and batch["region_features"].shape[:1] == (8,)
    length = batch["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0], corpus.text_inputs["input_ids"][5, :length])
    assert int(batch["attention_mask"].sum(1).max()) == batch["input_ids"].shape[1]
    assert torch.equal(batch["region_features"][4], corpus.region_inputs["region_features"][5])


@pytest.mark.parametrize(
    "weights",
    [{"binary": 1.0}, {"multiclass": 1.0}, {"triplet": 1.0}, {"binary": 1.0, "multiclass": 0.5, "triplet": 2.0}],
)
def test_one_training_step_per_loss(corpus, weights):
    model = _model(corpus, retrieval_loss_weights=weights)
    wrapper = RetrievalTrainingModel(model, contrastive_weight=0.5)
    collator = DataCollatorForImageTextRetrieval(corpus, RandomNegativeSampler(corpus, 3, "both", seed=0))
    batch = collator(list(range(4)))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    outputs = wrapper(**batch)
    expected = sum(weight * outputs[f"{name}_loss"] for name, weight in weights.items())
    torch.testing.assert_close(outputs["loss"], expected + 0.5 * outputs["contrastive_loss"])
    for name in ("binary", "multiclass", "triplet"):
        assert (outputs.get(f"{name}_loss") is not None) == (name in weights)
    assert all(torch.isfinite(value) for value in outputs.values())
    outputs["loss"].backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert {"cls.seq_relationship.weight", "cls.text_projection.weight", "cls.region_projection.weight"} <= changed


def test_contrastive_mining_draws_by_similarity_and_never_the_same_image():
    # Texts 0-3 of images 0, 0, 1, 2: each text's only similar image is the next positive's.
    images = torch.tensor([0, 0, 1, 2])
    similarities = torch.full((4, 4), -30.0)
    for text, image in ((0, 2), (1, 2), (2, 3), (3, 0)):
        similarities[text, image] = 30.0
    generator = torch.Generator().manual_seed(0)
    texts, regions, found = mine_contrastive_negatives(similarities, images, 4, "both", generator)
    assert found.all()
    own = torch.arange(4)[:, None].expand(4, 4)
    # A slot swaps either the text (another caption for the positive's image) or the image, never both.
    swaps_text = regions == own
    assert torch.equal(swaps_text, texts != own) and swaps_text.any() and (~swaps_text).any()
    each_texts_image = torch.tensor([2, 2, 3, 0])[:, None].expand(4, 4)
    assert torch.equal(regions[~swaps_text], each_texts_image[~swaps_text])
    # Column 2 (image 1) is most similar to texts 0 and 1; column 0 only to text 3.
    assert set(texts[2][swaps_text[2]].tolist()) <= {0, 1} and set(texts[0][swaps_text[0]].tolist()) <= {3}
    assert not (images[texts] == images[regions]).any()
    # A batch of one image has nothing to draw from: the caller keeps its random negatives.
    _, _, found = mine_contrastive_negatives(torch.zeros(2, 2), torch.tensor([5, 5]), 2, "text")
    assert not found.any()


@pytest.mark.parametrize(("contrastive_weight", "positives"), [(0.0, [0, 2, 4]), (1.0, [0]), (1.0, [0, 2])])
def test_every_trainable_parameter_gets_a_gradient_at_each_step(corpus, contrastive_weight, positives):
    """What several processes need (DistributedDataParallel without `find_unused_parameters` fails on the next step
    otherwise): with the contrastive loss off the heads are frozen; a micro-batch of one positive still runs them."""
    model = _model(corpus, retrieval_loss_weights={"binary": 1.0})
    training = RetrievalTrainingModel(model, contrastive_weight)
    collator = DataCollatorForImageTextRetrieval(corpus, RandomNegativeSampler(corpus, 2, "both", seed=0))
    outputs = training(**collator(positives))
    outputs["loss"].backward()
    missing = [name for name, param in training.named_parameters() if param.requires_grad and param.grad is None]
    assert missing == []
    heads = [model.cls.text_projection.weight, model.cls.region_projection.weight]
    assert all(head.requires_grad == bool(contrastive_weight) for head in heads)
    # One positive has nothing to be contrasted with: no contrastive loss is reported (a logged 0 would be a lie).
    assert ("contrastive_loss" in outputs) == (contrastive_weight > 0 and len(positives) > 1)
    # A later wrapper of the same model with the loss on trains the heads again.
    RetrievalTrainingModel(model, 1.0)
    assert all(head.requires_grad for head in heads)


def test_contrastive_mining_never_pairs_a_caption_with_an_image_it_describes(corpus):
    # Texts 8 and 10 are one caption string, of images 4 and 5; text 2 is image 1's.
    collator = DataCollatorForImageTextRetrieval(corpus, RandomNegativeSampler(corpus, 2, "both", seed=0))
    batch = collator([8, 10, 2])
    matches = batch["positive_caption_matches"]
    assert matches.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    # The duplicate is the most similar pair: unguarded, mining picks it.
    similarities = torch.full((3, 3), -30.0)
    similarities[0, 1] = similarities[1, 0] = 30.0
    images = batch["positive_images"]
    texts, regions, found = mine_contrastive_negatives(
        similarities, images, 4, "both", torch.Generator().manual_seed(0), matches
    )
    assert found.all() and not matches[texts, regions].any()
    texts, regions, _ = mine_contrastive_negatives(similarities, images, 4, "both", torch.Generator().manual_seed(0))
    assert matches[texts, regions].any()
    # Nothing but the duplicate to draw from: the collator's random negatives stay.
    pair = collator([8, 10])
    _, _, found = mine_contrastive_negatives(
        torch.zeros(2, 2), pair["positive_images"], 2, "both", None, pair["positive_caption_matches"]
    )
    assert not found.any()

    # Through the training model: no group holds its own positive's caption and image again, labelled 0.
    model = _model(corpus)
    seen = {}
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    mining = RetrievalTrainingModel(model, 1.0, negative_mining="contrastive", negative_type="text", seed=0)
    for seed in range(10):
        mining.seed = seed
        mining(**batch)
        for row in range(seen["input_ids"].shape[0]):
            positive = row - row % batch["group_size"]
            same_text = torch.equal(seen["input_ids"][row], seen["input_ids"][positive])
            same_regions = torch.equal(seen["region_features"][row], seen["region_features"][positive])
            assert row == positive or not (same_text and same_regions), (seed, row)


def test_contrastive_mining_replaces_the_collators_negatives(corpus):
    model = _model(corpus, retrieval_loss_weights={"binary": 1.0, "multiclass": 1.0})
    collator = DataCollatorForImageTextRetrieval(corpus, RandomNegativeSampler(corpus, 3, "both", seed=0))
    batch = collator([0, 2, 4, 6])
    assert batch["positive_images"].tolist() == [int(corpus.text_to_image[t]) for t in (0, 2, 4, 6)]
    mining = RetrievalTrainingModel(model, 1.0, negative_mining="contrastive", seed=0)
    seen = {}
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    outputs = mining(**batch)
    assert torch.isfinite(outputs["loss"]) and outputs["multiclass_loss"] is not None
    positives = batch["positive_index"]
    pair_text, pair_regions = seen["input_ids"], seen["region_features"]
    assert torch.equal(pair_text[positives], batch["input_ids"][positives])
    texts_of_positives = [batch["input_ids"][i] for i in positives]
    regions_of_positives = [batch["region_features"][i] for i in positives]
    for row in range(pair_text.shape[0]):
        text = next(i for i, t in enumerate(texts_of_positives) if torch.equal(t, pair_text[row]))
        image = next(i for i, r in enumerate(regions_of_positives) if torch.equal(r, pair_regions[row]))
        # Every pair is made of the batch's positives; negatives pair two different images' halves.
        assert (text == image) == (row % 4 == 0)
    # The draw depends only on the batch and the seed: a resumed run mines the same negatives.
    first = {key: value.clone() for key, value in seen.items() if torch.is_tensor(value)}
    RetrievalTrainingModel(model, 1.0, negative_mining="contrastive", seed=0)(**batch)
    assert all(torch.equal(first[key], seen[key]) for key in first)
    with pytest.raises(ValueError, match="negative_mining"):
        RetrievalTrainingModel(model, 1.0, negative_mining="hardest")
    with pytest.raises(ValueError, match="contrastive_weight"):
        RetrievalTrainingModel(model, 0.0, negative_mining="contrastive")


def test_contrastive_loss_can_train_the_heads_only(corpus):
    model = _model(corpus)
    collator = DataCollatorForImageTextRetrieval(corpus, RandomNegativeSampler(corpus, 3, "both", seed=0))
    batch = collator(list(range(4)))
    for trains_encoder in (True, False):
        model.zero_grad()
        wrapper = RetrievalTrainingModel(model, 1.0, contrastive_trains_encoder=trains_encoder)
        wrapper(**batch)["contrastive_loss"].backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        assert grads["cls.text_projection.weight"].abs().sum() > 0
        assert grads["cls.region_projection.weight"].abs().sum() > 0
        encoder = grads["bert.encoder.layer.0.attention.self.query.weight"]
        assert (encoder is not None and encoder.abs().sum() > 0) == trains_encoder


def test_loss_weight_flag_parsing():
    assert parse_loss_weights("binary=1, triplet=0.5") == {"binary": 1.0, "triplet": 0.5}
    with pytest.raises(ValueError, match="name=weight"):
        parse_loss_weights("contrastive=1")
    with pytest.raises(ValueError, match="turns every retrieval loss off"):
        parse_loss_weights("binary=0")


def test_script_trains_checkpoints_and_resumes(tmp_path):
    run_retrieval = _load_example("run_retrieval")
    common = [
        "--synthetic_images", "24", "--eval_images", "8", "--max_steps", "4", "--per_device_train_batch_size", "4",
        "--report_to", "none", "--logging_steps", "1", "--checkpointing_steps", "2", "--cpu",
        "--loss_weights", "binary=1,multiclass=1", "--hard_negatives", "--hard_pool_size", "4",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        run_retrieval.main(common + ["--output_dir", str(tmp_path / "resumed"), "--stop_after_steps", "2"])
    assert stopped.value.code == 3
    assert (tmp_path / "resumed" / "checkpoints" / "step_00000002").is_dir()
    resumed = run_retrieval.main(common + ["--output_dir", str(tmp_path / "resumed"), "--resume"])
    straight = run_retrieval.main(common + ["--output_dir", str(tmp_path / "straight")])
    assert [h["step"] for h in straight["history"]] == [1, 2, 3, 4]
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in straight["history"]], rel=1e-4)
    for name in ("final/model.safetensors", "final/tokenizer_config.json", "losses.png", "recall_at_k.png",
                 "score_histogram.png", "eval_results.json"):  # fmt: skip
        assert (tmp_path / "straight" / name).is_file(), name
    assert set(straight["eval"]["full"]) == {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum"}


def test_a_run_killed_after_training_resumes_at_its_last_step(tmp_path, capsys):
    # A kill while the final model is saved or the evaluation runs: the resumed run repeats no step.
    run_retrieval = _load_example("run_retrieval")
    flags = [
        "--synthetic_images", "16", "--eval_images", "4", "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--report_to", "none", "--logging_steps", "1", "--checkpointing_steps", "2", "--cpu",
        "--output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    first = run_retrieval.main(flags)
    checkpoints = sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002", "step_00000003"]
    weights = load_file(tmp_path / "run" / "final" / "model.safetensors")
    shutil.rmtree(tmp_path / "run" / "final")
    (tmp_path / "run" / "eval_results.json").unlink()
    capsys.readouterr()
    resumed = run_retrieval.main([*flags, "--resume"])
    assert "from " + str(tmp_path / "run" / "checkpoints" / "step_00000003") + " at step 3" in capsys.readouterr().out
    assert resumed["history"] == first["history"] and resumed["eval"] == first["eval"]
    again = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert all(torch.equal(weights[name], again[name]) for name in weights) and weights.keys() == again.keys()


def test_brief_training_ranks_better_than_chance(tmp_path):
    # From scratch the cross-encoder sits on a plateau (loss at the label prior) for a couple of hundred steps before
    # it starts to match words to regions, hence the length of this run (a minute or two on 2 cores).
    run_retrieval = _load_example("run_retrieval")
    result = run_retrieval.main(
        [
            "--synthetic_images", "120", "--eval_images", "40", "--max_steps", "600", "--per_device_train_batch_size",
            "16", "--learning_rate", "1e-3", "--warmup_ratio", "0.02", "--report_to", "none", "--logging_steps", "50",
            "--cpu", "--loss_weights", "binary=1", "--contrastive_weight", "0", "--output_dir", str(tmp_path / "run"),
        ]
    )  # fmt: skip
    from imagebert_hf.data.synthetic import chance_recall

    metrics = result["eval"]["full"]
    # 40 images with 2 captions each: chance R@5 is about 23% for image queries (2 of 80 texts relevant) and
    # 12.5% for text queries (1 of 40 images).
    chance_ir5 = 100 * chance_recall(40, 5)
    chance_tr5 = 100 * chance_recall(80, 5, num_relevant=2)
    assert metrics["ir_r5"] > 2 * chance_ir5, metrics
    assert metrics["tr_r5"] > 2 * chance_tr5, metrics
    assert math.isfinite(result["history"][-1]["loss"])


@pytest.fixture
def pretraining_checkpoint(tmp_path, make_tiny_config):
    """A pretraining checkpoint of the synthetic set's sizes (`--synthetic_images`): no projection heads."""
    from imagebert_hf import ImageBERTForPreTraining
    from imagebert_hf.data.synthetic import make_synthetic_tokenizer

    tokenizer = make_synthetic_tokenizer()
    torch.manual_seed(0)
    config = make_tiny_config(
        vocab_size=len(tokenizer), region_feature_size=32, num_object_classes=24, max_regions=8, max_text_length=16
    )
    folder = tmp_path / "pretrained"
    ImageBERTForPreTraining(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _head_run(folder, output_dir, contrastive_weight, **flags):
    from imagebert_hf.training import RetrievalArguments

    return RetrievalArguments(
        output_dir=str(output_dir), model_name_or_path=str(folder), synthetic_images=12, eval_images=6,
        contrastive_weight=contrastive_weight, max_steps=2, per_device_train_batch_size=4, report_to="none",
        cpu=True, seed=0, **flags,
    )  # fmt: skip


def test_heads_nothing_trains_are_left_out_of_final_and_not_shortlisted(pretraining_checkpoint, tmp_path, monkeypatch):
    """From a pretraining checkpoint with --contrastive_weight 0 the projection heads stay random: `final/` leaves
    them out (every later load reports them untrained), and --eval_shortlist_k is refused before anything runs."""
    from transformers import AutoTokenizer

    from imagebert_hf.evaluation.full_ranking import check_shortlist_heads, load_retrieval_model
    from imagebert_hf.models.imagebert.pipeline_image_text_retrieval import (
        PROJECTION_HEADS,
        ImageTextRetrievalPipeline,
        untrained_heads,
    )
    from imagebert_hf.training import retrieval_finetuning, run_retrieval_finetuning

    refused = _head_run(pretraining_checkpoint, tmp_path / "refused", 0.0, eval_shortlist_k=2)
    with pytest.raises(ValueError, match=r"^--eval_shortlist_k 2: with --contrastive_weight 0 nothing trains"):
        run_retrieval_finetuning(refused)
    assert not (tmp_path / "refused").exists()

    reported = {}
    report = retrieval_finetuning._report
    monkeypatch.setattr(
        retrieval_finetuning,
        "_report",
        lambda acc, model, *rest: reported.setdefault("model", model) and report(acc, model, *rest),
    )

    def saved_heads(folder):
        saved = load_file(str(folder / "model.safetensors"))
        return {key.rsplit(".", 1)[0] for key in saved if key.startswith(tuple(PROJECTION_HEADS))}

    def published(model, folder):  # what save_for_hub uploads: the retrieval pipeline's save
        ImageTextRetrievalPipeline(model=model, tokenizer=tokenizer, task="image-text-retrieval").save_pretrained(
            folder
        )
        return folder

    tokenizer = AutoTokenizer.from_pretrained(pretraining_checkpoint)
    run_retrieval_finetuning(_head_run(pretraining_checkpoint, tmp_path / "frozen", 0.0))
    final = tmp_path / "frozen" / "final"
    assert saved_heads(final) == set()
    in_memory = reported.pop("model")
    assert untrained_heads(in_memory) == list(PROJECTION_HEADS)
    with pytest.raises(ValueError, match="has no trained projection heads"):
        check_shortlist_heads(load_retrieval_model(str(final)), 2, str(final))
    # Published from the run's model or from final/, the heads stay out: every load reports them untrained.
    ignored_on_save = copy_of(in_memory._keys_to_ignore_on_save)
    for model, name in ((in_memory, "from-run"), (load_retrieval_model(str(final)), "from-final")):
        copy = published(model, tmp_path / name)
        assert saved_heads(copy) == set() and untrained_heads(load_retrieval_model(str(copy))) == list(
            PROJECTION_HEADS
        )
    assert in_memory._keys_to_ignore_on_save == ignored_on_save  # as it was

    # A model built from scratch (no --model_name_or_path) starts with random heads: the same with weight 0.
    scratch = dataclasses.replace(_head_run(None, tmp_path / "scratch", 0.0), model_name_or_path=None)
    with pytest.raises(
        ValueError, match="projection heads .*, which a model built from scratch starts with at random"
    ):
        run_retrieval_finetuning(dataclasses.replace(scratch, eval_shortlist_k=2))
    run_retrieval_finetuning(scratch)
    assert saved_heads(tmp_path / "scratch" / "final") == set()
    assert untrained_heads(reported.pop("model")) == list(PROJECTION_HEADS)

    # With the contrastive loss the heads are trained: saved, and no longer reported untrained by the model in memory
    # (the pipeline built to publish it uses them).
    run_retrieval_finetuning(_head_run(pretraining_checkpoint, tmp_path / "trained", 1.0, eval_shortlist_k=2))
    in_memory = reported.pop("model")
    assert untrained_heads(in_memory) == []
    assert saved_heads(tmp_path / "trained" / "final") == set(PROJECTION_HEADS)
    assert saved_heads(published(in_memory, tmp_path / "trained-published")) == set(PROJECTION_HEADS)


def test_contrastive_loss_against_a_larger_batch_is_each_parts_share_of_its_loss(corpus):
    from imagebert_hf.training.retrieval_objective import gather_across_processes

    model = _model(corpus)
    generator = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    regions = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    whole = model.contrastive_loss(text, regions)
    parts = [model.contrastive_loss(text[i : i + 4], regions[i : i + 4], text, regions, i) for i in (0, 4)]
    assert torch.allclose((parts[0] + parts[1]) / 2, whole)
    assert not torch.allclose(model.contrastive_loss(text[:4], regions[:4]), parts[0])
    # Outside a run of several processes nothing is gathered.
    gathered, first = gather_across_processes(text)
    assert gathered is text and first == 0


def test_two_processes_contrast_their_positives_with_each_others(tmp_path):
    """Under `accelerate launch` with two gloo processes each contrasts its half of the batch with every process's
    embeddings: the mean of their losses is one process's loss over the whole batch, and the gradients of each half
    are that loss's."""
    import subprocess
    import sys

    from .test_pretraining import script_env

    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(PROJECT_ROOT / "examples" / "configs" / "accelerate_2cpu.yaml"),
        str(PROJECT_ROOT / "tests" / "gather_probe.py"), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"gather-{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["first"], r["rows"]) for r in ranks] == [(0, 8), (4, 8)]

    model = ImageBERTForImageTextRetrieval(
        ImageBERTConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    )
    generator = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1).requires_grad_(True)
    regions = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    whole = model.contrastive_loss(text, regions)
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(whole.item(), rel=1e-5)
    # Each process's loss reaches every text through the gather, so each process's rows get the gradient of the sum
    # of both losses, twice that of their mean (DDP's averaging over the two processes halves it back).
    whole.backward()
    gathered_grad = torch.tensor(ranks[0]["text_grad"] + ranks[1]["text_grad"])
    assert torch.allclose(gathered_grad, 2 * text.grad, atol=1e-5)


def test_evaluation_images_that_are_training_images_are_named_and_a_missing_image_is_one_line(
    tmp_path, tokenizer, make_tiny_config
):
    from transformers.testing_utils import CaptureLogger

    from imagebert_hf.training import RetrievalArguments, retrieval_finetuning
    from imagebert_hf.training.retrieval_finetuning import build_corpora

    from .test_region_cache_scale import FEATURES, build

    build(tmp_path / "cache", num_images=6)
    lines = [{"image": f"img{i:05d}", "captions": [f"a caption {i}"], "split": "train"} for i in range(4)]
    lines += [{"image": f"img{i:05d}", "captions": [f"a caption {i}"], "split": "dev"} for i in (3, 4, 5)]
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = make_tiny_config(vocab_size=len(tokenizer), region_feature_size=FEATURES)
    args = RetrievalArguments(
        output_dir=str(tmp_path / "out"), train_file=str(manifest), region_cache=str(tmp_path / "cache"),
        train_split="train", eval_split="dev", report_to="none", cpu=True,
    )  # fmt: skip
    with CaptureLogger(retrieval_finetuning.logger) as captured:
        train, held_out = build_corpora(args, tokenizer, config)
    assert (train.num_images, held_out.num_images) == (4, 3)
    assert "1 of the 3 images of --eval_split 'dev' are training images too" in captured.out
    assert "e.g. img00003" in captured.out

    manifest.write_text(manifest.read_text() + json.dumps({"image": "img00009", "captions": ["x"], "split": "dev"}))
    with pytest.raises(ValueError, match=r"^--region_cache .*cache: image 'img00009' is not in the region cache"):
        build_corpora(args, tokenizer, config)


def test_a_start_checkpoint_whose_processor_does_not_load_is_said_so(pretraining_checkpoint, make_tiny_extractor):
    from transformers import AutoTokenizer
    from transformers.testing_utils import CaptureLogger

    from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor
    from imagebert_hf.training import retrieval_finetuning
    from imagebert_hf.training.retrieval_finetuning import load_model_and_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(pretraining_checkpoint)
    extractor = make_tiny_extractor()
    # Longer texts than the model takes: the processor refuses the model's config when it loads.
    ImageBERTProcessor(extractor, tokenizer, max_text_length=44, max_regions=8).save_pretrained(pretraining_checkpoint)
    args = _head_run(pretraining_checkpoint, "unused", 1.0)
    with CaptureLogger(retrieval_finetuning.logger) as captured:
        _, _, processor = load_model_and_tokenizer(args, {"binary": 1.0})
    assert processor is None
    assert "holds a processor that does not load" in captured.out and "will not read raw images" in captured.out


def test_a_region_cache_of_another_feature_size_is_refused_before_fine_tuning_builds_anything(
    tmp_path, tokenizer, make_tiny_config
):
    from imagebert_hf.training import RetrievalArguments
    from imagebert_hf.training.retrieval_finetuning import build_corpora

    from .test_region_cache_scale import FEATURES, build

    build(tmp_path / "cache", num_images=2)
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text(json.dumps({"image": "img00000", "captions": ["a caption"]}) + "\n")
    config = make_tiny_config(vocab_size=len(tokenizer), region_feature_size=FEATURES + 1)
    args = RetrievalArguments(
        output_dir=str(tmp_path / "out"), train_file=str(manifest), region_cache=str(tmp_path / "cache"),
        eval_split=None, report_to="none", cpu=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match=rf"^--region_cache .*cache holds regions of {FEATURES} features; the model"):
        build_corpora(args, tokenizer, config)


@pytest.mark.parametrize("num_negatives", [1, 3])
def test_contrastive_mining_of_both_kinds_draws_each_negative_of_either_kind(num_negatives):
    # With one negative per positive, an alternation starting with text would never mine an image negative.
    from imagebert_hf.training.retrieval_objective import mine_contrastive_negatives

    positive_images = torch.arange(16)
    own = positive_images[:, None]
    text_kind = []
    for seed in range(50):
        generator = torch.Generator().manual_seed(seed)
        similarities = torch.randn(16, 16, generator=generator)
        text_source, image_source, found = mine_contrastive_negatives(
            similarities, positive_images, num_negatives, "both", generator
        )
        assert found.all()
        is_text, is_image = image_source == own, text_source == own
        assert torch.equal(is_text, ~is_image)  # each negative replaces exactly one half of its positive
        text_kind.append(is_text.float())
    share = torch.cat(text_kind).mean(dim=0)  # per negative slot, over 800 positives
    assert ((share > 0.4) & (share < 0.6)).all(), share
