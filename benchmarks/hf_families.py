"""Print the Hugging Face family table of docs/huggingface.md: params kept and the four checks per family.

    PYTHONPATH=src python benchmarks/hf_families.py [Family ...]

Tiny random models (tests/transformers/hf_families.py) pruned at pruning_ratio=0.5 with whole heads
(head_pruning_ratio=0.5), LM heads and classifiers ignored; see that module for the checks.
"""
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "transformers"))

import torch  # noqa: E402

from hf_families import FAMILIES, run_checks  # noqa: E402


def main(names):
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    chosen = [family for family in FAMILIES if not names or family.name in names]
    print("| family | params kept | forward | params -25% | generate | save_pretrained/from_pretrained | s |")
    print("|---|---|---|---|---|---|---|")
    passed = 0
    for family in chosen:
        start = time.perf_counter()
        result = run_checks(family)
        passed += result.passed
        ratio = "-" if result.ratio is None else f"{result.ratio:.0%}"
        refused = family.config_limit is not None and result.reload.startswith("ConfigMismatchError")
        reload = result.reload if not refused else (
            f"refused before writing ({family.config_limit}); tp.save_pruned: {result.reload_pruned}")
        print(f"| {result.name} | {ratio} | {result.forward} | {result.params} | {result.generate} | "
              f"{reload if len(reload) < 400 else reload[:400]} | {time.perf_counter() - start:.1f} |", flush=True)
        for message in result.warnings:
            print(f"    warning: {message}", file=sys.stderr)
    print(f"\n{passed} of {len(chosen)} families pass all four checks")


if __name__ == "__main__":
    main(sys.argv[1:])
