"""Image-text pair sources for pretraining, their weighted mixture, and the dataset that joins pairs to regions.

A source is a list of `(image_key, caption)` pairs: from a jsonl manifest + image folder (the layout of the bundled
real data), a `datasets` dataset with image and text columns, webdataset tar shards as img2dataset writes them, or
the generated synthetic set. Regions are looked up by `image_key` in a region store (the region cache, or any
mapping from key to region record), so pretraining never runs the extractor.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from ..formats.manifest import ManifestError, ManifestRecord, check_id_text, iter_manifest
from ..models.imagebert.processing_imagebert import tokenize_as_text
from ..models.imagebert.region_batching import check_region_record
from ..models.imagebert.roi_image_loading import open_image_file
from ..regions.cache_reader import RegionCache, RegionCacheError, load_region_cache
from ..regions.cache_writer import dataset_row_key
from .negatives import CaptionPictures, caption_key, choose_hard_caption, choose_negative
from .retrieval_corpus import SameImageGroups, caption_text
from .synthetic import (
    SWAP_CAPTION_KINDS,
    corrupt_captions,
    make_synthetic_examples,
    swap_caption_words,
    synthetic_region_record,
)


logger = logging.get_logger(__name__)

# Every format the image loader (PIL) decodes that img2dataset or a web crawl writes; a GIF gives its first frame.
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_REGION_KEYS = ("region_features", "region_locations", "region_class_labels", "region_class_probs")


class PairSource:
    """A named list of `(image_key, caption)` pairs, with a way to open each image for region extraction.

    Subclasses fill `pairs` and may override `open_image`. A source that knows captions false of an image but made
    of the same words (relation swaps) gives them by `hard_negative_captions` and sets `hard_negative_share`, the
    share of its ITM negatives that `PretrainingPairDataset` turns into such hard ones (none by default).
    """

    name: str
    pairs: list[tuple[str, str]]
    hard_negative_share: float = 0.0

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

    def hard_negative_captions(self, index: int) -> list[str]:
        """Captions false of the image of pair `index` that share its words (none here; see `SyntheticPairSource`)."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, pairs={len(self.pairs)}, images={len(self.image_keys())})"


class ManifestPairSource(PairSource):
    """Pairs from a jsonl manifest: one image per line with `"image"` (a path relative to the manifest's folder or
    `image_root`) and `"captions"` (a list, or `"caption"`, a string).

    Lines of one image are pooled, by the rule evaluation merges them with (`merge_duplicate_images`): lines that
    share the key, the id (`ManifestRecord.image_id`: `image_id`, else `coco_id`, else the path as written) or the
    image file (normalised: `./images/a.jpg` is `images/a.jpg`) are one image, under the first line's key. A later
    line adds only the captions the image does not hold yet, and the cut to `max_captions_per_image` applies to the
    pooled captions; a warning counts the lines pooled and the captions dropped. An image listed twice would
    otherwise be trained on twice as often, past `max_captions_per_image`. A caption a line lists twice (spacing
    aside) is kept once, for the same reason.

    A key read from another field (`key_field`) must be a non-empty string or an integer, on every line kept; a
    line without it, and an integer id that reads as another line's string id (`1` and `"1"`: one key once written
    as text), raise `ManifestError` naming `file:line`.

    Args:
        manifest (`str` or `Path`): The `captions.jsonl` file.
        image_root (`str` or `Path`, *optional*): Folder the `"image"` paths are relative to (the manifest's).
        splits (`Sequence[str]`, *optional*): Keep only lines whose `"split"` is one of these.
        key_field (`str`, defaults to `"image"`): The field used as the image key (the region cache's key).
        max_captions_per_image (`int`, *optional*): Use at most this many captions of each image.
        name (`str`, *optional*): Name used in logs (the manifest's folder name by default).
        allow_outside_root (`bool`, defaults to `False`): Follow image paths that leave `image_root`.
    """

    def __init__(
        self,
        manifest: str | Path,
        image_root: str | Path | None = None,
        splits: Sequence[str] | None = None,
        key_field: str = "image",
        max_captions_per_image: int | None = None,
        name: str | None = None,
        allow_outside_root: bool = False,
    ):
        manifest = Path(manifest)
        if not manifest.is_file():
            raise FileNotFoundError(f"manifest {manifest} does not exist.")
        if splits is not None and (isinstance(splits, str) or not all(isinstance(split, str) for split in splits)):
            # A string would be searched for substrings: "validation" would keep the lines of split "val".
            raise TypeError(f"splits must be a list of split names, got {splits!r}.")
        if max_captions_per_image is not None and (
            isinstance(max_captions_per_image, bool)
            or not isinstance(max_captions_per_image, int)
            or max_captions_per_image < 1
        ):
            raise ValueError(
                f"max_captions_per_image must be a positive integer or None, got {max_captions_per_image!r}."
            )
        # Lines are pooled while they are read: a web-scale manifest keeps, per image, only its key, path and
        # captions, never its lines.
        grouping = SameImageGroups()
        group_keys: list[str] = []
        group_captions: list[Sequence[str]] = []
        held_of: dict[int, set[str]] = {}  # caption texts of the images pooled so far
        self._paths: dict[str, Path] = {}
        pooled, dropped, repeated, first = 0, 0, 0, None
        # Id as text -> (value, field, where) of its first line: the keys, and the ids evaluation merges lines by.
        keys_as_text: dict[str, tuple[Any, str, str]] = {}
        ids_as_text: dict[str, tuple[Any, str, str]] = {}
        for record in iter_manifest(manifest, image_root, allow_outside_root):
            if splits is not None and record.extra.get("split") not in splits:
                continue
            # The region cache keys items by the manifest's image path, the default key here too.
            key = record.image if key_field == "image" else _manifest_key(record, key_field, keys_as_text)
            if record.id_field is not None:
                check_id_text(record.extra[record.id_field], record.id_field, record.where, ids_as_text)
            image_file = os.fspath(record.image_path)
            normal_file = os.path.normpath(image_file)
            # An already normal path shares its text with the path kept in `_paths`.
            normal_file = image_file if normal_file == image_file else normal_file
            group = grouping.add([("key", key), ("id", record.image_id), ("file", normal_file)])
            if group == len(group_keys):
                group_keys.append(key)
                self._paths[key] = record.image_path
                distinct = _distinct_captions(record.captions)
                repeated += len(record.captions) - len(distinct)
                group_captions.append(distinct)
                continue
            if group not in held_of:
                group_captions[group] = list(group_captions[group])
                held_of[group] = {caption_text(caption) for caption in group_captions[group]}
            held = held_of[group]
            new = [caption for caption in record.captions if caption_text(caption) not in held]
            pooled, dropped = pooled + 1, dropped + len(record.captions) - len(new)
            first = first or (record.where, record.image, group_keys[group])
            group_captions[group].extend(new)
            held.update(caption_text(caption) for caption in new)
        # The name tables go before the pairs are built, so the peak holds one or the other, not both.
        del grouping, held_of, keys_as_text, ids_as_text
        if repeated:
            logger.warning(
                "manifest %s: %d caption(s) repeated within their own line were kept once.", manifest, repeated
            )
        if pooled:
            logger.warning(
                "manifest %s: %d line(s) repeat an image of an earlier line (first: %s, image %r, pooled with %r); "
                "their captions were pooled with that image's, %d repeated caption(s) dropped, so each image is "
                "trained on as often as the others.",
                manifest,
                pooled,
                *first,
                dropped,
            )
        pairs = [
            (key, caption)
            for key, captions in zip(group_keys, group_captions)
            for caption in captions[:max_captions_per_image]
        ]
        super().__init__(name or manifest.parent.name, pairs)

    def image_path(self, key: str) -> Path:
        return self._paths[key]

    def open_image(self, key: str):
        with open_image_file(self._paths[key]) as image:
            return image.convert("RGB")


def _distinct_captions(captions: Sequence[str]) -> Sequence[str]:
    """`captions` without the later repeats of a caption (spacing aside), in their order."""
    seen: set[str] = set()
    distinct = []
    for caption in captions:
        text = caption_text(caption)
        if text not in seen:
            seen.add(text)
            distinct.append(caption)
    return captions if len(distinct) == len(captions) else distinct


def _manifest_key(record: ManifestRecord, key_field: str, ids_as_text: dict[str, tuple[Any, str, str]]) -> str:
    """The image key of a manifest line read from `key_field`; `ManifestError` naming `file:line` for a line without
    it or whose value is not a non-empty string or an integer."""
    if record.extra.get(key_field) is None:
        raise ManifestError(f"{record.where}: no {key_field!r} (the source's key_field, the image key)")
    value = record.extra[key_field]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise ManifestError(
            f"{record.where}: {key_field!r} (the source's key_field) must be a non-empty string or an integer, got "
            f"{value!r:.60}"
        )
    check_id_text(value, key_field, record.where, ids_as_text)
    return str(value)


def _row_captions(key: Any, texts: Any, where: str, text_column: str, id_column: str | None) -> tuple[str, list[str]]:
    """The image key and the captions of one row of a `datasets` source, listed or streamed: `texts` is a string or
    a list of strings; null and blank captions are dropped (web data has them), anything else raises a `ValueError`
    naming `where` (source and row), the key and the column. With `id_column`, `key` must be a non-empty string or
    an integer (the region cache's key)."""
    if id_column is not None and (
        isinstance(key, bool) or not isinstance(key, (str, int)) or (isinstance(key, str) and not key.strip())
    ):
        raise ValueError(
            f"{where}: {id_column!r} must be a non-empty string or an integer (the image key), got {key!r:.60}."
        )
    key = str(key)
    if texts is not None and not isinstance(texts, (str, list, tuple)):
        raise ValueError(
            f"{where} (key {key!r}): {text_column!r} must be a string or a list of strings, got {type(texts).__name__}."
        )
    captions = []
    for number, text in enumerate([texts] if isinstance(texts, str) else texts or ()):
        if text is not None and not isinstance(text, str):
            raise ValueError(
                f"{where} (key {key!r}): {text_column}[{number}] must be a string, got {type(text).__name__} "
                f"{text!r:.60}."
            )
        if text and text.strip():
            captions.append(text)
    return key, captions


def _default_row_keys(dataset, image_column: str) -> list[str]:
    """Each row's key by `dataset_row_key` (the region cache's rule without `key_column`), reading only the image
    paths: the image bytes stay in the Arrow files."""
    import pyarrow as pa

    if image_column not in dataset.column_names:
        return [dataset_row_key(None, row) for row in range(len(dataset))]
    # The stored column, chunk by chunk: iterating the dataset or combining chunks would copy every image's bytes
    # along with its path, in every process at every stage start.
    cells = dataset.data.column(image_column)
    is_path_struct = pa.types.is_struct(cells.type) and cells.type.get_field_index("path") >= 0
    if is_path_struct:
        path_type = cells.type[cells.type.get_field_index("path")].type
        cells = pa.chunked_array([chunk.field("path") for chunk in cells.chunks], type=path_type)
    elif _is_binary(cells.type):
        return [dataset_row_key(None, row) for row in range(len(dataset))]
    # A dataset selected, shuffled or filtered (without flatten_indices) maps its rows to the stored ones.
    indices = dataset._indices
    if indices is not None:
        cells = cells.take(indices.column(0))
    keys: list[str] = []
    for chunk in cells.chunks:
        for start in range(0, len(chunk), 10_000):
            values = chunk.slice(start, 10_000).to_pylist()
            if is_path_struct:
                values = [{"path": path} for path in values]
            keys.extend(dataset_row_key(cell, row) for row, cell in enumerate(values, start=len(keys)))
    return keys


def _column_values(dataset, column: str) -> list:
    """A column's values, as `dataset[column]` gives them: read as one Arrow column when it holds plain values or
    lists of them (row by row, `datasets` formats every value, ten times slower on millions of rows), else decoded
    by `datasets` (a `Json` column, a string on one row and a list on another, stores encoded text)."""
    import datasets

    feature = dataset.features.get(column)
    inner = getattr(feature, "feature", None) if isinstance(feature, (datasets.List, datasets.LargeList)) else feature
    if isinstance(inner, datasets.Value):
        return dataset.with_format("arrow")[column].to_pylist()
    return list(dataset[column])


def _is_binary(data_type) -> bool:
    """Whether an Arrow column holds raw bytes, without a path: its rows are keyed `row-<index>`."""
    import pyarrow as pa

    checks = ("is_binary", "is_large_binary", "is_fixed_size_binary", "is_binary_view")  # binary_view: pyarrow>=16
    return any(getattr(pa.types, check, lambda _: False)(data_type) for check in checks)


class DatasetPairSource(PairSource):
    """Pairs from a `datasets.Dataset` (or a folder saved with `save_to_disk`) with a text column of strings or
    lists of strings: one row per image, or one row per caption with the image's id in `id_column`.

    Without `id_column` a row's key is the one `extract_regions` gives it without `key_column`: its image's path,
    else `row-<index>` (`dataset_row_key`), so the source finds the regions extracted from the same dataset.
    `check_region_store` tells, before training, when its keys are not those of a region store.

    Captions are checked as `DatasetStream` checks them: null and blank ones are dropped (a row left with none is
    skipped, with a warning counting them), any other value that is not a string raises a `ValueError` naming the
    source, row and column, as does an id that is missing or blank. Rows that share an id are one image: their
    captions are pooled (a dataset of one row per caption). `open_image` compares the image cells of such rows and
    raises a `ValueError` naming the rows when they differ, rather than pairing one row's captions with another
    row's image.

    Args:
        dataset: A `datasets.Dataset`, or the path of one saved with `save_to_disk`.
        text_column (`str`, defaults to `"captions"`): Caption(s) of each row.
        image_column (`str`, defaults to `"image"`): The image (for extraction).
        id_column (`str`, *optional*): The image key; defaults to the image path, else `row-<index>`, as
            `extract_regions` keys a dataset without `key_column`.
        name (`str`, defaults to `"dataset"`): Name used in logs.
        split (`str`, *optional*): The split to read when `dataset` is a `datasets.DatasetDict` (what
            `load_dataset(...).save_to_disk` writes); unused for a single `Dataset`.
    """

    def __init__(
        self,
        dataset,
        text_column: str = "captions",
        image_column: str = "image",
        id_column: str | None = None,
        name: str = "dataset",
        split: str | None = None,
    ):
        import datasets

        where = f"dataset source {name!r}"
        if isinstance(dataset, (str, Path)):
            where = f"{where} ({dataset})"
            try:
                dataset = datasets.load_from_disk(str(dataset))
            except FileNotFoundError as error:
                raise FileNotFoundError(f"{where}: no dataset saved with save_to_disk there ({error}).") from error
            except Exception as error:  # json / pyarrow / datasets errors of a damaged or mislabelled folder
                raise ValueError(
                    f"{where}: cannot load the saved dataset ({type(error).__name__}: {str(error)[:300]}); was it "
                    "written by save_to_disk and left unchanged?"
                ) from error
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                given = "no split was given" if split is None else f"split {split!r} is not one of them"
                raise ValueError(
                    f"{where} is a DatasetDict of the splits {list(dataset)} and {given}; set split to the one to "
                    "read."
                )
            dataset = dataset[split]
            where = f"{where}, split {split!r}"
        for column in (text_column, id_column):
            if column is not None and column not in dataset.column_names:
                raise ValueError(
                    f"{where}: the dataset has no column {column!r}; its columns are {dataset.column_names}."
                )
        self.dataset = dataset
        self.image_column = image_column
        self.id_column = id_column
        keys = _column_values(dataset, id_column) if id_column else _default_row_keys(dataset, image_column)
        self._where = where
        # Each key's rows, built by the first `open_image`: training reads regions, never the images, and the index
        # would take about 110 MB per million rows in every process and DataLoader worker.
        self._rows: dict[str, list[int]] | None = None
        pairs, captionless = [], []
        for row, (key, texts) in enumerate(zip(keys, _column_values(dataset, text_column))):
            # Rows that share an id are one image (a dataset of one row per caption): their captions are pooled.
            key, captions = _row_captions(key, texts, f"{where}, row {row}", text_column, id_column)
            if not captions:
                captionless.append(row)
            pairs.extend((key, text) for text in captions)
        if captionless and not pairs:
            raise ValueError(f"{where}: no row has a caption ({text_column!r} is null or blank in all {len(keys)}).")
        if captionless:
            logger.warning(
                "%s: %d row(s) without a caption (null or blank) skipped; first: row %d.",
                where,
                len(captionless),
                captionless[0],
            )
        super().__init__(name, pairs)

    def check_region_store(self, store: Mapping[str, Any], num_keys: int = 8) -> None:
        """Raises a `ValueError` when none of the first `num_keys` image keys is in `store` (a key whose image
        failed extraction counts as present): every sample would then be skipped. The message names the keys on
        both sides and the key rule to change (`id_column`)."""
        keys = self.image_keys()[:num_keys]
        failed = getattr(store, "errors", {})
        if any(key in store or key in failed for key in keys):
            return
        theirs = [key for key, _ in zip(store, range(3))]
        named = f"the region cache {store.path}" if hasattr(store, "path") else "its region store"
        if self.id_column is None:
            rule = (
                "keyed by image path, else row-<index> (no id_column); if the cache was built with a key_column, set "
                "id_column to that column"
            )
        else:
            rule = (
                f"keyed by its column {self.id_column!r} (id_column); set id_column to the column the cache was built "
                "with (extract_regions' key_column), or leave it unset if the cache was built without one"
            )
        raise ValueError(
            f"{self._where}: none of its first {len(keys)} image keys {keys[:3]} is in {named}, whose keys look "
            f"like {theirs}; the source is {rule}."
        )

    def open_image(self, key: str):
        if self._rows is None:
            keys = (
                _column_values(self.dataset, self.id_column)
                if self.id_column
                else _default_row_keys(self.dataset, self.image_column)
            )
            self._rows = {}
            for row, row_key in enumerate(keys):
                self._rows.setdefault(str(row_key), []).append(row)
        rows = self._rows[key]
        if len(rows) > 1:
            self._check_one_image(key, rows)
        return self.dataset[rows[0]][self.image_column].convert("RGB")

    def _check_one_image(self, key: str, rows: list[int]) -> None:
        """Raises a `ValueError` naming the rows when rows sharing `key` hold different images: their captions are
        pooled, so they would be paired with one row's image without a word. Compared undecoded (the stored bytes,
        else the path), only for the rows of this key."""
        import datasets

        subset = self.dataset.select(rows)
        if isinstance(subset.features.get(self.image_column), datasets.Image):
            subset = subset.cast_column(self.image_column, datasets.Image(decode=False))
        cells = subset[self.image_column]

        def identity(cell):
            if isinstance(cell, dict):
                return cell.get("bytes") if cell.get("bytes") is not None else cell.get("path")
            return cell

        first = identity(cells[0])
        other = next((row for row, cell in zip(rows, cells) if identity(cell) != first), None)
        if other is not None:
            raise ValueError(
                f"{self._where}: rows {rows[0]} and {other} share the id {key!r} but hold different images in "
                f"{self.image_column!r}; rows of one id are one image (their captions are pooled), so give each image "
                "its own id."
            )


def _is_text_member(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in ("txt", "json")


def _caption_of(sample: dict[str, Any]) -> str | None:
    """The caption of a webdataset sample as img2dataset writes it: `KEY.txt`, else `"caption"` of `KEY.json`.

    Raises:
        ValueError: naming the shard and key of a caption that is not UTF-8, a `.json` member that is not a JSON
            object, or a `"caption"` in it that is not a string.
    """
    where = f"webdataset shard {sample.get('__url__')}, key {sample.get('__key__')!r}"
    try:
        if sample.get("txt"):
            text = bytes(sample["txt"]).decode("utf-8").strip()
            if text:
                return text
        if sample.get("json"):
            meta = json.loads(bytes(sample["json"]))
            if not isinstance(meta, dict):
                raise ValueError(f"the .json member is a {type(meta).__name__}, not an object")
            caption = meta.get("caption")
            if caption is not None and not isinstance(caption, str):
                raise ValueError(f'"caption" of the .json member is a {type(caption).__name__}, not a string')
            return (caption or "").strip() or None
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{where}: unreadable caption ({type(error).__name__}: {error}).") from error
    return None


def _read_samples(reader, name: str):
    """The samples of a webdataset reader; an error of the tar reader (a truncated or non-tar shard) becomes a
    `ValueError` naming the source and the last shard and key read, and `StopIteration` never leaks."""
    last = {"__url__": None, "__key__": None}
    iterator = iter(reader)
    while True:
        try:
            sample = next(iterator)
        except StopIteration:
            return
        except _ShardError as error:
            raise ValueError(f"webdataset source {name!r}: {error}") from error
        except Exception as error:
            raise ValueError(
                f"webdataset source {name!r}: reading failed after shard {last['__url__']}, key {last['__key__']!r} "
                f"({type(error).__name__}: {str(error)[:300]}); is a shard truncated or not a tar file?"
            ) from error
        last = sample
        yield sample


def _image_of(sample: dict[str, Any]) -> bytes | None:
    for extension in _IMAGE_EXTENSIONS:
        if sample.get(extension) is not None:
            return bytes(sample[extension])
    return None


# Members webdataset leaves out of samples: `__key__/...` and `__meta__`-like names.
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


class _ShardError(ValueError):
    """A shard that cannot be read whole (truncated, not a tar file, a member twice in a sample); the message names
    the shard."""


class _EndMarkedTarInfo(tarfile.TarInfo):
    """A member header that notes on its archive (`saw_end_marker`) whether the member list ended with the
    end-of-archive marker, two zero blocks. `tarfile` also ends a member list without a word at a missing, short or
    unreadable header, which is how a shard cut short on a block boundary or inside a header looks."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.saw_end_marker = tar.fileobj.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)
            raise


def _tar_members(sources: Iterator[dict[str, Any]], select_files=None, read_data=None) -> Iterator[dict[str, Any]]:
    """The regular files of each opened shard as webdataset's `group_by_keys` takes them, then `{}` at each shard's
    end: those `select_files` keeps (all by default), with their bytes where `read_data` says so (all by default)
    and `None` for the others, whose presence is all their sample shows. A local shard is read by seeking from
    header to header, so the members whose bytes are not wanted (the images, when only captions are) are never read
    from disk; a stream is read through, like webdataset's own expander. A shard whose members do not end with the
    end-of-archive marker raises a `ValueError` naming it instead of ending early."""
    for source in sources:
        url = source["url"]
        mode = "r|*" if source.get("local_path") is None else "r:*"
        try:
            with tarfile.open(fileobj=source["stream"], mode=mode, tarinfo=_EndMarkedTarInfo) as tar:
                for member in tar:
                    name = member.name
                    if not member.isreg() or _META_MEMBER.match(name) or (select_files and not select_files(name)):
                        continue
                    data = tar.extractfile(member).read() if read_data is None or read_data(name) else None
                    file = {"fname": name, "data": data, "__url__": url}
                    if source.get("local_path") is not None:
                        file["__local_path__"] = source["local_path"]
                    yield file
                    tar.members = []  # a stream of any length in bounded memory
                if not getattr(tar, "saw_end_marker", False):
                    raise _ShardError(
                        f"webdataset shard {url} is truncated: its members stop at byte {tar.offset} without the "
                        "end-of-archive marker (two zero blocks), so the samples after that point are missing; write "
                        "or copy the shard again."
                    )
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            # tarfile's message lists each compression it tried on lines of their own: one line here.
            reason = " ".join(str(error).split())[:300]
            raise _ShardError(
                f"webdataset shard {url} cannot be read ({type(error).__name__}: {reason}); is it truncated or not a "
                "tar file? Write or copy it again."
            ) from error
        yield {}


def _samples_by_key(files: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """webdataset's `group_by_keys` over `files`, its own errors (a member name twice in one sample) naming the shard
    they were read from."""
    from webdataset.tariterators import group_by_keys

    current = {"url": None}

    def tracked():
        for file in files:
            current["url"] = file.get("__url__", current["url"])
            yield file

    try:
        yield from group_by_keys(tracked())
    except _ShardError:
        raise
    except Exception as error:
        raise _ShardError(f"webdataset shard {current['url']}: {type(error).__name__}: {str(error)[:300]}") from error


def _webdataset(urls: list[str], select_files=None, split: bool = False, read_data=None):
    """A `webdataset` pipeline over `urls` (paths, http(s)/s3/gs URLs, `pipe:` commands) giving undecoded samples,
    the members `select_files` keeps, with the bytes of those `read_data` names (see `_tar_members`); a truncated
    shard raises.

    With `split`, the shards are divided between the processes of the run and the DataLoader workers of each.
    """
    import webdataset as wds
    from webdataset.cache import StreamingOpen

    splitters = [wds.split_by_node, wds.split_by_worker] if split else []
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        *splitters,
        StreamingOpen(),
        lambda sources: _tar_members(sources, select_files, read_data),
        _samples_by_key,
    )


class WebDatasetPairSource(PairSource):
    """Pairs from webdataset tar shards as img2dataset writes them: per sample `KEY.jpg` (or another image
    extension), `KEY.txt` (the caption) and optionally `KEY.json` (with `"key"`, `"caption"`, ...).

    Read with the `webdataset` library, so shards may be local paths, URLs (`https://`, `s3://` through its
    handlers) or `pipe:` commands (`pipe:aws s3 cp s3://bucket/00000.tar -`). Captions are read once at
    construction; images are read by streaming their shard again (for extraction use `image_table`, one pass over
    all shards). For corpora too large to list in memory, use `WebDatasetStream`.

    Raises a `ValueError` naming the shard (and key) for a shard that is truncated or not a tar file, an unreadable
    caption, and a key that appears twice (in two shards, or twice in one). A sample without an image member (of
    `jpg`, `jpeg`, `png`, `webp`, `bmp`, `gif`, `tif`, `tiff`) or without a non-blank caption is skipped, with a
    warning counting them and naming the first (shard, key and why).

    Args:
        urls (`str` or `Sequence[str]`): Shards; a string may use brace notation (`shards/{00000..00009}.tar`) or,
            for local files, a glob.
        name (`str`, defaults to `"webdataset"`): Name used in logs.
    """

    def __init__(self, urls: str | Sequence[str], name: str = "webdataset"):
        self.urls = expand_urls(urls)
        self._shard_of: dict[str, str] = {}
        seen: dict[str, str] = {}
        pairs, skipped = [], []
        # The captions alone are read: an image member's presence is all the listing needs of it.
        for sample in _read_samples(_webdataset(self.urls, read_data=_is_text_member), name):
            key, shard = sample["__key__"], sample["__url__"]
            # Images are found again by key (image_bytes, image_table): a second sample of a key would pair its
            # captions with the first one's regions.
            if key in seen:
                where = "twice in shard" if seen[key] == shard else f"in shard {seen[key]} and in shard"
                raise ValueError(
                    f"webdataset source {name!r}: key {key!r} appears {where} {shard}; keys must be unique."
                )
            seen[key] = shard
            caption = _caption_of(sample)
            has_image = any(extension in sample for extension in _IMAGE_EXTENSIONS)
            if caption and has_image:
                self._shard_of[key] = shard
                pairs.append((key, caption))
            else:
                missing = [] if has_image else [f"no image member (of {', '.join(_IMAGE_EXTENSIONS)})"]
                missing += [] if caption else ["no caption (.txt, or 'caption' of .json, missing or blank)"]
                skipped.append((shard, key, " and ".join(missing)))
        if skipped:
            shard, key, reason = skipped[0]
            logger.warning(
                "webdataset source %r: %d sample(s) skipped as unusable; first: shard %s, key %r: %s.",
                name,
                len(skipped),
                shard,
                key,
                reason,
            )
        super().__init__(name, pairs)

    def image_bytes(self, key: str) -> bytes:
        for sample in _webdataset([self._shard_of[key]]):
            if sample["__key__"] == key:
                return _image_of(sample)
        raise KeyError(f"{key!r} is no longer in shard {self._shard_of[key]}")

    def open_image(self, key: str):
        return open_image_file(io.BytesIO(self.image_bytes(key))).convert("RGB")

    def image_table(self):
        """A `datasets.Dataset` with `key` and `image` (`{"bytes", "path"}`) per distinct image, streamed from the
        shards in one pass: the input `extract_regions(table, cache_dir, key_column="key")` needs to build this
        source's region cache."""
        import datasets

        def rows():
            wanted = set(self._shard_of)
            for sample in _webdataset(self.urls):
                if sample["__key__"] in wanted:
                    wanted.discard(sample["__key__"])
                    yield {"key": sample["__key__"], "image": {"bytes": _image_of(sample), "path": None}}

        features = datasets.Features({"key": datasets.Value("string"), "image": datasets.Image(decode=False)})
        return datasets.Dataset.from_generator(rows, features=features)


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """The webdataset shards `urls` names: a string is a brace pattern (`shards-{000..009}.tar`, expanded when
    `braceexpand` is installed) or a local glob, a list is taken as it is. Raises `FileNotFoundError` when none is
    found or a local one is missing (remote URLs are not checked)."""
    if isinstance(urls, str):
        import glob

        try:
            import braceexpand

            patterns = list(braceexpand.braceexpand(urls))
        except ImportError:
            patterns = [urls]
        expanded = []
        for pattern in patterns:
            local_glob = not _is_remote(pattern) and any(ch in pattern for ch in "*?[")
            expanded.extend(sorted(glob.glob(pattern)) if local_glob else [pattern])
    elif isinstance(urls, Sequence) and not isinstance(urls, bytes):
        expanded = [str(url) for url in urls]
    else:
        raise TypeError(f"urls must be a string (pattern) or a list of shard paths/URLs, got {type(urls).__name__}.")
    missing = [url for url in expanded if not _is_remote(url) and not Path(url).is_file()]
    if not expanded:
        raise FileNotFoundError(
            f"webdataset shards not found: no file matches {urls!r} (a local pattern is expanded with glob, braces "
            "with braceexpand when installed)."
        )
    if missing:
        raise FileNotFoundError(
            f"webdataset shards not found: {missing[:5]} ({len(missing)} of {len(expanded)} missing)."
        )
    return expanded


# ------------------------------------------------------------------------------------------------ streaming


class StreamingPairSource:
    """Pairs read as a stream, never listed or held in memory: each process of the run and each DataLoader worker
    reads its own part. `epoch_pairs(epoch)` gives the `(image_key, caption)` pairs of that part for one epoch.
    """

    name: str

    def epoch_pairs(self, epoch: int) -> Iterator[tuple[str, str]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class WebDatasetStream(StreamingPairSource):
    """img2dataset webdataset shards as a stream through the `webdataset` library: local paths, URLs or `pipe:`
    commands; shards split between processes (`split_by_node`) and DataLoader workers (`split_by_worker`), in an
    order reshuffled each epoch from `seed`. Only captions are read: regions come from the region cache, so shards may
    hold the captions alone once the regions are extracted (a key the cache lacks is a failed record when loaded).

    A shard that is truncated or not a tar file, or an unreadable caption, raises a `ValueError` naming the shard
    (and key) when the stream reaches it. Keys are not checked for repeats across shards, which would take memory
    growing with the stream (and each process sees only its part): check a new corpus once with
    `WebDatasetPairSource`, or build its region cache with `image_table`, which does.

    Args:
        urls (`str` or `Sequence[str]`): Shards, with brace notation (`pipe:aws s3 cp s3://b/{00000..09999}.tar -`).
        name (`str`, defaults to `"webdataset"`): Name used in logs.
        shuffle_shards (`bool`, defaults to `True`): Visit the shards in another order each epoch.
        seed (`int`, defaults to 0): Seed of that order (the same in every process, so the split stays disjoint).
    """

    def __init__(
        self, urls: str | Sequence[str], name: str = "webdataset", shuffle_shards: bool = True, seed: int = 0
    ):
        self.urls = expand_urls(urls)
        self.name = name
        self.shuffle_shards = shuffle_shards
        self.seed = seed

    def epoch_pairs(self, epoch: int) -> Iterator[tuple[str, str]]:
        urls = list(self.urls)
        if self.shuffle_shards:
            urls = [urls[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(urls))]
        for sample in _read_samples(_webdataset(urls, select_files=_is_text_member, split=True), self.name):
            caption = _caption_of(sample)
            if caption:
                yield sample["__key__"], caption


class DatasetStream(StreamingPairSource):
    """A `datasets` streaming dataset (`load_dataset(..., streaming=True)`) as a pair stream: split between
    processes with `split_dataset_by_node`; `datasets` splits its shards between DataLoader workers.

    Rows are shuffled as `datasets` shuffles a stream (`IterableDataset.shuffle`: its shards in another order, and
    rows drawn from a buffer of `shuffle_buffer`), in another order each epoch from `seed`: a stream read in file
    order would give every epoch the same order and bring a row's captions together, one image several times in a
    batch.

    Args:
        dataset: A `datasets.IterableDataset`, a Hub id or folder for `load_dataset`, or data files (`.jsonl`,
            `.json`, `.parquet`, `.csv`, a glob of them, or an fsspec URL to them).
        text_column (`str`, defaults to `"captions"`): Caption(s) of each row (a string or a list of strings).
        id_column (`str`, defaults to `"key"`): The image key (the region cache's key).
        split (`str`, defaults to `"train"`): The split to stream.
        name (`str`, defaults to `"dataset"`): Name used in logs.
        seed (`int`, defaults to 0): Seed of the shuffle.
        shuffle_buffer (`int`, defaults to 10000): Rows the shuffle draws from; 0 reads the stream in its order.
    """

    def __init__(
        self,
        dataset,
        text_column: str = "captions",
        id_column: str = "key",
        split: str = "train",
        name: str = "dataset",
        seed: int = 0,
        shuffle_buffer: int = 10_000,
    ):
        self.dataset, self.text_column, self.id_column = dataset, text_column, id_column
        self.split, self.name = split, name
        self.seed, self.shuffle_buffer = seed, shuffle_buffer

    def _open(self):
        import datasets

        if not isinstance(self.dataset, (str, Path)):
            return self.dataset
        path = str(self.dataset)
        builder = data_file_builder(path)
        if builder is not None:
            return datasets.load_dataset(builder, data_files={self.split: path}, split=self.split, streaming=True)
        return datasets.load_dataset(path, split=self.split, streaming=True)

    def epoch_pairs(self, epoch: int) -> Iterator[tuple[str, str]]:
        from datasets.distributed import split_dataset_by_node

        try:
            stream = self._open()
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds (an empty file: StopIteration)
            detail = str(error)[:300] or "no data: an empty file, or a pattern no file matches"
            raise ValueError(
                f"streaming source {self.name!r}: cannot open {self.dataset} ({type(error).__name__}: {detail})."
            ) from error
        if self.shuffle_buffer and hasattr(stream, "shuffle"):
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        if hasattr(stream, "set_epoch"):
            stream.set_epoch(epoch)
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if world > 1:
            stream = split_dataset_by_node(stream, rank=rank, world_size=world)
        pairs = self._row_pairs(iter(stream))
        if not self.shuffle_buffer:
            yield from pairs
            return
        # Rows arrive shuffled, but each row's captions together: the pairs are shuffled again, within a buffer.
        yield from _buffer_shuffled(pairs, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, rank]))

    def _row_pairs(self, rows) -> Iterator[tuple[str, str]]:
        number = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as error:  # pyarrow / datasets / json errors of a damaged data file
                raise ValueError(
                    f"streaming source {self.name!r} ({self.dataset}): reading failed after row {number} "
                    f"({type(error).__name__}: {str(error)[:300]})."
                ) from error
            number += 1
            if not isinstance(row, dict) or self.text_column not in row or self.id_column not in row:
                raise ValueError(
                    f"streaming source {self.name!r}: rows need columns {self.text_column!r} and {self.id_column!r}; "
                    f"got {sorted(row)}."
                )
            key, captions = _row_captions(
                row[self.id_column],
                row[self.text_column],
                f"streaming source {self.name!r}, row {number - 1}",
                self.text_column,
                self.id_column,
            )
            for text in captions:
                yield key, text


# The `datasets` builder of data files by suffix, after any compression suffix (`datasets` reads those too).
_DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def data_file_builder(path: str) -> str | None:
    """The `datasets` builder (`json`, `parquet`, `csv`) of data files named by `path` (a file, a glob or an fsspec
    URL, `.jsonl.gz` as `.jsonl`); None for a Hub id or a folder, which `load_dataset` opens by its name."""
    name = path.split("?")[0].lower()
    for suffix in _COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return _DATA_FILE_BUILDERS.get(Path(name).suffix)


def _buffer_shuffled(items, buffer_size: int, rng: np.random.Generator):
    """`items` in a random order drawn from a buffer of `buffer_size` (as `datasets` shuffles a stream): each item
    is yielded once, an item at most `buffer_size` places before it came, in one pass without the whole list."""
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        position = int(rng.integers(buffer_size))
        yield buffer[position]
        buffer[position] = item
    rng.shuffle(buffer)
    yield from buffer


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
        swap_negatives (`float`, defaults to 0.0): Share of this source's ITM negatives that become hard ones: the
            sample's own image with its own caption's two objects or two colours swapped ("a blue square to the
            left of a red circle" for a red circle left of a blue square; `swap_caption_words`, from the caption
            before any `caption_noise`). Only a model that reads word order against the regions' positions can
            tell those from the true caption; the wording stays the caption's, so it gives nothing away.
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
        swap_negatives: float = 0.0,
    ):
        if not 0.0 <= swap_negatives <= 1.0:
            raise ValueError(f"swap_negatives must be in [0, 1], got {swap_negatives}.")
        self.hard_negative_share = float(swap_negatives)
        examples = make_synthetic_examples(first_image + num_images, seed, image_size, captions_per_image)
        self.examples = {example["image_id"]: example for example in examples[first_image:]}
        pairs = [(key, caption) for key, example in self.examples.items() for caption in example["captions"]]
        self._true_captions = [text for _, text in pairs]
        texts = corrupt_captions(self._true_captions, caption_noise, seed=seed + 1)
        super().__init__(name, [(key, text) for (key, _), text in zip(pairs, texts)])

    def open_image(self, key: str):
        return self.examples[key]["image"]

    def hard_negative_captions(self, index: int) -> list[str]:
        """The object swap and attribute swap of pair `index`'s true caption (those that exist), in its wording:
        `swap_caption_words`."""
        twins = swap_caption_words(self._true_captions[index])
        return [twins[kind] for kind in SWAP_CAPTION_KINDS if kind in twins]

    def annotation_regions(self, feature_size: int) -> dict[str, dict]:
        """Region records made from the annotations (see `synthetic_region_record`), keyed like the pairs."""
        return {key: synthetic_region_record(example, feature_size) for key, example in self.examples.items()}


def region_arrays(store: Mapping[str, dict], key: str, max_regions: int) -> dict[str, Any]:
    """The region arrays of `key` in `store`, cut to `max_regions`; raises when the record is missing or unusable."""
    record = store[key]
    if record is None:
        raise KeyError(key)
    if record.get("error"):
        raise ValueError(f"region extraction failed: {record['error']}")
    # On the whole record: cutting first would hide rows of one array that another lacks.
    check_region_record(record, f"region record of {key!r}", keys=_REGION_KEYS)
    regions = {}
    for name in _REGION_KEYS:
        if record.get(name) is not None:
            regions[name] = np.asarray(record[name])[:max_regions]
    if "region_features" not in regions or "region_locations" not in regions:
        raise ValueError(f"region record of {key!r} lacks region_features or region_locations.")
    if len(regions["region_features"]) == 0:
        raise ValueError(f"region record of {key!r} has no regions.")
    return regions


def _stored_region_count(store: Mapping[str, dict], key: str, max_regions: int) -> int | None:
    """How many regions of `key` a sample uses, without loading its features when the store can say
    (`RegionCache.num_regions` reads one column); None for a record that cannot be read (it is skipped, and counted,
    when loaded)."""
    try:
        count = store.num_regions(key) if hasattr(store, "num_regions") else len(store[key]["region_features"])
        return min(int(count), max_regions)
    except Exception:  # noqa: BLE001 - any unreadable record
        return None


def _cache_row(store: Mapping[str, dict], key: str) -> int | None:
    """The row of `key` in a region cache, which stores each picture once (it deduplicates by content): keys of one
    row name one picture, a byte-identical copy under another file name included. None when `store` is no region
    cache or cannot say (a missing key, a damaged shard: the sample is skipped, and counted, when loaded)."""
    if not isinstance(store, RegionCache) or not isinstance(key, str):
        return None
    try:
        return store._find(key)
    except RegionCacheError:
        return None


def _source_captions(source: PairSource, pictures: np.ndarray | None) -> tuple[np.ndarray, CaptionPictures]:
    """Each pair's `caption_key`, and the pictures of the captions `source` holds on several pictures (by region-cache
    row where `pictures` numbers them, by key otherwise), for ITM negatives that are never true pairs."""
    keys = np.fromiter((caption_key(caption) for _, caption in source.pairs), dtype=np.int64, count=len(source))
    named = [key for key, _ in source.pairs] if pictures is None else pictures.tolist()
    return keys, CaptionPictures.from_pairs(keys, named)


def _picture_numbers(source: PairSource, store: Mapping[str, dict]) -> np.ndarray | None:
    """One number per pair of `source` naming the picture it shows: its region-cache row, so that ITM negatives
    compare pictures rather than names. A key the cache cannot place gets a number of its own (negative). None when
    the store is no region cache: names are compared then, as nothing tells two names of one picture apart."""
    if not isinstance(store, RegionCache):
        return None
    number_of: dict[str, int] = {}
    row_keys: dict[int, str] = {}
    shared = []
    for key in source.image_keys():
        row = _cache_row(store, key)
        number_of[key] = -1 - len(number_of) if row is None else row
        if row is not None and row_keys.setdefault(row, key) != key:
            shared.append((key, row_keys[row]))
    if shared:
        logger.warning(
            "source %r: %d image key(s) name the picture of another key (first: %r is %r, one row of the region "
            "cache); ITM negatives never pair a caption with regions of its own picture.",
            source.name,
            len(shared),
            *shared[0],
        )
    return np.fromiter((number_of[key] for key, _ in source.pairs), dtype=np.int64, count=len(source))


class _WarningBudget:
    """Logs the first `limit` warnings of skipped records, then counts the rest silently."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0

    def warn(self, message: str) -> None:
        self.count += 1
        if self.count <= self.limit:
            suffix = " (further failures are counted silently)" if self.count == self.limit else ""
            logger.warning(message + suffix)


def open_region_store(path: str | Path) -> Mapping[str, dict]:
    """Opens a region cache written by `extract_regions` as a mapping from image key to region record."""
    # Stored dtype (float16 by default): the collator converts each row once, into the padded float32 batch.
    return load_region_cache(str(path), dtype=None)


# How many groups, at most, the second sorting pass of `length_groups` may mix (tried in turn; 1 is no second pass).
LENGTH_GROUP_WINDOWS = (1, 2, 3, 4, 6, 8)


def length_groups(lengths: np.ndarray, group_size: int) -> list[np.ndarray]:
    """Cuts samples into groups of `group_size` (the last may be short) that waste few positions on padding.

    A batch pads each length entry (region count, caption length) to its own longest, so a group costs its size
    times the sum of its maxima. Sorting by the first entry alone leaves the second as random as it came: with
    10-100 regions and 10-32 tokens, a batch of 8 then pads its captions by about 9 tokens. So the samples are
    sorted by the first entry (longest first), and then within each window of a few consecutive groups by the next
    entries; every window size of `LENGTH_GROUP_WINDOWS` is tried and the cheapest kept (1, the plain sort, on a
    tie). The result depends only on `lengths`.

    Args:
        lengths (`np.ndarray` of shape `(num_samples, num_entries)`): Integer lengths, the entries in priority order.
        group_size (`int`): Samples per group.

    Returns:
        `list[np.ndarray]`: Row indices of `lengths`, one array per group, each sorted longest first.
    """
    if len(lengths) == 0:
        return []
    descending = -np.asarray(lengths, dtype=np.int64).reshape(len(lengths), -1)
    # lexsort sorts by its last key first, and it is stable.
    order = np.lexsort(descending.T[::-1])
    starts = np.arange(0, len(order), group_size)
    sizes = np.diff(np.append(starts, len(order)))
    later_entries = descending[order, 1:].T[::-1]
    best, best_cost = order, None
    for window in LENGTH_GROUP_WINDOWS:
        window_of = np.arange(len(order)) // (window * group_size)
        candidate = order[np.lexsort((descending[order, 0], *later_entries, window_of))]
        cost = int((sizes * np.maximum.reduceat(-descending[candidate], starts, axis=0).sum(axis=1)).sum())
        if best_cost is None or cost < best_cost:
            best, best_cost = candidate, cost
    groups = [best[start : start + group_size] for start in starts]
    return [group[np.lexsort(descending[group].T[::-1])] for group in groups]


def group_by_length(
    samples: Sequence[Any],
    lengths: Sequence[tuple[int, ...] | None],
    group_size: int,
    pool_size: int,
    rng: np.random.Generator,
    longest_first: bool = True,
) -> list[Any]:
    """Reorders `samples` so that each run of `group_size` consecutive samples has similar lengths.

    The order is cut into pools of `pool_size` consecutive samples; each pool is cut into groups that pad little
    (`length_groups`), and the groups of a pool are shuffled. Samples never leave their pool, so the order stays as
    random as its pools are small. With `longest_first`, the group whose samples pad to the longest (the sum of its
    longest entries) is moved to the front, so an out-of-memory error shows at the first step.

    A sample of unknown length (`None`: its record cannot be read, and will be skipped) takes the length of the
    sample before it. Giving all of them one length would put them together into batches with nothing left to train
    on; this way they spread over the batches as the readable samples do.

    Args:
        samples (`Sequence`): The samples in their random order.
        lengths (`Sequence[tuple[int, ...] | None]`): One length tuple per sample, e.g. `(num_regions, num_tokens)`,
            or `None` where it is unknown.
        group_size (`int`): Samples per group (the batch every optimizer step pads to its own longest).
        pool_size (`int`): Samples per pool; rounded down to a multiple of `group_size` (at least one group).
        rng (`np.random.Generator`): Shuffles the groups.
        longest_first (`bool`, defaults to `True`): Move the group that pads to the longest to the front.

    Returns:
        `list`: The same samples, reordered.
    """
    if len(samples) != len(lengths):
        raise ValueError(f"need one length per sample; got {len(samples)} samples and {len(lengths)} lengths.")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}.")
    pool_size = max(group_size, pool_size - pool_size % group_size)
    known = next((length for length in lengths if length is not None), None)
    if known is None:  # nothing to sort by
        return list(samples)
    filled = []
    for length in lengths:
        known = known if length is None else length
        filled.append(tuple(known))
    keys = np.asarray(filled, dtype=np.int64).reshape(len(lengths), -1)
    groups: list[np.ndarray] = []
    for start in range(0, len(samples), pool_size):
        pool_groups = [start + group for group in length_groups(keys[start : start + pool_size], group_size)]
        groups.extend(pool_groups[i] for i in rng.permutation(len(pool_groups)))
    if groups and longest_first:
        longest = max(range(len(groups)), key=lambda i: int(keys[groups[i]].max(axis=0).sum()))
        groups[0], groups[longest] = groups[longest], groups[0]
    return [samples[i] for group in groups for i in group]


class MixtureSampler(torch.utils.data.Sampler):
    """Yields `(flat_index, sample_seed)` for a weighted mixture of sources, reproducibly per epoch.

    Position `p` of epoch `e` draws its source with probability proportional to `weights`, then takes the next item
    of that source's own shuffled order (reshuffled when exhausted). `flat_index` indexes the concatenation of the
    sources; `sample_seed` depends only on `(seed, e, p)`, so every random choice made for the sample (negatives,
    masks) is the same on resume and however batches are split across processes.

    With `sample_lengths`, the epoch's order is then grouped by length (`group_by_length`): each run of `group_size`
    samples (the global batch of one step) holds samples of similar region count and caption length, so padding
    each batch to its own longest sample wastes little. Samples only move within pools of `pool_groups` groups, and
    lengths are asked for one pool at a time, as the epoch is iterated.

    Args:
        sizes (`Sequence[int]`): Pairs per source.
        weights (`Sequence[float]`): Mixing weights (any positive scale).
        seed (`int`): Seed of the order.
        num_samples (`int`, *optional*): Samples per epoch; the total size of the sources by default.
        sample_lengths (`Callable`, *optional*): Maps a list of samples `(flat_index, sample_seed)` to their length
            tuples (`None` where unknown), e.g. `PretrainingPairDataset.sample_lengths`. No grouping without it.
        group_size (`int`, defaults to 1): Samples per group: the per-device batch size times the number of processes.
        pool_groups (`int`, defaults to 50): Groups per pool.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        seed: int,
        num_samples: int | None = None,
        sample_lengths: Callable[[list[tuple[int, int]]], list[tuple[int, ...] | None]] | None = None,
        group_size: int = 1,
        pool_groups: int = 50,
    ):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"need one weight per source; got {len(sizes)} sources and {len(weights)} weights.")
        if any(w <= 0 for w in weights):
            raise ValueError(f"mixing weights must be positive, got {list(weights)}.")
        if any(s <= 0 for s in sizes):
            raise ValueError(f"every source needs at least one pair, got sizes {list(sizes)}.")
        if group_size < 1 or pool_groups < 1:
            raise ValueError(f"group_size and pool_groups must be at least 1, got {group_size} and {pool_groups}.")
        self.sizes = [int(s) for s in sizes]
        self.probabilities = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.seed = int(seed)
        self.num_samples = int(num_samples) if num_samples is not None else int(sum(self.sizes))
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}.")
        self.sample_lengths = sample_lengths
        self.group_size = int(group_size)
        self.pool_groups = int(pool_groups)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def indices(self, epoch: int) -> list[tuple[int, int]]:
        """The whole order of `epoch` (iterating the sampler gives the same, computed pool by pool)."""
        return list(self._iterate(epoch))

    def _ungrouped(self, epoch: int) -> list[tuple[int, int]]:
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

    def _iterate(self, epoch: int) -> Iterator[tuple[int, int]]:
        order = self._ungrouped(epoch)
        if self.sample_lengths is None:
            yield from order
            return
        # A generator of its own, so grouping leaves the ungrouped order (and every sample seed) as it was.
        group_rng = np.random.default_rng([self.seed, epoch, 1])
        pool_size = self.group_size * self.pool_groups
        # Pool by pool, so the first batch does not wait for the lengths of a whole epoch.
        for start in range(0, len(order), pool_size):
            pool = order[start : start + pool_size]
            lengths = self.sample_lengths(pool)
            yield from group_by_length(pool, lengths, self.group_size, pool_size, group_rng, longest_first=start == 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self._iterate(self.epoch)


class PretrainingPairDataset(torch.utils.data.Dataset):
    """Joins pairs to their regions and tokenizes the caption; picks ITM negatives from the whole source.

    Indexed by what `MixtureSampler` yields, `(flat_index, sample_seed)` (a plain int index also works, with the
    index as seed). With probability `itm_negative_probability` the sample becomes a negative: its caption (share
    `text_negative_share`) or its regions are replaced by those of a random pair of the same source showing another
    image. With a region cache as the store, images are told apart by their cache row, not their key: the cache
    stores a picture once (it deduplicates by content), so a copy of a file under another name is never a negative
    of the original (each source key is placed once, when the dataset is built, with a warning counting the keys
    that share a picture; another store compares keys). A source with a `hard_negative_share`
    (`SyntheticPairSource(swap_negatives=...)`) turns that share of its negatives into hard ones: the sample's own
    image with one of its `hard_negative_captions`. A record whose regions cannot be loaded gives `None` (the
    collator drops and counts it) and a warning.

    Args:
        sources (`Sequence[PairSource]`): The sources, in mixture order.
        region_stores (`Sequence[Mapping]`): One mapping from image key to region record per source.
        tokenizer: BERT tokenizer.
        max_text_length (`int`): Tokens per caption, [CLS] and [SEP] included.
        max_regions (`int`): Regions kept per image.
        itm_negative_probability (`float`, defaults to 0.5): Share of negatives.
        text_negative_share (`float`, defaults to 0.5): Share of negatives that swap the caption.
        max_warnings (`int`, defaults to 10): Load failures logged individually before going quiet.
        max_cached_regions (`int`, defaults to 0): Region records kept in memory (least recently used dropped),
            for a store whose reads are slow. The region cache reads a record from its mapped Arrow buffers in
            about as long as the collator takes to copy it, and at paper size 8192 kept records would hold 3.7 GB
            per process, so none are kept by default.
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
        max_cached_regions: int = 0,
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
        self._warnings = _WarningBudget(max_warnings)
        self.offsets = np.cumsum([0] + [len(source) for source in self.sources])
        self.max_cached_regions = max_cached_regions
        self._cached: OrderedDict[tuple[int, str], dict[str, Any]] = OrderedDict()
        self._token_count_cache: dict[int, np.ndarray] = {}  # per source; -1 until first asked for
        self._region_count_cache: dict[tuple[int, str], int] = {}
        self._pictures = [_picture_numbers(source, store) for source, store in zip(self.sources, self.region_stores)]
        self._captions = [
            _source_captions(source, pictures) if itm_negative_probability > 0 else None
            for source, pictures in zip(self.sources, self._pictures)
        ]

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
        return region_arrays(store, key, self.max_regions)

    def _plan(self, index: int, sample_seed: int) -> tuple[int, int, int | str, str, int]:
        """What the sample is made of: `(source_index, pair, text, region_key, itm_label)`, `text` being the index
        of the pair whose caption it shows, or the caption itself for a hard negative (see
        `PairSource.hard_negative_captions`).

        Every random choice comes from `sample_seed`, so `sample_lengths` can replay it without loading anything.
        """
        source_index, pair = self._locate(index)
        source, pictures = self.sources[source_index], self._pictures[source_index]
        key = source[pair][0]
        picture = (lambda other: source[other][0]) if pictures is None else (lambda other: int(pictures[other]))
        captions = self._captions[source_index]
        rng = np.random.default_rng([sample_seed, 17])
        negative = choose_negative(
            rng,
            picture(pair),
            len(source),
            picture,
            self.itm_negative_probability,
            self.text_negative_share,
            caption_fits=None
            if captions is None
            else lambda other: captions[1].fit(captions[0][pair], picture(pair), captions[0][other], picture(other)),
        )
        if negative is None:
            return source_index, pair, pair, key, 1
        hard = choose_hard_caption(rng, source.hard_negative_share, lambda: source.hard_negative_captions(pair))
        if hard is not None:
            return source_index, pair, hard, key, 0
        if negative.swap_text:
            return source_index, pair, negative.partner, key, 0
        return source_index, pair, pair, source[negative.partner][0], 0

    def _token_counts(self, source_index: int, pairs: Sequence[int]) -> list[int]:
        if source_index not in self._token_count_cache:
            self._token_count_cache[source_index] = np.full(len(self.sources[source_index]), -1, dtype=np.int32)
        counts = self._token_count_cache[source_index]
        missing = sorted({pair for pair in pairs if counts[pair] < 0})
        if missing:
            source = self.sources[source_index]
            # One batched call lets the fast tokenizer work in parallel; a call per caption costs several times more.
            encoded = tokenize_as_text(
                self.tokenizer,
                [source[pair][1] for pair in missing],
                name="caption",
                truncation=True,
                max_length=self.max_text_length,
            )
            counts[missing] = [len(ids) for ids in encoded["input_ids"]]
        return [int(counts[pair]) for pair in pairs]

    def _region_count(self, source_index: int, key: str) -> int | None:
        cache_key = (source_index, key)
        if cache_key not in self._region_count_cache:
            store = self.region_stores[source_index]
            self._region_count_cache[cache_key] = _stored_region_count(store, key, self.max_regions)
        return self._region_count_cache[cache_key]

    def sample_lengths(self, samples: Sequence[tuple[int, int]]) -> list[tuple[int, int] | None]:
        """`(num_regions, num_tokens)` of each sample `(index, sample_seed)`, negatives included, without loading it.

        This is what `MixtureSampler` groups by. Every random choice of the sample is replayed from its seed; caption
        token counts are computed in one batch per call and kept; region counts come from the store
        (`RegionCache.num_regions` reads one column, not the features). `None` for a record that cannot be read.
        """
        plans = [self._plan(int(index), int(seed)) for index, seed in samples]
        tokens: dict[int, dict[int | str, int]] = {}
        for source_index in {plan[0] for plan in plans}:
            pairs = sorted({plan[2] for plan in plans if plan[0] == source_index and not isinstance(plan[2], str)})
            tokens[source_index] = dict(zip(pairs, self._token_counts(source_index, pairs)))
        captions = sorted({plan[2] for plan in plans if isinstance(plan[2], str)})
        if captions:  # hard negatives: captions of no pair
            encoded = tokenize_as_text(
                self.tokenizer, captions, name="caption", truncation=True, max_length=self.max_text_length
            )["input_ids"]
            counts = {caption: len(ids) for caption, ids in zip(captions, encoded)}
            for source_index, _, text, _, _ in plans:
                if isinstance(text, str):
                    tokens[source_index][text] = counts[text]
        lengths = []
        for source_index, _, text, region_key, _ in plans:
            num_regions = self._region_count(source_index, region_key)
            lengths.append(None if num_regions is None else (num_regions, tokens[source_index][text]))
        return lengths

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any] | None:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: Sequence[int | tuple[int, int]]) -> list[dict[str, Any] | None]:
        """The samples of a batch (the DataLoader's batched fetch): one tokenizer call for all their captions."""
        samples, texts = [], []
        for item in items:
            index, sample_seed = item if isinstance(item, tuple) else (int(item), int(item))
            source_index, pair, text, region_key, itm_label = self._plan(index, sample_seed)
            source = self.sources[source_index]
            try:
                regions = self._cached_regions(source_index, region_key)
            except Exception as error:  # noqa: BLE001 - any unreadable record is skipped and counted, never fatal here
                self._warnings.warn(
                    f"skipping pair {pair} of source {source.name!r} (image {region_key!r}): {error!r}"
                )
                samples.append(None)
                continue
            texts.append(text if isinstance(text, str) else source[text][1])
            samples.append(
                {**regions, "image_id": region_key, "itm_labels": itm_label, "sample_seed": int(sample_seed)}
            )
        if texts:
            encoding = tokenize_as_text(
                self.tokenizer, texts, name="caption", truncation=True, max_length=self.max_text_length
            )
            token_types = encoding.get("token_type_ids")
            loaded = (sample for sample in samples if sample is not None)
            for row, sample in enumerate(loaded):
                sample["input_ids"] = encoding["input_ids"][row]
                sample["token_type_ids"] = None if token_types is None else token_types[row]
        return samples


class StreamingPretrainingDataset(torch.utils.data.IterableDataset):
    """Pretraining samples from streaming sources: pairs mixed by weight, joined to their regions by image key, ITM
    negatives drawn from a buffer of recent pairs of the same source (showing another picture: with a region cache,
    another cache row, as in `PretrainingPairDataset`), and grouped by length pool by pool.

    Each process and DataLoader worker reads its own part of every source (see `StreamingPairSource`) and draws
    from its own generator (seeded by `seed`, the process rank and the worker id); sources start again at their
    end, epoch after epoch, so the stream never ends: a stage over streaming sources runs `max_steps`. Samples look
    like `PretrainingPairDataset`'s; a pair whose regions cannot be loaded gives `None` (counted by the collator).

    Args:
        sources (`Sequence[StreamingPairSource]`): The sources, in mixture order.
        region_stores (`Sequence[Mapping]`): One mapping from image key to region record per source.
        weights (`Sequence[float]`): Mixing weights.
        tokenizer: BERT tokenizer.
        max_text_length (`int`): Tokens per caption, [CLS] and [SEP] included.
        max_regions (`int`): Regions kept per image.
        seed (`int`, defaults to 0): Seed of the mixture, negatives and grouping.
        itm_negative_probability (`float`, defaults to 0.5): Share of negatives.
        text_negative_share (`float`, defaults to 0.5): Share of negatives that swap the caption.
        group_size (`int`, defaults to 1): Samples per group, the per-device batch size (each process reads its own
            stream). 1 turns grouping off.
        pool_groups (`int`, defaults to 50): Groups per pool.
        negative_buffer (`int`, defaults to 1024): Recent pairs per source that negatives are drawn from.
        max_warnings (`int`, defaults to 10): Load failures logged individually before going quiet.
    """

    def __init__(
        self,
        sources: Sequence[StreamingPairSource],
        region_stores: Sequence[Mapping[str, dict]],
        weights: Sequence[float],
        tokenizer,
        max_text_length: int,
        max_regions: int,
        seed: int = 0,
        itm_negative_probability: float = 0.5,
        text_negative_share: float = 0.5,
        group_size: int = 1,
        pool_groups: int = 50,
        negative_buffer: int = 1024,
        max_warnings: int = 10,
    ):
        if not (len(sources) == len(region_stores) == len(weights)) or not sources:
            raise ValueError(
                f"need one region store and one weight per source; got {len(sources)} sources, "
                f"{len(region_stores)} stores and {len(weights)} weights."
            )
        if any(w <= 0 for w in weights):
            raise ValueError(f"mixing weights must be positive, got {list(weights)}.")
        if isinstance(negative_buffer, bool) or not isinstance(negative_buffer, int) or negative_buffer < 1:
            raise ValueError(
                f"negative_buffer must be a positive number of recent pairs to draw negatives from, got "
                f"{negative_buffer!r}."
            )
        self.sources, self.region_stores = list(sources), list(region_stores)
        self.probabilities = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.tokenizer = tokenizer
        self.max_text_length, self.max_regions = max_text_length, max_regions
        self.seed = int(seed)
        self.itm_negative_probability, self.text_negative_share = itm_negative_probability, text_negative_share
        self.group_size, self.pool_size = int(group_size), int(group_size) * int(pool_groups)
        self.negative_buffer = negative_buffer
        self._warnings = _WarningBudget(max_warnings)

    def _pairs(self, source_index: int, where: str) -> Iterator[tuple[str, str]]:
        source, epoch = self.sources[source_index], 0
        while True:
            count = 0
            for pair in source.epoch_pairs(epoch):
                count += 1
                yield pair
            if count == 0:
                raise ValueError(
                    f"streaming source {source.name!r} gave {where} no pairs: it is empty, or has fewer shards than "
                    "processes x DataLoader workers (each reads whole shards)."
                )
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        from collections import deque

        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        rank = int(os.environ.get("RANK", 0))
        where = f"process {rank}, worker {worker_id}"
        rng = np.random.default_rng([self.seed, rank, worker_id])
        streams = [self._pairs(i, where) for i in range(len(self.sources))]
        recent = [deque(maxlen=self.negative_buffer) for _ in self.sources]
        recent_captions = [CaptionPictures() for _ in self.sources]
        pool: list[tuple[int, str, str, int, int]] = []
        while True:
            source_index = int(rng.choice(len(self.sources), p=self.probabilities))
            try:
                key, caption = next(streams[source_index])
            except StopIteration:  # a source's stream never ends; if one does, say which instead of stopping silently
                raise RuntimeError(
                    f"streaming source {self.sources[source_index].name!r} stopped ({where}); streams are endless."
                ) from None
            region_key, text, label = key, caption, 1
            candidates = recent[source_index]
            # The picture, not the name: a region cache holds one row for every name of a picture.
            row = _cache_row(self.region_stores[source_index], key)
            picture = ("key", key) if row is None else ("row", row)
            own_caption = caption_key(caption)
            negative = choose_negative(
                rng,
                picture,
                len(candidates),
                lambda other: candidates[other][2],
                self.itm_negative_probability,
                self.text_negative_share,
                caption_fits=lambda other: recent_captions[source_index].fit(
                    own_caption, picture, candidates[other][3], candidates[other][2]
                ),
            )
            if negative is not None:
                label = 0
                if negative.swap_text:
                    text = candidates[negative.partner][1]
                else:
                    region_key = candidates[negative.partner][0]
            if len(candidates) == candidates.maxlen:
                recent_captions[source_index].discard(candidates[0][3], candidates[0][2])
            candidates.append((key, caption, picture, own_caption))
            recent_captions[source_index].add(own_caption, picture)
            pool.append((source_index, region_key, text, label, int(rng.integers(0, 2**62))))
            if len(pool) >= max(self.pool_size, 1):
                yield from self._emit(pool, rng)
                pool = []

    def _emit(self, pool: list[tuple[int, str, str, int, int]], rng: np.random.Generator):
        encoded = tokenize_as_text(
            self.tokenizer,
            [text for _, _, text, _, _ in pool],
            name="caption",
            truncation=True,
            max_length=self.max_text_length,
        )
        token_types = encoded.get("token_type_ids")
        order = list(range(len(pool)))
        if self.group_size > 1:
            lengths = []
            for row, (source_index, region_key, _, _, _) in enumerate(pool):
                regions = _stored_region_count(self.region_stores[source_index], region_key, self.max_regions)
                lengths.append(None if regions is None else (regions, len(encoded["input_ids"][row])))
            order = group_by_length(order, lengths, self.group_size, self.pool_size, rng)
        for row in order:
            source_index, region_key, _, label, sample_seed = pool[row]
            try:
                regions = region_arrays(self.region_stores[source_index], region_key, self.max_regions)
            except Exception as error:  # noqa: BLE001 - any unreadable record is skipped and counted, never fatal
                name = self.sources[source_index].name
                self._warnings.warn(f"skipping a pair of source {name!r} (image {region_key!r}): {error!r}")
                yield None
                continue
            yield {
                "input_ids": encoded["input_ids"][row],
                "token_type_ids": None if token_types is None else token_types[row],
                **regions,
                "image_id": region_key,
                "itm_labels": label,
                "sample_seed": sample_seed,
            }


def stable_seed(*parts: Any) -> int:
    """A seed from strings and ints that is the same in every process (unlike `hash`)."""
    return zlib.crc32("\x1f".join(str(part) for part in parts).encode()) & 0x7FFFFFFF


__all__ = [
    "DatasetPairSource",
    "DatasetStream",
    "ManifestPairSource",
    "MixtureSampler",
    "PairSource",
    "PretrainingPairDataset",
    "StreamingPairSource",
    "StreamingPretrainingDataset",
    "SyntheticPairSource",
    "WebDatasetPairSource",
    "WebDatasetStream",
    "expand_urls",
    "group_by_length",
    "length_groups",
    "open_region_store",
    "region_arrays",
    "stable_seed",
]
