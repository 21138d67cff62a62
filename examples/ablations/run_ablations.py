"""The paper's ablations at small scale, on the bundled real data, from offline weights, with several seeds.

Text encoder: the offline MiniLM (6 layers, 384 wide); regions: the offline EfficientNet-Lite0 extractor over a
1+4+9+16 grid (30 regions, 1280-d); data: ../shared/data (Flickr8k train/dev, COCO 128). Every run writes one JSON
file to `--results_dir` (its metrics, seconds, steps, protocol and command); `make_results_page.py` turns them into
docs/results.md. A run whose JSON exists is skipped (one written with other settings, or from another `--pretrained`
checkpoint or recipe by content, is refused, naming the difference), and an interrupted one resumes from its last
checkpoint; several processes started with the same arguments share the runs between them. A run scored on another
protocol (gallery, captions per image, the flags that decide the figures) than the study's results already in
`--results_dir` is refused before anything trains: the page averages a study's runs as one protocol.

    python examples/ablations/run_ablations.py --study rerank            # cross-encoder vs dual encoder
    python examples/ablations/run_ablations.py --study finetune_losses   # binary / multi-class / triplet / all
    python examples/ablations/run_ablations.py --study stages            # single- vs multi-stage pretraining
    python examples/ablations/run_ablations.py --study mrfr_regions      # MRFR on/off, 5 / 14 / 30 regions
    python examples/ablations/make_results_page.py

Fine-tuning studies start from `--pretrained` (the real-data example's final stage, see `--help`) and are scored on
the first `--eval_images` Flickr8k dev images with all their captions, every pair by the cross-encoder.
Pretraining studies run `--pretrain_steps` steps per variant and are scored zero-shot the same way. A fine-tuned
run is shared by every study and invocation that asks for it with the same settings; one fine-tuned with others
(another `--pretrained`, step count, rate...) is refused, naming the difference, rather than reported as this one.
Exits 1 with one line on stderr when an argument or file is wrong (`exit_on_error`, as the console scripts).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import transformers
from transformers import HfArgumentParser

from imagebert_hf.formats.files import (
    atomic_write_json,
    atomic_write_text,
    check_folder_or_hub_id,
    file_checksum,
    read_json_file,
)
from imagebert_hf.models.imagebert.configuration_imagebert import SEED_RULE, check_field, check_flag_values
from imagebert_hf.models.imagebert.script_errors import exit_on_error, parse_flags


STUDIES = ("rerank", "finetune_losses", "stages", "mrfr_regions")
FINETUNING_STUDIES = ("rerank", "finetune_losses")
# The recipe stage whose settings (rate, masking, loss weights) the pretraining studies reuse.
TEMPLATE_STAGE = "flickr8k"
FINETUNE_LOSSES = {
    "binary": "binary=1",
    "multiclass": "multiclass=1",
    "triplet": "triplet=1",
    "all three": "binary=1,multiclass=1,triplet=1",
}


@dataclass
class AblationArguments:
    """Settings of the ablation runs."""

    study: str = field(metadata={"help": f"One of {STUDIES}."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds, one run each."})
    variants: list[str] | None = field(default=None, metadata={"help": "Run only these variants of the study."})
    output_dir: str = field(default="outputs/ablations", metadata={"help": "Run folders (checkpoints, models)."})
    results_dir: str = field(default="docs/results", metadata={"help": "One JSON per finished run."})
    data_dir: str = field(
        default="../shared/data", metadata={"help": "Folder of flickr8k_trainval/, coco_val2017_128/."}
    )
    cache_dir: str = field(default="outputs/regions", metadata={"help": "Region caches (extracted when missing)."})
    pretrained: str = field(
        default="outputs/ablations/pretrained/stage3-flickr8k_coco/final",
        metadata={
            "help": "Checkpoint the fine-tuning studies start from: the final stage of "
            "`python examples/pretrain_shared_data.py --output_dir outputs/ablations/pretrained`."
        },
    )
    recipe: str = field(
        default="examples/configs/pretrain_minilm_shared_data.yaml",
        metadata={"help": "Recipe whose model and stage settings the pretraining studies reuse."},
    )
    eval_images: int = field(default=50, metadata={"help": "Flickr8k dev images scored (first ones, file order)."})
    eval_captions_per_image: int = field(default=5, metadata={"help": "Captions per dev image (5: all)."})
    eval_batch_size: int = field(default=256, metadata={"help": "Pairs per forward pass when scoring."})
    shortlist_k: int = field(default=8, metadata={"help": "Candidates per query re-ranked by the cross-encoder."})
    finetune_steps: int = field(default=150, metadata={"help": "Optimizer steps of each fine-tuning run."})
    finetune_batch_size: int = field(default=8, metadata={"help": "Positives per fine-tuning step."})
    finetune_learning_rate: float = field(default=1e-4, metadata={"help": "Peak fine-tuning learning rate."})
    num_negatives: int = field(default=3, metadata={"help": "Negatives per positive when fine-tuning."})
    pretrain_steps: int = field(default=600, metadata={"help": "Total optimizer steps of each pretraining run."})
    noise_seed: int = field(default=0, metadata={"help": "Seed of the web-like caption noise of the noisy source."})


def study_variants(study: str) -> list[str]:
    if study == "rerank":
        return [
            "random negatives",
            "contrastive-mined negatives",
            "random negatives, no contrastive loss",
            "random negatives, contrastive loss on the heads only",
        ]
    if study == "finetune_losses":
        return list(FINETUNE_LOSSES)
    if study == "stages":
        return ["clean only", "noisy + clean mixed", "noisy, then clean"]
    if study == "mrfr_regions":
        return ["30 regions, MRFR", "30 regions, no MRFR", "14 regions, MRFR", "5 regions, MRFR"]
    raise ValueError(f"--study must be one of {STUDIES}, got {study!r}.")


# The numeric flags as `check_field`'s (kind, lowest, highest): checked before anything is extracted or trained, as
# the evaluation flags are otherwise first read once every run of the study has trained.
FLAG_RULES = {
    "eval_images": ("int", 1, None),
    "eval_captions_per_image": ("int", 1, None),
    "eval_batch_size": ("int", 1, None),
    "shortlist_k": ("int", 1, None),
    "finetune_steps": ("int", 1, None),
    "finetune_batch_size": ("int", 1, None),
    "finetune_learning_rate": ("positive", None, None),
    "num_negatives": ("int", 1, None),
    "pretrain_steps": ("int", 1, None),
    "noise_seed": SEED_RULE,
}
PRETRAINED_EXPECTED = "a checkpoint folder, such as the final stage of examples/pretrain_shared_data.py"
# The flags that decide a study's results (the runs and how they are scored): a result file written with other
# values is another protocol's. Paths are left out, as a results folder moves between machines; the checkpoint the
# fine-tuning studies start from and the pretraining studies' recipe are compared by their contents instead.
EVALUATION_FLAGS = ("eval_images", "eval_captions_per_image")
FINETUNING_FLAGS = ("finetune_steps", "finetune_batch_size", "finetune_learning_rate", "num_negatives")
RESULT_FLAGS = {
    "rerank": (*EVALUATION_FLAGS, "shortlist_k", *FINETUNING_FLAGS),
    "finetune_losses": (*EVALUATION_FLAGS, *FINETUNING_FLAGS),
    "stages": (*EVALUATION_FLAGS, "pretrain_steps", "noise_seed"),
    "mrfr_regions": (*EVALUATION_FLAGS, "pretrain_steps", "noise_seed"),
}
# Written in a fine-tuning run folder: the checksum of the weights it started from.
PRETRAINED_WEIGHTS_FILE = "pretrained_weights.json"


def weights_checksum(folder: str) -> str | None:
    """One sha256 over the `*.safetensors` files of a checkpoint folder (None for a Hub id or a folder without
    them): what tells a checkpoint retrained in place from the one a run started from."""
    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        status = file.stat()
        digest.update(f"{file.name}:{_file_sha256(str(file), status.st_size, status.st_mtime_ns)};".encode())
    return digest.hexdigest()


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, read once per version of the file (its size and modification time) in a process that
    checks every run of a study against the same checkpoint."""
    return file_checksum(path)["sha256"]


def file_checksum_or_none(path: str) -> str | None:
    return file_checksum(path)["sha256"] if Path(path).is_file() else None


def content_checksums(args: AblationArguments) -> dict[str, str | None]:
    """What a study's results depend on beyond its flags, by content: `{"pretrained weights": ...}` for the
    fine-tuning studies, `{"recipe": ...}` for the pretraining ones."""
    if args.study in FINETUNING_STUDIES:
        return {"pretrained weights": weights_checksum(str(Path(args.pretrained)))}
    return {"recipe": file_checksum_or_none(args.recipe)}


def read_result_file(result_file: Path) -> dict:
    """A result file's content; raises naming the file when it is not JSON or has no `arguments` object."""
    stored = read_json_file(result_file, "an ablation result, as a JSON object")
    if not isinstance(stored, dict) or not isinstance(stored.get("arguments"), dict):
        raise ValueError(
            f"{result_file} is not an ablation result (no 'arguments' object); remove it to run it again."
        )
    return stored


def protocol_flags(study: str, arguments: dict, names: list[str] | None = None) -> str:
    """`--eval_images 50, --eval_captions_per_image 5, ...`: the result flags of `study` that `arguments` records
    (those of `names` alone when given), as the results and the page name a protocol."""
    names = [name for name in (RESULT_FLAGS.get(study, ()) if names is None else names) if name in arguments]
    return ", ".join(f"--{name} {arguments[name]!r}" for name in names)


def differing_flags(study: str, there: dict, here: dict) -> list[str]:
    """The result flags of `study` that both records give, with other values (a record of an earlier version may
    lack some: those cannot be compared); none for a study this file does not run."""
    flags = RESULT_FLAGS.get(study, ())
    return [name for name in flags if name in there and name in here and there[name] != here[name]]


def check_result_file(args: AblationArguments, result_file: Path) -> None:
    """Refuses to report `result_file` as this invocation's result when it was written with other settings (its
    `arguments`, and the checksums it recorded): a changed step count or checkpoint would otherwise be shown the old
    run's figures."""
    stored = read_result_file(result_file)
    differences = [
        f"--{name} {stored['arguments'][name]!r} there, {getattr(args, name)!r} now"
        for name in RESULT_FLAGS[args.study]
        if name in stored["arguments"] and stored["arguments"][name] != getattr(args, name)
    ]
    recorded = stored.get("checksums") or {}
    for what, checksum in content_checksums(args).items():
        if recorded.get(what) is not None and checksum is not None and recorded[what] != checksum:
            differences.append(f"the {what}: sha256 {recorded[what][:12]}... there, {checksum[:12]}... now")
    if differences:
        raise ValueError(
            f"--results_dir: {result_file} holds a result made with other settings: {'; '.join(differences)}. Give "
            "another --results_dir, or remove that file to run it again."
        )


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


# ---------------------------------------------------------------------------------------------------- evaluation


def eval_inputs(args: AblationArguments, tokenizer, max_text_length: int, max_regions: int):
    """Tokenized dev captions, padded dev regions and the caption -> image map of the scoring protocol."""
    from imagebert_hf.evaluation.zero_shot import manifest_retrieval_inputs

    flickr = Path(args.data_dir) / "flickr8k_trainval" / "captions.jsonl"
    return manifest_retrieval_inputs(
        flickr, Path(args.cache_dir) / "flickr8k", tokenizer, split="dev", max_text_length=max_text_length,
        max_regions=max_regions, max_images=args.eval_images, captions_per_image=args.eval_captions_per_image,
    )  # fmt: skip


def protocol(args: AblationArguments, text_to_image: list[int]) -> str:
    return (
        f"Flickr8k dev, first {max(text_to_image) + 1} images x {len(text_to_image)} captions "
        f"({args.eval_captions_per_image} per image), every pair scored"
    )


def evaluate_model(model, args: AblationArguments, tokenizer, ways: tuple[str, ...]) -> tuple[dict, str]:
    """Recall of a retrieval model on the protocol's pairs: `"cross-encoder"` (full ranking), `"dual encoder"`
    (unimodal heads alone), `"shortlist + re-rank"` (top `shortlist_k` of the heads, re-scored)."""
    import torch

    from imagebert_hf.evaluation.recall import retrieval_metrics
    from imagebert_hf.evaluation.shortlist import dual_encoder_scores, shortlist_rerank
    from imagebert_hf.evaluation.zero_shot import chance_metrics, zero_shot_retrieval

    config = model.config
    text_inputs, region_inputs, text_to_image = eval_inputs(
        args, tokenizer, config.max_text_length, config.max_regions
    )
    results = {"chance": chance_metrics(text_to_image)}
    model.eval()
    with torch.inference_mode():
        if "cross-encoder" in ways:
            results["cross-encoder"] = zero_shot_retrieval(
                model, text_inputs, region_inputs, text_to_image, args.eval_batch_size
            )
        if "dual encoder" in ways:
            scores = dual_encoder_scores(model, text_inputs, region_inputs, args.eval_batch_size)
            results["dual encoder"] = retrieval_metrics(scores, text_to_image)
        if "shortlist + re-rank" in ways:
            shortlist = shortlist_rerank(model, text_inputs, region_inputs, args.shortlist_k, args.eval_batch_size)
            results["shortlist + re-rank"] = retrieval_metrics(
                shortlist.i2t_scores, text_to_image, ir_scores=shortlist.t2i_scores
            )
    return results, protocol(args, text_to_image)


# ---------------------------------------------------------------------------------------------------- fine-tuning


def finetune_arguments(
    args: AblationArguments,
    loss_weights: str,
    negative_mining: str,
    contrastive_weight: float,
    seed: int,
    run_dir: Path,
    contrastive_trains_encoder: bool = True,
):
    """The `RetrievalArguments` of one fine-tuning run (`run_retrieval_finetuning`)."""
    from imagebert_hf.training.retrieval_finetuning import RetrievalArguments

    return RetrievalArguments(
        output_dir=str(run_dir),
        model_name_or_path=args.pretrained,
        train_file=str(Path(args.data_dir) / "flickr8k_trainval" / "captions.jsonl"),
        train_split="train",
        region_cache=str(Path(args.cache_dir) / "flickr8k"),
        loss_weights=loss_weights,
        negative_mining=negative_mining,
        contrastive_weight=contrastive_weight,
        contrastive_trains_encoder=contrastive_trains_encoder,
        num_negatives=args.num_negatives,
        seed=seed,
        max_steps=args.finetune_steps,
        per_device_train_batch_size=args.finetune_batch_size,
        learning_rate=args.finetune_learning_rate,
        checkpointing_steps=50,
        save_total_limit=1,
        logging_steps=10,
        report_to="none",
        resume=run_dir.exists(),
    )


def finetuning_variant(args: AblationArguments, variant: str, seed: int):
    """`(finetune_args, ways)`: the fine-tuning run of a variant and how its model is scored (`evaluate_model`)."""
    contrastive_weight, ways, trains_encoder = 1.0, ("cross-encoder",), True
    if args.study == "rerank":
        loss_weights, mining = "binary=1", "contrastive" if variant.startswith("contrastive") else "random"
        if variant.endswith("no contrastive loss"):
            # The cross-encoder alone: do the unimodal heads' loss and the ITM loss pull the shared encoder apart?
            contrastive_weight = 0.0
        else:
            ways = ("dual encoder", "cross-encoder", "shortlist + re-rank")
            trains_encoder = not variant.endswith("heads only")
    else:
        loss_weights, mining = FINETUNE_LOSSES[variant], "contrastive"
    # Runs are shared between studies: the rerank study's mined run is the loss study's binary run. The folder is
    # named by what differs between variants; `check_finetuning_run` compares the rest with the run's record.
    name = f"{slug(loss_weights)}-{mining}" + ("" if contrastive_weight else "-no-contrastive")
    name += "" if trains_encoder else "-heads-only"
    run_dir = Path(args.output_dir) / "finetune" / name / f"seed{seed}"
    finetune_args = finetune_arguments(args, loss_weights, mining, contrastive_weight, seed, run_dir, trains_encoder)
    return finetune_args, ways


# The fine-tuning settings that an ablation flag sets, named by that flag when a run folder holds other values.
ABLATION_FLAG_OF = {
    "model_name_or_path": "--pretrained",
    "train_file": "--data_dir",
    "region_cache": "--cache_dir",
    "max_steps": "--finetune_steps",
    "per_device_train_batch_size": "--finetune_batch_size",
    "learning_rate": "--finetune_learning_rate",
    "num_negatives": "--num_negatives",
}


def check_finetuning_run(finetune_args) -> None:
    """Refuses to reuse or resume the run folder of `finetune_args` when it was fine-tuned with other settings: the
    folder's name holds the variant and seed only, so a run of another `--pretrained`, step count or rate would be
    reported under these. The comparison reads the run's own record of its flags (`run_args.json`); a run without
    one (an earlier version's) cannot be compared and is refused too."""
    from imagebert_hf.training.checkpointing import latest_checkpoint
    from imagebert_hf.training.retrieval_finetuning import RUN_ARGS_FILE, flag_differences

    run_dir = Path(finetune_args.output_dir)
    record = run_dir / RUN_ARGS_FILE
    if not record.is_file():
        if (run_dir / "final").exists() or latest_checkpoint(run_dir / "checkpoints") is not None:
            raise ValueError(
                f"--output_dir: {run_dir} holds a fine-tuning run without {RUN_ARGS_FILE} (the settings it was "
                "trained with), so it cannot be reused for these; remove that folder or give another --output_dir."
            )
        return
    stored = read_json_file(record, "the flags of a fine-tuning run, as a JSON object")
    if not isinstance(stored, dict):
        raise ValueError(f"{record} holds a JSON {type(stored).__name__}, not the flags of a fine-tuning run.")
    differences = []
    for name, old, new in flag_differences(finetune_args, stored):
        flag = ABLATION_FLAG_OF.get(name, f"fine-tuning's {name}")
        differences.append(f"{flag} is {old!r} there, {new!r} now")
    started_from = run_dir / PRETRAINED_WEIGHTS_FILE
    checksum = weights_checksum(str(Path(finetune_args.model_name_or_path)))
    if started_from.is_file() and checksum is not None:
        recorded = read_json_file(started_from, "the checksum of a run's starting weights, as a JSON object")
        if not isinstance(recorded, dict) or recorded.get("sha256") != checksum:
            differences.append(f"the --pretrained weights differ from those it started from ({started_from})")
    if differences:
        raise ValueError(
            f"--output_dir: {run_dir} holds a run fine-tuned with other settings: {'; '.join(differences)}. Give "
            "another --output_dir to fine-tune with these, or the settings of that run to reuse it."
        )


def run_finetuning_variant(args: AblationArguments, variant: str, seed: int) -> dict:
    from transformers import AutoTokenizer

    from imagebert_hf import ImageBERTForImageTextRetrieval
    from imagebert_hf.training.retrieval_finetuning import run_retrieval_finetuning

    check_folder_or_hub_id(args.pretrained, "--pretrained", PRETRAINED_EXPECTED)
    finetune_args, ways = finetuning_variant(args, variant, seed)
    check_finetuning_run(finetune_args)
    run_dir = Path(finetune_args.output_dir)
    timings_file = run_dir / "timings.json"
    if not (run_dir / "final").is_dir():
        started = time.perf_counter()
        if not (run_dir / PRETRAINED_WEIGHTS_FILE).is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            checksum = weights_checksum(str(Path(args.pretrained)))
            atomic_write_json(run_dir / PRETRAINED_WEIGHTS_FILE, {"sha256": checksum})
        run_retrieval_finetuning(finetune_args)
        atomic_write_json(timings_file, {"train": round(time.perf_counter() - started)})
    train_seconds = json.loads(timings_file.read_text())["train"] if timings_file.is_file() else None
    transformers.logging.set_verbosity_error()
    model = ImageBERTForImageTextRetrieval.from_pretrained(str(run_dir / "final"))
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "final"))
    started = time.perf_counter()
    # Rankings already computed for this model on this protocol (by the other fine-tuning study) are reused.
    scored_file = run_dir / "rankings.json"
    scored = json.loads(scored_file.read_text()) if scored_file.is_file() else {}
    key = json.dumps([args.eval_images, args.eval_captions_per_image, args.shortlist_k])
    missing = tuple(way for way in ways if way not in scored.get(key, {}).get("metrics", {}))
    if missing:
        metrics, scoring = evaluate_model(model, args, tokenizer, missing)
        entry = scored.setdefault(key, {"metrics": {}, "protocol": scoring, "seconds": {}})
        entry["metrics"].update(metrics)
        entry.setdefault("seconds", {})[", ".join(missing)] = round(time.perf_counter() - started)
        atomic_write_json(scored_file, scored, indent=1)
    entry = scored[key]
    metrics = {way: entry["metrics"][way] for way in ("chance", *ways)}
    scoring = entry["protocol"]
    state = json.loads((run_dir / "final" / "trainer_state.json").read_text())
    return {
        "metrics": metrics,
        "protocol": scoring,
        "steps": state.get("completed_steps", args.finetune_steps),
        # Training and every ranking computed for this model, when this invocation only reused them.
        "seconds": {"train": train_seconds, "score": sum(entry.get("seconds", {}).values())},
        "settings": {
            "loss_weights": finetune_args.loss_weights, "negative_mining": finetune_args.negative_mining,
            "contrastive_weight": finetune_args.contrastive_weight,
            "contrastive_trains_encoder": finetune_args.contrastive_trains_encoder,
            "num_negatives": args.num_negatives, "batch_size": args.finetune_batch_size,
            "learning_rate": args.finetune_learning_rate, "shortlist_k": args.shortlist_k,
            "pretrained": args.pretrained,
        },
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------- pretraining


def pretraining_recipe(args: AblationArguments, variant: str, seed: int, run_dir: Path):
    """The recipe of one pretraining variant: the real-data recipe's model and stage settings, `pretrain_steps`
    optimizer steps in total, Flickr8k train as the clean source and its web-noised copy as the noisy one."""
    import yaml

    from imagebert_hf.data.web_noise import write_web_noisy_manifest
    from imagebert_hf.training.recipe import check_source_paths, recipe_from_dict

    with open(args.recipe, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    flickr = Path(args.data_dir) / "flickr8k_trainval" / "captions.jsonl"
    noisy = Path(args.output_dir) / "noisy_source" / f"flickr8k_train_web_noise_seed{args.noise_seed}.jsonl"
    if not noisy.is_file():
        write_web_noisy_manifest(flickr, noisy, seed=args.noise_seed, splits=["train"])
    cache = str(Path(args.cache_dir) / "flickr8k")
    clean_source = {"name": "flickr8k_clean", "type": "manifest", "path": str(flickr), "splits": ["train"],
                    "region_cache": cache}  # fmt: skip
    noisy_source = {"name": "flickr8k_web_noise", "type": "manifest", "path": str(noisy),
                    "image_root": str(flickr.parent), "region_cache": cache}  # fmt: skip
    # The all-task Flickr8k stage's settings (the recipe's first stage trains ITM alone, on unmasked pairs).
    named = {stage.get("name"): stage for stage in data["stages"]}
    if TEMPLATE_STAGE not in named:
        raise ValueError(f"--recipe {args.recipe} has no stage named {TEMPLATE_STAGE!r}; its stages: {list(named)}.")
    template = {
        key: value for key, value in named[TEMPLATE_STAGE].items() if key not in ("sources", "num_epochs", "name")
    }

    def stage(name: str, sources: list[dict], steps: int) -> dict:
        return {**template, "name": name, "sources": sources, "max_steps": steps}

    steps = args.pretrain_steps
    if variant == "noisy + clean mixed":
        stages = [stage("mixed", [noisy_source, clean_source], steps)]
    elif variant == "noisy, then clean":
        stages = [stage("noisy", [noisy_source], steps // 2), stage("clean", [clean_source], steps - steps // 2)]
    else:
        stages = [stage("clean", [clean_source], steps)]
    if "no MRFR" in variant:
        stages[0]["loss_weights"] = {**stages[0]["loss_weights"], "mrfr": 0.0}
    if variant.split()[0] in ("5", "14"):
        data["model"]["config"]["max_regions"] = int(variant.split()[0])
    data.update(output_dir=str(run_dir), seed=seed, stages=stages, report_to="none", checkpointing_steps=100)
    recipe = recipe_from_dict(data, where=f"{args.study}/{variant}")
    check_source_paths(recipe, where=f"{args.study}/{variant}")
    return recipe


def run_pretraining_variant(args: AblationArguments, variant: str, seed: int) -> dict:
    from imagebert_hf import ImageBERTForImageTextRetrieval
    from imagebert_hf.training import PretrainingRunOptions, run_pretraining
    from imagebert_hf.training.pretraining import load_tokenizer

    # The 30-region MRFR run of the regions study is the clean-only run of the stages study.
    shared = "clean only" if variant == "30 regions, MRFR" else variant
    run_dir = Path(args.output_dir) / "pretrain" / slug(shared) / f"seed{seed}"
    recipe = pretraining_recipe(args, shared, seed, run_dir)
    started = time.perf_counter()
    run = run_pretraining(recipe, PretrainingRunOptions(resume=run_dir.exists()))
    train_seconds = time.perf_counter() - started
    transformers.logging.set_verbosity_error()
    model = ImageBERTForImageTextRetrieval.from_pretrained(run["final_model"])
    started = time.perf_counter()
    metrics, scoring = evaluate_model(model, args, load_tokenizer(recipe.model), ("cross-encoder",))
    return {
        "metrics": metrics,
        "protocol": "zero-shot (ITM head), " + scoring,
        "steps": sum(run["steps_per_stage"]),
        "seconds": {"train": round(train_seconds), "score": round(time.perf_counter() - started)},
        "settings": {"stages": [(s.name, [src.name for src in s.sources], s.max_steps) for s in recipe.stages],
                     "loss_weights": recipe.stages[0].loss_weights, "max_regions": model.config.max_regions},
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------- main


def ensure_region_caches(args: AblationArguments) -> None:
    from imagebert_hf import ImageBERTRoIExtractor
    from imagebert_hf.regions import extract_regions

    extractor = ImageBERTRoIExtractor(grid_sizes=[1, 2, 3, 4], max_regions=30)
    for name, folder in (("flickr8k", "flickr8k_trainval"), ("coco128", "coco_val2017_128")):
        manifest = Path(args.data_dir) / folder / "captions.jsonl"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found; point --data_dir at the folder holding the real data.")
        extract_regions(manifest, Path(args.cache_dir) / name, extractor, store_class_probs=False)


def check_arguments(args: AblationArguments) -> None:
    """Refuses what could only fail, or change the protocol, once runs have trained: a number out of range, an
    unknown study or variant, a `--pretrained` that is neither a folder nor a Hub id, and a fine-tuned run folder
    of another run's settings, and a protocol other than that of the study's results already in `--results_dir`.
    Nothing is read beyond small files, and nothing is written."""
    check_flag_values(args, FLAG_RULES)
    for seed in args.seeds:
        try:
            check_field("--seeds", seed, *SEED_RULE)
        except TypeError as error:
            raise ValueError(str(error)) from None
    variants = study_variants(args.study)
    unknown = sorted(set(args.variants or []) - set(variants))
    if unknown:
        raise ValueError(f"--variants {unknown} are not variants of {args.study}; expected some of {variants}.")
    if args.study in FINETUNING_STUDIES:
        check_folder_or_hub_id(args.pretrained, "--pretrained", PRETRAINED_EXPECTED)
    own = set()
    for seed in args.seeds:
        for variant in args.variants or variants:
            result_file = result_path(args, variant, seed)
            own.add(result_file)
            if result_file.is_file():
                check_result_file(args, result_file)
            elif args.study in FINETUNING_STUDIES:
                check_finetuning_run(finetuning_variant(args, variant, seed)[0])
    check_study_protocol(args, own)


def check_study_protocol(args: AblationArguments, own: set[Path]) -> None:
    """Refuses a run scored on another protocol than the study's results already in `--results_dir` (other seeds
    and variants; this invocation's own result files, `own`, are checked by `check_result_file`): the results page
    averages a study's seeds and compares its variants, which only means something on one gallery and one set of
    result flags."""
    folder = Path(args.results_dir) / args.study
    now = {name: getattr(args, name) for name in RESULT_FLAGS[args.study]}
    for result_file in sorted(folder.glob("*.json")):
        if result_file in own:
            continue
        stored = read_result_file(result_file)
        differing = differing_flags(args.study, stored["arguments"], now)
        if differing:
            scored = f"scored on {stored['protocol']!r} with " if isinstance(stored.get("protocol"), str) else ""
            there = protocol_flags(args.study, stored["arguments"], differing)
            raise ValueError(
                f"--results_dir: {result_file} was {scored}{there}; this run would be scored with "
                f"{protocol_flags(args.study, now, differing)}, and the results page averages a study's runs as one "
                "protocol. Give another --results_dir, or that file's flags."
            )


def result_path(args: AblationArguments, variant: str, seed: int) -> Path:
    return Path(args.results_dir) / args.study / f"{slug(variant)}_seed{seed}.json"


def main(argv: list[str] | None = None) -> list[dict]:
    (args,) = parse_flags(HfArgumentParser(AblationArguments), argv)
    check_arguments(args)
    variants = study_variants(args.study)
    ensure_region_caches(args)
    command = "python examples/ablations/run_ablations.py " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
    finished = []
    # Seed-major, so that every variant has a first result early.
    for seed in args.seeds:
        for variant in args.variants or variants:
            result_file = result_path(args, variant, seed)
            if result_file.is_file():
                print(f"{args.study} / {variant} / seed {seed}: done ({result_file})")
                finished.append(json.loads(result_file.read_text()))
                continue
            # Several processes may share the queue (one thread each on a small machine): each run is claimed.
            claim = result_file.with_suffix(".running")
            claim.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                print(f"{args.study} / {variant} / seed {seed}: taken by another process ({claim}; delete it if not)")
                continue
            print(f"{args.study} / {variant} / seed {seed}: running", flush=True)
            try:
                if args.study in FINETUNING_STUDIES:
                    result = run_finetuning_variant(args, variant, seed)
                else:
                    result = run_pretraining_variant(args, variant, seed)
            finally:
                claim.unlink()
            result = {"study": args.study, "variant": variant, "seed": seed, "command": command,
                      "date": time.strftime("%Y-%m-%d"), "arguments": asdict(args),
                      "checksums": content_checksums(args), **result}  # fmt: skip
            result_file.parent.mkdir(parents=True, exist_ok=True)
            # Whole or not at all: a run killed while writing would leave a file that the page cannot read.
            atomic_write_text(result_file, json.dumps(result, indent=1) + "\n")
            finished.append(result)
            print(json.dumps({key: result[key] for key in ("variant", "seed", "seconds")}), flush=True)
    return finished


if __name__ == "__main__":
    with exit_on_error("run_ablations"):
        main()
