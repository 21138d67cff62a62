"""`choose_negative`, the one rule for ITM negatives shared by the datasets and the collator."""

import numpy as np
import pytest

from imagebert_hf.data.negatives import Negative, choose_negative


def _choices(keys, own, probability=0.5, text_share=0.5, exclude=None, draws=2000):
    return [
        choose_negative(
            np.random.default_rng([seed, 17]), own, len(keys), keys.__getitem__, probability, text_share, exclude
        )
        for seed in range(draws)
    ]


def test_rates_and_partners_show_another_image():
    keys = [f"img{i % 10}" for i in range(50)]
    choices = _choices(keys, "img3", probability=0.3, text_share=0.25)
    negatives = [choice for choice in choices if choice is not None]
    assert 0.26 < len(negatives) / len(choices) < 0.34
    assert all(isinstance(choice, Negative) and keys[choice.partner] != "img3" for choice in negatives)
    assert 0.2 < np.mean([choice.swap_text for choice in negatives]) < 0.3
    assert len({choice.partner for choice in negatives}) > 30  # partners spread over the candidates


def test_never_the_same_image_nor_itself():
    assert all(choice is None for choice in _choices(["same"] * 5, "same", probability=1.0, draws=200))
    assert all(choice is None for choice in _choices([], "img", probability=1.0, draws=50))
    # Unknown keys (None) never match, but the sample's own position is never its partner.
    choices = _choices([None, None, None], None, probability=1.0, exclude=1, draws=300)
    found = [choice for choice in choices if choice is not None]
    assert len(found) > 290 and {choice.partner for choice in found} == {0, 2}


def test_probability_zero_and_replay():
    assert all(choice is None for choice in _choices(["a", "b"], "a", probability=0.0, draws=100))
    keys = [f"img{i}" for i in range(20)]
    assert _choices(keys, "img0", draws=200) == _choices(keys, "img0", draws=200)


@pytest.mark.parametrize("tries", [1, 8])
def test_gives_up_after_its_tries(tries):
    # One candidate in 20 shows another image: more tries find it more often, none ever picks a same-image one.
    keys = ["same"] * 19 + ["other"]
    choices = _choices(keys, "same", probability=1.0, draws=1000)
    if tries == 1:
        choices = [
            choose_negative(np.random.default_rng(seed), "same", 20, keys.__getitem__, 1.0, 0.5, tries=1)
            for seed in range(1000)
        ]
    found = [choice for choice in choices if choice is not None]
    assert all(choice.partner == 19 for choice in found)
    expected = 1 - (19 / 20) ** tries
    assert abs(len(found) / len(choices) - expected) < 0.05
