"""Training-step speed of the ImageBERT encoder against BERT and VisualBERT, measured in one process.

Prints:
1. base-size forward+backward at 44 text tokens + 100 regions, batch 8, eager (attention through the model's default
   backend, sdpa), over `BertModel` (sdpa) at length 144 and over `VisualBertModel` at the same total length
   (targets: <= 1.0x each), as the median of the per-round ratios with a 95% bootstrap interval; the
   ImageBERT step with eager attention over VisualBERT's (which has eager attention only), so that the model's code
   is compared apart from the attention backend; and the ImageBERT step under `torch.compile` over eager (the gain);
2. achieved FLOP/s of the eager step over the matmul FLOP/s measured here (target >= 0.7);
3. samples/s at realistic lengths, padding each batch only to its own longest text and region count, over the
   paper's fixed 144-token layout (target >= 2x), and a check that padding leaves outputs unchanged.

Run: `python benchmarks/bench_model.py [--size base|small] [--repeats N] [--no_compile]`. The first compiled step
compiles the model (minutes on a small CPU) and is not timed.
"""

import argparse
import statistics
import time

import numpy as np
import torch
from transformers import BertConfig, BertModel, VisualBertConfig, VisualBertModel

from imagebert_hf import ImageBERTConfig, ImageBERTModel
from imagebert_hf.data.pair_sources import group_by_length


SIZES = {
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
}
TEXT_LENGTH, NUM_REGIONS, BATCH_SIZE, FEATURE_SIZE = 44, 100, 8, 2048


DEVICE = torch.device("cpu")
DTYPE = torch.float32


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def square_gemm_run(size: int, times: int):
    """`times` square products of side `size`, back to back."""
    a = torch.randn(size, size, device=DEVICE, dtype=DTYPE)
    b = torch.randn(size, size, device=DEVICE, dtype=DTYPE)

    def run():
        for _ in range(times):
            a @ b

    return run


def step_matmuls(hidden: int, intermediate: int, heads: int, layers: int, length: int, batch: int, regions: int):
    """The matrix products of one forward+backward step of the encoder, as (batch, m, k, n) shapes.

    Each linear layer `x @ W` of shape (m, k) x (k, n) costs one product forward and two backward (the input's
    gradient, (m, n) x (n, k), and the weight's, (k, m) x (m, n)); attention's two batched products likewise.
    """
    tokens, head_size = batch * length, hidden // heads

    def linear(m, k, n):
        return [(1, m, k, n), (1, m, n, k), (1, k, m, n)]

    def batched(b, m, k, n):
        return [(b, m, k, n), (b, m, n, k), (b, k, m, n)]

    per_layer = (
        linear(tokens, hidden, hidden) * 4  # query, key, value, attention output
        + linear(tokens, hidden, intermediate)
        + linear(tokens, intermediate, hidden)
        + batched(batch * heads, length, head_size, length)  # scores
        + batched(batch * heads, length, length, head_size)  # weighted values
    )
    # The region features are inputs, not parameters: their projection has no input gradient to compute.
    region_projection = linear(batch * regions, FEATURE_SIZE, hidden)
    return per_layer * layers + [region_projection[0], region_projection[2]]


def matmul_run(shapes):
    """The given products alone, back to back: the step's speed if nothing but its matmuls cost time."""
    operands = {
        shape: (
            torch.randn(shape[0], shape[1], shape[2], device=DEVICE, dtype=DTYPE),
            torch.randn(shape[0], shape[2], shape[3], device=DEVICE, dtype=DTYPE),
        )
        for shape in set(shapes)
    }

    def run():
        for shape in shapes:
            a, b = operands[shape]
            torch.bmm(a, b)

    return run


def paired_ratio(
    numerator: list[float], denominator: list[float], resamples: int = 10_000
) -> tuple[float, float, float]:
    """Median of the per-round time ratios and its 95% bootstrap interval (rounds resampled). Both steps of a round
    ran back to back, so a slow stretch of the machine scales both and cancels in their ratio; the median, as for the
    times, keeps a round that a burst of other work hit from moving the figure."""
    ratios = np.asarray(numerator) / np.asarray(denominator)
    rng = np.random.default_rng(0)
    medians = np.median(ratios[rng.integers(0, len(ratios), size=(resamples, len(ratios)))], axis=1)
    low, high = np.quantile(medians, [0.025, 0.975])
    return float(np.median(ratios)), float(low), float(high)


def training_step(model, inputs):
    inputs = {key: value.to(DEVICE) for key, value in inputs.items()}

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=DTYPE, enabled=DTYPE is not torch.float32):
            out = model(**inputs)
        out.last_hidden_state.float().mean().backward()

    return step


def imagebert_inputs(config: ImageBERTConfig, text_lengths, region_counts, generator, pad_to=None):
    """A batch of samples with the given lengths, padded to `pad_to` (text, regions) or to the batch's longest."""
    text_pad = pad_to[0] if pad_to else max(text_lengths)
    region_pad = pad_to[1] if pad_to else max(region_counts)
    batch = len(text_lengths)
    input_ids = torch.zeros(batch, text_pad, dtype=torch.long)
    attention_mask = torch.zeros(batch, text_pad, dtype=torch.long)
    features = torch.zeros(batch, region_pad, config.region_feature_size)
    locations = torch.zeros(batch, region_pad, 5)
    region_mask = torch.zeros(batch, region_pad, dtype=torch.long)
    for i, (length, count) in enumerate(zip(text_lengths, region_counts)):
        input_ids[i, :length] = torch.randint(1, config.vocab_size, (length,), generator=generator)
        attention_mask[i, :length] = 1
        features[i, :count] = torch.randn(count, config.region_feature_size, generator=generator).relu()
        corners = torch.rand(count, 4, generator=generator).sort(dim=-1).values
        locations[i, :count, :4] = corners
        locations[i, :count, 4] = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])
        region_mask[i, :count] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "region_features": features,
        "region_locations": locations,
        "region_attention_mask": region_mask,
    }


def realistic_lengths(num_samples: int, rng: np.random.Generator):
    """Caption lengths of 8-30 tokens (+2 special tokens) and 10-100 regions, log-uniform as a detector with a
    confidence threshold gives (most images have a few dozen confident boxes, few have a hundred)."""
    text = rng.integers(8, 31, size=num_samples) + 2
    regions = np.exp(rng.uniform(np.log(10), np.log(100), size=num_samples)).round().astype(int)
    return text.tolist(), regions.tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base", help="model size to measure")
    parser.add_argument(
        "--repeats",
        type=int,
        default=10,
        help="timed rounds per measurement (median is kept; the order rotates each round)",
    )
    parser.add_argument(
        "--realistic_passes", type=int, default=2, help="timed passes over each realistic layout (fastest is kept)"
    )
    parser.add_argument(
        "--realistic_samples", type=int, default=64, help="samples timed in the fixed and per-batch padded layouts"
    )
    parser.add_argument(
        "--group_pool",
        type=int,
        default=400,
        help="samples grouped by length at once (50 batches, as length-grouped samplers draw mega-batches)",
    )
    parser.add_argument("--device", default="cpu", help="device to run on (cpu, cuda)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile measurement")
    args = parser.parse_args()
    global DEVICE, DTYPE
    DEVICE, DTYPE = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    size = SIZES[args.size]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, size={args.size}, {DEVICE}, {args.dtype}")

    # 1. Fixed layout, base size: ImageBERT vs BERT vs VisualBERT at the same total length.
    total_length = TEXT_LENGTH + NUM_REGIONS
    ours = ImageBERTModel(ImageBERTConfig(**size, region_feature_size=FEATURE_SIZE)).to(DEVICE).train()
    ours_eager = ImageBERTModel(ImageBERTConfig(**size, region_feature_size=FEATURE_SIZE, attn_implementation="eager"))
    ours_eager.load_state_dict(ours.state_dict())
    ours_eager.to(DEVICE).train()
    bert = BertModel(BertConfig(**size, attn_implementation="sdpa")).to(DEVICE).train()
    visual = VisualBertModel(VisualBertConfig(**size, visual_embedding_dim=FEATURE_SIZE)).to(DEVICE).train()
    generator = torch.Generator().manual_seed(0)
    ours_inputs = imagebert_inputs(ours.config, [TEXT_LENGTH] * BATCH_SIZE, [NUM_REGIONS] * BATCH_SIZE, generator)
    bert_inputs = {"input_ids": torch.randint(1, 30000, (BATCH_SIZE, total_length))}
    visual_inputs = {
        "input_ids": torch.randint(1, 30000, (BATCH_SIZE, TEXT_LENGTH)),
        "visual_embeds": ours_inputs["region_features"],
    }

    # 2. The matmul FLOP/s to compare the ImageBERT step with: the step's own products timed alone (the speed the
    # step would have if nothing but its matmuls cost time), and a square GEMM.
    def shapes_of_step(num_regions: int) -> list[tuple[int, int, int, int]]:
        return step_matmuls(
            size["hidden_size"],
            size["intermediate_size"],
            size["num_attention_heads"],
            size["num_hidden_layers"],
            total_length,
            BATCH_SIZE,
            num_regions,
        )

    def matmul_flops(shapes: list[tuple[int, int, int, int]]) -> int:
        return sum(2 * b * m * k * n for b, m, k, n in shapes)

    shapes = shapes_of_step(NUM_REGIONS)
    flops = matmul_flops(shapes)
    gemm_size = 2048 if DEVICE.type == "cpu" else 8192
    steps = {
        "imagebert": training_step(ours, ours_inputs),
        "imagebert eager": training_step(ours_eager, ours_inputs),
        **({} if args.no_compile else {"imagebert compiled": training_step(torch.compile(ours), ours_inputs)}),
        "bert": training_step(bert, bert_inputs),
        "visualbert": training_step(visual, visual_inputs),
        "step matmuls": matmul_run(shapes),
        "square GEMM": square_gemm_run(gemm_size, times=8),
    }
    # Interleaved, so that drifting machine load hits every measurement alike, and in an order rotated each round, so
    # that no step always runs right after the square GEMM (which can leave a busy CPU clocked down); the median of
    # each is kept.
    seconds = {name: [] for name in steps}
    for name, step in steps.items():
        start = time.perf_counter()
        step()  # warm-up; compiles the compiled step
        if name == "imagebert compiled":
            print(f"  (torch.compile of the step took {time.perf_counter() - start:.0f} s)")
    names = list(steps)
    for round_index in range(args.repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(time_call(steps[name], repeats=1, warmup=0))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    for name in ("imagebert", "imagebert eager", "imagebert compiled", "bert", "visualbert"):
        if name in median:
            print(
                f"  {name:<18} forward+backward, batch {BATCH_SIZE}, length {total_length}: "
                f"{median[name] * 1000:8.1f} ms"
            )

    def ratio_line(label: str, numerator: str, denominator: str, target: str = "") -> None:
        ratio, low, high = paired_ratio(seconds[numerator], seconds[denominator])
        print(f"{label:<40}{ratio:.3f}  (95% interval {low:.3f} to {high:.3f}){target}")

    ratio_line("ImageBERT / BERT (sdpa) time ratio:", "imagebert", "bert", "  (target <= 1.0)")
    # What the region projection adds: the only matmuls ImageBERT has and BERT at the same length has not.
    bert_flops = matmul_flops(shapes_of_step(0))
    print(
        f"  its matmul FLOPs over BERT's at the same length: {flops / bert_flops:.3f} (the ratio of equal efficiency)"
    )
    ratio_line("ImageBERT / VisualBERT time ratio:", "imagebert", "visualbert", "  (target <= 1.0)")
    ratio_line("  with eager attention, as VisualBERT:", "imagebert eager", "visualbert")
    ratio_line("  ImageBERT eager / its sdpa:", "imagebert eager", "imagebert")
    if "imagebert compiled" in median:
        print(f"torch.compile gain (eager / compiled): {median['imagebert'] / median['imagebert compiled']:.3f}x")

    achieved = flops / median["imagebert"]
    own_matmuls = flops / median["step matmuls"]
    peak = 8 * 2 * gemm_size**3 / median["square GEMM"]
    print(f"ImageBERT step: {flops / 1e9:.0f} GFLOP of matmuls, {achieved / 1e9:.1f} GFLOP/s achieved")
    print(
        f"square GEMM ({gemm_size}^3, {args.dtype}): {peak / 1e9:.1f} GFLOP/s; achieved / that: {achieved / peak:.3f}"
    )
    print(f"the step's own matmuls alone:         {own_matmuls / 1e9:.1f} GFLOP/s")
    print(f"achieved / the step's matmul FLOP/s:  {achieved / own_matmuls:.3f}  (target >= 0.7)")

    # 3. Realistic lengths: fixed 144 layout vs each batch padded to its own longest, batches grouped by length.
    rng = np.random.default_rng(0)
    pool = max(args.group_pool, args.realistic_samples)
    text_lengths, region_counts = realistic_lengths(pool, rng)
    # The pretraining sampler's grouping: by region count (they vary most), then by caption length within windows.
    order = group_by_length(
        list(range(pool)), list(zip(region_counts, text_lengths)), BATCH_SIZE, pool, np.random.default_rng(1)
    )
    grouped = [order[i : i + BATCH_SIZE] for i in range(0, pool, BATCH_SIZE)]
    random_batches = [
        np.arange(i, min(i + BATCH_SIZE, args.realistic_samples)) for i in range(0, args.realistic_samples, BATCH_SIZE)
    ]

    def batches(indices_list, pad_to):
        generator = torch.Generator().manual_seed(1)
        return [
            imagebert_inputs(
                ours.config,
                [text_lengths[i] for i in idx],
                [region_counts[i] for i in idx],
                generator,
                pad_to=pad_to,
            )
            for idx in indices_list
        ]

    layouts = {
        "fixed 144": batches(random_batches, (TEXT_LENGTH, NUM_REGIONS)),
        "longest in batch": batches(random_batches, None),
        "longest in batch, grouped by length": batches(grouped, None),
    }
    for layout in layouts.values():
        training_step(ours, layout[0])()  # warm-up
    # Interleaved passes, the fastest kept: machine noise only ever adds time, and it hits every layout alike.
    passes = {name: [] for name in layouts}
    for _ in range(args.realistic_passes):
        for name, layout in layouts.items():
            passes[name].append(time_call(lambda layout=layout: [training_step(ours, b)() for b in layout], 1, 0))
    throughput = {}
    for name, layout in layouts.items():
        throughput[name] = sum(len(b["input_ids"]) for b in layout) / min(passes[name])
        mean_length = np.mean([b["input_ids"].shape[1] + b["region_features"].shape[1] for b in layout])
        samples = sum(len(b["input_ids"]) for b in layout)
        print(
            f"  {name:<36} {samples:4d} samples, mean padded length {mean_length:6.1f}: "
            f"{throughput[name]:6.2f} samples/s"
        )
    base = throughput["fixed 144"]
    print(f"per-batch padding / fixed 144:        {throughput['longest in batch'] / base:.2f}x")
    print(
        f"grouped per-batch padding / fixed 144: {throughput['longest in batch, grouped by length'] / base:.2f}x (target >= 2x)"
    )

    # Padding must not change outputs: the same sample in the fixed layout and alone.
    ours.eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(2)
        alone = imagebert_inputs(ours.config, [text_lengths[0]], [region_counts[0]], generator)
        generator = torch.Generator().manual_seed(2)
        padded = imagebert_inputs(
            ours.config, [text_lengths[0]], [region_counts[0]], generator, pad_to=(TEXT_LENGTH, NUM_REGIONS)
        )
        a = ours(**{k: v.to(DEVICE) for k, v in alone.items()}).last_hidden_state[0]
        b = ours(**{k: v.to(DEVICE) for k, v in padded.items()}).last_hidden_state[0]
        text = text_lengths[0]
        difference = max(
            (a[:text] - b[:text]).abs().max().item(),
            (a[text:] - b[TEXT_LENGTH : TEXT_LENGTH + region_counts[0]]).abs().max().item(),
        )
    print(f"max |hidden(alone) - hidden(padded to 144)| = {difference:.2e}")


if __name__ == "__main__":
    main()
