"""The `imagebert-extract-regions` command: extract a region cache, join the parts of a split run, or verify a
cache (`python -m imagebert_hf.regions ...` runs the same `main`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from ..formats.files import check_folder_or_hub_id, check_output_dir, expand_home
from ..formats.manifest import outside_root_flag
from ..models.imagebert.script_errors import exit_on_error, parse_flags
from .cache_layout import REPORT_NAME


@dataclass
class ExtractRegionsArguments:
    """Arguments of `imagebert-extract-regions`."""

    output_dir: str = field(metadata={"help": "Folder of the region cache (an unfinished one is resumed)."})
    manifest: str | None = field(
        default=None,
        metadata={"help": "A jsonl manifest: one image per line, as `imagebert_hf.formats.manifest` describes."},
    )
    dataset_path: str | None = field(
        default=None, metadata={"help": "A datasets folder saved with save_to_disk, instead of a manifest."}
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Folder the manifest's image paths are relative to (its own by default)."}
    )
    allow_outside_root: bool = outside_root_flag("the manifest")
    image_column: str = field(default="image", metadata={"help": "Dataset column of the images."})
    key_column: str | None = field(default=None, metadata={"help": "Dataset column naming each row."})
    use_boxes: bool = field(
        default=False, metadata={"help": "Pool over the manifest's object boxes instead of the extractor's regions."}
    )
    extractor: str | None = field(
        default=None,
        metadata={"help": "A saved ImageBERTRoIExtractor folder; the offline EfficientNet-Lite0 default if unset."},
    )
    max_regions: int | None = field(
        default=None,
        metadata={
            "help": "Most regions per image of the default extractor (100 when unset); a saved --extractor keeps its own."
        },
    )
    shard_size: int = field(default=512, metadata={"help": "Distinct images per shard."})
    num_proc: int = field(default=1, metadata={"help": "Worker processes."})
    batch_size: int = field(default=8, metadata={"help": "Images per extractor forward."})
    no_class_probs: bool = field(
        default=False, metadata={"help": "Do not store region class distributions (smaller cache)."}
    )
    storage_dtype: str = field(
        default="float16",
        metadata={"help": "float16 (half the size) or float32 for features and class distributions."},
    )
    num_shards: int = field(default=1, metadata={"help": "Machines the extraction is split across."})
    shard_index: int = field(default=0, metadata={"help": "This machine's part (0 .. num_shards - 1)."})
    merge: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Instead of extracting, join these part folders (one per shard_index) into output_dir.",
            "nargs": "*",
        },
    )
    verify: bool = field(
        default=False,
        metadata={
            "help": "Instead of extracting, check every file of the cache in output_dir: shard files and the index "
            "against the checksums recorded when it was written, the extractor and shard metadata by reading them "
            "(exit status 1 and the damaged file's name when one fails)."
        },
    )


# The flags each mode reads besides --output_dir; any other flag given a value of its own is refused, since it would
# be accepted and change nothing.
_EXTRACTION_FLAGS = (
    "extractor",
    "max_regions",
    "shard_size",
    "num_proc",
    "batch_size",
    "no_class_probs",
    "storage_dtype",
    "num_shards",
    "shard_index",
)
_MODE_FLAGS = {
    "--verify": ("verify",),
    "--merge": ("merge",),
    "--manifest": ("manifest", "image_root", "allow_outside_root", "use_boxes", *_EXTRACTION_FLAGS),
    "--dataset_path": ("dataset_path", "image_column", "key_column", *_EXTRACTION_FLAGS),
}
_MODE_WORDS = {
    "--verify": "checks the cache in --output_dir as it was written",
    "--merge": "joins finished parts as their machines extracted them",
    "--manifest": "reads its images and keys from the manifest's lines",
    "--dataset_path": "reads its images from the dataset's image column",
}


def _default(name: str):
    (found,) = (f for f in fields(ExtractRegionsArguments) if f.name == name)
    return found.default_factory() if found.default is MISSING else found.default


def _refuse_other_flags(args: ExtractRegionsArguments, mode: str) -> None:
    """Refuses a flag that `mode` does not read (one given a value other than its default), naming both."""
    for item in fields(args):
        if item.name == "output_dir" or item.name in _MODE_FLAGS[mode]:
            continue
        value = getattr(args, item.name)
        if value == _default(item.name):
            continue
        if mode == "--dataset_path" and item.name in ("use_boxes", "image_root", "allow_outside_root"):
            raise ValueError(
                f"--{item.name} applies to a manifest (its object boxes, its relative image paths), not to "
                f"--dataset_path {args.dataset_path}, whose image column holds the images"
            )
        given = "" if isinstance(value, bool) else " " + (" ".join(value) if isinstance(value, list) else str(value))
        raise ValueError(f"--{item.name}{given} does not apply to {mode}, which {_MODE_WORDS[mode]}; drop it")


def _expand_paths(args: ExtractRegionsArguments) -> ExtractRegionsArguments:
    """The path flags with "~" expanded (`expand_home`), as datasets and fsspec expand it: unexpanded, a cache would
    be split between a folder named "~" and the home folder."""
    paths = ("output_dir", "manifest", "dataset_path", "image_root", "extractor", "merge")
    return replace(args, **expand_home({name: getattr(args, name) for name in paths}))


# The cache's reader and writer (and torch with them) are imported by the command that needs them, so `--help` is fast.
def _verify(args: ExtractRegionsArguments) -> int:
    from .cache_reader import verify_region_cache

    if args.merge or args.manifest is not None or args.dataset_path is not None:
        raise ValueError(
            "--verify checks the cache in --output_dir; give it without --manifest, --dataset_path or --merge"
        )
    _refuse_other_flags(args, "--verify")
    checked = verify_region_cache(args.output_dir)
    print(f"{args.output_dir}: intact ({checked} files match their recorded checksums)")
    return 0


def _merge(args: ExtractRegionsArguments) -> int:
    from .cache_writer import merge_region_caches

    _refuse_other_flags(args, "--merge")
    check_output_dir(args.output_dir)
    report = merge_region_caches(args.merge, args.output_dir)
    print(f"merged {len(args.merge)} parts: {report.num_unique} distinct images, {report.num_failed} failed")
    return 0


def _extract(args: ExtractRegionsArguments) -> int:
    from ..models.imagebert.configuration_imagebert import check_field
    from ..models.imagebert.image_processing_imagebert import ImageBERTRoIExtractor
    from .cache_writer import extract_regions

    if (args.manifest is None) == (args.dataset_path is None):
        raise ValueError("give exactly one of --manifest and --dataset_path")
    # Flags that would otherwise be accepted and have no effect on what is extracted.
    if args.extractor is not None and args.max_regions is not None:
        raise ValueError(
            f"--max_regions {args.max_regions} applies to the default extractor; the saved --extractor "
            f"{args.extractor} keeps its own max_regions (save it again with the limit you want)"
        )
    _refuse_other_flags(args, "--manifest" if args.manifest is not None else "--dataset_path")
    if args.max_regions is not None:
        check_field("--max_regions", args.max_regions, "int", 1, None)
    check_output_dir(args.output_dir)
    if args.extractor is not None:
        check_folder_or_hub_id(
            args.extractor, "--extractor", "a folder saved with ImageBERTRoIExtractor.save_pretrained"
        )
    if args.dataset_path is not None:
        from datasets import DatasetDict, load_from_disk

        source = load_from_disk(args.dataset_path)
        if isinstance(source, DatasetDict):
            splits = list(source)
            example = Path(args.dataset_path) / (splits[0] if splits else "train")
            raise ValueError(
                f"--dataset_path {args.dataset_path} holds a DatasetDict of the splits {splits}; give one split's "
                f"folder (e.g. --dataset_path {example})"
            )
    else:
        if not Path(args.manifest).is_file():
            found = "a folder" if Path(args.manifest).is_dir() else "no such file"
            raise FileNotFoundError(f"--manifest {args.manifest}: {found} (expected a jsonl manifest)")
        source = args.manifest
    extractor = args.extractor or ImageBERTRoIExtractor(max_regions=args.max_regions or 100)
    report = extract_regions(
        source,
        args.output_dir,
        extractor,
        image_root=args.image_root,
        allow_outside_root=args.allow_outside_root,
        use_boxes=args.use_boxes,
        image_column=args.image_column,
        key_column=args.key_column,
        shard_size=args.shard_size,
        num_proc=args.num_proc,
        batch_size=args.batch_size,
        store_class_probs=not args.no_class_probs,
        storage_dtype=args.storage_dtype,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
    )
    if report.num_failed and not report.num_extracted:
        # Some failures are normal at web scale (the report lists them, the exit status stays 0); none extracted
        # means the input itself is wrong.
        first = report.failures[0]
        raise ValueError(
            f"no image could be extracted: all {report.num_failed} failed (first: {first['key']}: {first['error']}); "
            f"reasons in {Path(args.output_dir) / REPORT_NAME}"
        )
    print(
        f"{report.num_items} items, {report.num_unique} distinct images, {report.num_extracted} extracted, "
        f"{report.num_failed} failed, {report.num_shards_skipped} shards reused in {report.seconds:.1f} s; report: "
        f"{Path(args.output_dir) / REPORT_NAME}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`imagebert-extract-regions --output_dir cache --manifest data/captions.jsonl [--num_proc 2]`.

    On several GPUs: `torchrun --nproc_per_node 8 -m imagebert_hf.regions ...` (or `accelerate
    launch`); on several machines add `--num_shards M --shard_index K`, then `--merge part0 part1 ...` when the
    machines wrote separate folders. `--output_dir cache --verify` reads every file of an existing cache and compares
    it with the checksums recorded when it was written.

    Returns 0 when the command ran and extracted at least one image (images that failed are counted and listed in
    `report.json`) or the verified cache is intact; a bad argument or input (a missing manifest or image root, an
    empty manifest, a cache of another source in `output_dir`, a damaged file of a verified cache) ends it with one
    line naming it and exit status 1, before anything is written; so does a run in which every image failed (its
    cache and `report.json` are written, with every reason). An unknown flag gets argparse's usage, exit status 2.
    """
    from transformers import HfArgumentParser

    # ImportError: the offline weights package is missing (an unknown flag ends in the parser, exit status 2)
    with exit_on_error("imagebert-extract-regions", errors=(ImportError, OSError, ValueError)):
        (args,) = parse_flags(HfArgumentParser(ExtractRegionsArguments), argv)
        args = _expand_paths(args)
        if args.verify:
            return _verify(args)
        if args.merge:
            return _merge(args)
        return _extract(args)


__all__ = ["ExtractRegionsArguments", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
