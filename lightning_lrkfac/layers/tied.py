"""One weight used as an ``nn.Embedding``'s table and as a Linear head's weight (GPT-2, T5, nanoGPT): one block.

Let W be (vocabulary V × width d). As the head (logits = h Wᵀ) its Fisher block is B_h ⊗ A_h: B_h over the
vocabulary from the logits' gradients, A_h over the width from the head's inputs. As the embedding (a Linear on
one-hot tokens, weight Wᵀ) it is D_e ⊗ B_e in W's orientation: D_e the diagonal of token frequencies, B_e over
the width from the embedding's output gradients. A sum of two Kronecker products has no cheap inverse, so

    F ≈ c · (s_h B_h + s_e D_e) ⊗ (A_h / s_h + B_e / s_e).

Each use's pair is first balanced to equal mean eigenvalues μ_i on both sides (s_i, as π-damping balances A and
B), the balanced factors are summed over the uses (as K-FAC-expand sums the uses of a shared weight), and
c = Σμ_i² / (Σμ_i)² makes the trace equal to tr F_h + tr F_e exactly: c = 1 when one use dominates, ½ when the
two are equal. Everything is per micro-batch; the factors then average as any other layer's. The vocabulary side
is the usual diagonal-plus-low-rank factor: D_e lands on its exact diagonal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..compatibility import conflict
from .base import PairedRows, concat
from .embedding import EmbeddingLayer, token_counts
from .linear import LinearLayer

if TYPE_CHECKING:
    from ..eigenbasis import Bases
    from ..options import KFACOptions


def tie_reason(embedding: nn.Module, head: nn.Module, options: KFACOptions) -> str | None:
    """Why a tie of ``embedding`` and ``head`` keeps the plain gradient; None when it is handled."""
    if not options.precondition_tied_embeddings:
        return "precondition_tied_embeddings=False"
    if (reason := conflict("tied", options)) is not None:
        return reason
    if not isinstance(embedding, nn.Embedding) or type(head) is not nn.Linear:
        return f"tie between {type(embedding).__name__} and {type(head).__name__}: only an nn.Embedding with an nn.Linear head is handled"
    if (reason := EmbeddingLayer.unsupported(embedding, options)) is not None:  # the embedding's own conditions
        return reason
    vocabulary, width = embedding.num_embeddings, embedding.embedding_dim
    if (head.out_features, head.in_features) != (vocabulary, width) or head.weight.shape != (vocabulary, width):
        return (
            f"tie of incompatible shapes: nn.Embedding({vocabulary}, {width}) and nn.Linear(in={head.in_features}, "
            f"out={head.out_features}) holding a weight of shape {tuple(head.weight.shape)}"
        )
    return None


class TiedEmbeddingLayer(LinearLayer):
    """The head's Linear block (out = vocabulary, in = width), with the embedding's use folded in (see the module)."""

    shard_side = None

    def __init__(self, name: str, head: nn.Linear, embeddings: dict[str, nn.Embedding], options: KFACOptions):
        super().__init__(name, head, bias_mode=options.bias_mode, weight_sharing=options.weight_sharing)
        #: The nn.Embedding modules holding the table (usually one; T5 has the shared one and its two users).
        self.embeddings = embeddings
        self.padding_idx = next(iter(embeddings.values())).padding_idx

    def describe(self) -> str:
        return f"Linear ({'reduce' if self.reduce else 'expand'}) tied to nn.Embedding {sorted(self.embeddings)}, one block"

    def hooked_modules(self) -> dict[str, nn.Module]:
        return {self.name: self.module, **self.embeddings}

    def record(
        self,
        pop: Callable[[nn.Module], tuple[list[Tensor], list[Tensor]]],
        per_example_grad: Callable[[float], float | Tensor],
        bases: Bases | None = None,
    ) -> PairedRows | None:
        """Both uses' statistics, balanced and summed into one micro-batch estimate of each factor (no pairs: a rule
        that wants them is refused for ties, :mod:`..compatibility`)."""
        a_factor, b_factor = self.factors
        dtype = b_factor.dtype
        uses = []  # (A rows, A weight, B rows or token counts, B weight, whether B is the diagonal counts)
        inputs, grads = pop(self.module)
        if inputs and grads:
            rows = concat([self._input_rows(x) for x in inputs]).to(dtype)
            if self.augment:
                rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
            samples = sum(self.num_samples(g) for g in grads)
            b_rows = concat([self.output_grad_rows(g) for g in grads]).to(dtype) * per_example_grad(
                samples / len(grads)
            )
            uses.append((rows, 1.0 / rows.shape[-2], b_rows, 1.0 / b_rows.shape[-2], False))
        lookups = [pop(embedding) for embedding in self.embeddings.values()]
        tokens = [x.reshape(-1) for inputs, grads in lookups if grads for x in inputs]
        if tokens:
            tokens = torch.cat(tokens)
            counts, _ = token_counts(tokens, self.out_dim, self.padding_idx, dtype)
            # each call's output gradients made per-example by its own number of positions
            width_rows = concat(
                [
                    g.reshape(-1, g.shape[-1]).to(dtype) * per_example_grad(g.numel() // g.shape[-1])
                    for _, grads in lookups
                    for g in grads
                ]
            )
            if self.augment:  # the bias column is the head's alone: zero in the embedding's rows
                width_rows = torch.cat([width_rows, width_rows.new_zeros(*width_rows.shape[:-1], 1)], dim=-1)
            uses.append((width_rows, 1.0 / width_rows.shape[-2], counts, 1.0 / tokens.numel(), True))
        if not uses:
            return None
        tiny = torch.finfo(dtype).tiny
        traces = [
            (rows.square().sum() * a_weight, (b.sum() if diagonal else b.square().sum()) * b_weight)
            for rows, a_weight, b, b_weight, diagonal in uses
        ]
        # s_i = √((tr A_i/d)/(tr B_i/V)) balances use i; μ_i = √(tr A_i tr B_i/(d V)) is then its mean eigenvalue.
        scales = [((a / self.in_dim).clamp_min(tiny) / (b / self.out_dim).clamp_min(tiny)).sqrt() for a, b in traces]
        means = [(a * b / (self.in_dim * self.out_dim)).sqrt() for a, b in traces]
        trace_match = sum(m * m for m in means) / (sum(means) ** 2).clamp_min(tiny)
        for index, ((rows, a_weight, b, b_weight, diagonal), scale) in enumerate(zip(uses, scales)):
            a_factor.accumulate(rows, a_weight / scale, new_estimate=index == 0)
            if diagonal:
                b_factor.accumulate_diagonal(b, trace_match * scale * b_weight, new_estimate=index == 0)
            else:
                b_factor.accumulate(b, trace_match * scale * b_weight, new_estimate=index == 0)
        return None
