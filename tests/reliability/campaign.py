"""Long fuzz campaign: run the fuzz properties on many networks and group failures by signature.

    .venv/bin/python tests/reliability/campaign.py --examples 2000 [--seed 1] [--property valid|arbitrary]

Unlike the pytest run, a failure does not stop the campaign: each distinct signature (exception type
plus the message with numbers masked) keeps its smallest example, printed at the end as a spec.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import torch  # noqa: E402
from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import test_fuzz_graphs as fuzz  # noqa: E402
from strategies import specs  # noqa: E402


def signature(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    text = re.sub(r"\d+", "N", text)
    text = re.sub(r"\(N(, N)*\)", "(...)", text)
    return text[:300]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--property", choices=["valid", "arbitrary"], default="valid")
    parser.add_argument("--max-ops", type=int, default=10)
    parser.add_argument("--min-piece", type=int, default=1, help="narrowest split piece (1: any)")
    parser.add_argument("--no-grouped", action="store_true", help="no grouped or depthwise convs")
    parser.add_argument("--allow", action="append", default=[],
                        help="extra regex of blocked reasons to accept (to look past a known bug)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for pattern in args.allow:
        fuzz.ALLOWED_BLOCKED[pattern] = re.compile(pattern)

    found: dict = {}
    counts = {"examples": 0, "failed": 0}
    start = time.time()

    @hypothesis_seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(spec=specs(max_ops=args.max_ops, min_piece=args.min_piece, grouped=not args.no_grouped), rng_seed=st.integers(0, 2**16))
    def run(spec, rng_seed):
        counts["examples"] += 1
        try:
            if args.property == "valid":
                fuzz.check_valid_pruning(spec, random.Random(rng_seed))
            else:
                fuzz.check_arbitrary_idxs(spec, random.Random(rng_seed))
        except Exception as error:  # noqa: BLE001 - every failure is recorded, none stops the campaign
            counts["failed"] += 1
            key = signature(error)
            size = len(spec.ops) + len(spec.layers)
            if key not in found or size < found[key][0]:
                found[key] = (size, repr(spec), rng_seed, traceback.format_exc(limit=-4))
            found.setdefault(f"count:{key}", [0])[0] += 1

    run()
    print(f"property={args.property} seed={args.seed} examples={counts['examples']} failed={counts['failed']} "
          f"distinct={sum(1 for k in found if not k.startswith('count:'))} time={time.time() - start:.0f}s")
    print("blocked reasons seen:", fuzz.BLOCKED_SEEN)
    for key, value in found.items():
        if key.startswith("count:"):
            continue
        size, spec, rng_seed, tb = value
        print("=" * 100)
        print(f"[{found['count:' + key][0]}x] {key}")
        print(f"rng_seed={rng_seed}")
        print(spec)
        print(tb)


if __name__ == "__main__":
    main()
