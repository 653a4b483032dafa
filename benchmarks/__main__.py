"""Run every benchmark: ``python -m benchmarks [--quick] [--only NAME ...]``, or the GPU check: ``--gpu``.

--quick (about 2 hours on 2 CPU cores, about 25 minutes of them batch_scaling) shrinks sizes, seeds,
grids and repeats; without it the scripts run their full settings (meant for a GPU). Each writes JSON and PNG to
benchmarks/results/ and prints its table. --gpu runs benchmarks/gpu.py: the CUDA tests and
the GPU step-ratio and layer-scaling checks, into benchmarks/results/gpu/.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

BENCHMARKS = {
    "layer_scaling": True,  # value: whether the script takes --quick
    "communication": False,
    "step_overhead": True,
    "approximation": False,
    "time_to_accuracy": True,
    "embeddings": False,
    "defaults": False,
    "step_rules": True,
    "automatic_step": True,
    "automatic_profile": False,
    "batch_scaling": True,
    "language_model": True,
    "language_model_w256": True,  # the wider model at the smaller batch, against AdamW and Muon
    "language_model_variants": True,  # the normalized step's update norm and statistics cap, against Muon
    "language_model_polar": True,  # each layer's update orthogonalized, against the normalized step and Muon (1,024 tokens)
    "language_model_cost": True,  # the statistics capped, and folded every 4th step, against Muon
    "sharding_bytes": False,
    "main_job": False,
    "compile": False,
}
#: Runs of a script with arguments of their own: name → (module, arguments).
VARIANTS = {
    "language_model_w256": (
        "language_model",
        ["--width", "256", "--batches", "8", "--methods", "adamw", "muon", "normalized"],
    ),
    "language_model_variants": (
        "language_model",
        [
            "--methods",
            "muon",
            "normalized",
            "normalized-rms",
            "normalized-capped",
            "--output",
            "language_model_variants",
        ],
    ),
    "language_model_polar": (
        "language_model",
        ["--batches", "8", "--methods", "muon", "normalized", "normalized-polar", "--output", "language_model_polar"],
    ),
    "language_model_cost": (
        "language_model",
        ["--methods", "muon", "normalized-capped", "normalized-lean", "--output", "language_model_cost"],
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--gpu", action="store_true", help="the GPU check only (benchmarks/gpu.py)")
    parser.add_argument("--list", action="store_true", help="print every benchmark's name and first line, run none")
    args = parser.parse_args()
    if args.list:
        for name in BENCHMARKS:
            module_name, extra = VARIANTS.get(name, (name, []))
            doc = importlib.import_module(f"benchmarks.{module_name}").__doc__ or ""
            doc = f"{' '.join(extra)}: {doc.strip()}" if extra else doc
            print(f"{name:<18} {doc.strip().splitlines()[0] if doc.strip() else ''}")
        return
    if args.gpu:
        importlib.import_module("benchmarks.gpu").main()
        return
    for name in args.only:
        print(f"\n=== benchmarks.{name} ===", flush=True)
        started = time.perf_counter()
        module_name, extra = VARIANTS.get(name, (name, []))
        module = importlib.import_module(f"benchmarks.{module_name}")
        sys.argv = [module_name, *extra] + (["--quick"] if args.quick and BENCHMARKS[name] else [])
        module.main()
        print(f"=== {name}: {time.perf_counter() - started:.0f} s ===", flush=True)


if __name__ == "__main__":
    main()
