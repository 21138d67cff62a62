"""Console scripts: seconds to `--help`, against a target of 2 s, with the imports that set the floor.

    python benchmarks/bench_cli.py               # every script of setup.cfg, best and median of 3 runs each
    python benchmarks/bench_cli.py --runs 5 --output cli.json

Each script runs as a user runs it (the installed entry point next to this interpreter, on this checkout's
sources). In the same run, the same way: the bare interpreter, `import torch`, `import transformers` and
`import imagebert_hf` (lazy: it loads neither, and registers ImageBERT with the Auto classes only once transformers
loads them). For each command it reports wall seconds and CPU seconds (user + sys of the child process): on a
loaded machine the wall time mostly measures the wait for a core, the CPU time what the command itself costs. The
verdict against the target is given for both. Reports the machine's core count and load average, since both move
these numbers.
"""

from __future__ import annotations

import argparse
import configparser
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 2.0


def console_scripts() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return [line.split("=")[0].strip() for line in lines]


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], runs: int) -> tuple[list[float], list[float]]:
    """Wall seconds and CPU seconds (user + sys) of each of `runs` runs of `command`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    wall, cpu = [], []
    for _ in range(runs):
        cpu_start, start = _children_cpu_seconds(), time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        wall.append(time.perf_counter() - start)
        cpu.append(_children_cpu_seconds() - cpu_start)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()[-500:]}")
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each command (best and median reported)")
    parser.add_argument("--output", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    bin_dir = Path(sys.executable).parent
    commands = {
        "python (bare interpreter)": [sys.executable, "-c", "pass"],
        "import torch": [sys.executable, "-c", "import torch"],
        "import transformers": [sys.executable, "-c", "import transformers"],
        "import imagebert_hf": [sys.executable, "-c", "import imagebert_hf"],
    }
    for name in console_scripts():
        script = bin_dir / name
        if not script.is_file():
            raise SystemExit(f"{name} is not installed next to {sys.executable}: run `make setup` (pip install -e .)")
        commands[f"{name} --help"] = [str(script), "--help"]

    load_before = os.getloadavg()[0]
    rows = {}
    print(
        f"{'command':<38} {'wall best':>9} {'median':>7} {'cpu best':>9} {'median':>7}"
        f"  vs {TARGET_SECONDS:.0f} s target (wall, cpu)"
    )
    for label, command in commands.items():
        wall, cpu = timed(command, args.runs)
        best, median, cpu_best, cpu_median = min(wall), statistics.median(wall), min(cpu), statistics.median(cpu)
        verdict = ""
        if label.endswith("--help"):
            verdict = ", ".join("under" if value < TARGET_SECONDS else "OVER" for value in (best, cpu_best))
        rows[label] = {
            "best_s": round(best, 2),
            "median_s": round(median, 2),
            "cpu_best_s": round(cpu_best, 2),
            "cpu_median_s": round(cpu_median, 2),
            "runs": args.runs,
        }
        print(f"{label:<38} {best:>9.2f} {median:>7.2f} {cpu_best:>9.2f} {cpu_median:>7.2f}  {verdict}", flush=True)
    machine = {
        "cpu_count": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }
    print(
        f"machine: {machine['cpu_count']} CPU cores, load average {load_before:.1f} -> {machine['load_average_after']}"
    )
    if args.output:
        from imagebert_hf.formats.files import atomic_write_json

        atomic_write_json(args.output, {"target_s": TARGET_SECONDS, "machine": machine, "rows": rows}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
