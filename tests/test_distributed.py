"""Data parallelism: 2 gloo ranks (Lightning's DDP strategy, or plain torch.distributed driving the engine)
vs one process with the global batch."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_lrkfac.distributed import balanced_owners

SCRIPT = Path(__file__).with_name("ddp_run.py")
STEPS = 6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(out: Path, *args: str) -> dict[int, dict]:
    # The repository root on the path: the script imports this checkout, installed or not.
    path = os.pathsep.join(filter(None, [str(SCRIPT.parent.parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = path
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--steps", str(STEPS), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {int(p.stem[4:]): torch.load(p) for p in sorted(out.glob("rank*.pt"))}


def max_relative_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.fixture(scope="module")
def ddp_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def runs(ddp_root) -> dict[str, dict[int, dict]]:
    root = ddp_root
    return {
        "single_lowrank": run(root / "single_lowrank", "--devices", "1"),
        "single_exact": run(root / "single_exact", "--devices", "1", "--rank", "128"),
        "ddp_lowrank_layerwise": run(root / "ddp_lowrank_layerwise", "--work", "layerwise"),
        "ddp_lowrank_layerwise_again": run(root / "ddp_lowrank_layerwise_again", "--work", "layerwise"),
        "ddp_lowrank_replicate": run(root / "ddp_lowrank_replicate", "--work", "replicate"),
        "ddp_exact_layerwise": run(root / "ddp_exact_layerwise", "--rank", "128", "--work", "layerwise"),
        "engine_lowrank_layerwise": run(root / "engine_lowrank_layerwise", *ENGINE_SAVE, "--work", "layerwise"),
        "engine_lowrank_replicate": run(root / "engine_lowrank_replicate", *ENGINE_SAVE, "--work", "replicate"),
        "engine_single": run(root / "engine_single", *ENGINE_SAVE, "--devices", "1"),
        "engine_ekfac_layerwise": run(root / "engine_ekfac_layerwise", *EKFAC, "--work", "layerwise"),
        "engine_ekfac_single": run(root / "engine_ekfac_single", *EKFAC, "--devices", "1"),
        "engine_auto_single": run(root / "engine_auto_single", *AUTO, "--driver", "engine", "--devices", "1"),
        "engine_auto_ddp": run(root / "engine_auto_ddp", *AUTO, "--driver", "engine"),
        "ddp_auto": run(root / "ddp_auto", *AUTO),
        "engine_normalized_single": run(
            root / "engine_normalized_single", *NORMALIZED, "--driver", "engine", "--devices", "1"
        ),
        "engine_normalized_ddp": run(root / "engine_normalized_ddp", *NORMALIZED, "--driver", "engine"),
        "ddp_normalized": run(root / "ddp_normalized", *NORMALIZED),
    }


ENGINE_SAVE = ("--driver", "engine", "--save-at", str(STEPS // 2))
EKFAC = ("--driver", "engine", "--step-rule", "ekfac")
AUTO = ("--step-size", "auto")
NORMALIZED = ("--step-size", "normalized")
RESUMES = {  # (checkpoint's run, world size, work distribution) of each resumed run
    "2-ranks-layerwise-to-1": ("engine_lowrank_layerwise", 1, "layerwise"),
    "2-ranks-replicate-to-1": ("engine_lowrank_replicate", 1, "replicate"),
    "1-to-2-ranks-layerwise": ("engine_single", 2, "layerwise"),
    "1-to-2-ranks-replicate": ("engine_single", 2, "replicate"),
}


@pytest.mark.parametrize("name", list(RESUMES))
def test_resume_across_world_sizes_and_work_distributions(runs, ddp_root, tmp_path, name):
    """A checkpoint saved halfway under one world size resumes under another: the loaded state equals the saved
    one, the loss stays finite, and the run ends where one process with the global batch does."""
    source, devices, work = RESUMES[name]
    checkpoint = ddp_root / source / "checkpoint.pt"
    ranks = run(
        tmp_path / "resumed",
        "--driver",
        "engine",
        "--devices",
        str(devices),
        "--work",
        work,
        "--resume",
        str(checkpoint),
    )
    assert sorted(ranks) == list(range(devices))
    for record in ranks.values():
        assert record["resumed_equal"] is True
        assert math.isfinite(record["final_loss"])
        assert max_relative_difference(record["parameters"], runs["single_lowrank"][0]["parameters"]) < 1e-4


DATA_PARALLEL = ["ddp_lowrank_layerwise", "ddp_lowrank_replicate", "ddp_exact_layerwise"]
ENGINE = ["engine_lowrank_layerwise", "engine_lowrank_replicate", "engine_ekfac_layerwise"]


def single_process_twin(name: str) -> str:
    if "ekfac" in name:  # EKFAC's per-example moments are summed over ranks like the sketches
        return "engine_ekfac_single"
    return "single_exact" if "exact" in name else "single_lowrank"


@pytest.mark.parametrize("name", DATA_PARALLEL + ENGINE)
def test_ranks_end_identical_and_equal_to_one_process_with_the_global_batch(runs, name):
    ranks = runs[name]
    assert sorted(ranks) == [0, 1] and ranks[0]["world_size"] == 2
    for key, value in ranks[0]["parameters"].items():
        assert torch.equal(value, ranks[1]["parameters"][key]), key
    single = runs[single_process_twin(name)][0]["parameters"]
    # float32: the ranks sum in another order. EKFAC divides by per-coordinate second moments as
    # small as λ = 1e-3, which amplifies that noise (measured 1.1e-4 against K-FAC's 4e-5); it
    # still sits 500× below the gap between EKFAC and K-FAC (asserted below).
    tolerance = 1e-3 if "ekfac" in name else 1e-4
    assert max_relative_difference(ranks[0]["parameters"], single) < tolerance
    # The comparison has power: low-rank and exact K-FAC end far apart after these steps.
    assert max_relative_difference(runs["single_lowrank"][0]["parameters"], runs["single_exact"][0]["parameters"]) > 0.1
    ekfac_gap = max_relative_difference(
        runs["engine_ekfac_single"][0]["parameters"], runs["single_lowrank"][0]["parameters"]
    )
    assert ekfac_gap > 0.1


@pytest.mark.parametrize("name", ["ddp_lowrank_layerwise", "engine_lowrank_layerwise", "engine_ekfac_layerwise"])
def test_layerwise_ranks_hold_the_same_complete_curvature_state(runs, name):
    """Non-owners receive the bases and prepare the damped inverses too: any rank's checkpoint is complete."""
    ranks = runs[name]
    curvature = ranks[0]["curvature"]
    assert any(key.endswith("B.inverse_core") for key in curvature)
    assert curvature.keys() == ranks[1]["curvature"].keys()
    for key, value in curvature.items():
        assert torch.equal(value, ranks[1]["curvature"][key]), key


def test_ddp_run_is_deterministic_for_a_fixed_seed(runs):
    first, again = runs["ddp_lowrank_layerwise"][0]["parameters"], runs["ddp_lowrank_layerwise_again"][0]["parameters"]
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("driver", ["ddp", "engine"])
def test_layerwise_work_spreads_layers_and_communicates_sketches_not_matrices(runs, driver):
    ranks = runs[f"{driver}_lowrank_layerwise"]
    owners = ranks[0]["owners"]
    assert owners == ranks[1]["owners"] and set(owners) == {0, 1}
    assert [kinds for _, *kinds in ranks[0]["layers"]] == [["LowRankFactor", "DiagPlusLowRankFactor"]] * 3
    # Statistics: one flat float32 all-reduce of every pending sketch/diag/trace per step: O(k·d), not O(d²).
    sent = ranks[0]["bytes"]["statistics"]
    assert sent == STEPS * ranks[0]["pending_numel"] * 4
    dense_factor_floats = (65**2 + 32**2) + (33**2 + 32**2) + (33**2 + 10**2)  # A, B of the 64-32-32-10 MLP
    assert ranks[0]["pending_numel"] < 0.3 * dense_factor_floats
    # Each rank broadcast the bases and gradients of the layers it owns; replicate mode sends none.
    for rank in (0, 1):
        assert ranks[rank]["bytes"]["bases"] > 0 and ranks[rank]["bytes"]["gradients"] > 0
    assert set(runs[f"{driver}_lowrank_replicate"][0]["bytes"]) == {"statistics"}


def test_balanced_owners_is_greedy_largest_first():
    assert balanced_owners([5.0, 1.0, 4.0, 3.0, 3.0], 2) == [0, 1, 1, 1, 0]  # 5|4, 5|7, 8|7, 8|8
    assert balanced_owners([1.0, 1.0, 1.0], 3) == [0, 1, 2]
    assert balanced_owners([2.0, 1.0], 1) == [0, 0]


@pytest.mark.parametrize("name", ["engine_auto_ddp", "ddp_auto"])
def test_automatic_step_under_ddp_equals_one_process_with_the_global_batch(runs, name):
    """step_size='auto': G's products and the losses are averaged over the ranks, so α, μ, ρ and λ agree."""
    ranks = runs[name]
    assert sorted(ranks) == [0, 1]
    for key, value in ranks[0]["parameters"].items():
        assert torch.equal(value, ranks[1]["parameters"][key]), key
    single = runs["engine_auto_single"][0]["parameters"]
    assert max_relative_difference(ranks[0]["parameters"], single) < 1e-4
    # power: the automatic step ends far from K-FAC with SGD + momentum after the same steps
    assert max_relative_difference(runs["single_lowrank"][0]["parameters"], single) > 0.05
    assert ranks[0]["bytes"]["automatic step"] > 0


@pytest.mark.parametrize("name", ["engine_normalized_ddp", "ddp_normalized"])
def test_normalized_step_under_ddp_equals_one_process_with_the_global_batch(runs, name):
    """step_size='normalized' (with KFACWithAdamW): the momenta and the norms come from all-reduced gradients, so the
    ranks agree with each other and with one process that sees the global batch."""
    ranks = runs[name]
    assert sorted(ranks) == [0, 1]
    for key, value in ranks[0]["parameters"].items():
        assert torch.equal(value, ranks[1]["parameters"][key]), key
    single = runs["engine_normalized_single"][0]["parameters"]
    assert max_relative_difference(ranks[0]["parameters"], single) < 1e-4  # float32, AdamW on the LayerNorm
    # power: the normalized step ends far from K-FAC with SGD + momentum after the same steps
    assert max_relative_difference(runs["single_lowrank"][0]["parameters"], single) > 0.05
