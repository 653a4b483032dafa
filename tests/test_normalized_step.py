"""step_size='normalized': K-FAC on a Nesterov momentum, each layer's update at a set norm; relative damping;
KFACWithAdamW. Checked against a dense float64 reference built here from hooks and torch.linalg.solve."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_lrkfac import LowRankKFAC, LowRankKFACCallback
from lightning_lrkfac.compatibility import check
from lightning_lrkfac.optim import KFACWithAdamW
from lightning_lrkfac.options import KFACOptions
from tests.helpers import DigitsModule, digits_loader, quiet_trainer

LAMBDA, BETA, LR = 1e-2, 0.9, 0.05
NORMALIZED = {"step_size": "normalized", "kl_clip": None, "momentum": BETA, "damping": LAMBDA}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def muon_norm(rows: int, columns: int) -> float:
    return math.sqrt(min(rows, columns)) * math.sqrt(max(1.0, rows / columns))


class DenseReference:
    """The rule written out densely: m ← βm + (1−β)G, U = (1−β)G + βm, P = (B + δ_B)⁻¹ U (A + δ_A)⁻¹ with the
    factors of this batch alone (factor_decay 0), P scaled to Muon's norm, for every Linear (bias as a ones column)."""

    def __init__(self, model: nn.Module, damping_mode: str, update_norm: str = "muon") -> None:
        self.linears = [m for m in model if isinstance(m, nn.Linear)]
        self.mode, self.update_norm = damping_mode, update_norm
        self.inputs, self.output_grads = {}, {}
        self.momenta = {
            id(m): torch.zeros(m.out_features, m.in_features + 1, dtype=torch.float64) for m in self.linears
        }
        for module in self.linears:
            module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.inputs[id(module)] = args[0].detach()
        output.register_hook(lambda grad: self.output_grads.__setitem__(id(module), grad.detach()))

    def updates(self) -> list[torch.Tensor]:
        result = []
        for module in self.linears:
            x, g = self.inputs[id(module)], self.output_grads[id(module)]
            n = x.shape[0]
            rows = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
            a_factor = rows.T @ rows / n
            per_example = g * n  # the mean loss's output gradient, made each example's own
            b_factor = per_example.T @ per_example / n
            mean_a, mean_b = torch.trace(a_factor) / a_factor.shape[0], torch.trace(b_factor) / b_factor.shape[0]
            if self.mode == "pi":
                pi = torch.sqrt(mean_a / mean_b)
                damping_a, damping_b = math.sqrt(LAMBDA) * pi, math.sqrt(LAMBDA) / pi
            else:
                damping_a, damping_b = math.sqrt(LAMBDA) * mean_a, math.sqrt(LAMBDA) * mean_b
            grad = torch.cat([module.weight.grad, module.bias.grad[:, None]], dim=1)
            momentum = self.momenta[id(module)]
            momentum.mul_(BETA).add_(grad, alpha=1 - BETA)
            nesterov = (1 - BETA) * grad + BETA * momentum
            eye_a, eye_b = torch.eye(a_factor.shape[0], dtype=x.dtype), torch.eye(b_factor.shape[0], dtype=x.dtype)
            right = torch.linalg.solve(a_factor + damping_a * eye_a, nesterov.T).T  # U (A + δ_A)⁻¹ (A symmetric)
            natural = torch.linalg.solve(b_factor + damping_b * eye_b, right)
            if self.update_norm == "polar":
                result.append(polar_by_svd(natural) * math.sqrt(max(1.0, natural.shape[0] / natural.shape[1])))
            else:
                result.append(natural * muon_norm(*natural.shape) / natural.norm())
        return result


def polar_by_svd(matrix: torch.Tensor) -> torch.Tensor:
    """What 5 steps of Muon's quintic Newton–Schulz iteration make of X = UΣVᵀ, from an SVD: U f(Σ/‖X‖_F) Vᵀ with
    f(σ) = aσ + bσ³ + cσ⁵ applied 5 times to each singular value."""
    u, sigma, vt = torch.linalg.svd(matrix, full_matrices=False)
    sigma = sigma / matrix.norm()
    for _ in range(5):
        sigma = 3.4445 * sigma - 4.7750 * sigma**3 + 2.0315 * sigma**5
    return (u * sigma) @ vt


@pytest.mark.parametrize(("damping_mode", "update_norm"), [("pi", "muon"), ("relative", "muon"), ("relative", "polar")])
def test_exact_mode_equals_the_dense_float64_rule(damping_mode, update_norm):
    model, twin = mlp(), mlp()
    reference = DenseReference(twin, damping_mode, update_norm)
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 4, (32,))
    options = dict(
        NORMALIZED, damping_mode=damping_mode, update_norm=update_norm, factor_decay=0.0, basis_update_interval=1
    )
    optimizer, twin_optimizer = torch.optim.SGD(model.parameters(), lr=LR), torch.optim.SGD(twin.parameters(), lr=LR)
    with LowRankKFAC(model, **options) as kfac:
        kfac.check_optimizer(optimizer)
        kfac.build()
        assert all(type(f).__name__ == "DenseFactor" for layer in kfac.layers for f in layer.factors)  # exact mode
        for _ in range(4):
            for net, opt in ((model, optimizer), (twin, twin_optimizer)):
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
            kfac.step()
            expected = reference.updates()
            for layer, want in zip((model[0], model[2]), expected):
                got = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            for twin_layer, want in zip(reference.linears, expected):
                twin_layer.weight.grad.copy_(want[:, :-1])
                twin_layer.bias.grad.copy_(want[:, -1])
            optimizer.step()
            twin_optimizer.step()


def conv_and_wide_head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 30, 200), nn.LayerNorm(200), nn.Linear(200, 50)
    )


def layer_updates(model: nn.Module, update_norm: str, steps: int = 3):
    """Each step's [W b] update of every handled layer (low rank, a conv, a wide head), and whether the LayerNorm
    kept its gradient."""
    torch.manual_seed(1)
    x, y = torch.randn(64, 3, 32), torch.randint(0, 50, (64,))
    with LowRankKFAC(model, **dict(NORMALIZED, update_norm=update_norm), rank=8) as kfac:
        for _ in range(steps):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            plain = model[4].weight.grad.clone()
            kfac.step()
            updates = {}
            for layer in kfac.layers:
                rows = layer.weight.shape[0]
                weight = layer.weight.grad.reshape(rows, -1)
                updates[layer.name] = torch.cat([weight, layer.module.bias.grad[:, None]], dim=1).clone()
            yield updates, torch.equal(model[4].weight.grad, plain)


@pytest.mark.parametrize("update_norm", ["muon", "rms"])
def test_every_layer_writes_its_set_norm(update_norm):
    """Low rank, a conv and a wide head: each layer's [W b] update has its norm; the plain parameters are untouched."""
    for step, (updates, norm_untouched) in enumerate(layer_updates(conv_and_wide_head(), update_norm)):
        assert norm_untouched, "the LayerNorm keeps its gradient"
        for name, update in updates.items():
            rows, columns = update.shape
            target = muon_norm(rows, columns) if update_norm == "muon" else 0.2 * math.sqrt(rows * columns)
            assert float(update.norm()) == pytest.approx(target, rel=1e-5), (name, step)


def test_polar_writes_newton_schulz_of_the_direction_by_svd():
    """``update_norm='polar'`` writes what 5 Newton–Schulz steps make of the same direction (the ``muon`` run's,
    which differs only by its length), computed from an SVD in float64, times √max(1, m/n)."""
    polar = layer_updates(conv_and_wide_head(), "polar")
    for step, ((directions, _), (updates, norm_untouched)) in enumerate(
        zip(layer_updates(conv_and_wide_head(), "muon"), polar)
    ):
        assert norm_untouched, "the LayerNorm keeps its gradient"
        for name, update in updates.items():
            rows, columns = update.shape
            want = polar_by_svd(directions[name].double()) * math.sqrt(max(1.0, rows / columns))
            torch.testing.assert_close(update.double(), want, rtol=0, atol=2e-4, msg=f"{name}, step {step}")


def test_resume_continues_exactly():
    """Two steps, a checkpoint, two more in a fresh engine and model: equal to four straight (momenta restored)."""
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 4, (32,))

    def train(model, kfac, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            kfac.step()
            optimizer.step()

    straight = mlp()
    with LowRankKFAC(straight, **NORMALIZED, rank=4, dense_threshold=0) as kfac:
        train(straight, kfac, torch.optim.SGD(straight.parameters(), lr=LR), 4)
    first = mlp()
    with LowRankKFAC(first, **NORMALIZED, rank=4, dense_threshold=0) as kfac:
        train(first, kfac, torch.optim.SGD(first.parameters(), lr=LR), 2)
        saved = kfac.state_dict()
    assert saved["normalized"] and all(t.abs().sum() > 0 for t in saved["normalized"].values())
    resumed = mlp()
    resumed.load_state_dict(first.state_dict())
    with LowRankKFAC(resumed, **NORMALIZED, rank=4, dense_threshold=0) as kfac:
        kfac.load_state_dict(saved)
        train(resumed, kfac, torch.optim.SGD(resumed.parameters(), lr=LR), 2)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_relative_damping_makes_the_step_invariant_to_the_loss_scale():
    """A loss scaled by c scales G by c and B by c²: with δ relative to each factor the normalized update is the
    same; π-damping of an absolute λ is not (its δ_B stays put while B grows)."""
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 4, (32,))

    def update(damping_mode: str, scale: float) -> torch.Tensor:
        model = mlp()
        with LowRankKFAC(model, **NORMALIZED, damping_mode=damping_mode) as kfac:
            (scale * F.cross_entropy(model(x), y)).backward()
            kfac.step()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    torch.testing.assert_close(update("relative", 100.0), update("relative", 1.0), rtol=1e-9, atol=1e-12)
    assert (update("pi", 100.0) - update("pi", 1.0)).abs().max() > 1e-3


def test_kfac_with_adamw_moves_the_rest_by_adamw_and_the_handled_by_their_finished_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    reference = nn.LayerNorm(8)
    reference.load_state_dict(model[1].state_dict())
    optimizer = KFACWithAdamW(model.parameters(), lr=0.02, adamw_lr=3e-3, weight_decay=0.1)
    adamw = torch.optim.AdamW(reference.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    kfac = LowRankKFAC(model, **NORMALIZED)
    with pytest.raises(RuntimeError, match="check_optimizer"):
        optimizer.step()
    kfac.check_optimizer(optimizer)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        kfac.step()
        for mine, theirs in zip(reference.parameters(), model[1].parameters()):
            mine.grad = theirs.grad.clone()
        before = model[0].weight.detach().clone()
        optimizer.step()
        adamw.step()
        expected = before * (1 - 0.02 * 0.1) - 0.02 * model[0].weight.grad
        torch.testing.assert_close(model[0].weight, expected, rtol=0, atol=1e-7)
        for mine, theirs in zip(reference.parameters(), model[1].parameters()):
            torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-7)
    kfac.close()


def test_kfac_with_adamw_resumes_bit_for_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    optimizer = KFACWithAdamW(model.parameters(), lr=0.02)
    optimizer.take_finished_steps([model[0].weight, model[0].bias, model[2].weight, model[2].bias])
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
    again = KFACWithAdamW(model.parameters(), lr=0.02)
    again.load_state_dict(optimizer.state_dict())
    again.take_finished_steps([model[0].weight, model[0].bias, model[2].weight, model[2].bias])
    for key, value in optimizer.state_dict()["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, again.state_dict()["state"][key][name])


@pytest.mark.parametrize(
    ("options", "optimizer", "message"),
    [
        ({"step_size": "normalized"}, None, "kl_clip"),
        ({**NORMALIZED, "step_rule": "soap"}, None, "step_rule"),
        ({"update_norm": "spectral"}, None, "update_norm"),
        ({"damping_mode": "absolute"}, None, "damping_mode"),
        (NORMALIZED, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "momentum=0"),
        (NORMALIZED, lambda p: torch.optim.AdamW(p, lr=0.1), "KFACWithAdamW"),
    ],
)
def test_bad_combinations_fail_clearly(options, optimizer, message):
    if optimizer is None:
        with pytest.raises(ValueError, match=message):
            LowRankKFACCallback(**options)
        return
    model = mlp()
    with LowRankKFAC(model, **options) as kfac, pytest.raises(ValueError, match=message):
        kfac.check_optimizer(optimizer(model.parameters()))


class NormalizedDigits(DigitsModule):
    def configure_optimizers(self):
        return KFACWithAdamW(self.parameters(), lr=0.05, adamw_lr=3e-3)


def test_callback_trains_digits_with_kfac_with_adamw():
    """Lightning: the callback binds the optimizer at fit start; a few epochs reach high training accuracy."""
    torch.manual_seed(0)
    module = NormalizedDigits(width=64)
    callback = LowRankKFACCallback(**{**NORMALIZED, "momentum": 0.95}, damping_mode="relative")
    trainer = quiet_trainer(max_epochs=4, callbacks=[callback])
    trainer.fit(module, digits_loader(batch_size=128, limit=1024))
    x, y = next(iter(digits_loader(batch_size=1024, limit=1024, shuffle=False)))
    with torch.no_grad():
        accuracy = (module(x).argmax(-1) == y).float().mean()
    assert accuracy > 0.95, accuracy


def test_kfac_with_adamw_rate_follows_a_scheduler():
    """A scheduler that halves `lr` halves the AdamW parameters' rate too (their ratio is kept)."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(8)
    reference = nn.LayerNorm(8)
    reference.load_state_dict(norm.state_dict())
    optimizer = KFACWithAdamW(norm.parameters(), lr=0.02, adamw_lr=4e-3)
    optimizer.take_finished_steps([])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    adamw = torch.optim.AdamW(reference.parameters(), lr=4e-3, betas=(0.9, 0.95), weight_decay=0.0)
    adamw_scheduler = torch.optim.lr_scheduler.StepLR(adamw, step_size=1, gamma=0.5)
    for _ in range(3):
        for mine, theirs in zip(norm.parameters(), reference.parameters()):
            mine.grad = torch.randn_like(mine)
            theirs.grad = mine.grad.clone()
        optimizer.step()
        adamw.step()
        scheduler.step()
        adamw_scheduler.step()
        for mine, theirs in zip(norm.parameters(), reference.parameters()):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-7)


def test_momenta_of_another_shape_fail_clearly_at_the_first_step():
    """A checkpoint's momenta from another layout (FSDP2 saves each rank's shards) are refused, naming the entry."""
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 4, (8,))
    model = mlp()
    with LowRankKFAC(model, **NORMALIZED) as kfac:
        F.cross_entropy(model(x), y).backward()
        kfac.step()
        saved = kfac.state_dict()
    saved["normalized"]["momentum.0.0"] = saved["normalized"]["momentum.0.0"][:3]  # a shard's rows
    fresh = mlp()
    with LowRankKFAC(fresh, **NORMALIZED) as kfac:
        kfac.load_state_dict(saved)
        F.cross_entropy(fresh(x), y).backward()
        with pytest.raises(ValueError, match=r"`normalized` holds a momentum of shape \(3, 5\) for layer '0'"):
            kfac.step()


def test_kfac_with_adamw_learns_every_handled_parameter_attention_included():
    """The in-projection blocks of nn.MultiheadAttention precondition a weight their module does not own: it takes
    the finished step too, and only the unhandled LayerNorm is AdamW's."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(self.attention(x, x, x, need_weights=False)[0])

    model = Attention()
    optimizer = KFACWithAdamW(model.parameters(), lr=0.02)
    with LowRankKFAC(model, **NORMALIZED, precondition_attention=True) as kfac:
        kfac.check_optimizer(optimizer)
    adamw = {name for name, p in model.named_parameters() if id(p) not in optimizer.finished}
    assert adamw == {"norm.weight", "norm.bias"}


def test_polar_is_refused_under_fsdp2_and_the_norms_are_not():
    """The polar factor needs each layer's whole matrix, which FSDP2 shards: refused by name at setup."""
    with pytest.raises(ValueError, match="update_norm"):
        check("fsdp2", KFACOptions(**NORMALIZED, update_norm="polar"))
    check("fsdp2", KFACOptions(**NORMALIZED, update_norm="muon"))
