"""nn.MultiheadAttention in full (opt-in ``precondition_attention``): its packed in-projection as three
K-FAC blocks (q, k, v), its ``out_proj`` as an ordinary Linear.

nn.MultiheadAttention hands ``in_proj_weight`` and ``out_proj.weight`` to a functional call, so no
hook sees their inputs or output gradients. While the engine is attached, the module's
``forward`` is replaced (on the instance only) by :func:`attention_forward`: the same attention
computed from hookable pieces, the q, k and v projections as :class:`InProjection` modules
over slices of ``in_proj_weight`` and ``out_proj`` called as a module. Nothing is registered on
the model, so its ``state_dict`` keys do not change; ``close()`` deletes the instance
attribute and the class's forward is back.
"""

from __future__ import annotations

import math
import types
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import LinearLayer

if TYPE_CHECKING:
    from ..options import KFACOptions

PARTS = ("q", "k", "v")


class InProjection(nn.Module):
    """The q, k or v rows of a MultiheadAttention's ``in_proj_weight`` (and bias) as a Linear-like module.

    It holds no parameter of its own and is not a child of the attention module.
    """

    def __init__(self, attention: nn.MultiheadAttention, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "attention", attention)  # a plain reference, not a submodule
        self.index = index
        self.in_features = self.out_features = attention.embed_dim
        self.rows = slice(index * attention.embed_dim, (index + 1) * attention.embed_dim)

    @property
    def weight(self) -> Tensor:
        return self.attention.in_proj_weight

    @property
    def bias(self) -> Tensor | None:
        return self.attention.in_proj_bias

    def forward(self, inputs: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias[self.rows]
        return F.linear(inputs, self.weight[self.rows], bias)


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: not allowed) as an additive float mask; float masks as they are."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def attention_forward(
    self: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """nn.MultiheadAttention.forward from hookable pieces (same arguments, same results)."""
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    elif self.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    # (length, batch, embed) → batch first, so that K-FAC-reduce sees the batch as the first dim.
    q_proj, k_proj, v_proj = self._lrkfac_projections
    q, k, v = q_proj(query.transpose(0, 1)), k_proj(key.transpose(0, 1)), v_proj(value.transpose(0, 1))
    batch, target, embed = q.shape
    source, heads = k.shape[1], self.num_heads
    q, k, v = (t.reshape(batch, -1, heads, embed // heads).transpose(1, 2) for t in (q, k, v))
    mask = _float_mask(attn_mask, q.dtype)
    if mask is not None:
        mask = mask.view(1, 1, target, source) if mask.dim() == 2 else mask.view(batch, heads, target, source)
    padding = _float_mask(key_padding_mask, q.dtype)
    if padding is not None:
        padding = padding.view(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    causal = is_causal and mask is None
    dropout = self.dropout if self.training else 0.0
    weights = None
    if need_weights:
        scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        output = F.dropout(weights, p=dropout) @ v if dropout > 0 else weights @ v
        weights = weights.mean(1) if average_attn_weights else weights
        weights = weights if batched else weights.squeeze(0)
    else:
        output = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    output = self.out_proj(output.transpose(1, 2).reshape(batch, target, embed))
    if not batched:
        return output.squeeze(0), weights
    return (output if self.batch_first else output.transpose(0, 1)), weights


def unsupported_attention(attention: nn.MultiheadAttention) -> str | None:
    """Why this attention module keeps the plain gradient even with ``precondition_attention``."""
    if not attention._qkv_same_embed_dim:
        return "nn.MultiheadAttention with kdim/vdim ≠ embed_dim (separate projection weights): not handled"
    if attention.bias_k is not None or attention.add_zero_attn:
        return "nn.MultiheadAttention with add_bias_kv or add_zero_attn: not handled"
    if not attention.in_proj_weight.requires_grad:
        return "frozen weight"
    return None


class AttentionProjectionLayer(LinearLayer):
    """One of the three in-projection blocks (q, k, v) of an nn.MultiheadAttention.

    A comes from that projection's input (under self-attention the three A factors see the same
    rows), B from its output gradient; the gradient is its rows of ``in_proj_weight.grad``.
    The q block owns the forward replacement of the attention module.
    """

    shard_side = None

    module_type = InProjection

    @classmethod
    def for_attention(cls, name: str, attention: nn.MultiheadAttention, options: KFACOptions) -> list[LinearLayer]:
        projections = tuple(InProjection(attention, index) for index in range(3))
        prefix = f"{name}." if name else ""
        return [cls.from_options(f"{prefix}in_proj[{part}]", p, options) for part, p in zip(PARTS, projections)]

    def describe(self) -> str:
        return f"MultiheadAttention in_proj as 3 blocks q/k/v ({'reduce' if self.reduce else 'expand'})"

    def weight_grad(self) -> Tensor | None:
        grad = self.weight.grad
        return None if grad is None else grad[self.module.rows]

    def bias_grad(self) -> Tensor | None:
        grad = self.module.bias.grad
        return None if grad is None else grad[self.module.rows]

    def attach(self) -> None:
        attention = self.module.attention
        projections = getattr(attention, "_lrkfac_projections", [None, None, None])
        projections = list(projections)
        projections[self.module.index] = self.module
        attention._lrkfac_projections = tuple(projections)
        if all(p is not None for p in projections):
            attention.forward = types.MethodType(attention_forward, attention)

    def detach(self) -> None:
        attention = self.module.attention
        for attribute in ("forward", "_lrkfac_projections"):
            attention.__dict__.pop(attribute, None)
