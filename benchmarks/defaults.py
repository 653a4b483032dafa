"""Which callback defaults reach the accuracy target soonest in wall time? One option at a time is
changed from the time-to-accuracy benchmark's tuned callback configuration (digits: lr 0.05;
mnist1d: lr 0.2; damping 0.01, rank 16, isotropic tail, factors every step, bases every 10),
3 seeds, median training seconds and steps to the target; candidates interleaved per seed.

    python -m benchmarks.defaults
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from .common import device_record, print_table, write_json
from .time_to_accuracy import TASKS, one_run

TUNED = {"digits": {"lr": 0.05, "damping": 0.01}, "mnist1d": {"lr": 0.2, "damping": 0.01}}
CANDIDATES = {
    "tuned": {},
    "factor_update_interval=3": {"factor_update_interval": 3},
    "factor_update_interval=10": {"factor_update_interval": 10},
    "basis_update_interval=30": {"basis_update_interval": 30},
    "basis_update_interval=100": {"basis_update_interval": 100},
    "factor 10 / basis 100 (kfac-pytorch)": {"factor_update_interval": 10, "basis_update_interval": 100},
    "rank=32": {"rank": 32},
    "rank=8": {"rank": 8},
    "isotropic_tail=false": {"isotropic_tail": False},
    "kl_clip=null": {"kl_clip": None},
    "kl_clip=1e-2": {"kl_clip": 1e-2},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cpu")
    rows = []
    for task in TASKS:
        results: dict[str, list[dict]] = {name: [] for name in CANDIDATES}
        for seed in range(args.seeds):
            for name, change in CANDIDATES.items():
                results[name].append(one_run(task, "kfac", {**TUNED[task.name], **change}, seed, device))
        baseline = statistics.median(r["seconds"] for r in results["tuned"])
        for name, runs in results.items():
            seconds = statistics.median(r["seconds"] for r in runs)
            rows.append(
                {
                    "task": task.name,
                    "candidate": name,
                    "reached": sum(math.isfinite(r["steps"]) for r in runs),
                    "median_steps": statistics.median(r["steps"] for r in runs),
                    "median_seconds": seconds,
                    "vs_tuned": seconds / baseline,
                    "ms_per_step": 1e3 * statistics.median(r["seconds_per_step"] for r in runs),
                }
            )
        print_table([r for r in rows if r["task"] == task.name], list(rows[0]))
    print("\ntime to target of each one-option change, relative to the tuned configuration:")
    print_table(rows, list(rows[0]))
    write_json("defaults", {**device_record(device), "seeds": args.seeds, "tuned": TUNED}, rows)


if __name__ == "__main__":
    main()
