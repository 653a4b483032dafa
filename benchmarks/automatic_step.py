"""Steps and time to a target with ``step_size="auto"`` (no learning rate) beside tuned SGD, Adam, Muon and K-FAC.

The tasks of :mod:`benchmarks.step_rules` (digits to 95% test accuracy, mnist1d to 60%, the digits autoencoder
to test MSE 0.045) at batch 100 and 1,000. Methods, each with a grid (rates shifted by √10 at batch 1,000):

- ``sgd`` (momentum 0.9), ``adam``, ``muon`` (torch's Muon on the hidden matrices, AdamW 3e-3 on the rest);
- ``kfac``: the callback's defaults with SGD + momentum 0.9, tuned learning rate;
- ``auto`` / ``auto-mc``: ``step_size="auto"``, ``kl_clip=None`` with ``SGD(lr=1)``, the empirical / the
  Monte-Carlo Fisher for the factors (gaussian likelihood for the autoencoder); the grid is λ₀ (``damping``),
  the untuned default is the package's λ₀ = 1e-2.

Every grid point runs seed 0 and stops at the target; each method's best point (fewest steps, then least time)
and its default rerun on seeds 1 and 2; medians of the three. Wall time counts training steps only.

    python -m benchmarks.automatic_step [--tasks ...] [--batches ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics

import torch

from .common import device_record, print_table, write_json
from .step_rules import DEFAULT_TASKS, TASKS, Method, Task, one_run
from .training import label

BATCHES = (100, 1000)
#: Steps allowed per task and batch size.
BUDGETS = {
    "digits": {100: 300, 1000: 300},
    "mnist1d": {100: 800, 1000: 400},
    "digits-autoencoder": {100: 1000, 1000: 1000},
}
SEEDS = 3
#: Steps between test evaluations (the resolution of "steps to target").
EVERY = 5
AUTO = {"step_size": "auto", "kl_clip": None}
DEFAULT_DAMPING = 1e-2


def methods(batch: int) -> list[Method]:
    """Each method's grid at this batch size; ``default`` is the untuned configuration where one is defined."""
    shift = 1.0 if batch <= 100 else math.sqrt(10.0)

    def rates(*values: float) -> list[dict]:
        return [{"lr": round(v * shift, 4)} for v in values]

    dampings = [{"lr": 1.0, "damping": d} for d in (1e-3, 1e-2, 1e-1)]
    auto_default = {"lr": 1.0, "damping": DEFAULT_DAMPING}
    return [
        Method("sgd", "sgd", 0.9, None, rates(0.03, 0.1, 0.3, 1.0)),
        Method("adam", "adam", 0.0, None, [{"lr": lr} for lr in (1e-3, 3e-3, 1e-2, 3e-2)]),
        Method("muon", "muon", 0.0, None, rates(0.01, 0.03, 0.1, 0.3)),
        Method("kfac", "sgd", 0.9, {}, rates(0.03, 0.1, 0.3)),
        Method("auto", "sgd", 0.0, AUTO, dampings, auto_default),
        Method("auto-mc", "sgd", 0.0, {**AUTO, "fisher_type": "mc"}, dampings, auto_default),
    ]


def median_of(runs: list[dict], config: dict, method: Method) -> dict:
    return {
        "method": method.name,
        "config": label(config),
        "reached": sum(math.isfinite(r["steps"]) for r in runs),
        "steps": statistics.median(r["steps"] for r in runs),
        "seconds": statistics.median(r["seconds"] for r in runs),
        "ms/step": 1e3 * statistics.median(r["seconds_per_step"] for r in runs),
    }


def measure(task: Task, batch: int, device: torch.device) -> list[dict]:
    """The rows of one task and batch size: each method's best point and, where defined, its default."""
    budget = BUDGETS[task.name][batch]
    task = dataclasses.replace(task, every=EVERY)

    def run(method: Method, config: dict, seed: int) -> dict:
        return one_run(task, method, config, seed, device, batch=batch, max_steps=budget, stop_at_target=True)

    rows = []
    for method in methods(batch):
        grid = {label(c): (c, [run(method, c, 0)]) for c in method.grid}
        best = min(grid.values(), key=lambda entry: (entry[1][0]["steps"], entry[1][0]["seconds"]))
        chosen = [("tuned", best)] + ([("default", grid[label(method.default)])] if method.default else [])
        for kind, (config, runs) in chosen:
            if len(runs) == 1:  # the default may be the best point: its seeds run once
                runs += [run(method, config, seed) for seed in range(1, SEEDS)]
            rows.append({"task": task.name, "batch": batch, "kind": kind, **median_of(runs, config, method)})
        print(f"{task.name} batch {batch} {method.name}: {rows[-1]}", flush=True)
    peers = [r for r in rows if r["method"] in ("sgd", "adam") and r["kind"] == "tuned"]
    best_peer_steps = min(r["steps"] for r in peers)
    best_peer_seconds = min(r["seconds"] for r in peers)
    best_tuned_steps = min(r["steps"] for r in rows if r["kind"] == "tuned")
    for row in rows:
        row["steps / best of sgd, adam"] = row["steps"] / best_peer_steps
        row["time / best of sgd, adam"] = row["seconds"] / best_peer_seconds
        row["steps / best tuned"] = row["steps"] / best_tuned_steps
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", nargs="*", default=DEFAULT_TASKS, choices=DEFAULT_TASKS)
    parser.add_argument("--batches", nargs="*", type=int, default=list(BATCHES))
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for task in [t for t in TASKS if t.name in args.tasks]:
        for batch in args.batches:
            rows += measure(task, batch, device)
    print_table(rows, list(rows[0]))
    meta = {
        **device_record(device),
        "seeds": SEEDS,
        "targets": {t.name: t.shown(t.target) for t in TASKS if t.name in args.tasks},
        "budgets": BUDGETS,
    }
    write_json("automatic_step", meta, rows)


if __name__ == "__main__":
    main()
