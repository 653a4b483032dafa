"""FSDP2: the engine on two gloo ranks with fully_shard against one process with the global batch, resuming across
world sizes, what it communicates, and the layouts it refuses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lightning_lrkfac.sharding import chunk_rows
from tests.fsdp_run import new_model

pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch ≥ 2.4")
if not hasattr(__import__("torch.distributed.fsdp", fromlist=["fully_shard"]), "fully_shard"):
    pytest.skip("FSDP2 (fully_shard) needs torch ≥ 2.4", allow_module_level=True)

SCRIPT = Path(__file__).resolve().parent / "fsdp_run.py"
#: What an earlier in-process Lightning run may have left in the environment: a child would think it was launched.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_SINGLE_PROCESS: dict[tuple, dict] = {}


def single_process(tmp_path: Path, **args) -> dict:
    """A one-process reference run, shared by the tests that compare against the same one."""
    key = tuple(sorted(args.items()))
    if key not in _SINGLE_PROCESS:
        _SINGLE_PROCESS[key] = run(tmp_path, "single", world=1, **args)
    return _SINGLE_PROCESS[key]


def run(tmp_path: Path, name: str, **args) -> dict:
    out = tmp_path / f"{name}.pt"
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--port", str(free_port())]
    for key, value in args.items():
        command += [f"--{key}", str(value)]
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
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
    single = single_process(tmp_path, model=model, mode=mode)
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
    initial = new_model(model).state_dict()  # the steps moved every parameter
    assert all(not torch.equal(initial[n], single["parameters"][n]) for n in single["parameters"])


@pytest.mark.parametrize(("mode", "tolerance"), [("exact", 1e-10), ("lowrank", 1e-6)])
def test_normalized_step_on_two_sharded_ranks_matches_one_process(tmp_path, mode, tolerance):
    """step_size='normalized': each rank holds row shards, so a layer's norm is its shards' squares summed."""
    single = single_process(tmp_path, model="mlp", mode=mode, **{"step-size": "normalized"})
    sharded = run(tmp_path, "sharded", world=2, model="mlp", mode=mode, **{"step-size": "normalized"})
    assert len(sharded["sharded"]) == 3 and sharded["bytes"]["norms"] > 0
    assert_parameters_close(sharded["parameters"], single["parameters"], tolerance)


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_resume_across_world_sizes(tmp_path, first, then):
    straight = single_process(tmp_path, mode="lowrank", steps=4, momentum=0.0)
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


def test_callback_under_lightning_fsdp2_matches_one_process(tmp_path):
    """ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) on the CPU, fully_shard in configure_model."""
    single = single_process(tmp_path, model="mlp", mode="exact")
    lightning = run(tmp_path, "lightning", driver="lightning", world=2, model="mlp", mode="exact")
    assert lightning["sharded"] == ["0", "2.conv", "4"]
    assert_parameters_close(lightning["parameters"], single["parameters"], 1e-10)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """A one-rank gloo group in this process and its 1-D CPU mesh: enough for FSDP2 to make DTensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    owned = not dist.is_initialized()  # an earlier in-process Lightning run may have left its one-rank group
    if owned:
        store = tmp_path_factory.mktemp("group") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    yield init_device_mesh("cpu", (1,))
    if owned:
        dist.destroy_process_group()


def two_linears() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def build(model: nn.Module, **options) -> None:
    from lightning_lrkfac import LowRankKFAC

    LowRankKFAC(model, **options).build()


def test_fsdp2_on_one_rank_is_detected_and_accepted(one_rank):
    from torch.distributed.fsdp import fully_shard

    from lightning_lrkfac import LowRankKFAC

    model = two_linears()
    fully_shard(model[0], mesh=one_rank)
    fully_shard(model, mesh=one_rank)
    kfac = LowRankKFAC(model)
    kfac.build()
    assert sorted(kfac.sharding.shards) == [0, 1]


def test_tensor_parallel_layouts_are_refused(one_rank):
    from torch.distributed.tensor import Shard, distribute_tensor

    model = two_linears()
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), one_rank, [Shard(1)]))
    with pytest.raises(ValueError, match=r"layer '0' has placements \(Shard\(dim=1\),\); only Shard\(0\)"):
        build(model)


def test_a_two_dimensional_mesh_is_refused(one_rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = two_linears()
    fully_shard(model[0], mesh=init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard")))
    with pytest.raises(ValueError, match="2-D device mesh"):
        build(model)


def test_fsdp1_mixed_with_fsdp2_is_refused(one_rank):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    model = two_linears()
    model[2] = FullyShardedDataParallel(model[2], device_id=torch.device("cpu"))
    fully_shard(model[0], mesh=one_rank)
    with pytest.raises(ValueError, match=r"FSDP1 \(FullyShardedDataParallel\) modules \['2'\] mixed with FSDP2"):
        build(model)


def test_cpu_offload_is_refused(one_rank):
    """FSDP2's CPU offload needs an accelerator to construct: the policy is set where FSDP2 keeps it."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    model = two_linears()
    fully_shard(model[0], mesh=one_rank)
    group = model[0]._get_fsdp_state()._fsdp_param_group
    assert hasattr(group, "offload_policy"), "FSDP2 moved its offload policy: update sharding._offloading_modules"
    group.offload_policy = CPUOffloadPolicy()
    with pytest.raises(ValueError, match=r"CPU offload .* on \['0'\]"):
        build(model)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"step_rule": "ekfac"}, "`step_rule` must be 'kfac'"),
        ({"bias_mode": "separate"}, "layer '0' .* cannot be preconditioned sharded"),
    ],
)
def test_unsupported_options_and_layers_are_refused(one_rank, options, message):
    from torch.distributed.fsdp import fully_shard

    model = two_linears()
    fully_shard(model[0], mesh=one_rank)
    fully_shard(model, mesh=one_rank)
    with pytest.raises(ValueError, match=message):
        build(model, **options)


def scaled_layer_type(shard_side: str | None) -> type:
    """The helpers' KFACLayer for :class:`Scaled`, whose weight's dim 0 is the output ("out") or, None, unknown."""
    from tests.helpers import ScaledLayer

    return type("ScaledLayer", (ScaledLayer,), {"shard_side": shard_side})


@pytest.mark.parametrize("shard_side", ["out", None])
def test_a_registered_layer_type_is_sharded_when_its_geometry_allows(one_rank, shard_side):
    """No concrete class is named by the sharding: a user's layer whose weight rows are the gradient matrix's rows
    takes the shard step (equal to the unsharded engine's to 1e-10, float64); one that says nothing is refused."""
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard

    from lightning_lrkfac import LowRankKFAC
    from lightning_lrkfac.layers import LAYER_TYPES, register_layer_type

    layer_type = register_layer_type(scaled_layer_type(shard_side))
    try:

        def model() -> nn.Module:
            torch.manual_seed(0)
            from tests.helpers import Scaled

            return nn.Sequential(Scaled(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()

        plain, sharded = model(), model()
        fully_shard(sharded[0], mesh=one_rank)
        fully_shard(sharded, mesh=one_rank)
        options = dict(rank=2, dense_threshold=0, kl_clip=1e-3, basis_update_interval=1)
        if shard_side is None:
            with pytest.raises(ValueError, match="layer '0' .* cannot be preconditioned sharded"):
                build(sharded, **options)
            return
        x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
        grads = {}
        for name, net in (("plain", plain), ("sharded", sharded)):
            with LowRankKFAC(net, **options) as kfac:
                for _ in range(2):
                    net.zero_grad()
                    F.cross_entropy(net(x), y).backward()
                    kfac.step(lr=0.1)
                assert (kfac.sharding is not None) == (name == "sharded")
                grads[name] = [getattr(p.grad, "to_local", lambda g=p.grad: g)() for p in net.parameters()]
        assert type(kfac.layers[0]) is layer_type and sorted(kfac.sharding.shards) == [0, 1]
        for got, expected in zip(grads["sharded"], grads["plain"]):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    finally:
        LAYER_TYPES.remove(layer_type)
