"""step_size='auto': the Gauss–Newton quadratic model against per-example Jacobians from torch.func, α and μ against
a dense 2×2 solve, Levenberg–Marquardt's rule and ratio, and the callback's wiring."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vmap

from lightning_lrkfac import LowRankKFAC, LowRankKFACCallback
from lightning_lrkfac.adaptive import AutomaticStep, GaussNewtonProducts, LevenbergMarquardt
from lightning_lrkfac.trainer_support import training_loss
from tests.helpers import DigitsModule, digits_loader, quiet_trainer

AUTO = {"step_size": "auto", "kl_clip": None}


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def dense_gauss_newton(model: nn.Module, x: torch.Tensor, output_hessian) -> torch.Tensor:
    """Σ_i J_iᵀ H_i J_i from per-example Jacobians (torch.func.vmap of jacrev) and a hand-written H_i."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def output(p, example):
        return functional_call(model, p, (example[None],))[0]

    jacobians = vmap(jacrev(output), in_dims=(None, 0))(params, x)  # name → (n, classes, *param shape)
    J = torch.cat([jacobians[name].flatten(2) for name in params], dim=2)  # (n, classes, P)
    with torch.no_grad():
        H = output_hessian(model(x))  # (n, classes, classes)
    return torch.einsum("ncp,ncd,ndq->pq", J, H, J)


def cross_entropy_hessian(logits: torch.Tensor) -> torch.Tensor:
    """Of the mean cross-entropy in the logits: (diag p − p pᵀ) / n per example."""
    p = logits.softmax(-1)
    return (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / len(p)


def mse_hessian(outputs: torch.Tensor) -> torch.Tensor:
    """Of F.mse_loss (mean over every element): 2 / (n·d) · I per example."""
    n, d = outputs.shape
    return 2.0 / (n * d) * torch.eye(d, dtype=outputs.dtype).expand(n, d, d)


def loss_and_prediction(model, x, y, kind):
    prediction = model(x)
    loss = F.cross_entropy(prediction, y) if kind == "ce" else F.mse_loss(prediction, y)
    return loss, prediction


def data(kind: str):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(9, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (9,), generator=generator) if kind == "ce" else torch.randn(9, 4, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_gauss_newton_gram_matches_per_example_jacobians(kind):
    model = small_model()
    x, y = data(kind)
    params = list(model.parameters())
    products = GaussNewtonProducts()
    loss, prediction = loss_and_prediction(model, x, y, kind)
    products.add(loss, [prediction], params)
    loss.backward()  # the training backward frees the forward's graph: the products must not need it
    generator = torch.Generator().manual_seed(2)
    vectors = [[torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params] for _ in range(2)]
    gram = products.gram(vectors, torch.device("cpu"))
    G = dense_gauss_newton(model, x, cross_entropy_hessian if kind == "ce" else mse_hessian)
    V = torch.stack([flat(v) for v in vectors], dim=1)
    torch.testing.assert_close(gram, V.T @ G @ V, rtol=1e-10, atol=1e-12)


def test_gram_sums_micro_batches_and_divides_the_loss_scale():
    model = small_model()
    x, y = data("ce")
    params = list(model.parameters())
    products = GaussNewtonProducts()
    for part in (slice(0, 4), slice(4, 9)):
        loss, prediction = loss_and_prediction(model, x[part], y[part], "ce")
        products.add(loss * 8.0, [prediction], params, scale=8.0)
    vector = [torch.ones_like(p) for p in params]
    expected = sum(
        flat(vector) @ dense_gauss_newton(model, x[part], cross_entropy_hessian) @ flat(vector)
        for part in (slice(0, 4), slice(4, 9))
    )
    torch.testing.assert_close(products.gram([vector], torch.device("cpu"))[0, 0], expected, rtol=1e-10, atol=0)


def test_step_coefficients_minimise_the_damped_model_over_the_two_directions():
    """αP + μs against a dense solve of Vᵀ(G + λI)V x = Vᵀg, G from per-example Jacobians."""
    model = small_model()
    x, y = data("ce")
    params = list(model.parameters())
    damping = 0.03
    step = AutomaticStep(params, damping, interval=5, minimum=1e-8)
    loss, prediction = loss_and_prediction(model, x, y, "ce")
    step.record(loss, [prediction])
    loss.backward()
    raw = [p.grad.clone() for p in params]
    generator = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    previous = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    step.build()
    for p, d, s, stored in zip(params, direction, previous, step.previous):
        p.grad.copy_(d)
        stored.copy_(s)
    step.coefficients = torch.zeros(2, dtype=torch.float64)  # a previous step exists
    step.combine(raw)

    G = dense_gauss_newton(model, x, cross_entropy_hessian)
    V = torch.stack([flat(direction), flat(previous)], dim=1)
    x_ref = torch.linalg.solve(V.T @ (G + damping * torch.eye(len(G), dtype=G.dtype)) @ V, V.T @ flat(raw))
    torch.testing.assert_close(step.coefficients, x_ref, rtol=1e-9, atol=0)
    update = V @ x_ref
    torch.testing.assert_close(flat(p.grad for p in params), update, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flat(step.previous), update, rtol=1e-9, atol=1e-12)
    predicted = 0.5 * update @ G @ update - update @ flat(raw)  # the undamped model's change at θ − update
    torch.testing.assert_close(step.predicted_change, predicted, rtol=1e-9, atol=0)


def test_first_step_is_the_one_dimensional_minimiser():
    model = small_model()
    x, y = data("mse")
    params = list(model.parameters())
    step = AutomaticStep(params, 0.1, interval=5, minimum=1e-8)
    loss, prediction = loss_and_prediction(model, x, y, "mse")
    step.record(loss, [prediction])
    loss.backward()
    g = flat(p.grad for p in params)
    step.combine([p.grad.clone() for p in params])
    G = dense_gauss_newton(model, x, mse_hessian)
    alpha = (g @ g) / (g @ G @ g + 0.1 * g @ g)
    torch.testing.assert_close(step.coefficients, torch.stack([alpha, torch.zeros_like(alpha)]), rtol=1e-10, atol=0)
    torch.testing.assert_close(flat(p.grad for p in params), alpha * g, rtol=1e-10, atol=0)


def test_levenberg_marquardt_rule():
    rule = LevenbergMarquardt(1e-2, interval=5, minimum=1e-3)
    omega = (19 / 20) ** 5
    rule.adapt(0.9)
    assert rule.damping == pytest.approx(1e-2 * omega)
    rule.adapt(0.5)
    assert rule.damping == pytest.approx(1e-2 * omega)
    rule.adapt(0.1)
    assert rule.damping == pytest.approx(1e-2)
    rule.adapt(math.nan)  # a step that made the loss non-finite: more damping
    assert rule.damping == pytest.approx(1e-2 / omega)
    for _ in range(40):
        rule.adapt(1.0)
    assert rule.damping == 1e-3
    assert [rule.due(step) for step in range(6)] == [False, False, False, False, True, False]


def test_a_step_that_raises_its_batch_loss_is_rejected():
    model = small_model()
    x, y = data("ce")
    params = list(model.parameters())
    step = AutomaticStep(params, 1e-2, interval=1, minimum=1e-8)
    loss, prediction = loss_and_prediction(model, x, y, "ce")
    step.record(loss, [prediction])
    loss.backward()
    step.combine([p.grad.clone() for p in params])
    assert any(p.grad.abs().sum() > 0 for p in params)
    assert not step.adapt(float(loss) + 1.0)  # the new point is worse on the same batch
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params), "the optimizer must not move"
    assert all(torch.equal(s, torch.zeros_like(s)) for s in step.previous), "momentum restarts"
    assert step.marquardt.damping == pytest.approx(1e-1) and step.rejections == 1
    assert step.ratio < 0


def test_monte_carlo_labels_from_non_finite_logits_do_not_raise():
    from lightning_lrkfac.fisher import sampled_negative_log_likelihood

    logits = torch.tensor([[0.0, 1.0], [math.nan, 0.0], [math.inf, 0.0]], requires_grad=True)
    loss = sampled_negative_log_likelihood(logits, "categorical", torch.Generator().manual_seed(0))
    assert not torch.isfinite(loss)  # the statistics will be non-finite, and the fold skips them


def run_engine(steps: int, closure: bool = True, **options):
    """A plain loop with the engine and SGD(lr=1) on one fixed batch; returns (model, engine, losses, records)."""
    model = small_model()
    x, y = data("ce")
    kfac = LowRankKFAC(model, **{**AUTO, "dense_threshold": 100, "damping": 1e-2, **options})
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    kfac.check_optimizer(optimizer)
    records = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        kfac.before_backward(loss)
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        raw = flat(p.grad for p in model.parameters())
        kfac.step(loss_closure=(lambda: F.cross_entropy(model(x), y)) if closure else None)
        unchanged = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        records.append({"raw": raw, "update": flat(p.grad for p in model.parameters()), "params_restored": unchanged})
        optimizer.step()
        records[-1]["loss"], records[-1]["ratio"] = float(loss.detach()), kfac.automatic.ratio
        records[-1]["damping"] = kfac.automatic.marquardt.damping
    return model, kfac, x, y, records


def test_engine_ratio_is_the_loss_change_over_the_model_change():
    """ρ against the loss at the new point and the undamped quadratic model from per-example Jacobians."""
    interval = 2
    model, kfac, x, y, records = run_engine(4, damping_adaptation_interval=interval)
    assert all(r["params_restored"] for r in records), "the closure's evaluation must leave the parameters exact"
    # replay: the parameters before step 3 (index 3) are the final ones plus its update
    theta_before = flat(p.detach() for p in model.parameters()) + records[3]["update"]
    probe = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(theta_before, probe.parameters())
    G = dense_gauss_newton(probe, x, cross_entropy_hessian)
    update = records[3]["update"]
    predicted = 0.5 * update @ G @ update - update @ records[3]["raw"]
    with torch.no_grad():
        new_loss = float(F.cross_entropy(model(x), y))
    expected_ratio = (new_loss - records[3]["loss"]) / float(predicted)
    assert records[3]["ratio"] == pytest.approx(expected_ratio, rel=1e-9)
    omega = (19 / 20) ** interval
    factor = omega if expected_ratio > 0.75 else (1 / omega if expected_ratio < 0.25 else 1.0)
    assert records[3]["damping"] == pytest.approx(records[2]["damping"] * factor, rel=1e-12)
    assert math.isnan(records[0]["ratio"]) and records[0]["damping"] == 1e-2  # step 0 does not adapt (T = 2)


def test_engine_update_is_stationary_for_the_damped_model_in_its_span():
    """The update δ = −(αP + μs) of a later step: Vᵀ((G + λI)(−δ) ... ) i.e. the model's gradient vanishes on span V."""
    model, kfac, x, y, records = run_engine(3, closure=False)
    update, previous, raw = records[2]["update"], records[1]["update"], records[2]["raw"]
    probe = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(flat(p.detach() for p in model.parameters()) + update, probe.parameters())
    G = dense_gauss_newton(probe, x, cross_entropy_hessian)
    model_gradient = (G + 1e-2 * torch.eye(len(G), dtype=G.dtype)) @ update - raw  # ∇ of ½sᵀ(G+λ)s − sᵀg at s
    direction = (update - float(kfac.automatic.coefficients[1]) * previous) / float(kfac.automatic.coefficients[0])
    for v in (direction, previous):
        assert abs(float(v @ model_gradient)) < 1e-9 * float(v.norm() * raw.norm())
    assert records[2]["damping"] == 1e-2, "without a closure λ stays"


def test_engine_state_dict_round_trip_keeps_the_previous_update_and_damping():
    model, kfac, *_ = run_engine(5, damping_adaptation_interval=1)
    state = kfac.state_dict()
    fresh = LowRankKFAC(
        copy.deepcopy(model), **{**AUTO, "dense_threshold": 100, "damping": 1e-2, "damping_adaptation_interval": 1}
    )
    fresh.load_state_dict(state)
    fresh.build()
    assert fresh.automatic.marquardt.damping == kfac.automatic.marquardt.damping != 1e-2
    assert all(torch.equal(a, b) for a, b in zip(fresh.automatic.previous, kfac.automatic.previous))
    assert fresh.automatic.coefficients is not None
    state["automatic"].pop("damping")
    with pytest.raises(ValueError, match="automatic.damping"):
        LowRankKFAC(copy.deepcopy(model), **{**AUTO, "dense_threshold": 100}).load_state_dict(state)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"step_size": "auto"}, "kl_clip"),
        ({**AUTO, "step_rule": "soap"}, "step_rule"),
        ({**AUTO, "damping": lambda step: 1e-2}, "damping"),
        ({**AUTO, "damping": 1e-8, "min_damping": 1e-6}, "min_damping"),
        ({"step_size": "newton"}, "step_size"),
    ],
)
def test_bad_options_fail_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        LowRankKFACCallback(**options)


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda p: torch.optim.Adam(p, lr=1.0),
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=1.0, weight_decay=1e-4),
    ],
)
def test_other_optimizers_are_refused(optimizer):
    model = small_model()
    kfac = LowRankKFAC(model, **AUTO)
    with pytest.raises(ValueError, match=r"SGD\(params, lr=1.0, momentum=0"):
        kfac.check_optimizer(optimizer(model.parameters()))
    kfac.check_optimizer(torch.optim.SGD(model.parameters(), lr=1.0))


def test_engine_needs_the_loss_before_backward():
    model = small_model()
    x, y = data("ce")
    kfac = LowRankKFAC(model, **AUTO)
    loss = F.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match="before_backward\\(loss\\)"):
        kfac.before_backward()
    loss.backward()
    with pytest.raises(RuntimeError, match="before_backward"):
        kfac.step()


def test_sparse_embeddings_are_refused():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="sparse"):
        LowRankKFAC(model, **AUTO)


class AutoDigits(DigitsModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class LossProbe(pl.Callback):
    """Just before the K-FAC callback's step: its re-evaluated loss at the current parameters against the recorded h."""

    def __init__(self, kfac: LowRankKFACCallback) -> None:
        self.kfac, self.pairs = kfac, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with torch.no_grad():
            again = training_loss(trainer, pl_module, self.kfac._batches)()
        self.pairs.append((float(self.kfac.engine.automatic.loss), float(again)))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_callback_trains_digits_with_no_learning_rate(accumulation):
    torch.manual_seed(0)
    callback = LowRankKFACCallback(**AUTO, dense_threshold=0, log_stats=True)
    probe = LossProbe(callback)
    module = AutoDigits()
    trainer = quiet_trainer(
        max_steps=30, callbacks=[probe, callback], accumulate_grad_batches=accumulation, log_every_n_steps=1
    )
    trainer.fit(module, digits_loader(batch_size=100 // accumulation, limit=1000))
    for recorded, again in probe.pairs:  # the closure sees the step's micro-batches, normalised as Lightning did
        assert again == pytest.approx(recorded, rel=1e-5)
    assert len(probe.pairs) == 30
    metrics = trainer.callback_metrics
    assert {"lrkfac/step_alpha", "lrkfac/step_momentum", "lrkfac/reduction_ratio", "lrkfac/rejected_steps"} <= set(
        metrics
    )
    assert math.isfinite(float(metrics["lrkfac/reduction_ratio"]))
    assert float(metrics["lrkfac/damping"]) != 1e-2, "λ adapts"
    assert float(metrics["train_loss"]) < 0.5, "the muted re-evaluation must not log over the training loss"
    x, y = next(iter(digits_loader(batch_size=1000, limit=1000, shuffle=False)))
    with torch.no_grad():
        accuracy = (module(x).argmax(-1) == y).float().mean()
    assert accuracy > 0.9


def test_callback_refuses_other_optimizers_at_fit_start():
    trainer = quiet_trainer(max_steps=2, callbacks=[LowRankKFACCallback(**AUTO)])
    with pytest.raises(ValueError, match="step_size"):
        trainer.fit(DigitsModule(), digits_loader(limit=256))
