"""Step time under ``torch.compile``: does the callback keep compile's speed-up?

Two models in a plain loop on synthetic batches: an MLP of 18 Linear layers (width 512, tanh) at batch 256, where the
step is matmuls and compile has little to fuse, and a byte GPT (width 128, 4 blocks, context 64: 16 handled Linear
layers and the head, with LayerNorm, GELU and attention for compile to fuse) at 16 sequences a step. Four arms
interleaved in each round (eager, eager with the engine, compiled, compiled with the engine; SGD with momentum, the
engine at its defaults): the median step time of each arm over the rounds' steps after a warm-up that includes the
compilation, and the median of its forward and backward alone (where the capture hooks' graph breaks cost).

    python -m benchmarks.compile [--rounds 3 --steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_lrkfac import LowRankKFAC
from lightning_lrkfac.examples.models import GPTLanguageModel

from .common import device_record, print_table, write_json

WIDTH, LAYERS, BATCH = 512, 18, 256
GPT_WIDTH, GPT_DEPTH, CONTEXT, SEQUENCES, VOCABULARY = 128, 4, 64, 16, 256


def mlp() -> nn.Module:
    hidden = [module for _ in range(LAYERS - 2) for module in (nn.Linear(WIDTH, WIDTH), nn.Tanh())]
    return nn.Sequential(nn.Linear(64, WIDTH), nn.Tanh(), *hidden, nn.Linear(WIDTH, 10))


def gpt() -> nn.Module:
    return GPTLanguageModel(VOCABULARY, CONTEXT, GPT_WIDTH, GPT_DEPTH, heads=4)


@dataclass(frozen=True)
class Workload:
    """A model and one synthetic batch (inputs, targets) for it."""

    name: str
    model: Callable[[], nn.Module]
    batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]


WORKLOADS = [
    Workload(
        f"MLP, {LAYERS} Linear layers of width {WIDTH}, batch {BATCH}",
        mlp,
        lambda: (torch.randn(BATCH, 64), torch.randint(0, 10, (BATCH,))),
    ),
    Workload(
        f"byte GPT, width {GPT_WIDTH}, {GPT_DEPTH} blocks, {SEQUENCES}×{CONTEXT} tokens",
        gpt,
        lambda: (
            torch.randint(0, VOCABULARY, (SEQUENCES, CONTEXT)),
            torch.randint(0, VOCABULARY, (SEQUENCES, CONTEXT)),
        ),
    ),
]


def arm(workload: Workload, compiled: bool, engine: bool, steps: int, warmup: int) -> tuple[float, float]:
    """Median seconds of a step (forward, backward, the engine's step, the optimizer's) and of its forward and
    backward alone, after ``warmup`` steps."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = workload.model()
    forward = torch.compile(net) if compiled else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    kfac = LowRankKFAC(net) if engine else None
    x, y = workload.batch()
    times, passes = [], []
    for step in range(warmup + steps):
        started = time.perf_counter()
        optimizer.zero_grad()
        logits = forward(x)
        F.cross_entropy(logits.flatten(0, -2), y.flatten()).backward()
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
    rows = []
    for workload in WORKLOADS:
        seconds: dict[tuple[bool, bool], list[tuple[float, float]]] = {a: [] for a in arms}
        for _ in range(args.rounds):
            for compiled, engine in arms:
                seconds[(compiled, engine)].append(arm(workload, compiled, engine, args.steps, args.warmup))
        ms = {a: 1e3 * statistics.median(step for step, _ in values) for a, values in seconds.items()}
        passes = {a: 1e3 * statistics.median(part for _, part in values) for a, values in seconds.items()}
        rows.append(
            {
                "model": workload.name,
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
        )
        print_table(rows[-1:], list(rows[-1]))
    print_table(rows, list(rows[0]))
    write_json("compile", {**device_record(torch.device("cpu")), "rounds": args.rounds, "steps": args.steps}, rows)


if __name__ == "__main__":
    main()
