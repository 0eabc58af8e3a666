"""Fuzz the format readers at length: thousands of mutated checkpoints, torch.load vs ckptd.load.

The CI test (``tests/formats/test_fuzz.py``) runs a few hundred mutants through hypothesis;
this script runs as many as asked, from a seed, and prints every violation with the ops
that made it (re-create one with ``ckptd_testlib.fuzz.apply(seeds()[name], ops)``).

    .venv/bin/python bench/fuzz_formats.py --mutants 5000 --seed 1

Exit status 0 when every mutant held (ckptd raised only its own errors, or torch's type where
torch failed too, and equalled torch.load wherever torch.load succeeded), 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ckptd_testlib.fuzz import apply, bounded_memory, check, random_ops, seeds  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=int, default=4000, help="how many mutants in all (default 4000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    outcomes: collections.Counter[str] = collections.Counter()
    failures = 0
    started = time.perf_counter()
    with bounded_memory():
        for i in range(args.mutants):
            name = rng.choice(sorted(seeds()))
            ops = random_ops(rng)
            try:
                outcomes[f"{name}: {check(apply(seeds()[name], ops))}"] += 1
            except AssertionError as exc:
                failures += 1
                print(f"VIOLATION #{i} seed={name} ops={ops}: {str(exc).splitlines()[0][:300]}")
    elapsed = time.perf_counter() - started
    for key, count in sorted(outcomes.items()):
        print(f"{count:6d}  {key}")
    print(f"{args.mutants} mutants in {elapsed:.1f} s, {failures} violations")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
