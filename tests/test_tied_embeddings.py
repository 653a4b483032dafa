"""A weight shared by an nn.Embedding and a Linear head: one block, checked against a dense float64 build of
the same approximation (each use's pair balanced, summed, trace-matched) from hooks and autograd alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_lrkfac import LowRankKFAC

from .helpers import damped_natural, kfac_grads, plain_grads, with_ones

VOCAB, WIDTH = 7, 5


class TiedLM(nn.Module):
    """tokens → embedding → tanh(Linear) → head, the head's weight the embedding table."""

    def __init__(self, head_bias: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.hidden = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=head_bias)
        self.head.weight = self.embedding.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.hidden(self.embedding(tokens))))


def token_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def tied_factors(model: TiedLM, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocabulary-side B, width-side A) of the tied block for one batch, built densely from hooks and autograd."""
    seen = {}
    hooks = [
        module.register_forward_hook(lambda m, args, out, key=key: seen.update({key: (args[0], out)}))
        for key, module in (("embedding", model.embedding), ("head", model.head))
    ]
    loss = token_loss(model(x), y)
    for hook in hooks:
        hook.remove()
    count = x.numel()  # the loss is a mean over every token: per-token gradients are count × these
    e_grad, g = (count * grad for grad in torch.autograd.grad(loss, [seen["embedding"][1], seen["head"][1]]))
    h = seen["head"][0].reshape(count, -1)
    if model.head.bias is not None:
        h = with_ones(h)
    g, e = g.reshape(count, VOCAB), e_grad.reshape(count, WIDTH)
    if model.head.bias is not None:
        e = torch.cat([e, torch.zeros(count, 1, dtype=e.dtype)], dim=1)  # the bias column is the head's alone
    one_hot = F.one_hot(x.reshape(-1), VOCAB).to(h.dtype)
    head_b, head_a = g.T @ g / count, h.T @ h / count
    embedding_b, embedding_a = one_hot.T @ one_hot / count, e.T @ e / count
    width = h.shape[1]
    pairs = [(head_b, head_a), (embedding_b, embedding_a)]
    scales = [((a.trace() / width) / (b.trace() / VOCAB)).sqrt() for b, a in pairs]
    means = [(a.trace() * b.trace() / (width * VOCAB)).sqrt() for b, a in pairs]
    match = sum(m**2 for m in means) / sum(means) ** 2
    b = match * sum(s * b for s, (b, _) in zip(scales, pairs))
    a = sum(a / s for s, (_, a) in zip(scales, pairs))
    # the approximation keeps the trace of the sum of the two Kronecker blocks
    exact_trace = sum(b.trace() * a.trace() for b, a in pairs)
    torch.testing.assert_close(b.trace() * a.trace(), exact_trace, rtol=1e-12, atol=0)
    return b, a


@pytest.mark.parametrize("head_bias", [True, False])
def test_exact_mode_matches_a_dense_build_of_the_tied_approximation(head_bias):
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = TiedLM(head_bias)
        x, y = torch.randint(0, VOCAB, (4, 6)), torch.randint(0, VOCAB, (4, 6))
        b, a = tied_factors(model, x, y)
        plain = dict(zip([n for n, _ in model.named_parameters()], plain_grads(model, x, y, token_loss)))
        grad = plain["embedding.weight"]
        if head_bias:
            grad = torch.cat([grad, plain["head.bias"][:, None]], dim=1)
        expected = damped_natural(a, b, grad, 1e-2)
        grads, kfac = kfac_grads(model, x, y, token_loss, rank=64, damping=1e-2, kl_clip=None)
        got = dict(zip([n for n, _ in model.named_parameters()], grads))
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(got["embedding.weight"], expected[:, :WIDTH], rtol=1e-10, atol=1e-12)
    if head_bias:
        torch.testing.assert_close(got["head.bias"], expected[:, -1], rtol=1e-10, atol=1e-12)
    assert sorted(layer.name for layer in kfac.layers) == ["head", "hidden"]
    rows = {row["parameter"]: row for row in kfac.coverage}
    assert rows["embedding.weight"]["preconditioned"]
    assert "tied to nn.Embedding ['embedding'], one block" in rows["embedding.weight"]["how"]


def test_low_rank_tied_factors_fold_the_dense_statistics():
    """Low-rank mode: B over the vocabulary keeps the exact diagonal (token frequencies land there) and its
    sketch is the dense factor times the test matrix; A's sketch likewise."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(1)
        model = TiedLM()
        x, y = torch.randint(0, VOCAB, (3, 5)), torch.randint(0, VOCAB, (3, 5))
        b, a = tied_factors(model, x, y)
        with LowRankKFAC(model, rank=2, oversampling=1, dense_threshold=0, kl_clip=None) as kfac:
            model.zero_grad()
            token_loss(model(x), y).backward()
            kfac.record()
            kfac.fold_statistics(0.95)
            head = next(layer for layer in kfac.layers if layer.name == "head")
            torch.testing.assert_close(head.b_factor.diag, b.diagonal(), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(head.b_factor.sketch, b @ head.b_factor.test, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(head.a_factor.sketch, a @ head.a_factor.test, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(head.b_factor.trace, b.trace(), rtol=1e-12, atol=0)
            assert head.a_factor.pending_count == head.b_factor.pending_count == 0
    finally:
        torch.set_default_dtype(torch.float32)


def test_tied_weights_can_be_left_plain():
    torch.manual_seed(0)
    model = TiedLM()
    x, y = torch.randint(0, VOCAB, (4, 6)), torch.randint(0, VOCAB, (4, 6))
    plain = plain_grads(model, x, y, token_loss)
    got, kfac = kfac_grads(model, x, y, token_loss, rank=64, kl_clip=None, precondition_tied_embeddings=False)
    torch.testing.assert_close(got[0], plain[0], rtol=0, atol=0)
    reason = "parameter shared with {} (tied weights): precondition_tied_embeddings=False"
    assert kfac.skipped_modules == {"embedding": reason.format(["head"]), "head": reason.format(["embedding"])}


class ThreeUses(nn.Module):
    """One table used by an embedding and two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.head, self.other_head = nn.Linear(WIDTH, VOCAB), nn.Linear(WIDTH, VOCAB)
        self.head.weight = self.other_head.weight = self.embedding.weight
        self.hidden = nn.Linear(WIDTH, WIDTH)

    def forward(self, tokens):
        h = torch.tanh(self.hidden(self.embedding(tokens)))
        return self.head(h) + self.other_head(h)


class MismatchedTie(nn.Module):
    """A Linear declared (in=VOCAB, out=WIDTH) whose weight is the (VOCAB × WIDTH) table: F.linear still runs."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.hidden = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(VOCAB, WIDTH, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.hidden(self.embedding(tokens))))


@pytest.mark.parametrize(
    "model, reason",
    [
        (ThreeUses, "used as 1 embedding(s) and 2 other module(s)"),
        (MismatchedTie, "tie of incompatible shapes: nn.Embedding(7, 5) and nn.Linear(in=7, out=5)"),
    ],
)
def test_unsupported_ties_keep_the_plain_gradient_with_their_reason(model, reason):
    torch.manual_seed(0)
    model = model()
    x, y = torch.randint(0, VOCAB, (4, 6)), torch.randint(0, VOCAB, (4, 6))
    plain = plain_grads(model, x, y, token_loss)
    got, kfac = kfac_grads(model, x, y, token_loss, rank=64, kl_clip=None)
    torch.testing.assert_close(got[0], plain[0], rtol=0, atol=0)  # the shared table
    assert [layer.name for layer in kfac.layers] == ["hidden"]
    rows = {row["parameter"]: row for row in kfac.coverage}
    assert not rows["embedding.weight"]["preconditioned"] and reason in rows["embedding.weight"]["how"]
    assert not torch.allclose(got[-2], plain[-2])  # hidden.weight is preconditioned
