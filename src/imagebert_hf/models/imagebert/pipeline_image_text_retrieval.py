"""`pipeline("image-text-retrieval")`: rank texts for images, images for texts, or score given pairs.

This file is copied next to the weights by `pipe.save_pretrained(dir)` and then loaded by
`pipeline(model=dir, trust_remote_code=True)` in environments without `imagebert_hf`, so it imports only torch,
numpy, PIL and transformers (faiss when installed), and no other module of the package.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModel, Pipeline
from transformers.utils import logging


try:  # exact and approximate (IVF, HNSW) search when faiss is installed; a torch matrix product otherwise
    import faiss
except ImportError:
    faiss = None

logger = logging.get_logger(__name__)

MODES = ("rank_texts", "rank_images", "pairs")
INDEX_TYPES = ("flat", "ivf", "hnsw")
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
REGION_KEYS = ("region_features", "region_locations", "region_attention_mask")


def _describe(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return repr(os.fspath(item))
    if isinstance(item, Mapping):
        return f"cached regions {item.get('image_id', '')!r}".replace(" ''", "")
    return type(item).__name__


class _Items:
    """Holds the caller's inputs through `Pipeline.forward`, which would otherwise copy dicts (region records) and
    lists on their way to the device; results then point at the very objects that were passed in."""

    def __init__(self, items: list):
        self.items = items


def _is_image_list(images: Any) -> bool:
    return isinstance(images, (list, tuple))


@dataclass
class RetrievalIndex:
    """A prebuilt gallery for repeated queries: its model inputs, unimodal embeddings and a search index.

    Build it with `ImageTextRetrievalPipeline.build_index(images=...)` (a gallery of images, queried with texts) or
    `build_index(texts=...)` (a gallery of texts, queried with images).

    Attributes:
        kind: `"images"` or `"texts"`, what the gallery holds.
        items: the gallery as given (texts, or the images' paths / PIL images / region records).
        inputs: the gallery's model inputs (region inputs or token ids), so the cross-encoder re-ranks without
            re-extracting or re-tokenizing.
        embeddings: `(len(items), dim)` L2-normalised unimodal embeddings.
        index_type: `"flat"` (exact), `"ivf"` or `"hnsw"` (approximate, faiss only).
    """

    kind: str
    items: list
    inputs: dict[str, torch.Tensor]
    embeddings: torch.Tensor
    index_type: str = "flat"
    _faiss_index: Any = None

    def __len__(self) -> int:
        return len(self.items)

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Indices `(num_queries, min(k, len(self)))` of the most similar gallery items, best first."""
        k = min(k, len(self))
        if self._faiss_index is None:
            return (queries.float().cpu() @ self.embeddings.T).topk(k, dim=1).indices
        _, indices = self._faiss_index.search(queries.float().cpu().contiguous().numpy(), k)
        indices = torch.from_numpy(indices).long()
        if (indices < 0).any():  # an approximate index may find fewer than k: complete with exact search
            exact = (queries.float().cpu() @ self.embeddings.T).topk(k, dim=1).indices
            indices = torch.where(indices < 0, exact, indices)
        return indices


def _build_faiss_index(embeddings: torch.Tensor, index_type: str, nlist: int | None, nprobe: int, hnsw_m: int):
    if faiss is None:
        if index_type != "flat":
            raise ImportError(f"index_type={index_type!r} needs faiss: pip install faiss-cpu.")
        return None
    vectors = embeddings.float().contiguous().numpy()
    dim = vectors.shape[1]
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "ivf":
        nlist = nlist or max(1, min(int(4 * len(vectors) ** 0.5), len(vectors) // 39 or 1))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(nprobe, nlist)
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.add(vectors)
    return index


class ImageTextRetrievalPipeline(Pipeline):
    """Image-text retrieval with an ImageBERT cross-encoder.

    Three modes (`mode=`), inferred when the inputs make them clear:

    - `"rank_texts"`: each image ranks the texts (one image and a list of texts infers it);
    - `"rank_images"`: each text ranks the images (a list of images and one text infers it);
    - `"pairs"`: `images[i]` and `texts[i]` are scored together (one image and one text infers it).

    Images are PIL images, file paths or cached region records (dicts with `region_features` and
    `region_locations`, as the region cache stores them); the pipeline's processor turns them into model inputs.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> retriever = pipeline("image-text-retrieval", model="path/to/imagebert-retrieval")
    >>> retriever(images="dog.jpg", texts=["a dog on the grass", "a plate of food"], top_k=1)
    [{'score': 3.2, 'probability': 0.96, 'index': 0, 'text': 'a dog on the grass'}]
    >>> gallery = retriever.build_index(images=["dog.jpg", "food.jpg", "car.jpg"])
    >>> retriever(texts="a red car", index=gallery, top_k=2)
    ```

    Call parameters:
        images: one image or a list (optional when `index` holds the images).
        texts: one text or a list (optional when `index` holds the texts).
        mode (`str`, *optional*): one of `MODES`; needed when both images and texts are lists.
        top_k (`int`, *optional*): results per query; all by default. A `top_k` larger than the gallery is
            clamped to the gallery size (every candidate is returned, ranked).
        batch_size (`int`, *optional*, defaults to 64): pairs per cross-encoder forward pass and images per
            processor call.
        shortlist_k (`int`, *optional*): re-rank only each query's `shortlist_k` nearest candidates by the
            unimodal embeddings (always at least `top_k`). Full ranking by default, or 128 with an `index`.
        index (`RetrievalIndex`, *optional*): a prebuilt gallery from `build_index`.

    Bad input raises a `ValueError` (or `TypeError`) that names the argument: empty lists, a missing side, pair
    lists of different lengths, and unreadable images. All unreadable images of a call are listed together; no
    image is ever dropped silently.
    """

    # The processor is loaded in __init__ rather than by the pipeline factory, so that a folder saved without its
    # processor still serves texts and cached regions (see `_load_processor_for`).
    _load_processor = False
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    default_batch_size = 64
    default_index_shortlist = 128

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            self.processor = _load_processor_for(self.model)
        missing = [name for name in ("get_text_embeddings", "get_region_embeddings") if not hasattr(self.model, name)]
        if missing:
            raise TypeError(
                f"{type(self.model).__name__} is not an image-text retrieval model (it has no {', '.join(missing)}); "
                "load ImageBERTForImageTextRetrieval."
            )

    # ------------------------------------------------------------------------------------------------------------
    # Parameters and entry point
    # ------------------------------------------------------------------------------------------------------------

    def _sanitize_parameters(self, mode=None, top_k=None, batch_size=None, shortlist_k=None, index=None, **kwargs):
        if kwargs:
            raise TypeError(f"unknown argument(s) {sorted(kwargs)} for the image-text-retrieval pipeline.")
        preprocess, forward, postprocess = {}, {}, {}
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
            preprocess["mode"] = mode
        if index is not None:
            if not isinstance(index, RetrievalIndex):
                raise TypeError(f"index must be a RetrievalIndex from build_index(), got {type(index).__name__}.")
            preprocess["index"] = index
        if batch_size is not None:
            if int(batch_size) < 1:
                raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
            preprocess["batch_size"] = forward["batch_size"] = int(batch_size)
        if shortlist_k is not None:
            if int(shortlist_k) < 1:
                raise ValueError(f"shortlist_k must be at least 1, got {shortlist_k}.")
            forward["shortlist_k"] = int(shortlist_k)
        if top_k is not None:
            if int(top_k) < 1:
                raise ValueError(f"top_k must be at least 1, got {top_k}.")
            postprocess["top_k"] = forward["top_k"] = int(top_k)
        return preprocess, forward, postprocess

    def __call__(self, images=None, texts=None, **kwargs):
        """See the class docstring. Returns, per image query (`rank_texts`) or text query (`rank_images`), a list of
        `{"score", "probability", "index", "text" | "image"}` best first (a list of such lists for several queries);
        for `pairs`, one `{"score", "probability"}` per pair (a single dict for a single pair)."""
        preprocess, forward, postprocess = self._sanitize_parameters(**kwargs)
        if self._batch_size is not None:
            preprocess.setdefault("batch_size", self._batch_size)
            forward.setdefault("batch_size", self._batch_size)
        preprocess = {**self._preprocess_params, **preprocess}
        forward = {**self._forward_params, **forward}
        postprocess = {**self._postprocess_params, **postprocess}
        return self.run_single({"images": images, "texts": texts}, preprocess, forward, postprocess)

    # ------------------------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------------------------

    def _load_images(self, images: Sequence) -> list:
        """Opens paths and checks every item; raises once, naming every unreadable image."""
        from PIL import Image

        loaded, errors = [], []
        for position, item in enumerate(images):
            if isinstance(item, Mapping):
                if "region_features" not in item or "region_locations" not in item:
                    errors.append(
                        f"images[{position}] ({_describe(item)}): a region record needs region_features and "
                        "region_locations"
                    )
                elif item.get("error"):
                    errors.append(f"images[{position}] ({_describe(item)}): its extraction failed: {item['error']}")
                loaded.append(item)
            elif isinstance(item, (str, os.PathLike)):
                try:
                    with Image.open(item) as image:
                        image.load()
                        loaded.append(image.convert("RGB"))
                except Exception as error:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError)
                    errors.append(f"images[{position}] ({_describe(item)}): {type(error).__name__}: {error}")
                    loaded.append(None)
            elif isinstance(item, Image.Image):
                loaded.append(item)
            else:
                errors.append(
                    f"images[{position}]: expected a PIL image, a file path or a region record, got "
                    f"{type(item).__name__}"
                )
                loaded.append(None)
        if errors:
            raise ValueError(
                f"{len(errors)} of {len(images)} image(s) could not be used, so nothing was scored:\n  "
                + "\n  ".join(errors)
            )
        return loaded

    def _text_inputs(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        for position, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{position}] is a {type(text).__name__}; expected a string.")
        encoded = self.processor(text=list(texts), return_tensors="pt")
        out = {key: encoded[key] for key in TEXT_KEYS if key in encoded}
        out.setdefault("attention_mask", torch.ones_like(out["input_ids"]))
        out.setdefault("token_type_ids", torch.zeros_like(out["input_ids"]))
        return out

    def _region_inputs(self, images: Sequence, batch_size: int) -> dict[str, torch.Tensor]:
        loaded = self._load_images(images)
        chunks = []
        for start in range(0, len(loaded), batch_size):
            chunk = loaded[start : start + batch_size]
            cached = [isinstance(item, Mapping) for item in chunk]
            # Region records and pixels take different processor paths; a mixed chunk runs both, in order.
            groups, current = [], [chunk[0]]
            for previous_cached, item_cached, item in zip(cached, cached[1:], chunk[1:]):
                if item_cached == previous_cached:
                    current.append(item)
                else:
                    groups.append(current)
                    current = [item]
            groups.append(current)
            for group in groups:
                if isinstance(group[0], Mapping):
                    encoded = self.processor(regions=group, return_tensors="pt")
                else:
                    encoded = self.processor(images=group, return_tensors="pt")
                chunks.append({key: encoded[key] for key in REGION_KEYS if key in encoded})
        return _concat_regions(chunks)

    def preprocess(self, inputs: dict, mode: str | None = None, index: RetrievalIndex | None = None, batch_size=None):
        images, texts = inputs["images"], inputs["texts"]
        batch_size = batch_size or self.default_batch_size
        single_image = images is not None and not _is_image_list(images)
        single_text = isinstance(texts, str)
        image_list = None if images is None else ([images] if single_image else list(images))
        if texts is not None and not single_text and not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}.")
        text_list = None if texts is None else ([texts] if single_text else list(texts))
        if image_list is not None and not image_list:
            raise ValueError("images is an empty list: give at least one image.")
        if text_list is not None and not text_list:
            raise ValueError("texts is an empty list: give at least one text.")

        if index is not None:
            inferred = "rank_images" if index.kind == "images" else "rank_texts"
            if mode not in (None, inferred):
                raise ValueError(f"an index of {index.kind} serves mode {inferred!r}, not {mode!r}.")
            mode = inferred
            if index.kind == "images":
                if images is not None:
                    raise ValueError("the index already holds the images: give only texts (the queries).")
                if text_list is None:
                    raise ValueError("the index holds images: give texts= to query it with.")
            else:
                if texts is not None:
                    raise ValueError("the index already holds the texts: give only images (the queries).")
                if image_list is None:
                    raise ValueError("the index holds texts: give images= to query it with.")
        else:
            if image_list is None and text_list is None:
                raise ValueError("give images and texts (or a prebuilt index and the queries); got neither.")
            if image_list is None:
                raise ValueError("texts were given without images: image-text retrieval needs both (or index=).")
            if text_list is None:
                raise ValueError("images were given without texts: image-text retrieval needs both (or index=).")
            if mode is None:
                if single_image and single_text:
                    mode = "pairs"
                elif single_image:
                    mode = "rank_texts"
                elif single_text:
                    mode = "rank_images"
                else:
                    raise ValueError(
                        f"{len(image_list)} images and {len(text_list)} texts: say what to do with mode='rank_texts' "
                        "(each image ranks the texts), 'rank_images' (each text ranks the images) or 'pairs' "
                        "(images[i] with texts[i])."
                    )
            if mode == "pairs" and len(image_list) != len(text_list):
                raise ValueError(
                    f"mode='pairs' scores images[i] with texts[i], but there are {len(image_list)} images and "
                    f"{len(text_list)} texts."
                )

        return {
            "mode": mode,
            "index": index,
            "images": _Items(image_list if image_list is not None else index.items),
            "texts": _Items(text_list if text_list is not None else index.items),
            "single_query": single_image if mode == "rank_texts" else single_text,
            "single_pair": single_image and single_text,
            "text_inputs": self._text_inputs(text_list) if text_list is not None else index.inputs,
            "region_inputs": (self._region_inputs(image_list, batch_size) if image_list is not None else index.inputs),
        }

    # ------------------------------------------------------------------------------------------------------------
    # Scoring
    # ------------------------------------------------------------------------------------------------------------

    def _score(self, text_inputs, region_inputs, image_index, text_index, batch_size: int) -> torch.Tensor:
        scores = torch.empty(image_index.numel())
        for start in range(0, image_index.numel(), batch_size):
            images = image_index[start : start + batch_size]
            texts = text_index[start : start + batch_size]
            text_mask = text_inputs["attention_mask"][texts]
            region_mask = region_inputs["region_attention_mask"][images]
            # Padding never changes a score, so each batch is cut to its longest text and most regions.
            length = max(int(text_mask.sum(1).max()), 1)
            count = max(int(region_mask.sum(1).max()), 1)
            batch = {key: text_inputs[key][texts, :length] for key in TEXT_KEYS}
            batch.update({key: region_inputs[key][images, :count] for key in REGION_KEYS})
            batch = {key: value.to(self.device) for key, value in batch.items()}
            scores[start : start + batch_size] = self.model(**batch).logits.float().cpu()
        return scores

    def _embed_texts(self, text_inputs, batch_size: int) -> torch.Tensor:
        chunks = []
        for start in range(0, text_inputs["input_ids"].shape[0], batch_size):
            batch = {key: text_inputs[key][start : start + batch_size].to(self.device) for key in TEXT_KEYS}
            chunks.append(self.model.get_text_embeddings(**batch).float().cpu())
        return torch.cat(chunks)

    def _embed_images(self, region_inputs, batch_size: int) -> torch.Tensor:
        chunks = []
        for start in range(0, region_inputs["region_features"].shape[0], batch_size):
            batch = {key: region_inputs[key][start : start + batch_size].to(self.device) for key in REGION_KEYS}
            chunks.append(self.model.get_region_embeddings(**batch).float().cpu())
        return torch.cat(chunks)

    def _forward(self, model_inputs, batch_size=None, shortlist_k=None, top_k=None):
        self.model.eval()
        batch_size = batch_size or self.default_batch_size
        mode, index = model_inputs["mode"], model_inputs["index"]
        text_inputs = {key: value.cpu() for key, value in model_inputs["text_inputs"].items()}
        region_inputs = {key: value.cpu() for key, value in model_inputs["region_inputs"].items()}
        num_images = region_inputs["region_features"].shape[0]
        num_texts = text_inputs["input_ids"].shape[0]
        if mode == "pairs":
            pairs = torch.arange(num_images)
            scores = self._score(text_inputs, region_inputs, pairs, pairs, batch_size)
            return {**model_inputs, "candidates": pairs[:, None], "scores": scores[:, None]}

        num_queries, gallery_size = (num_images, num_texts) if mode == "rank_texts" else (num_texts, num_images)
        if shortlist_k is None and index is not None:
            shortlist_k = self.default_index_shortlist
        if shortlist_k is not None and top_k is not None:
            shortlist_k = max(shortlist_k, top_k)
        if shortlist_k is None or shortlist_k >= gallery_size:
            candidates = torch.arange(gallery_size).expand(num_queries, gallery_size)
        else:
            if mode == "rank_texts":
                queries = self._embed_images(region_inputs, batch_size)
                gallery = index if index is not None else self._make_index("texts", [], text_inputs, batch_size)
            else:
                queries = self._embed_texts(text_inputs, batch_size)
                gallery = index if index is not None else self._make_index("images", [], region_inputs, batch_size)
            candidates = gallery.search(queries, shortlist_k)
        queries = torch.arange(num_queries)[:, None].expand_as(candidates).reshape(-1)
        flat = candidates.reshape(-1)
        image_index, text_index = (queries, flat) if mode == "rank_texts" else (flat, queries)
        scores = self._score(text_inputs, region_inputs, image_index, text_index, batch_size)
        return {**model_inputs, "candidates": candidates, "scores": scores.view_as(candidates)}

    def postprocess(self, model_outputs, top_k=None):
        mode, scores, candidates = model_outputs["mode"], model_outputs["scores"], model_outputs["candidates"]
        probabilities = torch.sigmoid(scores)
        if mode == "pairs":
            results = [{"score": s.item(), "probability": p.item()} for s, p in zip(scores[:, 0], probabilities[:, 0])]
            return results[0] if model_outputs["single_pair"] else results
        gallery = (model_outputs["texts"] if mode == "rank_texts" else model_outputs["images"]).items
        field = "text" if mode == "rank_texts" else "image"
        keep = candidates.shape[1] if top_k is None else min(top_k, candidates.shape[1])
        results = []
        for row_scores, row_probabilities, row_candidates in zip(scores, probabilities, candidates):
            order = torch.sort(row_scores, descending=True, stable=True).indices[:keep]
            results.append(
                [
                    {
                        "score": row_scores[i].item(),
                        "probability": row_probabilities[i].item(),
                        "index": int(row_candidates[i]),
                        field: gallery[int(row_candidates[i])],
                    }
                    for i in order.tolist()
                ]
            )
        return results[0] if model_outputs["single_query"] else results

    # ------------------------------------------------------------------------------------------------------------
    # Prebuilt galleries and saving
    # ------------------------------------------------------------------------------------------------------------

    def _make_index(self, kind, items, inputs, batch_size, index_type="flat", nlist=None, nprobe=16, hnsw_m=32):
        with torch.no_grad():
            if kind == "images":
                embeddings = self._embed_images(inputs, batch_size)
            else:
                embeddings = self._embed_texts(inputs, batch_size)
        faiss_index = _build_faiss_index(embeddings, index_type, nlist, nprobe, hnsw_m)
        return RetrievalIndex(kind, list(items), inputs, embeddings, index_type, faiss_index)

    def build_index(
        self,
        images=None,
        texts=None,
        index_type: str = "flat",
        batch_size: int | None = None,
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
    ) -> RetrievalIndex:
        """Prepares a gallery once (regions or tokens, embeddings, search index) for many queries.

        Args:
            images: the gallery images (PIL, paths or region records), queried later with `texts=`.
            texts: the gallery texts, queried later with `images=`. Give exactly one of the two.
            index_type: `"flat"` (exact), `"ivf"` or `"hnsw"` (approximate; faiss needed).
            batch_size: images per processor call and inputs per embedding pass.
            nlist, nprobe: IVF cells and cells visited per query. hnsw_m: HNSW graph degree.
        """
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}.")
        if (images is None) == (texts is None):
            raise ValueError("build_index takes either images= or texts= (the gallery), not both or neither.")
        batch_size = batch_size or self._batch_size or self.default_batch_size
        self.model.eval()
        if images is not None:
            items = list(images) if _is_image_list(images) else [images]
            if not items:
                raise ValueError("images is an empty list: an index needs at least one image.")
            inputs = self._region_inputs(items, batch_size)
            kind = "images"
        else:
            items = [texts] if isinstance(texts, str) else list(texts)
            if not items:
                raise ValueError("texts is an empty list: an index needs at least one text.")
            inputs = self._text_inputs(items)
            kind = "texts"
        inputs = {key: value.cpu() for key, value in inputs.items()}
        return self._make_index(kind, items, inputs, batch_size, index_type, nlist, nprobe, hnsw_m)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Saves model, processor (tokenizer, region extractor and its weights) and the code of all of them
        (pipeline, modeling, processing, region extraction), so that `pipeline(model=save_directory,
        trust_remote_code=True)` works, raw images included, where `imagebert_hf` is not installed."""
        # The remote pipeline loads its model through AutoModel (transformers resolves the model classes of a custom
        # pipeline by name among its own), so the folder's auto_map sends AutoModel to the retrieval class.
        auto_classes = [(type(self.model), "AutoModel"), (type(self.model.config), "AutoConfig")]
        auto_classes.append((type(self.processor), "AutoProcessor"))
        image_processor = getattr(self.processor, "image_processor", None)
        if image_processor is not None:
            auto_classes.append((type(image_processor), "AutoImageProcessor"))
        auto_classes = [
            (cls, name)
            for cls, name in auto_classes
            if not cls.__module__.startswith("transformers.") and hasattr(cls, "register_for_auto_class")
        ]
        previous = [(cls, cls.__dict__.get("_auto_class")) for cls, _ in auto_classes]
        registered = getattr(self, "_registered_impl", None)
        try:
            for cls, name in auto_classes:
                cls.register_for_auto_class(name)
            if registered is not None:
                self._registered_impl = {task: {**info, "pt": (AutoModel,)} for task, info in registered.items()}
            super().save_pretrained(save_directory, **kwargs)
            self.processor.save_pretrained(save_directory)
        finally:
            # register_for_auto_class is class-wide; leave other saves of these classes as they were.
            for cls, value in previous:
                if value is None:
                    cls._auto_class = None
                else:
                    cls._auto_class = value
            if registered is not None:
                self._registered_impl = registered


class RegionsOnlyProcessor:
    """Stands in for the model's processor in a folder saved without it (a model and tokenizer only): tokenizes
    texts and pads cached region records, and refuses raw images with a clear message."""

    def __init__(self, tokenizer, max_text_length: int, max_regions: int):
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.max_regions = max_regions
        self.image_processor = None

    def __call__(self, images=None, text=None, regions=None, return_tensors="pt"):
        if images is not None:
            raise ValueError(
                "this pipeline was loaded without its region extractor (the folder has no processor), so it cannot "
                "read images; save the model with its ImageBERTProcessor, or pass cached region records (dicts "
                "with region_features and region_locations) as images."
            )
        out = {}
        if text is not None:
            encoded = self.tokenizer(
                [text] if isinstance(text, str) else list(text),
                padding="max_length",
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
            )
            out.update({key: encoded[key] for key in TEXT_KEYS if key in encoded})
        if regions is not None:
            records = [regions] if isinstance(regions, Mapping) else list(regions)
            feature_size = len(records[0]["region_features"][0])
            out["region_features"] = torch.zeros(len(records), self.max_regions, feature_size)
            location_size = len(records[0]["region_locations"][0])
            out["region_locations"] = torch.zeros(len(records), self.max_regions, location_size)
            out["region_attention_mask"] = torch.zeros(len(records), self.max_regions, dtype=torch.long)
            for row, record in enumerate(records):
                features = torch.as_tensor(record["region_features"], dtype=torch.float32)[: self.max_regions]
                count = features.shape[0]
                out["region_features"][row, :count] = features
                out["region_locations"][row, :count] = torch.as_tensor(
                    record["region_locations"], dtype=torch.float32
                )[:count]
                out["region_attention_mask"][row, :count] = 1
        return out

    def save_pretrained(self, save_directory, **kwargs):
        return self.tokenizer.save_pretrained(save_directory, **kwargs)


def _load_processor_for(model):
    """The processor saved with the model, or a `RegionsOnlyProcessor` where the folder has none that loads."""
    from transformers import AutoProcessor, AutoTokenizer

    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not path:
        raise ValueError(
            "ImageTextRetrievalPipeline needs the model's processor (tokenizer + region extractor): pass "
            "processor=... or load the model from a folder that holds processor_config.json."
        )
    # Run the folder's code only when the model already comes from it (the user passed trust_remote_code=True).
    trust = type(model).__module__.startswith("transformers_modules")
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust)
        reason = "AutoProcessor gave a tokenizer only"
        if getattr(processor, "image_processor", None) is not None:
            return processor
    except Exception as error:  # unregistered processor class, missing code or files: fall back to text + regions
        reason = f"{type(error).__name__}: {error}"
    logger.warning(
        "Could not load the region processor of %s (%s); images must be given as cached region records.", path, reason
    )
    return RegionsOnlyProcessor(
        AutoTokenizer.from_pretrained(path, trust_remote_code=trust),
        model.config.max_text_length,
        model.config.max_regions,
    )


def _concat_regions(chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenates region inputs of several processor calls, padding the region axis to the widest."""
    width = max(chunk["region_features"].shape[1] for chunk in chunks)
    out = {key: [] for key in REGION_KEYS}
    for chunk in chunks:
        mask = chunk.get("region_attention_mask")
        if mask is None:
            mask = torch.ones(chunk["region_features"].shape[:2], dtype=torch.long)
        pad = width - chunk["region_features"].shape[1]
        out["region_features"].append(torch.nn.functional.pad(chunk["region_features"].float(), (0, 0, 0, pad)))
        out["region_locations"].append(torch.nn.functional.pad(chunk["region_locations"].float(), (0, 0, 0, pad)))
        out["region_attention_mask"].append(torch.nn.functional.pad(mask.long(), (0, pad)))
    return {key: torch.cat(values) for key, values in out.items()}


def register_pipeline() -> None:
    """Registers `"image-text-retrieval"` with transformers' pipeline registry. Safe to call twice."""
    from transformers.pipelines import PIPELINE_REGISTRY

    try:
        from imagebert_hf.models.imagebert.modeling_auto import AutoModelForImageTextRetrieval

        model_class = AutoModelForImageTextRetrieval
    except ImportError:  # loaded as remote code: transformers' own AutoModel reads the folder's auto_map
        model_class = AutoModel
    PIPELINE_REGISTRY.register_pipeline(
        "image-text-retrieval",
        pipeline_class=ImageTextRetrievalPipeline,
        pt_model=model_class,
        type="multimodal",
    )


__all__ = ["MODES", "ImageTextRetrievalPipeline", "RetrievalIndex", "register_pipeline"]
