"""Pretraining throughput: training samples/s and peak memory, tiny and MiniLM-size models, one process vs two.

Every measurement runs the real pipeline (pair dataset, collator, DataLoader, Accelerate, `train_loop`) in a fresh
process, so peak memory is that run's own. Two processes are launched with
`accelerate launch --multi_gpu --num_processes 2` (CPU forced when no GPU is present), at the same per-process
batch: their samples/s counts both processes.

    python benchmarks/bench_pretraining.py            # about 2-3 minutes on 2 CPU cores
    python benchmarks/bench_pretraining.py --configs tiny --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


CONFIGS = {
    # The demo's model: synthetic vocabulary, 3 layers of 128, 4 regions of EfficientNet-Lite0 features.
    "tiny": {
        "model": {
            "vocab_size": 36,
            "hidden_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "intermediate_size": 512,
            "max_position_embeddings": 64,
            "region_feature_size": 1280,
            "num_object_classes": 1000,
            "max_regions": 4,
            "max_text_length": 24,
        },
        "text_length": 14,
        "num_regions": 3,
        "batch_size": 32,
    },
    # MiniLM (6 layers of 384, BERT vocabulary) over a 30-region grid, as in the real-data example.
    "minilm": {
        "model": {
            "vocab_size": 30522,
            "hidden_size": 384,
            "num_hidden_layers": 6,
            "num_attention_heads": 12,
            "intermediate_size": 1536,
            "region_feature_size": 1280,
            "num_object_classes": 1000,
            "max_regions": 30,
            "max_text_length": 32,
        },
        "text_length": 18,
        "num_regions": 30,
        "batch_size": 16,
    },
}


def worker(name: str, steps: int, warmup: int) -> None:
    """One measured run (called in each process); rank 0 prints a JSON line."""
    import resource

    import numpy as np
    import torch

    from imagebert_hf import ImageBERTConfig, ImageBERTForPreTraining
    from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining
    from imagebert_hf.data.pair_sources import MixtureSampler, PairSource, PretrainingPairDataset
    from imagebert_hf.training import (
        LoopSettings,
        TrainState,
        build_accelerator,
        build_optimizer,
        build_scheduler,
        train_loop,
    )
    from imagebert_hf.training.loop import pretraining_loss_counts

    spec = CONFIGS[name]
    import tempfile

    accelerator = build_accelerator(tempfile.gettempdir(), report_to="none")
    torch.manual_seed(0)
    config = ImageBERTConfig(**spec["model"])
    model = ImageBERTForPreTraining(config)

    class WordTokenizer:
        """Fixed-length captions of random ids, so both configs see the same text length."""

        all_special_ids = [0, 1, 2, 3, 4]
        pad_token_id, mask_token_id = 0, 4

        def __len__(self):
            return config.vocab_size

        def __call__(self, text, truncation=True, max_length=None, split_special_tokens=False, **kwargs):
            # The captions' ids are never special ones, so splitting special-token spellings changes nothing.
            if not isinstance(text, str):  # a batch of captions, as the dataset tokenizes them
                encoded = [self(one, **kwargs) for one in text]
                return {key: [one[key] for one in encoded] for key in encoded[0]}
            rng = np.random.default_rng(abs(hash(text)) % 2**32)
            ids = rng.integers(5, config.vocab_size, spec["text_length"] - 2).tolist()
            encoded = {"input_ids": [2, *ids, 3], "token_type_ids": [0] * spec["text_length"]}
            if kwargs.get("return_special_tokens_mask"):
                encoded["special_tokens_mask"] = [1] + [0] * len(ids) + [1]
            return encoded

    rng = np.random.default_rng(0)
    num_images = 512
    store = {
        str(i): {
            "region_features": rng.random((spec["num_regions"], 1280), dtype=np.float32),
            "region_locations": rng.random((spec["num_regions"], 5), dtype=np.float32),
            "region_class_labels": rng.integers(0, 1000, spec["num_regions"]),
        }
        for i in range(num_images)
    }
    source = PairSource("bench", [(str(i), f"caption {i}") for i in range(num_images)])
    tokenizer = WordTokenizer()
    dataset = PretrainingPairDataset([source], [store], tokenizer, config.max_text_length, config.max_regions)
    sampler = MixtureSampler([len(source)], [1.0], seed=0, num_samples=100_000)
    collator = DataCollatorForImageBERTPretraining(tokenizer, itm_negative_probability=0.0, count_failed=True)
    loader = torch.utils.data.DataLoader(dataset, spec["batch_size"], sampler=sampler, collate_fn=collator)
    optimizer = build_optimizer(model, 1e-4)
    total = warmup + steps
    scheduler = build_scheduler(optimizer, "linear", total, 0, accelerator.num_processes)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    marks = {}

    def on_step(state, losses):
        if state.completed_steps in (warmup, total):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks[state.completed_steps] = time.perf_counter()

    state = TrainState(stage_name=name, total_steps=total)
    settings = LoopSettings(
        loss_counts=pretraining_loss_counts, logging_steps=total, model_kwargs={"sparse_prediction": True}
    )
    train_loop(accelerator, model, optimizer, scheduler, loader, state, settings, sampler=sampler, on_step=on_step)
    seconds = marks[total] - marks[warmup]
    samples = steps * spec["batch_size"] * accelerator.num_processes
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = torch.tensor([peak_rss_mb], device=accelerator.device)
    peak = accelerator.gather(peak).max().item()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    if accelerator.is_main_process:
        result = {
            "config": name,
            "processes": accelerator.num_processes,
            "batch_per_process": spec["batch_size"],
            "samples_per_s": samples / seconds,
            "step_s": seconds / steps,
            "peak_rss_mb_per_process": peak,
            "peak_gpu_mb": gpu_peak,
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "device": str(accelerator.device),
        }
        print("RESULT " + json.dumps(result), flush=True)


def measure(name: str, processes: int, steps: int, warmup: int) -> dict:
    script = [str(Path(__file__).resolve()), "--worker", name, "--steps", str(steps), "--warmup", str(warmup)]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script,
        ]  # fmt: skip
    env = dict(os.environ)
    import torch

    # Share the cores out: one process uses them all, two split them.
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{name} x{processes} failed:\n{result.stderr[-3000:]}")
    del torch
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS), help="Which models.")
    parser.add_argument("--processes", nargs="*", type=int, default=[1, 2], help="Process counts to compare.")
    parser.add_argument("--steps", type=int, default=None, help="Measured steps (default: 30 tiny, 8 minilm).")
    parser.add_argument("--warmup", type=int, default=3, help="Unmeasured steps first.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.warmup)
        return

    started = time.perf_counter()
    rows = []
    for name in args.configs:
        steps = args.steps or (30 if name == "tiny" else 8)
        for processes in args.processes:
            row = measure(name, processes, steps, args.warmup)
            rows.append(row)
            print(f"measured {name} x{processes}: {row['samples_per_s']:.1f} samples/s", flush=True)
    print()
    print(f"device: {rows[0]['device']}, cores: {os.cpu_count()}")
    print(
        "| config | params (M) | processes | batch/process | samples/s | s/step | peak RSS/process (MB) | peak GPU (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        gpu = f"{row['peak_gpu_mb']:.0f}" if row["peak_gpu_mb"] is not None else "-"
        print(
            f"| {row['config']} | {row['parameters_m']:.1f} | {row['processes']} | {row['batch_per_process']} | "
            f"{row['samples_per_s']:.1f} | {row['step_s']:.3f} | {row['peak_rss_mb_per_process']:.0f} | {gpu} |"
        )
    for name in args.configs:
        by_processes = {row["processes"]: row for row in rows if row["config"] == name}
        if 1 in by_processes and 2 in by_processes:
            ratio = by_processes[2]["samples_per_s"] / by_processes[1]["samples_per_s"]
            print(f"{name}: two processes give {ratio:.2f}x the samples/s of one")
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
