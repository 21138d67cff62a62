"""Runs every `benchmarks/bench_*.py` in turn (`make bench`); pass names to run a subset: `run_all.py model`."""

import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    folder = Path(__file__).resolve().parent
    wanted = set(sys.argv[1:])
    scripts = sorted(p for p in folder.glob("bench_*.py") if not wanted or p.stem.removeprefix("bench_") in wanted)
    failed = []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        start = time.perf_counter()
        if subprocess.run([sys.executable, str(script)]).returncode != 0:
            failed.append(script.name)
        print(f"({script.name} took {time.perf_counter() - start:.0f} s)", flush=True)
    if failed:
        print(f"\nFailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
