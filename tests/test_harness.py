"""The benchmark harness's sweep: grid on seed 0 with the methods alternating, the best point confirmed on the other
seeds, and the tuned row is the confirmed point's."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from benchmarks.harness import Method, Run, sweep


@dataclass
class ScriptedTask:
    """Runs whose score history is set by (config, seed); records the order of the runs."""

    name: str = "scripted"
    order: list[tuple[str, str, int]] = field(default_factory=list)

    def run(self, method: Method, config: dict, seed: int, device: torch.device) -> Run:
        self.order.append((method.name, config["point"], seed))
        reaches_at = {("fast", 0): 10, ("slow", 0): 30, ("slow", 1): 30, ("slow", 2): 30}.get((config["point"], seed))
        history = [(step, 0.01 * step, 1.0 if reaches_at and step >= reaches_at else 0.0) for step in (10, 20, 30)]
        return Run(history, 0.01)


def test_the_tuned_row_is_the_point_chosen_on_seed_0_and_confirmed_on_every_seed():
    task = ScriptedTask()
    methods = [
        Method("a", "sgd", grid=({"point": "fast"}, {"point": "slow"})),
        Method("b", "sgd", grid=({"point": "slow"},)),
    ]
    result = sweep([task], methods, seeds=3, device=torch.device("cpu"), target=lambda t, _: 0.5, log=lambda _: None)
    assert task.order[:3] == [("a", "fast", 0), ("b", "slow", 0), ("a", "slow", 0)], "grid on seed 0, alternating"
    assert task.order[3:] == [("a", "fast", 1), ("b", "slow", 1), ("a", "fast", 2), ("b", "slow", 2)]
    tuned = result.tuned("scripted", methods[0], 0.5)
    # "fast" won seed 0 (10 steps) and then missed seeds 1 and 2; "slow" ran on seed 0 alone, so ranking every row
    # by the share of seeds reaching the target would pick it over the confirmed point.
    assert (tuned["config"], tuned["seeds"], tuned["reached"]) == ("point=fast", 3, 1)
