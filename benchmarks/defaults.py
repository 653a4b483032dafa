"""Which callback defaults reach the accuracy target soonest in wall time? One option at a time is
changed from the time-to-accuracy benchmark's tuned callback configuration (digits: lr 0.05;
mnist1d: lr 0.2; damping 0.01, rank 16, isotropic tail, factors every step, bases every 10),
3 seeds (the harness's sweep), median training seconds and steps to the target; candidates alternating.

    python -m benchmarks.defaults
"""

from __future__ import annotations

import argparse

import torch

from .common import device_record, print_table, write_json
from .harness import Method, sweep
from .time_to_accuracy import TASKS

TUNED = {"digits": {"lr": 0.05, "damping": 0.01}, "mnist1d": {"lr": 0.2, "damping": 0.01}}
CALLBACK = {"rank": 16, "isotropic_tail": True}
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
    "damping_mode=relative": {"damping_mode": "relative"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cpu")
    rows = []
    for task in [t for t in TASKS if t.name in TUNED]:
        candidates = [
            Method(name, "sgd", 0.9, {**CALLBACK, **change}, ({**TUNED[task.name]},))
            for name, change in CANDIDATES.items()
        ]  # each one grid point: the sweep runs every candidate on every seed, the candidates alternating
        result = sweep([task], candidates, args.seeds, device, target=lambda t, _: t.target)
        summaries = [result.rows(task.name, method, task.target)[0] for method in candidates]
        tuned = next(row["seconds"] for row in summaries if row["method"] == "tuned")
        rows += [{**row, "vs_tuned": row["seconds"] / tuned} for row in summaries]
        print_table(rows[-len(summaries) :], list(rows[0]))
    print("\ntime to target of each one-option change, relative to the tuned configuration:")
    print_table(rows, list(rows[0]))
    write_json("defaults", {**device_record(device), "seeds": args.seeds, "tuned": TUNED}, rows)


if __name__ == "__main__":
    main()
