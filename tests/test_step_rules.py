"""EKFAC and SOAP (step_rule) against hand-written references: dense EKFAC, torch's Adam in rotated coordinates."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lrkfac import LowRankKFAC, LowRankKFACCallback
from lightning_lrkfac.layers.conv import conv_patches
from lightning_lrkfac.optim import KFACWithAdamW
from lightning_lrkfac.step_rules import Bases

from .helpers import (
    DigitsModule,
    InfGradAtStep,
    digits_loader,
    fp16_plugin,
    linear_io_grads,
    quiet_trainer,
    with_ones,
)

DAMPING = 1e-2


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def batch(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (n,), generator=generator)


def reference_statistics(model, x, y):
    """Per layer: (augmented inputs ā_i, per-example output grads b̃_i = n·∂L/∂out_i, G = [∂W ∂b]) by plain autograd."""
    linears = {"0": model[0], "2": model[2]}
    inputs, grads, params = linear_io_grads(linears, lambda: F.cross_entropy(model(x), y))
    n = x.shape[0]
    out = {}
    for index, name in enumerate(linears):
        weight_grad, bias_grad = params[2 * index], params[2 * index + 1]
        out[name] = (with_ones(inputs[name].detach()), n * grads[name], torch.cat([weight_grad, bias_grad[:, None]], 1))
    return out


def eigenbasis(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigh(matrix)[1]


def step_and_read(kfac, model, x, y, optimizer=None):
    """One backward + engine step; returns each Linear's preconditioned [∂W ∂b] and the plain one before."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    kfac.step(lr=optimizer)
    return {name: torch.cat([model[int(name)].weight.grad, model[int(name)].bias.grad[:, None]], 1) for name in "02"}


def test_ekfac_in_exact_mode_equals_dense_ekfac_with_the_eigenbasis_held_fixed():
    """k ≥ d: step 0 takes the bases of batch 0's A and B and K-FAC's λ_B λ_A as scaling; at step 1
    (EMA decay 0) the scaling is batch 1's E[(Q_Bᵀ g_i Q_A)²] and the step Q_B (C / (s + λ)) Q_Aᵀ."""
    model = tiny_model()
    x0, y0 = batch(0)
    x1, y1 = batch(1)
    reference0 = reference_statistics(model, x0, y0)
    kfac = LowRankKFAC(
        model, rank=16, damping=DAMPING, factor_decay=0.0, basis_update_interval=100, kl_clip=None, step_rule="ekfac"
    )
    got0 = step_and_read(kfac, model, x0, y0)
    bases = {}
    for name, (rows, outs, grad) in reference0.items():
        n = rows.shape[0]
        a_matrix, b_matrix = rows.T @ rows / n, outs.T @ outs / n
        a_values, q_a = torch.linalg.eigh(a_matrix)
        b_values, q_b = torch.linalg.eigh(b_matrix)
        bases[name] = (q_a, q_b)
        expected = q_b @ ((q_b.T @ grad @ q_a) / (b_values[:, None] * a_values[None, :] + DAMPING)) @ q_a.T
        torch.testing.assert_close(got0[name], expected, atol=1e-10, rtol=1e-9)
    reference1 = reference_statistics(model, x1, y1)  # the weights moved by no step: no optimizer ran
    got1 = step_and_read(kfac, model, x1, y1)
    for name, (rows, outs, grad) in reference1.items():
        q_a, q_b = bases[name]
        per_example = torch.einsum("ko,no,ni,ij->nkj", q_b.T, outs, rows, q_a)  # Q_Bᵀ b̃_i ā_iᵀ Q_A
        scaling = per_example.square().mean(0)
        expected = q_b @ ((q_b.T @ grad @ q_a) / (scaling + DAMPING)) @ q_a.T
        torch.testing.assert_close(got1[name], expected, atol=1e-10, rtol=1e-9)


def low_rank_engine(step_rule: str, **options) -> tuple[nn.Module, LowRankKFAC]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 10)).double()
    defaults = dict(
        rank=4, dense_threshold=0, damping=DAMPING, kl_clip=None, basis_update_interval=100, step_rule=step_rule
    )
    return model, LowRankKFAC(model, **{**defaults, **options})


def wide_batch(seed: int, n: int = 32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=generator, dtype=torch.float64), torch.randint(0, 10, (n,), generator=generator)


def test_low_rank_ekfac_is_a_symmetric_positive_operator_with_the_rescaled_core():
    """k < d: P(G) = V (Vᵀ G U / (s + λ)) Uᵀ + P⊥ K P⊥ G is symmetric (⟨P G₁, G₂⟩ = ⟨G₁, P G₂⟩), positive,
    and its core Vᵀ P(G) U is exactly the rescaled core."""
    model, kfac = low_rank_engine("ekfac")
    for seed in range(3):
        x, y = wide_batch(seed)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        kfac.step()
    layer, rule = kfac.layers[0], kfac.rules[0]
    assert not rule.bases.complete
    generator = torch.Generator().manual_seed(7)
    g1, g2 = (torch.randn(layer.out_dim, layer.in_dim, generator=generator, dtype=torch.float64) for _ in range(2))
    p1, p2 = (rule.precondition([g], DAMPING)[0] for g in (g1, g2))
    torch.testing.assert_close((p1 * g2).sum(), (g1 * p2).sum(), rtol=1e-10, atol=0)
    assert (p1 * g1).sum() > 0 and (p2 * g2).sum() > 0
    bases = rule.bases
    torch.testing.assert_close(bases.core(p1), bases.core(g1) / (rule.scaling + DAMPING), rtol=1e-10, atol=1e-12)
    eye_left = bases.left.T @ bases.left
    torch.testing.assert_close(eye_left, torch.eye(eye_left.shape[0], dtype=torch.float64), atol=1e-10, rtol=0)


def test_soap_in_exact_mode_equals_torch_adam_after_the_rotation():
    """k ≥ d and the bases held fixed: the direction is Q_B (Adam step on Q_Bᵀ G_t Q_A) Q_Aᵀ, step after step,
    against torch.optim.Adam run on the rotated gradients."""
    model = tiny_model()
    betas, eps = (0.8, 0.9), 1e-6
    kfac = LowRankKFAC(
        model, rank=16, basis_update_interval=100, kl_clip=None, step_rule="soap",
        adam_beta1=betas[0], adam_beta2=betas[1], adam_eps=eps,
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    kfac.check_optimizer(optimizer)
    rotated, adams, bases = {}, {}, {}
    for step in range(5):
        x, y = batch(step)
        reference = reference_statistics(model, x, y)
        if step == 0:  # the bases: batch 0's A and B (the first fold takes the batch as is)
            for name, (rows, outs, _) in reference.items():
                n = rows.shape[0]
                bases[name] = (eigenbasis(rows.T @ rows / n), eigenbasis(outs.T @ outs / n))
                rotated[name] = torch.zeros(outs.shape[1], rows.shape[1], dtype=torch.float64, requires_grad=True)
                adams[name] = torch.optim.Adam([rotated[name]], lr=1.0, betas=betas, eps=eps)
        got = step_and_read(kfac, model, x, y, optimizer)
        for name, (_, _, grad) in reference.items():
            q_a, q_b = bases[name]
            before = rotated[name].detach().clone()
            rotated[name].grad = q_b.T @ grad @ q_a
            adams[name].step()
            adam_step = before - rotated[name].detach()
            torch.testing.assert_close(got[name], q_b @ adam_step @ q_a.T, atol=1e-10, rtol=1e-8)
        optimizer.step()


def test_low_rank_soap_is_adam_on_the_core_plus_diagonal_adam_on_the_projected_rest():
    """k < d: the direction is V Adam(Vᵀ G U) Uᵀ + P⊥ Adam(G − V Vᵀ G U Uᵀ), each Adam torch's own."""
    model, kfac = low_rank_engine("soap")
    x, y = wide_batch(0)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    kfac.step()  # step 0: the bases are made (and used: Adam step 1)
    layer, rule = kfac.layers[0], kfac.rules[0]
    bases = rule.bases
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(layer.out_dim, layer.in_dim, generator=generator, dtype=torch.float64) for _ in range(3)]
    # Reset the rule's moments to zero so that both sides start from Adam's initial state.
    for block in rule.blocks:
        for tensor in block.tensors("x").values():
            tensor.zero_()
    rule.updates.zero_()
    core = torch.zeros(bases.left.shape[1], bases.right.shape[1], dtype=torch.float64, requires_grad=True)
    rest = torch.zeros(layer.out_dim, layer.in_dim, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([core, rest], lr=1.0)
    for grad in grads:
        got = rule.precondition([grad], DAMPING)[0]
        core_grad = bases.core(grad)
        core.grad, rest.grad = core_grad, grad - bases.expand(core_grad)
        before_core, before_rest = core.detach().clone(), rest.detach().clone()
        adam.step()
        core_step, rest_step = before_core - core.detach(), before_rest - rest.detach()
        expected = bases.expand(core_step) + rest_step - bases.expand(bases.core(rest_step))
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-9)


def test_soap_with_a_separate_bias_runs_adam_on_its_rotated_column():
    """bias_mode="separate": the bias has its own block with A = 1, so its rotated coordinates are Q_Bᵀ g_b;
    exact mode, fixed bases, against torch's Adam."""
    model = tiny_model()
    kfac = LowRankKFAC(
        model, rank=16, basis_update_interval=100, kl_clip=None, step_rule="soap", bias_mode="separate", adam_eps=1e-6
    )
    layer = model[2]
    rotated = torch.zeros(3, 5, dtype=torch.float64, requires_grad=True)  # weight block (3×4) and bias column
    adam, q_b, q_a = None, None, None
    for step in range(3):
        x, y = batch(step)
        inputs, grads, params = linear_io_grads({"2": layer}, lambda x=x, y=y: F.cross_entropy(model(x), y))
        if step == 0:
            rows, outs = inputs["2"].detach(), 8 * grads["2"]
            q_a, q_b = eigenbasis(rows.T @ rows / 8), eigenbasis(outs.T @ outs / 8)
            adam = torch.optim.Adam([rotated], lr=1.0, eps=1e-6)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        kfac.step()
        before = rotated.detach().clone()
        rotated.grad = torch.cat([q_b.T @ params[0] @ q_a, q_b.T @ params[1][:, None]], 1)
        adam.step()
        adam_step = before - rotated.detach()
        torch.testing.assert_close(layer.weight.grad, q_b @ adam_step[:, :4] @ q_a.T, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(layer.bias.grad, q_b @ adam_step[:, 4], atol=1e-10, rtol=1e-8)


def test_transport_follows_a_permutation_and_sign_flip_exactly_and_fills_new_directions():
    """Bases turned by a permutation with sign flips carry the moments along exactly (all covered);
    a new direction from outside the old core is uncovered."""
    old_left = torch.eye(4, dtype=torch.float64)[:, :3]
    old_right = torch.eye(3, dtype=torch.float64)[:, :2]
    previous = Bases(old_left, torch.ones(3), old_right, torch.ones(2))
    moments = torch.arange(1.0, 7.0, dtype=torch.float64).reshape(3, 2)
    permuted = Bases(-old_left[:, [2, 0, 1]], torch.ones(3), old_right[:, [1, 0]], torch.ones(2))
    carried, covered = permuted.transport(previous, moments)
    torch.testing.assert_close(carried, moments[[2, 0, 1]][:, [1, 0]])
    torch.testing.assert_close(covered, torch.ones(3, 2, dtype=torch.float64))
    turned_left = torch.eye(4, dtype=torch.float64)[:, [0, 1, 3]]  # the third direction is new
    carried, covered = Bases(turned_left, torch.ones(3), old_right, torch.ones(2)).transport(previous, moments)
    torch.testing.assert_close(covered[2], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(carried[:2], moments[:2])
    # A 45° turn inside the old span: each new direction is half of each old one, so by the
    # squared rotation it carries the mean of their moments, and nothing is uncovered.
    half = 0.5**0.5
    turned = old_left.clone()
    turned[:, 0], turned[:, 1] = half * (old_left[:, 0] + old_left[:, 1]), half * (old_left[:, 0] - old_left[:, 1])
    carried, covered = Bases(turned, torch.ones(3), old_right, torch.ones(2)).transport(previous, moments)
    mean = 0.5 * (moments[0] + moments[1])
    torch.testing.assert_close(carried, torch.stack([mean, mean, moments[2]]))
    torch.testing.assert_close(covered, torch.ones(3, 2, dtype=torch.float64))


def record_and_read_output_grad(kfac, model, module, x, y) -> torch.Tensor:
    """One forward/backward recorded by the engine (no step); returns ∂L/∂(module's output) by plain autograd."""
    outputs = {}
    handle = module.register_forward_hook(lambda m, a, out: outputs.update(out=out))
    loss = F.cross_entropy(model(x), y)
    handle.remove()
    output_grad = torch.autograd.grad(loss, outputs["out"], retain_graph=True)[0]
    model.zero_grad()
    loss.backward()
    kfac.record()
    return output_grad


def test_ekfac_pairs_of_a_sketched_conv_equal_those_of_unfolded_patches():
    """A low-rank conv A is sketched by convolutions (no patches); EKFAC's pending Σ (Vᵀb)²(Uᵀ[p 1])² / N
    must equal the sum over F.unfold's patches."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1, stride=2).double()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).double()
    kfac = LowRankKFAC(model, rank=4, kl_clip=None, step_rule="ekfac")
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    kfac.step()
    rule = kfac.rules[0]
    output_grad = record_and_read_output_grad(kfac, model, conv, x, y)
    patches = with_ones(conv_patches(conv, x))
    b_rows = 4 * output_grad.movedim(1, -1).reshape(-1, 6)  # per-example: n · ∂L/∂out
    expected = (b_rows @ rule.bases.left).square().T @ (patches @ rule.bases.right).square() / 4
    torch.testing.assert_close(rule.pending, expected, atol=1e-10, rtol=1e-9)


def test_ekfac_pairs_of_an_embedding_equal_those_of_one_hot_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 5, padding_idx=0), nn.Flatten(), nn.Linear(15, 4)).double()
    kfac = LowRankKFAC(model, rank=2, kl_clip=None, step_rule="ekfac")
    tokens, y = torch.randint(0, 7, (6, 3)), torch.randint(0, 4, (6,))
    model.zero_grad()
    F.cross_entropy(model(tokens), y).backward()
    kfac.step()  # the bases
    output_grad = record_and_read_output_grad(kfac, model, model[0], tokens, y)
    rule = kfac.rules[0]
    one_hot = F.one_hot(tokens.reshape(-1), 7).double() * (tokens.reshape(-1, 1) != 0)
    b_rows = 18 * output_grad.reshape(-1, 5)  # expand: each of the 6·3 positions is an example, as for B
    assert rule.bases.right is None
    expected = (b_rows @ rule.bases.left).square().T @ one_hot / 18
    torch.testing.assert_close(rule.pending, expected, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("step_rule", ["kfac", "ekfac", "soap"])
def test_step_rule_state_resumes_bitwise_and_a_bad_entry_is_named(step_rule):
    """A plain loop resumed from a checkpoint loaded before the first step takes the very same next step."""
    model, kfac = low_rank_engine(step_rule, basis_update_interval=2)
    for seed in range(3):
        x, y = wide_batch(seed)
        step_and_read(kfac, model, x, y)
    state = kfac.state_dict()
    twin_model, twin = low_rank_engine(step_rule, basis_update_interval=2)
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(state)
    x, y = wide_batch(9)
    got, expected = step_and_read(kfac, model, x, y), step_and_read(twin, twin_model, x, y)
    for name in got:
        assert torch.equal(got[name], expected[name])
    if step_rule == "kfac":
        return
    bad = kfac.state_dict()
    name = next(iter(bad["layers"]))
    entry = "scaling" if step_rule == "ekfac" else "block0.core_second"
    bad["layers"][name]["rule"][entry] = bad["layers"][name]["rule"][entry][:-1]
    fresh = low_rank_engine(step_rule)[1]
    fresh.build()
    with pytest.raises(ValueError, match=f"layers.{name}.rule.{entry}"):
        fresh.load_state_dict(bad)


def test_soap_asks_for_plain_sgd_and_no_kl_clip():
    with pytest.raises(ValueError, match="kl_clip"):
        LowRankKFAC(nn.Linear(3, 2), step_rule="soap")
    with pytest.raises(ValueError, match="work_distribution"):
        LowRankKFAC(nn.Linear(3, 2), step_rule="soap", kl_clip=None, work_distribution="layerwise")
    model = nn.Linear(3, 2)
    kfac = LowRankKFAC(model, step_rule="soap", kl_clip=None)
    for optimizer in (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), torch.optim.Adam(model.parameters())):
        with pytest.raises(ValueError, match="SGD with momentum=0"):
            kfac.check_optimizer(optimizer)
    kfac.check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4))


def test_soap_takes_kfac_with_adamw_its_step_finished_and_adamw_on_the_rest():
    """KFACWithAdamW (Adam's moments only on what the engine leaves) is accepted for soap, as for the normalized
    step: θ ← θ − lr·(soap's step) on the handled layer, torch's AdamW on the LayerNorm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8))
    reference = nn.LayerNorm(8)
    reference.load_state_dict(model[1].state_dict())
    optimizer = KFACWithAdamW(model.parameters(), lr=1e-3, adamw_lr=3e-3)
    adamw = torch.optim.AdamW(reference.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    with LowRankKFAC(model, step_rule="soap", kl_clip=None, rank=4) as kfac:
        kfac.check_optimizer(optimizer)
        x = torch.randn(16, 6)
        for _ in range(3):
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            raw = model[0].weight.grad.clone()
            kfac.step()
            assert not torch.allclose(model[0].weight.grad, raw)  # soap's step, not the gradient
            for mine, theirs in zip(reference.parameters(), model[1].parameters()):
                mine.grad = theirs.grad.clone()
            expected = model[0].weight.detach() - 1e-3 * model[0].weight.grad
            optimizer.step()
            adamw.step()
            torch.testing.assert_close(model[0].weight, expected, rtol=0, atol=1e-7)
            for mine, theirs in zip(reference.parameters(), model[1].parameters()):
                torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-7)


class PlainSGDDigits(DigitsModule):
    """The digits module with SGD without momentum, as SOAP asks."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class MomentSnapshots(pl.Callback):
    def __init__(self, callback) -> None:
        self.callback, self.states = callback, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rules = self.callback.engine.rules
        self.states.append([t.clone() for rule in rules for t in rule.state_tensors().values()])


def test_soap_moments_survive_a_step_the_amp_scaler_skips():
    """16-mixed with a real GradScaler and an inf gradient at step 1: the scaler skips the step, and SOAP's
    moments (and its step count) stay exactly as they were; the next step changes them again."""
    torch.manual_seed(0)
    callback = LowRankKFACCallback(rank=8, step_rule="soap", kl_clip=None, log_stats=False)
    snapshots = MomentSnapshots(callback)
    trainer = quiet_trainer(max_steps=3, plugins=[fp16_plugin()], callbacks=[callback, InfGradAtStep(1), snapshots])
    trainer.fit(PlainSGDDigits(lr=1e-3), digits_loader(limit=256))
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**15  # the scaler saw the inf and backed off
    before, skipped, after = snapshots.states
    assert all(torch.isfinite(t.float()).all() for t in after)
    assert all(torch.equal(s, b) for s, b in zip(skipped, before))
    assert not all(torch.equal(a, s) for a, s in zip(after, skipped))


def _example_model(name: str):
    from lightning_lrkfac.examples.models import (
        CNNClassifier,
        Conv1dClassifier,
        DepthwiseCNNClassifier,
        GPTLanguageModel,
    )

    if name == "depthwise-cnn":  # grouped convs: exact batched blocks
        return DepthwiseCNNClassifier(), torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    if name == "gpt":  # embeddings (diagonal A) and Linears over sequences
        return GPTLanguageModel(), torch.randint(0, 32, (4, 16)), torch.randint(0, 32, (4, 16))
    if name == "conv1d":
        return Conv1dClassifier(), torch.randn(4, 40), torch.randint(0, 10, (4,))
    return CNNClassifier(), torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))


@pytest.mark.parametrize("bias_mode", ["augment", "separate"])
@pytest.mark.parametrize("step_rule", ["ekfac", "soap"])
@pytest.mark.parametrize("name", ["depthwise-cnn", "gpt", "conv1d", "cnn"])
def test_step_rules_run_on_every_layer_type(name, step_rule, bias_mode):
    """Grouped convs, embeddings, Conv1d/2d and sequence Linears, through two refreshes: every handled
    gradient is replaced by a finite direction that differs from the plain gradient."""
    torch.manual_seed(0)
    model, x, y = _example_model(name)
    kl_clip = None if step_rule == "soap" else 1e-3
    kfac = LowRankKFAC(
        model, rank=8, step_rule=step_rule, kl_clip=kl_clip, basis_update_interval=2, bias_mode=bias_mode
    )
    for _ in range(5):
        model.zero_grad()
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        plain = {layer.name: layer.weight.grad.clone() for layer in kfac.layers}
        kfac.step(lr=0.01)
    for layer in kfac.layers:
        assert torch.isfinite(layer.weight.grad).all(), layer.name
        assert not torch.allclose(layer.weight.grad, plain[layer.name]), layer.name
