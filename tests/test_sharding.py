"""FSDP2: the engine on two gloo ranks with fully_shard against one process with the global batch, resuming across
world sizes, what it communicates, and the layouts it refuses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_lrkfac.sharding import chunk_rows

pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch ≥ 2.4")
if not hasattr(__import__("torch.distributed.fsdp", fromlist=["fully_shard"]), "fully_shard"):
    pytest.skip("FSDP2 (fully_shard) needs torch ≥ 2.4", allow_module_level=True)

SCRIPT = Path(__file__).resolve().parent / "fsdp_run.py"
PORTS = iter(range(29600, 29700))


def run(tmp_path: Path, name: str, **args) -> dict:
    out = tmp_path / f"{name}.pt"
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--port", str(next(PORTS))]
    for key, value in args.items():
        command += [f"--{key}", str(value)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=False)


def assert_parameters_close(left: dict, right: dict, tolerance: float) -> None:
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=tolerance, atol=tolerance, msg=name)


@pytest.mark.parametrize(
    ("model", "mode", "tolerance"),
    [("mlp", "exact", 1e-10), ("mlp", "lowrank", 1e-6), ("tokens", "exact", 1e-10), ("tokens", "lowrank", 1e-6)],
)
def test_two_sharded_ranks_match_one_process_with_the_global_batch(tmp_path, model, mode, tolerance):
    single = run(tmp_path, "single", world=1, model=model, mode=mode)
    sharded = run(tmp_path, "sharded", world=2, model=model, mode=mode)
    assert single["sharded"] == [] and len(sharded["sharded"]) == 3, "every handled layer is sharded"
    assert_parameters_close(sharded["parameters"], single["parameters"], tolerance)
    for layer, entry in single["engine"]["layers"].items():  # the statistics are replicated and the same
        for factor in ("A", "B"):  # not the bases: eigenvectors of repeated eigenvalues, and signs, are not unique
            for key, value in entry[factor]["tensors"].items():
                if key not in ("matrix", "diag", "trace", "eigenvalues", "inverse_damping"):
                    continue
                torch.testing.assert_close(
                    sharded["engine"]["layers"][layer][factor]["tensors"][key], value, rtol=tolerance, atol=tolerance
                )
    plain_steps = run(tmp_path, "plain", world=1, model=model, mode=mode, steps=1)  # the step moved something
    assert any(not torch.equal(plain_steps["parameters"][n], single["parameters"][n]) for n in single["parameters"])


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_resume_across_world_sizes(tmp_path, first, then):
    straight = run(tmp_path, "straight", world=1, mode="lowrank", steps=4, momentum=0.0)
    half = run(tmp_path, "half", world=first, mode="lowrank", steps=2, momentum=0.0)
    resumed = run(tmp_path, "resumed", world=then, mode="lowrank", steps=2, momentum=0.0, load=tmp_path / "half.pt")
    assert resumed["steps"] == 4 and half["steps"] == 2
    assert_parameters_close(resumed["parameters"], straight["parameters"], 1e-6)


def test_sharded_step_sends_k_by_d_in_per_layer(tmp_path):
    """Low rank: the shards' all-reduce carries Wᵀ X, k × d_in' per sharded Linear/Conv layer, nothing gradient-sized."""
    sharded = run(tmp_path, "sharded", world=2, model="mlp", mode="lowrank", steps=1)
    rank = sharded["engine"]["options"]["rank"]
    # float64 Wᵀ X of one step: layer 0 (B low-rank, k × (10+1)), the conv (3 channels ≤ k: B kept whole, 3 × (1·3+1))
    # and the head (k × (72+1))
    expected = (rank * (10 + 1) + 3 * (3 + 1) + rank * (72 + 1)) * 8
    assert sharded["bytes"]["shards"] == expected
    assert sharded["bytes"]["kl"] == 8


def test_chunk_rows_is_torch_chunk():
    for length in range(0, 9):
        for world in range(1, 5):
            pieces = torch.arange(length).chunk(world)
            for rank in range(world):
                expected = pieces[rank].tolist() if rank < len(pieces) else []
                assert list(range(length))[chunk_rows(length, world, rank)] == expected
