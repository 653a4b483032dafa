"""nn.Embedding as a Linear on one-hot inputs: A is exactly the diagonal of token frequencies."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..lowrank import DiagonalFactor, KroneckerFactor
from .base import KFACLayer

if TYPE_CHECKING:
    from ..eigenbasis import Bases, RowPairing
    from ..options import KFACOptions


def token_counts(tokens: Tensor, vocabulary: int, padding_idx: int | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(per-token counts, each position's weight: 0 at ``padding_idx``, else 1), by scatter-add: no host sync."""
    ones = torch.ones(tokens.shape, device=tokens.device, dtype=dtype)
    if padding_idx is not None:
        ones = ones * (tokens != padding_idx)
    return torch.zeros(vocabulary, device=tokens.device, dtype=dtype).index_add_(0, tokens, ones), ones


class EmbeddingLayer(KFACLayer):
    """y = Wᵀx with x one-hot (out = embedding_dim, in = num_embeddings); every position an example.

    A = E[x xᵀ] is diagonal: the token frequencies, kept as a :class:`~..lowrank.DiagonalFactor`
    in O(num_embeddings). B is the usual output-gradient factor over the embedding dimension.
    The natural gradient of the (num_embeddings × dim) weight is A⁻¹ G B⁻¹: each token's row is
    scaled by its inverse frequency and turned by B⁻¹. ``padding_idx`` positions count as zero inputs.
    """

    shard_side = "in"

    module_type = nn.Embedding

    def __init__(self, name: str, module: nn.Embedding) -> None:
        super().__init__(name, module, module.num_embeddings, module.embedding_dim, has_bias=False, augment=False)

    @classmethod
    def from_options(cls, name: str, module: nn.Module, options: KFACOptions) -> EmbeddingLayer:
        return cls(name, module)

    @classmethod
    def unsupported(cls, module: nn.Module, options: KFACOptions) -> str | None:
        if not options.precondition_embeddings:
            return "nn.Embedding (precondition_embeddings=False)"
        if module.sparse:
            return "sparse gradients (sparse=True)"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True (its gradient is already frequency-scaled)"
        return None

    def _special_input_factor(self, dtype: torch.dtype) -> KroneckerFactor:
        """A: the exact diagonal of token frequencies, whatever the rank."""
        return DiagonalFactor(self.in_dim, self.weight.device, dtype)

    def _accumulate_inputs(self, inputs: list[Tensor], bases: Bases | None = None) -> RowPairing | None:
        """A: per-token counts over all positions (scatter-add: no host sync), divided by the positions.

        A one-hot row in the standard basis squares to itself, so EKFAC's pairs scatter B's rows by token.
        """
        tokens = torch.cat([x.reshape(-1) for x in inputs])
        counts, ones = token_counts(tokens, self.in_dim, self.module.padding_idx, self.a_factor.dtype)
        self.a_factor.accumulate_diagonal(counts, 1.0 / tokens.numel())
        if bases is None:
            return None

        def pairing(left: Tensor) -> Tensor:
            scattered = torch.zeros(*left.shape[:-1], self.in_dim, device=left.device, dtype=left.dtype)
            return scattered.index_add_(-1, tokens, left * ones.to(left.dtype))

        return pairing

    def _input_rows(self, inputs: Tensor) -> Tensor:
        """One-hot rows (only for references and tests: statistics use the counts directly)."""
        return nn.functional.one_hot(inputs.reshape(-1), self.in_dim).to(self.weight.dtype)

    def output_grad_rows(self, grads: Tensor) -> Tensor:
        return grads.reshape(-1, grads.shape[-1])

    def num_samples(self, grads: Tensor) -> int:
        return grads.numel() // grads.shape[-1]

    def as_matrix(self, weight_like: Tensor) -> Tensor:
        """The (num_embeddings × dim) weight is Wᵀ of the Linear on one-hot inputs: its gradient read as dim × num_embeddings."""
        return weight_like.mT
