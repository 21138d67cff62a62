"""Runs examples/run_pretraining.py with a probe on the model's forward: each process writes what autocast was set
to inside the forward, its rank, world size and the accelerator's settings to `<output_dir>/probe-<rank>.json`.

Started by tests/test_launch.py through `accelerate launch` with a launch config, so what is checked is what the
launch config reaches, not what a test set in-process.
"""

import json
import os
import sys
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    import run_pretraining

    from imagebert_hf.models.imagebert.modeling_imagebert import ImageBERTForPreTraining

    seen = []
    original = ImageBERTForPreTraining.forward

    def probed(self, *args, **kwargs):
        device = self.device.type
        seen.append([torch.is_autocast_enabled(device), str(torch.get_autocast_dtype(device)), device])
        return original(self, *args, **kwargs)

    ImageBERTForPreTraining.forward = probed
    argv = sys.argv[1:]
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    run_pretraining.main(argv)
    from accelerate import PartialState

    state = PartialState()
    probe = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "distributed_type": state.distributed_type.value,
        "backend": state.backend,
        "env_world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "forward": seen,
    }
    (output_dir / f"probe-{state.process_index}.json").write_text(json.dumps(probe))


if __name__ == "__main__":
    main()
