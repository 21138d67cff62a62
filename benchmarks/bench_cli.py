"""Console scripts: seconds to `--help`, against a target of 2 s, with the imports that set the floor.

    python benchmarks/bench_cli.py               # every script of setup.cfg, best and median of 3 runs each
    python benchmarks/bench_cli.py --runs 5 --output cli.json

Each script runs as a user runs it (the installed entry point next to this interpreter, on this checkout's
sources). In the same run, the same way: the bare interpreter, `import torch`, `import transformers` and
`import imagebert_hf`; a script's `--help` cannot be faster than the package import, which registers ImageBERT with
transformers' Auto classes and so imports torch and transformers. Reports the machine's core count and load
average, since both move these numbers.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
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


def timed(command: list[str], runs: int) -> list[float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        seconds.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()[-500:]}")
    return seconds


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
    print(f"{'command':<38} {'best s':>8} {'median s':>9}  vs {TARGET_SECONDS:.0f} s target")
    for label, command in commands.items():
        seconds = timed(command, args.runs)
        best, median = min(seconds), statistics.median(seconds)
        verdict = ("under" if best < TARGET_SECONDS else "OVER") if label.endswith("--help") else ""
        rows[label] = {"best_s": round(best, 2), "median_s": round(median, 2), "runs": args.runs}
        print(f"{label:<38} {best:>8.2f} {median:>9.2f}  {verdict}", flush=True)
    machine = {
        "cpu_count": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }
    print(
        f"machine: {machine['cpu_count']} CPU cores, load average {load_before:.1f} -> {machine['load_average_after']}"
    )
    if args.output:
        Path(args.output).write_text(
            json.dumps({"target_s": TARGET_SECONDS, "machine": machine, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
