"""The region alignment warm start: fit the two region projections through the frozen text encoder, then pretrain
from the result (imagebert_hf.training.region_alignment has the method).

    OMP_NUM_THREADS=1 python examples/region_alignment.py \
        --config examples/configs/pretrain_minilm_shared_data.yaml --output_dir outputs/region_alignment
    python examples/run_pretraining.py --config examples/configs/pretrain_minilm_shared_data.yaml \
        --set model.init_from=outputs/region_alignment

examples/pretrain_shared_data.py runs this step itself before pretraining. The output folder is an
`ImageBERTForPreTraining` checkpoint with its tokenizer, and `region_alignment.json` (the settings, the loss every
`--logging_steps` steps and the held-out RSUM before and after). Exits 1 with one line on stderr when an argument or
file is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from imagebert_hf.models.imagebert.script_errors import exit_on_error, parse_flags
from imagebert_hf.training.region_alignment import RegionAlignmentSettings


@dataclass
class RegionAlignmentArguments:
    config: str = field(metadata={"help": "The pretraining recipe (YAML); its model and first stage's sources."})
    output_dir: str = field(metadata={"help": "New folder for the aligned checkpoint (refused if it holds files)."})
    seed: int | None = field(default=None, metadata={"help": "Seed (the recipe's by default)."})
    set: list[str] = field(default_factory=list, metadata={"help": "Recipe overrides, as run_pretraining's --set."})


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((RegionAlignmentArguments, RegionAlignmentSettings))
    args, settings = parse_flags(parser, argv)
    from imagebert_hf.training import load_recipe
    from imagebert_hf.training.region_alignment import run_region_alignment

    with exit_on_error("region_alignment"):
        settings.check()
        recipe = load_recipe(args.config, args.set)
        report = run_region_alignment(recipe, args.output_dir, settings, seed=args.seed)
    print(json.dumps({key: report[key] for key in ("held_out_rsum_before", "held_out_rsum_after")}))
    return report


if __name__ == "__main__":
    main()
