"""nn.MultiheadAttention in full (precondition_attention): the forward is unchanged, the state_dict keys are
unchanged, and exact mode equals dense K-FAC built by hand on a twin made of nn.Linear projections."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.demos import Transformer

from lightning_lrkfac import LowRankKFAC

from .helpers import damped_natural, linear_io_grads, with_ones

E, HEADS, CLASSES = 6, 2, 3


class AttentionModel(nn.Module):
    """An nn.MultiheadAttention (self- or cross-attention) and a per-position head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x, memory):
        return self.head(self.attention(x, memory, memory, need_weights=False)[0])


class TwinModel(nn.Module):
    """The same attention written with nn.Linear projections and SDPA (batch first)."""

    def __init__(self, model: AttentionModel) -> None:
        super().__init__()
        attention = model.attention
        self.q, self.k, self.v = (nn.Linear(E, E) for _ in range(3))
        for index, linear in enumerate((self.q, self.k, self.v)):
            linear.weight.data.copy_(attention.in_proj_weight.data[index * E : (index + 1) * E])
            linear.bias.data.copy_(attention.in_proj_bias.data[index * E : (index + 1) * E])
        self.out = nn.Linear(E, E)
        self.out.load_state_dict(attention.out_proj.state_dict())
        self.head = nn.Linear(E, CLASSES)
        self.head.load_state_dict(model.head.state_dict())

    def forward(self, x, memory):
        def heads(t):
            return t.reshape(t.shape[0], t.shape[1], HEADS, E // HEADS).transpose(1, 2)

        mixed = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(memory)), heads(self.v(memory)))
        return self.head(self.out(mixed.transpose(1, 2).reshape(x.shape[0], x.shape[1], E)))


def token_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, CLASSES), y.reshape(-1))


def dense_reference(twin: TwinModel, x, memory, y, damping: float) -> dict[str, torch.Tensor]:
    """Dense K-FAC-expand of every Linear of the twin: rows of inputs and of output gradients over all positions.

    As for any Linear under expand, a layer's positions are its examples: its recorded output
    gradients of the token-mean loss are multiplied by its own number of positions.
    """
    linears = {"q": twin.q, "k": twin.k, "v": twin.v, "out": twin.out, "head": twin.head}
    inputs, grads, params = linear_io_grads(linears, lambda: token_loss(twin(x, memory), y))
    expected = {}
    for i, name in enumerate(linears):
        a = inputs[name].reshape(-1, E)
        positions = a.shape[0]
        g = grads[name].reshape(positions, -1) * positions
        a = with_ones(a)
        gradient = torch.cat([params[2 * i], params[2 * i + 1][:, None]], 1)
        expected[name] = damped_natural(a.T @ a / positions, g.T @ g / positions, gradient, damping)
    return expected


@pytest.mark.parametrize("cross", [False, True], ids=["self-attention", "cross-attention"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
def test_exact_mode_on_multihead_attention_matches_dense_kfac_of_a_linear_twin(cross, batch_first):
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = AttentionModel(batch_first)
        x = torch.randn(4, 5, E)
        memory = torch.randn(4, 7, E) if cross else x
        y = torch.randint(0, CLASSES, (4, 5))
        expected = dense_reference(TwinModel(model), x, memory, y, 1e-2)

        def layout(t):
            return t if batch_first else t.transpose(0, 1)

        with LowRankKFAC(model, rank=64, damping=1e-2, kl_clip=None, precondition_attention=True) as kfac:
            model.zero_grad()
            logits = model(layout(x), layout(memory))
            token_loss(layout(logits), y).backward()
            kfac.step()
    finally:
        torch.set_default_dtype(torch.float32)
    attention = model.attention
    got = torch.cat([attention.in_proj_weight.grad, attention.in_proj_bias.grad[:, None]], 1)
    for index, part in enumerate("qkv"):
        torch.testing.assert_close(got[index * E : (index + 1) * E], expected[part], rtol=1e-10, atol=1e-12)
    out = torch.cat([attention.out_proj.weight.grad, attention.out_proj.bias.grad[:, None]], 1)
    torch.testing.assert_close(out, expected["out"], rtol=1e-10, atol=1e-12)
    assert [layer.name for layer in kfac.layers] == [
        "attention.in_proj[q]", "attention.in_proj[k]", "attention.in_proj[v]", "attention.out_proj", "head",
    ]  # fmt: skip


def demo_transformer() -> Transformer:
    torch.manual_seed(0)
    return Transformer(vocab_size=50, ninp=32, nhead=2, nhid=64, nlayers=1, dropout=0.0)


def test_demo_transformer_output_and_state_dict_keys_are_unchanged_and_coverage_is_full():
    model = demo_transformer()
    inputs, target = torch.randint(0, 50, (3, 9)), torch.randint(0, 50, (3, 9))
    before, keys = model(inputs, target), list(model.state_dict())
    kfac = LowRankKFAC(model, rank=16, precondition_attention=True, precondition_embeddings=True)
    after = model(inputs, target)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert list(model.state_dict()) == keys
    rows = kfac.coverage
    share = sum(r["numel"] for r in rows if r["preconditioned"]) / sum(r["numel"] for r in rows)
    assert share >= 0.95, kfac.coverage_report()
    attention = [r for r in rows if "in_proj_weight" in r["parameter"]]
    assert len(attention) == 3 and all("in_proj as 3 blocks" in r["how"] for r in attention)  # enc, dec self, cross
    # A step preconditions every attention weight; close() puts the class's forward back.
    F.nll_loss(model(inputs, target).reshape(-1, 50), target.reshape(-1)).backward()
    kfac.step(lr=0.1)
    assert all(layer.ready for layer in kfac.layers)
    kfac.close()
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(model(inputs, target), before, rtol=0, atol=1e-6)


def test_attention_stays_plain_unless_asked_or_unsupported():
    model = demo_transformer()
    off = LowRankKFAC(model, rank=16)
    off.close()
    assert off.skipped_modules["transformer.encoder.layers.0.self_attn"] == (
        "nn.MultiheadAttention (precondition_attention=False)"
    )
    kdim = nn.Sequential(nn.Linear(4, 4))
    kdim.attention = nn.MultiheadAttention(4, 1, kdim=3, vdim=3)
    kfac = LowRankKFAC(kdim, precondition_attention=True)
    assert "kdim/vdim" in kfac.skipped_modules["attention"]


def first_example(x, memory, batch_first):
    """(query, key, value) of one unbatched example."""
    one, other = (x[0], memory[0]) if batch_first else (x[:, 0], memory[:, 0])
    return one, other, other


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "3d"])
def test_swapped_forward_returns_what_multihead_attention_returns(need_weights, batch_first, masks):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    x, memory = torch.randn(3, 5, 8), torch.randn(3, 7, 8)
    if not batch_first:
        x, memory = x.transpose(0, 1), memory.transpose(0, 1)
    kwargs = {"need_weights": need_weights}
    if masks != "none":
        blocked = torch.rand(5, 7) > 0.6
        blocked[:, 0] = False
        padding = torch.rand(3, 7) > 0.7
        padding[:, 0] = False
        attn_mask = blocked if masks == "bool" else torch.randn(5, 7)
        if masks == "3d":
            attn_mask = torch.randn(3 * 2, 5, 7)
        kwargs.update(attn_mask=attn_mask, key_padding_mask=padding)
    expected = attention(x, memory, memory, **kwargs)
    with LowRankKFAC(attention, precondition_attention=True):
        assert "forward" in attention.__dict__
        got = attention(x, memory, memory, **kwargs)
        unbatched = attention(*first_example(x, memory, batch_first))
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-6)
    if need_weights:
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-6)
    else:
        assert got[1] is None and expected[1] is None
    reference = attention(*first_example(x, memory, batch_first))
    torch.testing.assert_close(unbatched[0], reference[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(unbatched[1], reference[1], rtol=0, atol=1e-6)
