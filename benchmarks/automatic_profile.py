"""Where the automatic step's time goes: the phases of one step in a plain loop, beside SGD and the callback's
default step (``kfac`` with SGD), on the step-rules MLP (64-256-256-10) at batch 100 and 1,000, synthetic batches.

Phases: the forward; ``before_backward`` (``auto``: the graphs of the Gauss–Newton products); the backward; the
engine's step (statistics, refreshes, preconditioning; ``auto``: also the two Jacobian products, α and μ, and the
forward at the new point); the optimizer's step. Each arm is a fresh model run for 40 steps (the first 5 not
counted), the arms alternating over 3 rounds; medians of the phases, the mean of the whole step.

    python -m benchmarks.automatic_profile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_lrkfac import LowRankKFAC

from .common import device_record, print_table, write_json

PHASES = ("forward", "before_backward", "backward", "engine step", "optimizer")
ARMS = {
    "sgd": None,
    "kfac": {},
    "auto": {"step_size": "auto", "kl_clip": None},
    "auto-mc": {"step_size": "auto", "kl_clip": None, "fisher_type": "mc"},
}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def arm(options: dict | None, batch: int, steps: int, warmup: int) -> dict[str, float]:
    """Seconds of each phase (median over steps) and of the whole step (mean) for one arm."""
    net = model()
    automatic = options is not None and options.get("step_size") == "auto"
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0 if automatic else 0.1, momentum=0.0 if automatic else 0.9)
    kfac = None if options is None else LowRankKFAC(net, **options)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 64, generator=generator), torch.randint(0, 10, (batch,), generator=generator)
    times = []
    for _ in range(warmup + steps):
        marks = [time.perf_counter()]
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        marks.append(time.perf_counter())
        if kfac is not None:
            kfac.before_backward(loss)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        if kfac is not None:
            kfac.step(lr=optimizer, loss_closure=lambda: F.cross_entropy(net(x), y))
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        times.append([b - a for a, b in zip(marks, marks[1:])])
    if kfac is not None:
        kfac.close()
    kept = times[warmup:]
    phases = {name: statistics.median(t[i] for t in kept) for i, name in enumerate(PHASES)}
    return phases | {"step": statistics.mean(sum(t) for t in kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batches", nargs="*", type=int, default=[100, 1000])
    args = parser.parse_args()
    rows = []
    for batch in args.batches:
        measured: dict[str, list[dict[str, float]]] = {name: [] for name in ARMS}
        for _ in range(args.rounds):
            for name, options in ARMS.items():  # alternating
                measured[name].append(arm(options, batch, args.steps, warmup=5))
        sgd = statistics.median(m["step"] for m in measured["sgd"])
        for name, runs in measured.items():
            row = {"batch": batch, "method": name}
            row |= {f"{key} ms": 1e3 * statistics.median(r[key] for r in runs) for key in (*PHASES, "step")}
            row["step / sgd"] = statistics.median(r["step"] for r in runs) / sgd
            rows.append(row)
    print_table(rows, list(rows[0]))
    write_json("automatic_profile", {**device_record(torch.device("cpu")), "rounds": args.rounds}, rows)


if __name__ == "__main__":
    main()
