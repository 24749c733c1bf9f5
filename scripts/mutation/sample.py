"""Print a seeded random sample of mutant names that have no result yet: run from the
staging directory (.mutation/) after mutmut has generated the mutants.

    ../.venv/bin/python ../scripts/mutation/sample.py --files runtime.py,validate.py --count 120

A full run takes hours on 2 cores; a uniform random sample of the mutants not yet checked
estimates the kill rate over all of them (docs/TESTING.md gives the interval).
"""
import argparse
import json
import random
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", required=True, help="comma-separated file names (e.g. runtime.py,validate.py)")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    wanted = args.files.split(",")
    names = []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        if meta.name[: -len(".meta")] in wanted:
            codes = json.loads(meta.read_text())["exit_code_by_key"]
            names += sorted(name for name, code in codes.items() if code is None)
    sample = random.Random(args.seed).sample(names, min(args.count, len(names)))
    print("\n".join(sorted(sample)))


if __name__ == "__main__":
    main()
