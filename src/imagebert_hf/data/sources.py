"""Image-text pair sources for pretraining, their weighted mixture, and the dataset that joins pairs to regions.

A source is a list of `(image_key, caption)` pairs: from a jsonl manifest + image folder (the layout of the bundled
real data), a `datasets` dataset with image and text columns, webdataset tar shards as img2dataset writes them, or
the generated synthetic set. Regions are looked up by `image_key` in a region store (the region cache, or any
mapping from key to region record), so pretraining never runs the extractor.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


logger = logging.getLogger(__name__)

_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
_REGION_KEYS = ("region_features", "region_locations", "region_class_labels", "region_class_probs")


class PairSource:
    """A named list of `(image_key, caption)` pairs, with a way to open each image for region extraction.

    Subclasses fill `pairs` and may override `open_image`.
    """

    name: str
    pairs: list[tuple[str, str]]

    def __init__(self, name: str, pairs: list[tuple[str, str]]):
        if not pairs:
            raise ValueError(f"source {name!r} holds no image-caption pairs.")
        self.name = name
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[str, str]:
        return self.pairs[index]

    def image_keys(self) -> list[str]:
        """Distinct image keys, in first-seen order."""
        return list(dict.fromkeys(key for key, _ in self.pairs))

    def open_image(self, key: str):
        """The image behind `key` as a PIL image (for region extraction)."""
        raise NotImplementedError(f"{type(self).__name__} cannot open images.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, pairs={len(self.pairs)}, images={len(self.image_keys())})"


class ManifestPairSource(PairSource):
    """Pairs from a jsonl manifest: one image per line with `"image"` (a path relative to the manifest's folder or
    `image_root`) and `"captions"` (a list, or `"caption"`, a string).

    Args:
        manifest (`str` or `Path`): The `captions.jsonl` file.
        image_root (`str` or `Path`, *optional*): Folder the `"image"` paths are relative to (the manifest's).
        splits (`Sequence[str]`, *optional*): Keep only lines whose `"split"` is one of these.
        key_field (`str`, defaults to `"image"`): The field used as the image key (the region cache's key).
        max_captions_per_image (`int`, *optional*): Use at most this many captions of each image.
        name (`str`, *optional*): Name used in logs (the manifest's folder name by default).
    """

    def __init__(
        self,
        manifest: str | Path,
        image_root: str | Path | None = None,
        splits: Sequence[str] | None = None,
        key_field: str = "image",
        max_captions_per_image: int | None = None,
        name: str | None = None,
    ):
        from .manifest import iter_manifest

        manifest = Path(manifest)
        if not manifest.is_file():
            raise FileNotFoundError(f"manifest {manifest} does not exist.")
        self._paths: dict[str, Path] = {}
        pairs = []
        for record in iter_manifest(manifest, image_root):
            if splits is not None and record.extra.get("split") not in splits:
                continue
            # The region cache keys items by the manifest's image path, the default key here too.
            key = record.image if key_field == "image" else str(record.extra[key_field])
            self._paths[key] = record.image_path
            pairs.extend((key, caption) for caption in record.captions[:max_captions_per_image])
        super().__init__(name or manifest.parent.name, pairs)

    def image_path(self, key: str) -> Path:
        return self._paths[key]

    def open_image(self, key: str):
        from PIL import Image

        with Image.open(self._paths[key]) as image:
            return image.convert("RGB")


class DatasetPairSource(PairSource):
    """Pairs from a `datasets.Dataset` (or a folder saved with `save_to_disk`) with a text column of strings or
    lists of strings.

    Args:
        dataset: A `datasets.Dataset`, or the path of one saved with `save_to_disk`.
        text_column (`str`, defaults to `"captions"`): Caption(s) of each row.
        image_column (`str`, defaults to `"image"`): The image (for extraction).
        id_column (`str`, *optional*): The image key; defaults to the row index as a string.
        name (`str`, defaults to `"dataset"`): Name used in logs.
    """

    def __init__(
        self,
        dataset,
        text_column: str = "captions",
        image_column: str = "image",
        id_column: str | None = None,
        name: str = "dataset",
    ):
        if isinstance(dataset, (str, Path)):
            import datasets

            dataset = datasets.load_from_disk(str(dataset))
        for column in (text_column, id_column):
            if column is not None and column not in dataset.column_names:
                raise ValueError(f"the dataset has no column {column!r}; its columns are {dataset.column_names}.")
        self.dataset = dataset
        self.image_column = image_column
        keys = dataset[id_column] if id_column else [str(i) for i in range(len(dataset))]
        self._rows = {str(key): row for row, key in enumerate(keys)}
        pairs = []
        for key, texts in zip(keys, dataset[text_column]):
            for text in [texts] if isinstance(texts, str) else texts:
                pairs.append((str(key), text))
        super().__init__(name, pairs)

    def open_image(self, key: str):
        return self.dataset[self._rows[key]][self.image_column].convert("RGB")


class WebDatasetPairSource(PairSource):
    """Pairs from webdataset tar shards as img2dataset writes them: per sample `KEY.jpg` (or another image
    extension), `KEY.txt` (the caption) and optionally `KEY.json` (with `"key"`, `"caption"`, ...).

    Captions are read once at construction; images are read on demand from the tar offsets.

    Args:
        urls (`str` or `Sequence[str]`): Shard paths; a string may use brace notation (`shards/{00000..00009}.tar`).
        name (`str`, defaults to `"webdataset"`): Name used in logs.
    """

    def __init__(self, urls: str | Sequence[str], name: str = "webdataset"):
        shards = _expand_urls(urls)
        self._images: dict[str, tuple[str, int, int]] = {}
        pairs = []
        for shard in shards:
            with tarfile.open(shard) as tar:
                texts: dict[str, str] = {}
                for member in tar:
                    if not member.isfile() or "." not in member.name:
                        continue
                    key, extension = member.name.split(".", 1)
                    if extension == "txt":
                        texts[key] = tar.extractfile(member).read().decode("utf-8").strip()
                    elif extension.lower() in _IMAGE_EXTENSIONS:
                        self._images[key] = (shard, member.offset_data, member.size)
                    elif extension == "json" and key not in texts:
                        meta = json.loads(tar.extractfile(member).read())
                        if meta.get("caption"):
                            texts.setdefault(key, meta["caption"])
            pairs.extend((key, text) for key, text in texts.items() if key in self._images and text)
        super().__init__(name, pairs)

    def image_bytes(self, key: str) -> bytes:
        shard, offset, size = self._images[key]
        with open(shard, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    def open_image(self, key: str):
        from PIL import Image

        return Image.open(io.BytesIO(self.image_bytes(key))).convert("RGB")

    def image_table(self):
        """A `datasets.Dataset` with `key` and `image` (`{"bytes", "path"}`) per distinct image, streamed from the
        shards: the input `extract_regions(table, cache_dir, key_column="key")` needs to build this source's
        region cache."""
        import datasets

        def rows():
            for key in self.image_keys():
                yield {"key": key, "image": {"bytes": self.image_bytes(key), "path": None}}

        features = datasets.Features({"key": datasets.Value("string"), "image": datasets.Image(decode=False)})
        return datasets.Dataset.from_generator(rows, features=features)


def _expand_urls(urls: str | Sequence[str]) -> list[str]:
    if isinstance(urls, str):
        import glob

        try:
            import braceexpand

            patterns = list(braceexpand.braceexpand(urls))
        except ImportError:
            patterns = [urls]
        expanded = []
        for pattern in patterns:
            expanded.extend(sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern])
    else:
        expanded = [str(url) for url in urls]
    missing = [url for url in expanded if not Path(url).is_file()]
    if not expanded or missing:
        raise FileNotFoundError(f"webdataset shards not found: {missing or urls}")
    return expanded


class SyntheticPairSource(PairSource):
    """Pairs from the generated shapes dataset, with an optional share of corrupted captions (a noisy "web" stage).

    Args:
        num_images (`int`): Images to generate.
        seed (`int`, defaults to 0): Generation seed.
        image_size (`int`, defaults to 96): Image side in pixels.
        captions_per_image (`int`, defaults to 2): Captions per image.
        caption_noise (`float`, defaults to 0.0): Share of captions replaced by a corrupted (mostly false) version.
        first_image (`int`, defaults to 0): Index of the first image, to carve disjoint splits from one seed.
        name (`str`, defaults to `"synthetic"`): Name used in logs.
    """

    def __init__(
        self,
        num_images: int,
        seed: int = 0,
        image_size: int = 96,
        captions_per_image: int = 2,
        caption_noise: float = 0.0,
        first_image: int = 0,
        name: str = "synthetic",
    ):
        from .synthetic import corrupt_captions, make_synthetic_examples

        examples = make_synthetic_examples(first_image + num_images, seed, image_size, captions_per_image)
        self.examples = {example["image_id"]: example for example in examples[first_image:]}
        pairs = [(key, caption) for key, example in self.examples.items() for caption in example["captions"]]
        texts = corrupt_captions([text for _, text in pairs], caption_noise, seed=seed + 1)
        super().__init__(name, [(key, text) for (key, _), text in zip(pairs, texts)])

    def open_image(self, key: str):
        return self.examples[key]["image"]

    def annotation_regions(self, feature_size: int) -> dict[str, dict]:
        """Region records made from the annotations (see `synthetic_region_record`), keyed like the pairs."""
        from .synthetic import synthetic_region_record

        return {key: synthetic_region_record(example, feature_size) for key, example in self.examples.items()}


def open_region_store(path: str | Path) -> Mapping[str, dict]:
    """Opens a region cache written by `extract_regions` as a mapping from image key to region record."""
    from .feature_cache import load_region_cache

    return load_region_cache(str(path))


class MixtureSampler(torch.utils.data.Sampler):
    """Yields `(flat_index, sample_seed)` for a weighted mixture of sources, reproducibly per epoch.

    Position `p` of epoch `e` draws its source with probability proportional to `weights`, then takes the next item
    of that source's own shuffled order (reshuffled when exhausted). `flat_index` indexes the concatenation of the
    sources; `sample_seed` depends only on `(seed, e, p)`, so every random choice made for the sample (negatives,
    masks) is the same on resume and however batches are split across processes.

    Args:
        sizes (`Sequence[int]`): Pairs per source.
        weights (`Sequence[float]`): Mixing weights (any positive scale).
        seed (`int`): Seed of the order.
        num_samples (`int`, *optional*): Samples per epoch; the total size of the sources by default.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int, num_samples: int | None = None):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"need one weight per source; got {len(sizes)} sources and {len(weights)} weights.")
        if any(w <= 0 for w in weights):
            raise ValueError(f"mixing weights must be positive, got {list(weights)}.")
        if any(s <= 0 for s in sizes):
            raise ValueError(f"every source needs at least one pair, got sizes {list(sizes)}.")
        self.sizes = [int(s) for s in sizes]
        self.probabilities = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.seed = int(seed)
        self.num_samples = int(num_samples) if num_samples is not None else int(sum(self.sizes))
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}.")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def indices(self, epoch: int) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, epoch])
        choices = rng.choice(len(self.sizes), size=self.num_samples, p=self.probabilities)
        orders = [rng.permutation(size) for size in self.sizes]
        cursors = [0] * len(self.sizes)
        seeds = rng.integers(0, 2**62, size=self.num_samples)
        result = []
        for position, source in enumerate(choices):
            if cursors[source] == self.sizes[source]:
                orders[source] = rng.permutation(self.sizes[source])
                cursors[source] = 0
            item = orders[source][cursors[source]]
            cursors[source] += 1
            result.append((int(self.offsets[source] + item), int(seeds[position])))
        return result

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.indices(self.epoch))


class PretrainingPairDataset(torch.utils.data.Dataset):
    """Joins pairs to their regions and tokenizes the caption; picks ITM negatives from the whole source.

    Indexed by what `MixtureSampler` yields, `(flat_index, sample_seed)` (a plain int index also works, with the
    index as seed). With probability `itm_negative_probability` the sample becomes a negative: its caption (share
    `text_negative_share`) or its regions are replaced by those of a random pair of the same source showing another
    image. A record whose regions cannot be loaded gives `None` (the collator drops and counts it) and a warning.

    Args:
        sources (`Sequence[PairSource]`): The sources, in mixture order.
        region_stores (`Sequence[Mapping]`): One mapping from image key to region record per source.
        tokenizer: BERT tokenizer.
        max_text_length (`int`): Tokens per caption, [CLS] and [SEP] included.
        max_regions (`int`): Regions kept per image.
        itm_negative_probability (`float`, defaults to 0.5): Share of negatives.
        text_negative_share (`float`, defaults to 0.5): Share of negatives that swap the caption.
        max_warnings (`int`, defaults to 10): Load failures logged individually before going quiet.
        max_cached_regions (`int`, defaults to 8192): Region records kept in memory (least recently used
            dropped); a cache lookup decodes an Arrow row, which costs more than a training step of a tiny model.
    """

    def __init__(
        self,
        sources: Sequence[PairSource],
        region_stores: Sequence[Mapping[str, dict]],
        tokenizer,
        max_text_length: int,
        max_regions: int,
        itm_negative_probability: float = 0.5,
        text_negative_share: float = 0.5,
        max_warnings: int = 10,
        max_cached_regions: int = 8192,
    ):
        if len(sources) != len(region_stores):
            raise ValueError(f"need one region store per source; got {len(sources)} and {len(region_stores)}.")
        self.sources = list(sources)
        self.region_stores = list(region_stores)
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.max_regions = max_regions
        self.itm_negative_probability = itm_negative_probability
        self.text_negative_share = text_negative_share
        self.max_warnings = max_warnings
        self.offsets = np.cumsum([0] + [len(source) for source in self.sources])
        self._warnings = 0
        self.max_cached_regions = max_cached_regions
        self._cached: OrderedDict[tuple[int, str], dict[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def sizes(self) -> list[int]:
        return [len(source) for source in self.sources]

    def _locate(self, index: int) -> tuple[int, int]:
        source = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return source, index - int(self.offsets[source])

    def _cached_regions(self, source_index: int, key: str) -> dict[str, Any]:
        cache_key = (source_index, key)
        if cache_key in self._cached:
            self._cached.move_to_end(cache_key)
            return self._cached[cache_key]
        regions = self._regions(self.region_stores[source_index], key)
        if self.max_cached_regions > 0:
            self._cached[cache_key] = regions
            if len(self._cached) > self.max_cached_regions:
                self._cached.popitem(last=False)
        return regions

    def _regions(self, store: Mapping[str, dict], key: str) -> dict[str, Any]:
        record = store[key]
        if record is None:
            raise KeyError(key)
        if record.get("error"):
            raise ValueError(f"region extraction failed: {record['error']}")
        regions = {}
        for name in _REGION_KEYS:
            if record.get(name) is not None:
                regions[name] = np.asarray(record[name])[: self.max_regions]
        if "region_features" not in regions or "region_locations" not in regions:
            raise ValueError(f"region record of {key!r} lacks region_features or region_locations.")
        if len(regions["region_features"]) == 0:
            raise ValueError(f"region record of {key!r} has no regions.")
        return regions

    def _warn(self, message: str) -> None:
        self._warnings += 1
        if self._warnings <= self.max_warnings:
            logger.warning(
                message + (" (further failures are counted silently)" if self._warnings == self.max_warnings else "")
            )

    def _other_pair(self, source: PairSource, key: str, rng: np.random.Generator) -> tuple[str, str] | None:
        # A few tries are enough: a source where most pairs share one image cannot give negatives anyway.
        for _ in range(8):
            other_key, other_text = source[int(rng.integers(len(source)))]
            if other_key != key:
                return other_key, other_text
        return None

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any] | None:
        index, sample_seed = item if isinstance(item, tuple) else (int(item), int(item))
        source_index, local = self._locate(index)
        source = self.sources[source_index]
        key, text = source[local]
        rng = np.random.default_rng([sample_seed, 17])
        itm_label, region_key = 1, key
        if rng.random() < self.itm_negative_probability:
            other = self._other_pair(source, key, rng)
            if other is not None:
                itm_label = 0
                if rng.random() < self.text_negative_share:
                    text = other[1]
                else:
                    region_key = other[0]
        try:
            regions = self._cached_regions(source_index, region_key)
        except Exception as error:  # noqa: BLE001 - any unreadable record is skipped and counted, never fatal here
            self._warn(f"skipping pair {local} of source {source.name!r} (image {region_key!r}): {error!r}")
            return None
        encoding = self.tokenizer(text, truncation=True, max_length=self.max_text_length)
        return {
            "input_ids": encoding["input_ids"],
            "token_type_ids": encoding.get("token_type_ids"),
            **regions,
            "image_id": region_key,
            "itm_labels": itm_label,
            "sample_seed": int(sample_seed),
        }


def stable_seed(*parts: Any) -> int:
    """A seed from strings and ints that is the same in every process (unlike `hash`)."""
    return zlib.crc32("\x1f".join(str(part) for part in parts).encode()) & 0x7FFFFFFF


def build_region_store(
    source: PairSource, extract: Callable[[list], list[dict]], batch_size: int = 8
) -> dict[str, dict]:
    """Runs `extract` (a list of PIL images -> list of region records) over a source's images, in memory.

    For small sources (the demo, tests); large ones go through the region cache.
    """
    store = {}
    keys = source.image_keys()
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        for key, record in zip(chunk, extract([source.open_image(key) for key in chunk])):
            store[key] = record
    return store


__all__ = [
    "DatasetPairSource",
    "ManifestPairSource",
    "MixtureSampler",
    "PairSource",
    "PretrainingPairDataset",
    "SyntheticPairSource",
    "WebDatasetPairSource",
    "build_region_store",
    "open_region_store",
    "stable_seed",
]
