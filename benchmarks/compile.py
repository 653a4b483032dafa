"""Step time under ``torch.compile``: does the callback keep compile's speed-up?

An MLP of 18 Linear layers (width 512, tanh) on synthetic batches of 256 in a plain loop, four arms interleaved in
each round (eager, eager with the engine, compiled, compiled with the engine; SGD with momentum, the engine at its
defaults): the median step time of each arm over the rounds' steps after a warm-up that includes the compilation,
and the median of its forward and backward alone (where the capture hooks' graph breaks cost).

    python -m benchmarks.compile [--rounds 3 --steps 30]
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

WIDTH, LAYERS, BATCH = 512, 18, 256


def model() -> nn.Module:
    torch.manual_seed(0)
    hidden = [module for _ in range(LAYERS - 2) for module in (nn.Linear(WIDTH, WIDTH), nn.Tanh())]
    return nn.Sequential(nn.Linear(64, WIDTH), nn.Tanh(), *hidden, nn.Linear(WIDTH, 10))


def arm(compiled: bool, engine: bool, steps: int, warmup: int) -> tuple[float, float]:
    """Median seconds of a step (forward, backward, the engine's step, the optimizer's) and of its forward and
    backward alone, after ``warmup`` steps."""
    torch._dynamo.reset()
    net = model()
    forward = torch.compile(net) if compiled else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    kfac = LowRankKFAC(net) if engine else None
    x, y = torch.randn(BATCH, 64), torch.randint(0, 10, (BATCH,))
    times, passes = [], []
    for step in range(warmup + steps):
        started = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        backward_done = time.perf_counter()
        if kfac is not None:
            kfac.step(lr=optimizer)
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - started)
            passes.append(backward_done - started)
    if kfac is not None:
        kfac.close()
    return statistics.median(times), statistics.median(passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    arms = [(False, False), (False, True), (True, False), (True, True)]
    seconds: dict[tuple[bool, bool], list[tuple[float, float]]] = {a: [] for a in arms}
    for _ in range(args.rounds):
        for compiled, engine in arms:
            seconds[(compiled, engine)].append(arm(compiled, engine, args.steps, args.warmup))
    ms = {a: 1e3 * statistics.median(step for step, _ in values) for a, values in seconds.items()}
    passes = {a: 1e3 * statistics.median(part for _, part in values) for a, values in seconds.items()}
    rows = [
        {
            "model": f"MLP, {LAYERS} Linear layers of width {WIDTH}, batch {BATCH}",
            "eager ms": ms[(False, False)],
            "eager + callback ms": ms[(False, True)],
            "compiled ms": ms[(True, False)],
            "compiled + callback ms": ms[(True, True)],
            "compile speed-up": ms[(False, False)] / ms[(True, False)],
            "compile speed-up with the callback": ms[(False, True)] / ms[(True, True)],
            "callback / plain, compiled": ms[(True, True)] / ms[(True, False)],
            "forward+backward ms: eager": passes[(False, False)],
            "forward+backward ms: eager + callback": passes[(False, True)],
            "forward+backward ms: compiled": passes[(True, False)],
            "forward+backward ms: compiled + callback": passes[(True, True)],
        }
    ]
    print_table(rows, list(rows[0]))
    write_json("compile", {**device_record(torch.device("cpu")), "rounds": args.rounds, "steps": args.steps}, rows)


if __name__ == "__main__":
    main()
