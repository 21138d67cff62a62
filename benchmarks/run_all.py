"""Runs every `benchmarks/bench_*.py` in turn (`make bench`); pass names to run a subset: `run_all.py model`."""

import argparse
import subprocess
import sys
import time
from pathlib import Path


FOLDER = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    known = {path.stem.removeprefix("bench_"): path for path in sorted(FOLDER.glob("bench_*.py"))}
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"Benchmarks to run (default: all): {', '.join(known)}."
    )
    wanted = parser.parse_args(argv).names
    unknown = sorted(set(wanted) - set(known))
    if unknown:  # a misspelled name would otherwise run nothing and report success
        parser.error(f"unknown benchmark {', '.join(unknown)}; expected some of: {', '.join(known)}.")
    scripts = [path for name, path in known.items() if not wanted or name in wanted]
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
