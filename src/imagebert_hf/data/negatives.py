"""ITM negatives: which samples become negatives and what they swap, decided in one function for every data path
(the map-style dataset over a whole source, the streaming dataset over recent pairs, the collator within a batch)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

import numpy as np


class Negative(NamedTuple):
    """A sample made an ITM negative: `partner` is the candidate whose text (`swap_text`) or regions replace the
    sample's own."""

    partner: int
    swap_text: bool


def choose_negative(
    rng: np.random.Generator,
    image_key: Hashable | None,
    num_candidates: int,
    candidate_key: Callable[[int], Hashable | None],
    probability: float,
    text_share: float,
    exclude: int | None = None,
    tries: int = 8,
    caption_fits: Callable[[int], bool] | None = None,
) -> Negative | None:
    """Whether a sample becomes an ITM negative, and with which candidate and which side swapped.

    With probability `probability`, up to `tries` candidates are drawn uniformly from `range(num_candidates)`; the
    first that shows another image (its key differs from `image_key`, or either key is unknown, `None`), is not
    `exclude` (the sample's own position among the candidates) and whose pairing with the sample is not a true one
    (`caption_fits`) is the partner. Its text replaces the sample's with
    probability `text_share`, its regions otherwise. A few tries are enough: candidates where most show the same
    image cannot give negatives anyway, and the draw needs no list of all valid candidates (a source may hold
    millions). Every draw comes from `rng`, so a sample's choice is replayed from its seed.

    Args:
        rng (`np.random.Generator`): The sample's own generator.
        image_key: The key of the sample's image (`None`: unknown, any other candidate qualifies).
        num_candidates (`int`): Candidates to draw from (a source's pairs, recent pairs, a batch's samples).
        candidate_key (`Callable[[int], Hashable | None]`): The image key of candidate `i`.
        probability (`float`): Chance of the sample becoming a negative.
        text_share (`float`): Chance that a negative swaps its text rather than its regions.
        exclude (`int`, *optional*): The sample's own position among the candidates.
        tries (`int`, defaults to 8): Candidates drawn before giving up (the sample then stays a positive).
        caption_fits (`Callable[[int], bool]`, *optional*): Whether candidate `i`'s caption describes the sample's
            picture, or the sample's caption the candidate's picture (`CaptionPictures.fit`). Short and web captions
            repeat across images ("a dog runs through the grass"): such a swap makes a true pair, and labelled a
            negative it would teach the model a falsehood.

    Returns:
        `Negative(partner, swap_text)`, or `None` when the sample stays a matched pair.
    """
    if rng.random() >= probability:
        return None
    for _ in range(tries if num_candidates > 0 else 0):
        candidate = int(rng.integers(num_candidates))
        if candidate == exclude:
            continue
        key = candidate_key(candidate)
        if (image_key is None or key is None or key != image_key) and not (caption_fits and caption_fits(candidate)):
            return Negative(candidate, bool(rng.random() < text_share))
    return None


def caption_key(text: str) -> int:
    """A caption as a 63-bit key, case and spacing ignored (as an uncased tokenizer reads it); the same in every
    process, unlike `hash`, so that keys computed before DataLoader workers start agree with theirs."""
    normal = " ".join(text.casefold().split()).encode()
    return int.from_bytes(hashlib.blake2b(normal, digest_size=8).digest(), "little") >> 1


class CaptionPictures:
    """Which pictures the captions of a set of pairs describe, for `choose_negative`'s `caption_fits`.

    Built from every pair of a source (`from_pairs`), it keeps only the captions found on more than one picture, so
    that millions of distinct captions cost one array of keys; filled pair by pair (`add` / `discard`), it follows a
    window of pairs, such as a stream's recent ones or a batch. Captions are any hashable keys: `caption_key` of a
    text, or the token ids the model reads. A pair whose picture is unknown (None, or not hashable) is not indexed:
    it describes no picture that another pair could be.
    """

    def __init__(self):
        self._counts: dict[tuple[Hashable, Hashable], int] = {}

    @classmethod
    def from_pairs(cls, captions: Sequence[Hashable], pictures: Sequence[Hashable]) -> CaptionPictures:
        index = cls()
        keys = np.asarray(captions)
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        ends = np.r_[starts[1:], len(ordered)]
        for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            seen = {pictures[int(pair)] for pair in order[start:end]}
            if len(seen) > 1:
                index._counts.update(((ordered[start].item(), picture), 1) for picture in seen)
        return index

    def add(self, caption: Hashable, picture: Hashable) -> None:
        if picture is None or not isinstance(picture, Hashable):
            return
        self._counts[caption, picture] = self._counts.get((caption, picture), 0) + 1

    def discard(self, caption: Hashable, picture: Hashable) -> None:
        if picture is None or not isinstance(picture, Hashable):
            return
        count = self._counts.get((caption, picture), 0)
        if count > 1:
            self._counts[caption, picture] = count - 1
        else:
            self._counts.pop((caption, picture), None)

    def fit(self, caption: Hashable, picture: Hashable, other_caption: Hashable, other_picture: Hashable) -> bool:
        """Whether either caption describes the other pair's picture: swapping them would make a true pair. A
        caption describes its own pair's picture, and those of the pairs known to carry it; an unknown picture is
        described only by its own pair's caption."""
        return caption == other_caption or self._known(caption, other_picture) or self._known(other_caption, picture)

    def _known(self, caption: Hashable, picture: Hashable) -> bool:
        return picture is not None and isinstance(picture, Hashable) and (caption, picture) in self._counts


def choose_hard_caption(rng: np.random.Generator, share: float, captions: Callable[[], Sequence[str]]) -> str | None:
    """Whether a sample already made a negative (by `choose_negative`) becomes a hard one instead: its own image
    with a caption that is false of it but holds the same words, e.g. the two objects of its relation swapped.

    With probability `share` one of `captions()` is drawn uniformly. With `share` 0 nothing is drawn from `rng`
    (and `captions` is not called), so a run without hard negatives makes exactly the draws it made before.

    Args:
        rng (`np.random.Generator`): The sample's own generator, after `choose_negative` drew from it.
        share (`float`): Chance that the negative becomes a hard one.
        captions (`Callable[[], Sequence[str]]`): The hard negative captions of the sample's image (may be empty).

    Returns:
        The caption that replaces the sample's own, or `None` when the negative stays as `choose_negative` made it.
    """
    if share <= 0.0 or rng.random() >= share:
        return None
    options = captions()
    if not options:
        return None
    return options[int(rng.integers(len(options)))]


__all__ = ["CaptionPictures", "Negative", "caption_key", "choose_hard_caption", "choose_negative"]
