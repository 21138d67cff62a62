"""Hard ITM negatives from relation swaps (`swap_negatives` of a synthetic source): the sample's own image with its
relation's objects or colours exchanged, labelled 0; with the option off every sample is what it was before."""

import numpy as np
import pytest

from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining
from imagebert_hf.data.negatives import choose_hard_caption, choose_negative
from imagebert_hf.data.pair_sources import MixtureSampler, PretrainingPairDataset, SyntheticPairSource
from imagebert_hf.data.synthetic import COLORS, make_synthetic_tokenizer, swap_caption_words, synthetic_swap_captions
from imagebert_hf.training.pretraining import build_source
from imagebert_hf.training.recipe import RecipeError, recipe_from_dict


FEATURE_SIZE = 16


@pytest.fixture(scope="module")
def tokenizer():
    return make_synthetic_tokenizer()


def dataset_of(source, tokenizer):
    return PretrainingPairDataset([source], [source.annotation_regions(FEATURE_SIZE)], tokenizer, 24, 4)


def items(dataset, count=400, grouped=True):
    lengths = dataset.sample_lengths if grouped else None
    sampler = MixtureSampler(dataset.sizes, [1.0], seed=3, sample_lengths=lengths, group_size=8)
    return sampler.indices(0)[:count]


def text_of(sample, tokenizer):
    return tokenizer.decode(sample["input_ids"], skip_special_tokens=True)


def test_choose_hard_caption_draws_nothing_when_off():
    rng, untouched = np.random.default_rng(5), np.random.default_rng(5)
    called = []
    assert choose_hard_caption(rng, 0.0, lambda: called.append(1) or ["x"]) is None
    assert not called and rng.random() == untouched.random()


def test_choose_hard_caption_rate_and_choices():
    draws = [choose_hard_caption(np.random.default_rng(seed), 0.3, lambda: ["a", "b"]) for seed in range(2000)]
    chosen = [draw for draw in draws if draw is not None]
    assert 0.26 < len(chosen) / len(draws) < 0.34
    assert set(chosen) == {"a", "b"}
    assert all(choose_hard_caption(np.random.default_rng(seed), 1.0, list) is None for seed in range(20))


@pytest.mark.parametrize(
    ("caption", "twins"),
    [
        (
            "a blue square to the right of an orange circle",
            {
                "object_swap": "an orange circle to the right of a blue square",
                "attribute_swap": "an orange square to the right of a blue circle",
            },
        ),
        ("a red cross above a red circle", {"object_swap": "a red circle above a red cross"}),
        # "and" joins without a relation: exchanging the objects keeps it true, so only the colours are swapped.
        (
            "a red circle and a green square on a white background",
            {"attribute_swap": "a green circle and a red square on a white background"},
        ),
        ("a red circle above a red circle", {}),
        # Two shapes alike joined by "and": the colour swap is the object swap, true as well.
        ("a red cross and a blue cross on a black background", {}),
        (
            "a red cross above a blue cross",
            {"object_swap": "a blue cross above a red cross", "attribute_swap": "a blue cross above a red cross"},
        ),
        ("circle red above blue square", {}),
    ],
)
def test_swap_caption_words(caption, twins):
    assert swap_caption_words(caption) == twins


def test_source_hard_captions_swap_each_true_caption_in_its_wording():
    source = SyntheticPairSource(30, swap_negatives=0.5, caption_noise=0.5)
    clean = SyntheticPairSource(30)
    for index, (key, _) in enumerate(source.pairs):
        true_caption = clean.pairs[index][1]
        twins = swap_caption_words(true_caption)
        assert source.hard_negative_captions(index) == [
            twins[k] for k in ("object_swap", "attribute_swap") if k in twins
        ]
        joined, shapes = " and " in true_caption, [label.split()[1] for label in _object_labels(source, key)]
        # The generator draws two different colours: only two shapes alike joined by "and" give no colour swap.
        assert ("attribute_swap" in twins) == (not joined or shapes[0] != shapes[1])
        assert ("object_swap" in twins) == (not joined)
        # A twin is false of the image: it is none of the image's true captions (left-of and right-of included).
        example = source.examples[key]
        for twin in twins.values():
            assert twin not in example["captions"]
            assert twin != (synthetic_swap_captions(example) or {}).get("true")
    assert SyntheticPairSource(5).hard_negative_share == 0.0
    with pytest.raises(ValueError, match="swap_negatives must be in"):
        SyntheticPairSource(5, swap_negatives=1.5)


def _object_labels(source, key) -> list[str]:
    return [item["label"] for item in source.examples[key]["objects"]]


def test_no_swap_twin_is_true_of_its_image():
    """A twin names the image's objects in another arrangement: with "and" (no relation) a twin naming the same
    objects would be true, so none may."""
    source = SyntheticPairSource(400, seed=0, captions_per_image=3, swap_negatives=1.0)
    twins = 0
    for index, (key, _) in enumerate(source.pairs):
        objects = sorted(_object_labels(source, key))
        for twin in source.hard_negative_captions(index):
            twins += 1
            words = twin.split()
            named = sorted(f"{word} {words[i + 1]}" for i, word in enumerate(words[:-1]) if word in COLORS)
            assert twin not in source.examples[key]["captions"]
            assert not (" and " in twin and named == objects), (twin, objects)
    assert twins > 1500


def test_swap_negatives_show_the_own_image_with_label_zero(tokenizer):
    source = SyntheticPairSource(40, swap_negatives=0.5)
    dataset = dataset_of(source, tokenizer)
    chosen = items(dataset)
    samples = dataset.__getitems__(chosen)
    swaps = 0
    for (index, _), sample in zip(chosen, samples):
        key = source.pairs[index][0]
        text = text_of(sample, tokenizer)
        if text in source.hard_negative_captions(index):
            swaps += 1
            assert sample["itm_labels"] == 0 and sample["image_id"] == key
    negatives = sum(sample["itm_labels"] == 0 for sample in samples)
    # Half the samples are negatives and half of those become swaps, of the pairs whose caption has a twin (about 9
    # in 10: two shapes alike joined by "and" give none).
    with_twins = sum(bool(source.hard_negative_captions(index)) for index in range(len(source.pairs)))
    expected = 0.25 * with_twins / len(source.pairs)
    assert abs(swaps / len(samples) - expected) < 0.1 and swaps < negatives
    # The lengths the sampler groups by are those of the texts the samples show.
    lengths = dataset.sample_lengths(chosen)
    assert lengths == [(len(sample["region_features"]), len(sample["input_ids"])) for sample in samples]
    batch = DataCollatorForImageBERTPretraining(tokenizer, max_text_length=24, max_regions=4)(samples[:16])
    assert batch["itm_labels"].tolist() == [sample["itm_labels"] for sample in samples[:16]]


def test_off_leaves_every_sample_as_choose_negative_makes_it(tokenizer):
    off = dataset_of(SyntheticPairSource(40), tokenizer)
    on = dataset_of(SyntheticPairSource(40, swap_negatives=0.5), tokenizer)
    # Ungrouped: grouping by length orders the samples by the lengths of the texts they show, which the option changes.
    chosen = items(off, grouped=False)
    source = off.sources[0]
    for (index, seed), off_sample, on_sample in zip(chosen, off.__getitems__(chosen), on.__getitems__(chosen)):
        key, caption = source.pairs[index]
        negative = choose_negative(
            np.random.default_rng([seed, 17]), key, len(source), lambda i: source[i][0], 0.5, 0.5
        )
        if negative is None:
            expected = (caption, key, 1)
        elif negative.swap_text:
            expected = (source[negative.partner][1], key, 0)
        else:
            expected = (caption, source[negative.partner][0], 0)
        assert (text_of(off_sample, tokenizer), off_sample["image_id"], off_sample["itm_labels"]) == expected
        # Turning the option on changes only what a negative shows, never which samples are negatives.
        assert on_sample["itm_labels"] == off_sample["itm_labels"]
        if off_sample["itm_labels"] == 1:
            assert on_sample["input_ids"] == off_sample["input_ids"]


def recipe(source_overrides):
    source = {"name": "s", "type": "synthetic", "num_images": 20, "regions": "annotations", **source_overrides}
    return recipe_from_dict({"stages": [{"name": "a", "sources": [source], "max_steps": 1}]})


def test_recipe_field_reaches_the_source():
    spec = recipe({"swap_negatives": 0.25}).stages[0].sources[0]
    source, _ = build_source(spec, FEATURE_SIZE)
    assert source.hard_negative_share == 0.25
    assert build_source(recipe({}).stages[0].sources[0], FEATURE_SIZE)[0].hard_negative_share == 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"swap_negatives": 1.5}, r"sources\[0\]\.swap_negatives must be in \[0, 1\], got 1.5"),
        (
            {"type": "manifest", "path": "x.jsonl", "region_cache": "r", "swap_negatives": 0.5},
            r"sources\[0\]\.swap_negatives is 0.5, but only a synthetic source",
        ),
    ],
)
def test_recipe_rejects_bad_swap_negatives(overrides, message):
    with pytest.raises(RecipeError, match=message):
        recipe(overrides)
