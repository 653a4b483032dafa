"""One harness for the training benchmarks: methods at grid points, a sweep that interleaves them, one result schema
and one best-point rule.

- A **method** is an optimizer (and momentum), the callback's options or none, a learning-rate grid and a default.
- A **task** builds one run of a method at a grid point on a seed and returns a :class:`Run`: its validation or test
  score every few steps against optimizer steps and training wall time.
- :func:`sweep` runs the plan: every grid point on seed 0, then the best point (and the default) on the other
  seeds. Seeds are the outer loop and the arms alternate inside it, so machine drift hits every arm alike.
- Every run is kept whole (its history); a summary row per (task, method, config) has the same keys everywhere:
  ``task, method, config, default, seeds, reached, steps, seconds, ms_per_step, final, best`` (medians over seeds).
- :func:`best_point`: most seeds reaching the target, then fewest median steps, then least median time, then the
  best final score.
- ``--quick`` means one seed (the grid on seed 0 only).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .training import label


@dataclass(frozen=True)
class Method:
    """An optimizer (and its momentum), the callback's options (None: the plain optimizer), a grid and a default."""

    name: str
    optimizer: str
    momentum: float = 0.0
    callback: dict | None = None
    grid: tuple[dict, ...] = ()
    default: dict | None = None

    def configs(self) -> list[dict]:
        """The grid points, then the default when it is off the grid."""
        extra = [] if self.default is None or self.default in self.grid else [self.default]
        return [*self.grid, *extra]


@dataclass
class Run:
    """One training run: (step, training seconds, score) at every check, and the seconds of each step."""

    history: list[tuple[int, float, float]]
    seconds_per_step: float

    def to_target(self, target: float) -> tuple[float, float]:
        """(steps, training seconds) to the first check whose score reaches ``target``; (inf, inf) if none did."""
        return next(((step, seconds) for step, seconds, score in self.history if score >= target), (math.inf, math.inf))

    @property
    def final(self) -> float:
        return self.history[-1][2]

    @property
    def best(self) -> float:
        return max(score for _, _, score in self.history)


class Task(Protocol):
    """What a benchmark declares: a name, a target score (higher is better) and how to make one run."""

    name: str

    def run(self, method: Method, config: dict, seed: int, device: torch.device) -> Run: ...


def summary(task: str, method: Method, config: dict, runs: Sequence[Run], target: float) -> dict[str, Any]:
    """The one summary schema: medians over the seeds of steps and seconds to ``target``, ms per step, final, best."""
    reached = [run.to_target(target) for run in runs]
    return {
        "task": task,
        "method": method.name,
        "config": label(config),
        "default": config == method.default,
        "seeds": len(runs),
        "reached": sum(math.isfinite(steps) for steps, _ in reached),
        "steps": statistics.median(steps for steps, _ in reached),
        "seconds": statistics.median(seconds for _, seconds in reached),
        "ms_per_step": 1e3 * statistics.median(run.seconds_per_step for run in runs),
        "final": statistics.median(run.final for run in runs),
        "best": statistics.median(run.best for run in runs),
    }


def best_point(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best of one method's summary rows: most seeds reaching the target, fewest steps, least time, best final."""
    return min(rows, key=lambda row: (-row["reached"] / row["seeds"], row["steps"], row["seconds"], -row["final"]))


@dataclass
class Sweep:
    """Every run of a benchmark, keyed by (task, method, config label), each a list over seeds."""

    runs: dict[tuple[str, str, str], list[Run]] = field(default_factory=dict)
    #: The grid point (label) each (task, method) confirmed on the other seeds: its best on seed 0.
    chosen: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, task: str, method: Method, config: dict, run: Run) -> None:
        self.runs.setdefault((task, method.name, label(config)), []).append(run)

    def rows(self, task: str, method: Method, target: float) -> list[dict[str, Any]]:
        """The summary rows of one method's grid points (and default) that ran on ``task``."""
        return [
            summary(task, method, config, self.runs[(task, method.name, label(config))], target)
            for config in method.configs()
            if (task, method.name, label(config)) in self.runs
        ]

    def tuned(self, task: str, method: Method, target: float) -> dict[str, Any]:
        """The summary row of the method's tuned point: the one chosen on seed 0 and confirmed on the other seeds
        (a point that ran on seed 0 alone is never picked over it because it had fewer seeds to miss with)."""
        rows = self.rows(task, method, target)
        return next(row for row in rows if row["config"] == self.chosen[(task, method.name)])


def sweep(
    tasks: Sequence[Task],
    methods: Sequence[Method],
    seeds: int,
    device: torch.device,
    target: Callable[[Task, Sweep], float],
    log: Callable[[str], None] = print,
) -> Sweep:
    """Grid then confirm: every method's grid points (and default) on seed 0, the arms alternating; then the best
    point by :func:`best_point` at ``target(task, the runs so far)`` and the default on seeds 1 … ``seeds`` − 1,
    seeds outside."""
    result = Sweep()
    for task in tasks:
        longest = max(len(method.configs()) for method in methods)
        for index in range(longest):  # grid points alternate across methods
            for method in methods:
                configs = method.configs()
                if index < len(configs):
                    run = task.run(method, configs[index], 0, device)
                    result.add(task.name, method, configs[index], run)
                    log(
                        f"{task.name} {method.name} {label(configs[index])}: final {run.final:.4g}, best {run.best:.4g}"
                    )
        goal = target(task, result)
        confirmed = {}
        for method in methods:
            best = best_point(result.rows(task.name, method, goal))
            result.chosen[(task.name, method.name)] = best["config"]
            confirmed[method.name] = [c for c in method.configs() if label(c) == best["config"] or c == method.default]
        for seed in range(1, seeds):
            for method in methods:
                for config in confirmed[method.name]:
                    result.add(task.name, method, config, task.run(method, config, seed, device))
    return result
