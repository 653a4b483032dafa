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


def _summary(method: str, config: str, steps: float, seconds: float, seeds: int = 3, default: bool = False) -> dict:
    return {"method": method, "config": config, "default": default, "seeds": seeds, "reached": seeds,
            "steps": steps, "seconds": seconds, "ms_per_step": 1e3 * seconds / steps, "final": 0.9}  # fmt: skip


def test_batch_scaling_rows_take_kfacs_tuned_point_from_its_defaults_variants_and_only_confirmed_points():
    from benchmarks.batch_scaling import FAMILIES, tuned_rows

    grid = [
        _summary("sgd", "lr=1", 100, 1.0),
        _summary("adam", "lr=1", 200, 2.0),
        _summary("muon", "lr=1", 50, 0.8),
        _summary("muon", "lr=3", 40, 0.5, seeds=1),  # better on seed 0's table, but not the confirmed point
        _summary("kfac", "lr=1", 72, 1.1),
        _summary("kfac-default", "lr=0.1", 74, 1.2, default=True),
        _summary("kfac-default", "lr=0.1, kl_clip=0.01", 54, 0.8),
        _summary("normalized", "lr=1", 46, 0.7),
        _summary("normalized-default", "lr=0.02", 100, 1.5, default=True),
    ]
    rows = {row["method"]: row for row in tuned_rows(FAMILIES[0], 2048, grid)}
    assert (rows["kfac"]["config"], rows["kfac"]["steps"]) == ("lr=0.1, kl_clip=0.01", 54)
    assert rows["kfac-default"]["steps"] == 74, "a default method's row is its default, not its best variant"
    assert rows["muon"]["steps"] == 50
    assert rows["kfac"]["steps / baseline"] == 54 / 50 and rows["kfac"]["time / baseline"] == 0.8 / 0.8
    assert rows["normalized"]["steps / Muon"] == 46 / 50 and rows["normalized"]["time / Muon"] == 0.7 / 0.8
    assert rows["kfac"]["default / tuned steps"] == 74 / 54
    assert rows["normalized"]["default / tuned time"] == 1.5 / 0.7
