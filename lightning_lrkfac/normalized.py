"""``step_size="normalized"``: K-FAC's direction on a Nesterov momentum of the gradient, each layer's update at a set norm.

Muon's update is the polar factor of a Nesterov momentum, so each hidden layer's update has a set norm; the
curvature methods that beat it on transformers keep that half and change the direction. Here, per handled layer:

    m ← β m + (1 − β) g,   u = (1 − β) g + β m          (Nesterov, Muon's form: written into ``.grad``)
    P = the step rule's direction for u                   (K-FAC: (B + δ_B)⁻¹ u (A + δ_A)⁻¹, in place)
    .grad ← P · ν / ‖P‖_F,  ν = √min(m,n)·√max(1, m/n)    (``update_norm="muon"``; "rms": 0.2·√(m·n))
    .grad ← polar(P) · √max(1, m/n)                       (``update_norm="polar"``: Muon's orthogonalization)

for the layer's m × n gradient matrix [W b] (outputs by inputs, an augmented bias column included). The optimizer
then subtracts lr × that (plain SGD, momentum 0: its weight decay is decoupled). The momentum is two in-place passes
over the gradients, the norm one read and the scaling one read and write; the norm of a sharded layer (FSDP2) is
summed over its shards. ``polar`` runs Muon's Newton–Schulz iteration on each layer's [W b] (one copy of it, since
the matmuls need one matrix) in float32, or float64 for float64 gradients. Everything stays on the device: no host
sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .distributed import is_dtensor, local_tensor

if TYPE_CHECKING:
    from .distributed import Communicator
    from .layers import KFACLayer
    from .options import KFACOptions


def target_norm(rows: int, columns: int, rule: str) -> float:
    """Each rule's length of an m × n update: ‖update‖_F, Muon's √min(m,n)·√max(1, m/n) or AdamW's typical RMS 0.2
    times √(m·n); for ``polar`` the factor √max(1, m/n) of the orthogonal update (whose norm is then about Muon's)."""
    if rule == "rms":
        return 0.2 * math.sqrt(rows * columns)
    aspect = math.sqrt(max(1.0, rows / columns))
    return aspect if rule == "polar" else math.sqrt(min(rows, columns)) * aspect


#: Muon's quintic Newton–Schulz coefficients (Jordan et al. 2024): X ← aX + (bXXᵀ + c(XXᵀ)²)X drives every singular
#: value of X (scaled to ‖X‖_F = 1) into about [0.7, 1.2] in 5 steps, keeping the singular vectors.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5


def polar_factor(matrix: Tensor) -> Tensor:
    """≈ UVᵀ of X = UΣVᵀ by Muon's Newton–Schulz iteration, in float32 (float64 for float64 X); zero stays zero."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.to(torch.promote_types(matrix.dtype, torch.float32))
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.mT  # XXᵀ on the smaller side
    x = x / torch.linalg.matrix_norm(x).clamp_min(torch.finfo(x.dtype).tiny)
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = x @ x.mT
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.mT


def update_shape(layer: KFACLayer) -> tuple[int, int]:
    """(m, n) of a layer's update [W b] as its gradient matrix: the outputs (of every block of a grouped conv) by the
    inputs (a conv's channels × kernel, and an augmented bias column). A block of a shared weight (an attention
    projection) is its own m × n."""
    return math.prod(layer.blocks) * layer.out_dim, layer.in_dim


def update_grads(layer: KFACLayer) -> list[Tensor]:
    """This rank's views of the gradients a layer's update spans: its part of the weight's (a block of a shared
    weight, a shard) and of the bias's, when it has them."""
    grads = [layer.weight_grad(), layer.bias_grad() if layer.has_bias else None]
    return [local_tensor(grad) for grad in grads if grad is not None]


class NormalizedStep:
    """The momenta of the handled layers' gradients and each layer's update norm (see the module)."""

    def __init__(self, layers: Sequence[KFACLayer], beta: float, rule: str) -> None:
        self.layers, self.beta, self.rule = list(layers), beta, rule
        self.targets = [target_norm(*update_shape(layer), rule) for layer in layers]
        #: (layer, piece) → the momentum of that gradient view, made at its first gradient (or loaded).
        self.momenta: dict[tuple[int, int], Tensor] = {}
        self._owners: dict[tuple[int, ...], Tensor] = {}
        self._targets: Tensor | None = None
        self._shards: Tensor | None = None

    @classmethod
    def for_options(cls, layers: Sequence[KFACLayer], options: KFACOptions) -> NormalizedStep | None:
        """The state of ``step_size="normalized"`` for these layers, or None when it is off."""
        return cls(layers, options.momentum, options.update_norm) if options.step_size == "normalized" else None

    def step(
        self, precondition: Callable[[], None] | None, finite: Tensor | None = None, comm: Communicator | None = None
    ) -> None:
        """The momentum into ``.grad``, the step rule's direction for it (``precondition``; None before the factors
        are ready: the normalized momentum alone), then each layer's update at its norm (``comm``: sums a sharded
        layer's squared norm over the ranks)."""
        grads, keys = self._grads()  # views of .grad: the direction is written into them in place
        self.take_momentum(finite, grads, keys)
        if precondition is not None:
            precondition()
        if self.rule == "polar":
            self.orthogonalize(grads, keys)
        else:
            self.set_norms(comm, grads, keys)

    def _grads(self) -> tuple[list[Tensor], list[tuple[int, int]]]:
        """The gradient views of every layer's update, and their (layer, piece) keys."""
        grads, keys = [], []
        for index, layer in enumerate(self.layers):
            for piece, grad in enumerate(update_grads(layer)):
                grads.append(grad)
                keys.append((index, piece))
        return grads, keys

    def take_momentum(self, finite: Tensor | None, grads: list[Tensor], keys: list[tuple[int, int]]) -> None:
        """m ← β m + (1 − β) g, then ``.grad`` ← (1 − β) g + β m. ``finite`` False (AMP skips): m stays."""
        if not grads:
            return
        for key, grad in zip(keys, grads):
            if key not in self.momenta:
                self.momenta[key] = torch.zeros_like(grad, memory_format=torch.contiguous_format)
            elif self.momenta[key].shape != grad.shape:  # loaded from a run with other shards or shapes
                raise ValueError(
                    f"LowRankKFAC: checkpoint entry `normalized` holds a momentum of shape {tuple(self.momenta[key].shape)} "
                    f"for layer {self.layers[key[0]].name!r}, whose gradient here is {tuple(grad.shape)}: resume "
                    "step_size='normalized' on the same world size and layout (FSDP2 saves each rank's shards)"
                )
        momenta = [self.momenta[key] for key in keys]
        previous = None if finite is None else [m.clone() for m in momenta]
        torch._foreach_lerp_(momenta, grads, 1.0 - self.beta)
        torch._foreach_lerp_(grads, momenta, self.beta)
        if previous is not None:
            for buffer, old in zip(momenta, previous):
                buffer.copy_(torch.where(finite, buffer, old))

    def set_norms(self, comm: Communicator | None, grads: list[Tensor], keys: list[tuple[int, int]]) -> None:
        """Scale each layer's update in ``.grad`` to its target norm (a zero update stays zero); a sharded layer's
        (FSDP2: its weight is a DTensor) squared norm is summed over the ranks first (every rank calls it alike)."""
        if not grads:
            return
        device = grads[0].device
        owners = tuple(index for index, _ in keys)
        if owners not in self._owners:  # the same parameters have gradients step after step: one upload
            self._owners = {owners: torch.tensor(owners, device=device)}
        if self._targets is None:  # the targets and which layers are sharded are fixed once training runs
            self._targets = torch.tensor(self.targets, dtype=torch.float64, device=device)
            sharded = [is_dtensor(layer.weight) for layer in self.layers]
            self._shards = torch.tensor(sharded, device=device) if any(sharded) else None
        norms = torch.stack(torch._foreach_norm(grads)).to(torch.float64).square()
        squares = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        squares.index_add_(0, self._owners[owners], norms)
        if comm is not None and comm.active and self._shards is not None:
            summed = torch.where(self._shards, squares, torch.zeros_like(squares))
            comm.all_reduce_sum([summed], kind="norms")
            squares = torch.where(self._shards, summed, squares)
        norm = squares.sqrt()
        tiny = torch.finfo(torch.float64).tiny
        scales = torch.where(norm > 0, self._targets / norm.clamp_min(tiny), torch.zeros_like(norm))
        for grad, owner in zip(grads, owners):
            grad.mul_(scales[owner].to(grad.dtype))

    def orthogonalize(self, grads: list[Tensor], keys: list[tuple[int, int]]) -> None:
        """Write each layer's update [W b] as its polar factor times √max(1, m/n) (:func:`polar_factor`)."""
        pieces: dict[int, list[Tensor]] = {}
        for grad, (owner, _) in zip(grads, keys):
            pieces.setdefault(owner, []).append(grad)
        for owner, views in pieces.items():
            rows = views[0].shape[0]
            columns = [view.reshape(rows, -1) for view in views]  # the weight's (a view), then the bias's column
            matrix = torch.cat(columns, dim=1) if len(columns) > 1 else columns[0]
            polar = polar_factor(matrix) * self.targets[owner]
            start = 0
            for view, column in zip(views, columns):
                view.copy_(polar[:, start : start + column.shape[1]].reshape(view.shape))
                start += column.shape[1]

    def state_tensors(self) -> dict[str, Tensor]:
        return {f"momentum.{i}.{j}": m for (i, j), m in sorted(self.momenta.items())}

    def load_state_tensors(self, state: dict[str, Tensor]) -> None:
        """The saved momenta, each on its layer's device (shapes are those of the saved run's gradients)."""
        self.momenta = {}
        for name, tensor in state.items():
            _, index, piece = name.split(".")
            device = self.layers[int(index)].weight.device
            self.momenta[(int(index), int(piece))] = local_tensor(tensor).detach().clone().to(device)
