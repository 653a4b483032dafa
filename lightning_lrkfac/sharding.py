"""Fully sharded training (FSDP2, ``torch.distributed.fsdp.fully_shard``): precondition each rank's shard in place.

Under FSDP2 every weight and its gradient are DTensors sharded along dim 0 on a 1-D mesh: rank r holds the rows
R_r (``torch.chunk``'s split). The forward hooks see each rank's whole local activations, so the statistics are
data-parallel exactly as under DDP (the pending sums are summed over the ranks). The step for a shard:

- ``nn.Linear`` / ``nn.Conv*d`` (dim 0 = output channels, B's side): A⁻¹ applies to the shard, since A is the
  same on every rank. B's prepared inverse has the form L X = s·X + e∘X + W M (Wᵀ X) (diagonal plus low rank:
  s = 0, M = −K; kept whole as eigenpairs: e = 0, M = diag(c)), so rows R_r of L X need only Wᵀ X =
  Σ_r W[R_r]ᵀ X_r: one all-reduce of k×d_in numbers per layer, all layers in one flat collective. A B kept whole
  (exact mode, or a head with few outputs) sends its d_out×d_in product instead: as many numbers as gathering the
  gradient, and no more than FSDP's own traffic for that layer, which is why it is not special-cased.
- ``nn.Embedding`` (dim 0 = tokens, A's side): A is the diagonal of token frequencies and B acts along the width,
  so the step is local.

The KL clip's Σ⟨P, G⟩ is summed over the ranks. Everything else (other layer kinds, tensor parallelism, a 2-D
mesh, CPU offload, FSDP1) is refused before the first step, naming what is not supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .compatibility import check
from .distributed import Communicator, is_dtensor
from .layer_steps import GeneralStep, LearningRates
from .layers import KFACLayer
from .layers.base import write_scaled
from .lowrank import InverseForm

try:  # torch ≥ 2.4 (FSDP2)
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import Shard
except ImportError:  # pragma: no cover - older torch: nothing is ever sharded
    FSDPModule = Shard = None  # type: ignore[assignment,misc]


def chunk_rows(length: int, world_size: int, rank: int) -> slice:
    """Rows of dim 0 that rank ``rank`` holds under ``torch.chunk`` (FSDP2's split): ⌈length / world⌉ each."""
    size = -(-length // world_size)
    start = min(rank * size, length)
    return slice(start, min(start + size, length))


def _fsdp1_modules(model: nn.Module) -> list[str]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [
        name or type(model).__name__ for name, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)
    ]


def _offloading_modules(model: nn.Module) -> list[str]:
    """FSDP2 modules whose parameters live on the CPU between uses (``offload_policy=CPUOffloadPolicy()``)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    found = []
    for name, module in model.named_modules():
        if FSDPModule is not None and isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group  # private: the documented policy is not exposed
            if group is not None and isinstance(getattr(group, "offload_policy", None), CPUOffloadPolicy):
                found.append(name or type(module).__name__)
    return found


@dataclass
class ShardedLayer:
    """One handled layer whose weight is sharded along dim 0: which rows this rank holds and on which side."""

    layer: KFACLayer
    rows: slice
    #: "out": dim 0 is the output (B's side: Linear, Conv); "in": dim 0 is the input (A's side: Embedding).
    side: str

    def local_grad(self) -> Tensor | None:
        """This rank's gradient block as a matrix: (rows, in') for "out" (the augmented bias column appended),
        (out, rows) for "in"; None without a gradient."""
        weight_grad = self.layer.weight.grad
        if weight_grad is None:
            return None
        local = weight_grad.to_local()
        if self.side == "in":
            return local.mT
        matrix = local.reshape(local.shape[0], -1)
        if self.layer.augment:
            bias = self.layer.module.bias.grad
            column = torch.zeros_like(matrix[:, :1]) if bias is None else bias.to_local().reshape(-1, 1)
            matrix = torch.cat([matrix, column], dim=1)
        return matrix

    def write(self, natural: Tensor, scale: Tensor | None) -> None:
        """The preconditioned block (times ``scale``) into this rank's gradient shard(s), in place."""
        local = self.layer.weight.grad.to_local()
        if self.side == "in":
            write_scaled(local.mT, natural, scale)
            return
        columns = natural.shape[1] - int(self.layer.augment)
        write_scaled(local.view(local.shape[0], columns), natural[:, :columns], scale)
        bias = self.layer.module.bias.grad if self.layer.augment else None
        if bias is not None:
            write_scaled(bias.to_local(), natural[:, columns], scale)


def _finish_left(form: InverseForm, local: Tensor, rows: slice, reduced: Tensor) -> Tensor:
    """Rows ``rows`` of (F̃ + δI)⁻¹ X from this rank's rows of X and the summed Wᵀ X."""
    scale, diag, basis, middle = form.scale, form.diag, form.basis, form.middle
    mixed = middle @ reduced if middle.dim() == 2 else middle[:, None] * reduced
    result = basis[rows] @ mixed
    if diag is not None:
        result = result.addcmul_(diag[rows, None], local)
    return result.add_(local, alpha=scale) if scale else result


@dataclass
class ShardStep:
    """One rank's row shard of a layer's step: its KL term is a part, summed over the ranks."""

    shard: ShardedLayer
    grad: Tensor
    natural: Tensor
    partial = True

    def kl_term(self, learning_rate: LearningRates) -> Tensor:
        return GeneralStep(self.shard.layer, [self.grad], [self.natural]).kl_term(learning_rate)

    def write(self, scale: Tensor | None) -> None:
        self.shard.write(self.natural, scale)


class ShardedPreconditioner:
    """The step for every sharded layer of one model, with one flat all-reduce for all of them."""

    def __init__(self, shards: dict[int, ShardedLayer], comm: Communicator) -> None:
        self.shards = shards
        self.comm = comm

    def __contains__(self, index: int) -> bool:
        return index in self.shards

    def steps(self, indices: Sequence[int]) -> list[ShardStep]:
        """The shard steps of the given ready layers: phase one applies A⁻¹ (or, on the input side, everything)
        and projects onto B's basis, one all-reduce sums the projections, phase two ends."""
        started, partials = [], []
        for index in indices:
            shard = self.shards[index]
            grad = shard.local_grad()
            if grad is None:
                continue
            a_factor, b_factor = shard.layer.factors
            grad = grad.to(shard.layer.dtype)
            if shard.side == "in":  # B over the full width, diagonal A over this rank's tokens
                natural = b_factor.inverse_left(grad) * a_factor.inverse_diagonal[shard.rows]
                started.append((index, grad, natural, None, None))
                continue
            right_applied = a_factor.inverse_right(grad)
            form = b_factor.inverse_form()
            partials.append(form.basis[shard.rows].mT @ right_applied)
            started.append((index, grad, right_applied, len(partials) - 1, form))
        self.comm.all_reduce_sum(partials, kind="shards")
        finished = []
        for index, grad, value, partial, form in started:
            shard = self.shards[index]
            natural = value if partial is None else _finish_left(form, value, shard.rows, partials[partial])
            finished.append(ShardStep(shard, grad, natural))
        return finished


def detect_sharding(
    model: nn.Module, layers: Sequence[KFACLayer], comm: Communicator, options
) -> ShardedPreconditioner | None:
    """The sharded layers' preconditioner under FSDP2, None without DTensor weights; refuses what is not supported."""
    if FSDPModule is None:
        return None
    fsdp2 = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    fsdp1 = _fsdp1_modules(model)
    if fsdp1:
        mixed = f" mixed with FSDP2 (fully_shard) modules {fsdp2}" if fsdp2 else ""
        raise ValueError(
            f"LowRankKFAC: FSDP1 (FullyShardedDataParallel) modules {fsdp1}{mixed} are not supported: FSDP1 flattens "
            "parameters; shard with torch.distributed.fsdp.fully_shard (FSDP2) instead"
        )
    sharded = {index: layer for index, layer in enumerate(layers) if is_dtensor(layer.weight)}
    if not sharded:
        return None
    offloading = _offloading_modules(model)
    if offloading:
        raise ValueError(
            f"LowRankKFAC: FSDP2 CPU offload (offload_policy=CPUOffloadPolicy()) on {offloading} is not supported: "
            "the curvature state and the step live on the parameters' compute device; drop the offload policy"
        )
    check("fsdp2", options)
    shards = {}
    for index, layer in sharded.items():
        weight = layer.weight
        mesh, placements = weight.device_mesh, tuple(weight.placements)
        if mesh.ndim != 1:
            raise ValueError(
                f"LowRankKFAC: layer {layer.name!r} is sharded on a {mesh.ndim}-D device mesh (HSDP or tensor "
                "parallelism); only a 1-D mesh (fully_shard(module, mesh=init_device_mesh(device, (world,)))) is supported"
            )
        if mesh.size() != comm.world_size:
            raise ValueError(
                f"LowRankKFAC: layer {layer.name!r} is sharded over {mesh.size()} of the {comm.world_size} ranks; the "
                "shards must span every rank (pure data-parallel FSDP2: tensor_parallel_size=1, no replica groups)"
            )
        if placements != (Shard(0),):
            raise ValueError(
                f"LowRankKFAC: layer {layer.name!r} has placements {placements}; only Shard(0), FSDP2's row sharding, is "
                "supported (tensor parallelism and other layouts are not)"
            )
        shards[index] = _sharded_layer(layer, mesh.size(), mesh.get_local_rank())
    return ShardedPreconditioner(shards, comm)


def _sharded_layer(layer: KFACLayer, world_size: int, rank: int) -> ShardedLayer:
    """The row range and side of a layer whose geometry allows a shard step (any registered type); a clear error
    for the others."""
    a_form, b_form = (factor.inverse_form() for factor in layer.factors)
    if layer.shard_side == "in" and a_form is not None and a_form.basis is None:  # A diagonal over dim 0's rows
        return ShardedLayer(layer, chunk_rows(layer.in_dim, world_size, rank), "in")
    b_pieces = b_form is not None and b_form.basis is not None and b_form.basis.dim() == 2
    if layer.shard_side == "out" and not layer.blocks and layer.augment == layer.has_bias and b_pieces:
        return ShardedLayer(layer, chunk_rows(layer.out_dim, world_size, rank), "out")
    raise ValueError(
        f"LowRankKFAC: layer {layer.name!r} ({layer.describe()}) cannot be preconditioned sharded under FSDP2: a shard "
        "must be rows of the gradient matrix (nn.Linear, ungrouped nn.Conv*d and layer types like them, bias_mode "
        "'augment') or of a diagonal A (nn.Embedding); `exclude` it or leave it unsharded"
    )
