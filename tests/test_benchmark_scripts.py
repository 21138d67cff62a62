"""The benchmark scripts still run against today's code, at their smallest size: `make bench` is not part of
`make test`, so a change to a data path or a loop signature would otherwise break a benchmark unnoticed. Nothing is
timed or compared here; the figures are `make bench`'s business."""

import subprocess
import sys

from .testing_utils import PROJECT_ROOT


BENCHMARKS = PROJECT_ROOT / "benchmarks"


def run_benchmark(name: str, *arguments: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *arguments], capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_the_pretraining_benchmark_runs_one_process_of_the_tiny_model():
    output = run_benchmark(
        "bench_pretraining.py", "--configs", "tiny", "--processes", "1", "--steps", "2", "--warmup", "1"
    )
    assert "| tiny |" in output and "samples/s" in output


def test_the_loader_benchmark_runs_every_reader_on_a_small_cache():
    output = run_benchmark("bench_loader.py", "--num_images", "40", "--num_samples", "192", "--batch_size", "16")
    for reader in ("datasets rows (float32)", "arrow (float16), 1 worker", "a segment per tensor"):
        assert reader in output, reader
    assert "1 worker:" in output and "samples per CPU-second" in output
