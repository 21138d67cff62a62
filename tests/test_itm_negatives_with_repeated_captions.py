"""Pretraining ITM negatives never pair a caption with an image that carries the same caption: short and web captions
repeat across images, and such a "negative" is a true pair labelled false. Checked on the shared rule and on each
data path that uses it (the map-style dataset, the streaming dataset and the collator's in-batch negatives)."""

import itertools

import numpy as np
import pytest
import torch

from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining
from imagebert_hf.data.negatives import caption_key, choose_negative
from imagebert_hf.data.pair_sources import (
    PairSource,
    PretrainingPairDataset,
    StreamingPairSource,
    StreamingPretrainingDataset,
)


# Words of the synthetic tokenizer, so that distinct captions have distinct token ids.
REPEATED = "a red circle left of a blue square"
COLOURS = ["green", "yellow", "orange", "purple", "white", "black"]
# Images 0..5 each have a caption of their own; images 0, 2 and 4 also carry the repeated one (spelt differently).
PAIRS = [(f"img{i}", f"a {colour} triangle above a gray cross") for i, colour in enumerate(COLOURS)] + [
    ("img0", REPEATED),
    ("img2", "A red circle  left of a blue square"),
    ("img4", "a red circle left of a blue SQUARE "),
]
SHARED = {"img0", "img2", "img4"}


def _regions(count=6):
    rng = np.random.default_rng(0)
    return {
        key: {
            "region_features": rng.standard_normal((2, 4)).astype(np.float32),
            "region_locations": np.full((2, 5), 0.5, dtype=np.float32),
        }
        for key in (f"img{i}" for i in range(count))
    }


def _is_true_pair(text: str, image: str) -> bool:
    return any(key == image and caption_key(caption) == caption_key(text) for key, caption in PAIRS)


def test_the_rule_skips_candidates_whose_caption_fits():
    keys = [f"img{i}" for i in range(20)]
    same = set(range(0, 20, 2))
    partners = [
        choose_negative(
            np.random.default_rng(seed), "own", 20, keys.__getitem__, 1.0, 0.5, caption_fits=same.__contains__
        )
        for seed in range(500)
    ]
    found = [negative.partner for negative in partners if negative is not None]
    assert len(found) > 490 and not same.intersection(found)
    # Only such candidates left: the sample stays a positive rather than become a false negative.
    never = [
        choose_negative(
            np.random.default_rng(seed), "own", 20, keys.__getitem__, 1.0, 0.5, caption_fits=lambda other: True
        )
        for seed in range(50)
    ]
    assert never == [None] * 50


def test_caption_key_ignores_case_and_spacing():
    assert caption_key(" A red  circle\tleft of a blue SQUARE ") == caption_key(REPEATED)
    assert caption_key("a red circle left of a blue square.") != caption_key(REPEATED)


def test_map_style_negatives_are_never_true_pairs(tokenizer):
    source = PairSource("repeated", PAIRS)
    dataset = PretrainingPairDataset([source], [_regions()], tokenizer, 16, 2, itm_negative_probability=1.0)
    negatives = 0
    for seed in range(3000):
        _, pair, text, region_key, label = dataset._plan(seed % len(dataset), seed)
        if label == 0:
            negatives += 1
            assert not _is_true_pair(source[text][1], region_key), (pair, text, region_key)
    # The repeated caption's pairs still get negatives, from the images that lack it.
    assert negatives > 2900


def test_map_style_draws_of_other_samples_are_unchanged(tokenizer):
    # A sample whose draws meet no repeated caption makes the draws it made before the rule existed.
    source = PairSource("distinct", PAIRS[:6])
    dataset = PretrainingPairDataset([source], [_regions()], tokenizer, 16, 2, itm_negative_probability=1.0)
    for seed in range(200):
        index = seed % len(dataset)
        rng = np.random.default_rng([seed, 17])
        expected = choose_negative(rng, f"img{index}", 6, lambda other: f"img{other}", 1.0, 0.5)
        _, _, text, region_key, _ = dataset._plan(index, seed)
        partner = text if expected.swap_text else int(region_key[3:])
        assert partner == expected.partner


def test_streamed_negatives_are_never_true_pairs(tokenizer):
    # A stream knows only its recent pairs: here each image has one caption, so a true pair can only come from a
    # caption repeated on another image, which the window always shows.
    pairs = [pair for pair in PAIRS[:6] if pair[0] not in SHARED] + PAIRS[6:]

    class Listed(StreamingPairSource):
        name = "listed"

        def epoch_pairs(self, epoch):
            rng = np.random.default_rng(epoch)
            yield from (pairs[i] for i in rng.permutation(len(pairs)))

    dataset = StreamingPretrainingDataset(
        [Listed()], [_regions()], [1.0], tokenizer, 16, 2, itm_negative_probability=1.0, negative_buffer=4, seed=3
    )
    repeated = 0
    for sample in itertools.islice(dataset, 1500):
        text = tokenizer.decode(sample["input_ids"], skip_special_tokens=True)
        if int(sample["itm_labels"]) == 0:
            assert not _is_true_pair(text, sample["image_id"]), (text, sample["image_id"])
            repeated += caption_key(text) == caption_key(REPEATED)
    assert repeated > 50  # the repeated caption was drawn as a negative, on images that lack it


def test_in_batch_negatives_are_never_true_pairs(tokenizer):
    rng = np.random.default_rng(0)
    features = []
    for key, caption in PAIRS:
        features.append(
            {
                "input_ids": tokenizer(caption)["input_ids"],
                "region_features": rng.standard_normal((2, 4)).astype(np.float32),
                "region_locations": np.full((2, 5), 0.5, dtype=np.float32),
                "image_id": key,
            }
        )
    texts_of = {}
    for feature in features:
        texts_of.setdefault(tuple(feature["input_ids"]), set()).add(feature["image_id"])
    negatives = 0
    for seed in range(200):
        collator = DataCollatorForImageBERTPretraining(
            tokenizer, itm_negative_probability=1.0, mlm_probability=0.0, region_mask_probability=0.0, seed=seed
        )
        batch = collator(features)
        for i in torch.nonzero(batch["itm_labels"] == 0).flatten().tolist():
            ids = batch["input_ids"][i][batch["attention_mask"][i, : batch["input_ids"].shape[1]].bool()].tolist()
            regions = batch["region_features"][i, :2]
            shown = [
                feature["image_id"]
                for feature in features
                if torch.equal(torch.from_numpy(feature["region_features"]), regions)
            ]
            assert shown and shown[0] not in texts_of[tuple(ids)], (ids, shown)
            negatives += 1
    assert negatives > 1500


@pytest.mark.parametrize("buffer", [0, -1, 2.5, True])
def test_a_stream_without_a_buffer_of_recent_pairs_is_refused(tokenizer, buffer):
    # 0 crashed on the first sample (an empty deque indexed when evicting).
    with pytest.raises(ValueError, match=rf"negative_buffer must be a positive number of recent pairs .*{buffer!r}"):
        StreamingPretrainingDataset([None], [{}], [1.0], tokenizer, 16, 2, negative_buffer=buffer)


@pytest.mark.parametrize("image_id", ["given", "absent", "a list"])
def test_in_batch_negatives_are_drawn_whatever_the_samples_say_of_their_picture(tokenizer, image_id):
    # Without `image_id` (it is optional) every sample was once passed over as a partner: no negative at all.
    rng = np.random.default_rng(1)
    features = []
    for i, (_, caption) in enumerate(PAIRS[:6]):
        feature = {
            "input_ids": tokenizer(caption)["input_ids"],
            "region_features": rng.standard_normal((2, 4)).astype(np.float32),
            "region_locations": np.full((2, 5), 0.5, dtype=np.float32),
        }
        if image_id != "absent":
            feature["image_id"] = f"img{i}" if image_id == "given" else [f"img{i}"]
        features.append(feature)
    negatives = sum(
        int(
            (
                DataCollatorForImageBERTPretraining(tokenizer, itm_negative_probability=0.5, seed=seed)(features)[
                    "itm_labels"
                ]
                == 0
            ).sum()
        )
        for seed in range(40)
    )
    assert 0.4 < negatives / (40 * len(features)) < 0.6
