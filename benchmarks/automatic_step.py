"""Steps and time to a target with ``step_size="auto"`` (no learning rate) beside tuned SGD, Adam, Muon and K-FAC.

The tasks of :mod:`benchmarks.step_rules` (digits to 95% test accuracy, mnist1d to 60%, the digits autoencoder
to test MSE 0.045) at batch 100 and 1,000. Methods, each with a grid (rates shifted by √10 at batch 1,000):

- ``sgd`` (momentum 0.9), ``adam``, ``muon`` (torch's Muon on the hidden matrices, AdamW 3e-3 on the rest);
- ``kfac``: the callback's defaults with SGD + momentum 0.9, tuned learning rate;
- ``auto`` / ``auto-mc``: ``step_size="auto"``, ``kl_clip=None`` with ``SGD(lr=1)``, the empirical / the
  Monte-Carlo Fisher for the factors (gaussian likelihood for the autoencoder); the grid is λ₀ (``damping``),
  the untuned default is the package's λ₀ = 1e-2.

The harness's sweep (:mod:`benchmarks.harness`): every grid point runs seed 0 and stops at the target; each
method's best point and its default rerun on seeds 1 and 2 (``--quick``: seed 0 only); medians over the seeds.
Wall time counts training steps only. ``ms/step`` is the mean over the run (training seconds over steps), so the
steps that cost more (the first refresh) count as they do in the time to the target.

    python -m benchmarks.automatic_step [--tasks ...] [--batches ...] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from .common import device_record, print_table, write_json
from .harness import Method, Run, Sweep, sweep
from .step_rules import DEFAULT_TASKS, TASKS, Task

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
#: The peers whose best time the automatic step is measured against.
PEERS = ("sgd", "adam", "muon")


def methods(batch: int) -> list[Method]:
    """Each method's grid at this batch size; ``default`` is the untuned configuration where one is defined."""
    shift = 1.0 if batch <= 100 else math.sqrt(10.0)

    def rates(*values: float) -> tuple[dict, ...]:
        return tuple({"lr": round(v * shift, 4)} for v in values)

    dampings = tuple({"lr": 1.0, "damping": d} for d in (1e-3, 1e-2, 1e-1))
    auto_default = {"lr": 1.0, "damping": DEFAULT_DAMPING}
    return [
        Method("sgd", "sgd", 0.9, None, rates(0.03, 0.1, 0.3, 1.0)),
        Method("adam", "adam", 0.0, None, tuple({"lr": lr} for lr in (1e-3, 3e-3, 1e-2, 3e-2))),
        Method("muon", "muon", 0.0, None, rates(0.01, 0.03, 0.1, 0.3)),
        Method("kfac", "sgd", 0.9, {}, rates(0.03, 0.1, 0.3)),
        Method("auto", "sgd", 0.0, AUTO, dampings, auto_default),
        Method("auto-mc", "sgd", 0.0, {**AUTO, "fisher_type": "mc"}, dampings, auto_default),
    ]


def mean_ms_per_step(runs: list[Run]) -> float:
    """Median over the seeds of each run's training seconds over its steps, in ms."""
    return 1e3 * statistics.median(run.history[-1][1] / max(run.history[-1][0], 1) for run in runs)


def measure(task: Task, batch: int, seeds: int, device: torch.device) -> list[dict]:
    """The rows of one task and batch size: each method's best point and, where defined, its default."""
    task = task.at(batch, BUDGETS[task.name][batch], EVERY)
    every_method = methods(batch)
    result: Sweep = sweep([task], every_method, seeds, device, target=lambda t, _: t.target)
    rows = []
    for method in every_method:
        grid = result.rows(task.name, method, task.target)
        chosen = [("tuned", result.tuned(task.name, method, task.target))] + [
            ("default", row) for row in grid if row["default"]
        ]
        for kind, row in chosen:
            runs = result.runs[(task.name, method.name, row["config"])]
            rows.append(
                {
                    "task": task.name, "batch": batch, "kind": kind, "method": method.name, "config": row["config"],
                    "seeds": row["seeds"], "reached": row["reached"], "steps": row["steps"],
                    "seconds": row["seconds"], "ms/step": mean_ms_per_step(runs),
                }
            )  # fmt: skip
        print(f"{task.name} batch {batch} {method.name}: {rows[-1]}", flush=True)
    tuned = {row["method"]: row for row in rows if row["kind"] == "tuned"}
    best_peer_seconds = min(tuned[m]["seconds"] for m in PEERS)
    best_tuned_steps = min(row["steps"] for row in tuned.values())
    for row in rows:
        row["step cost / sgd"] = row["ms/step"] / tuned["sgd"]["ms/step"]
        row["time / best of sgd, adam, muon"] = row["seconds"] / best_peer_seconds
        row["steps / best tuned"] = row["steps"] / best_tuned_steps
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", nargs="*", default=DEFAULT_TASKS, choices=DEFAULT_TASKS)
    parser.add_argument("--batches", nargs="*", type=int, default=list(BATCHES))
    parser.add_argument("--quick", action="store_true", help="seed 0 only (the grid)")
    args = parser.parse_args()
    device = torch.device(args.device)
    seeds = 1 if args.quick else SEEDS
    rows = []
    for task in [t for t in TASKS if t.name in args.tasks]:
        for batch in args.batches:
            rows += measure(task, batch, seeds, device)
    print_table(rows, list(rows[0]))
    meta = {
        **device_record(device),
        "seeds": seeds,
        "targets": {t.name: t.shown(t.target) for t in TASKS if t.name in args.tasks},
        "budgets": BUDGETS,
    }
    write_json("automatic_step", meta, rows)


if __name__ == "__main__":
    main()
