"""The automatic step: step size and momentum from the exact Gauss–Newton quadratic model, and the damping
adapted by Levenberg–Marquardt (Martens & Grosse 2015, §6–7).

Vectors here are what the optimizer subtracts (θ ← θ − s): P = F̃⁻¹g, K-FAC's preconditioned gradient, and s,
the previous update. The new update is s' = αP + μs with (α, μ) = x minimising the damped quadratic model of
the batch's loss h,

    M(−Vx) − h(θ) = ½ xᵀ(VᵀGV + λ VᵀV)x − xᵀVᵀg,   V = [P s],

G the Gauss–Newton matrix. Every T steps the reduction ratio ρ = (h(θ − s') − h(θ)) / (M₀(−s') − M₀(0)), with
M₀ the undamped model, moves λ by ω = (19/20)^T: down when ρ > 3/4, up when ρ < 1/4. A step with ρ < 0 (it
raised its own batch's loss) is rejected: not taken, momentum reset, λ × 10.

G's products need no extra forward. Before the training backward, while the forward's graph lives, Jᵀu is
built with its graph (u a zero tensor shaped like the prediction z), and so is H w' = ∂⟨∇_z h, w'⟩/∂z (w' a
second zero tensor). Both are linear in their dual tensor, so afterwards Jv = ∂⟨Jᵀu, v⟩/∂u and H w =
∂⟨H w', w⟩/∂w' run through these new graphs alone, and vᵀGw = ⟨Jv, H Jw⟩: the loss's own Hessian in its
prediction, whatever the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .options import KFACOptions

#: Levenberg–Marquardt's thresholds on the reduction ratio ρ and its factor per step (Martens & Grosse 2015, §6.5).
GOOD_RATIO, POOR_RATIO, DECAY_PER_STEP = 0.75, 0.25, 19.0 / 20.0
#: λ's growth after a rejected step (one that raised its own batch's loss): Levenberg's ×10 on failure. The gentle
#: ω alone cannot catch a first step that overshoots: the saturated outputs then make G too small to stop the next.
REJECTION_FACTOR = 10.0


def _dot(left: Tensor | None, right: Tensor | None, device: torch.device) -> Tensor:
    """⟨left, right⟩ in float64 on ``device`` (0 when either is missing)."""
    if left is None or right is None:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.vdot(left.reshape(-1), right.reshape(-1).to(left.dtype)).to(device, torch.float64)


def _inner(left: Sequence[Tensor | None], right: Sequence[Tensor | None], device: torch.device) -> Tensor:
    """Σ over the aligned pieces of ⟨left, right⟩, float64."""
    return sum((_dot(a, b, device) for a, b in zip(left, right)), torch.zeros((), dtype=torch.float64, device=device))


def _symmetric(lower: list[list[Tensor]]) -> Tensor:
    """The symmetric m×m matrix whose row i starts with ``lower[i]`` (its entries j ≤ i)."""
    m = len(lower)
    return torch.stack([torch.stack([lower[max(i, j)][min(i, j)] for j in range(m)]) for i in range(m)])


@dataclass
class _Graph:
    """One loss's graphs: per parameter Jᵀu; per prediction its duals u and w', and H w'."""

    duals: list[Tensor]
    transposed: list[Tensor | None]
    curvature_duals: list[Tensor]
    curved: list[Tensor | None]
    scale: float | Tensor


def _linear_map(
    outputs: Sequence[Tensor | None],
    inputs: list[Tensor],
    grad_outputs: Sequence[Tensor | None],
    create_graph: bool = False,
) -> list[Tensor | None]:
    """Σ ∂⟨outputᵢ, grad_outputᵢ⟩/∂inputs over the pairs that exist and carry a graph (a list of None if none)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad and g is not None]
    if not pairs:
        return [None] * len(inputs)
    selected, directions = zip(*pairs)
    return list(
        torch.autograd.grad(
            selected, inputs, directions, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
    )


class GaussNewtonProducts:
    """vᵀGw for parameter-shaped v and w, G = Σ Jᵀ H J over the losses :meth:`add`-ed (one per micro-batch)."""

    def __init__(self) -> None:
        self._graphs: list[_Graph] = []

    def __bool__(self) -> bool:
        return bool(self._graphs)

    def add(
        self, loss: Tensor, predictions: Sequence[Tensor], params: Sequence[Tensor], scale: float | Tensor = 1.0
    ) -> None:
        """Build Jᵀu and H w' with their graphs; call it before ``loss.backward()`` (``scale``: an AMP loss scale).

        Costs a backward through the model that keeps its graph, and two through the loss's head.
        """
        predictions = list(predictions)
        duals = [torch.zeros_like(z, requires_grad=True) for z in predictions]
        transposed = torch.autograd.grad(
            predictions, list(params), duals, create_graph=True, retain_graph=True, allow_unused=True
        )
        loss_grads = torch.autograd.grad(loss, predictions, create_graph=True, retain_graph=True, allow_unused=True)
        curvature_duals = [torch.zeros_like(z, requires_grad=True) for z in predictions]
        # H w' (None where the loss is linear in that prediction: no curvature there)
        curved = _linear_map(loss_grads, predictions, curvature_duals, create_graph=True)
        self._graphs.append(_Graph(duals, list(transposed), curvature_duals, curved, scale))

    def clear(self) -> None:
        """Drop the graphs (and the memory they hold)."""
        self._graphs = []

    def gram(self, vectors: Sequence[Sequence[Tensor | None]], device: torch.device) -> Tensor:
        """[vᵢᵀ G vⱼ] (float64, m×m, on ``device``) for m parameter-shaped vectors, each aligned with :meth:`add`'s ``params``."""
        m = len(vectors)
        entries = [[torch.zeros((), dtype=torch.float64, device=device) for _ in range(i + 1)] for i in range(m)]
        for graph in self._graphs:
            jacobian = [_linear_map(graph.transposed, graph.duals, v) for v in vectors]  # J v
            curved = [_linear_map(graph.curved, graph.curvature_duals, j) for j in jacobian]  # H J v
            for i in range(m):
                for j in range(i + 1):
                    entries[i][j] = entries[i][j] + _inner(curved[i], jacobian[j], device) / graph.scale
        return _symmetric(entries)


def step_coefficients(
    gram: Tensor, overlaps: Tensor, gradient_products: Tensor, damping: float
) -> tuple[Tensor, Tensor]:
    """(x, the undamped model's change at x) for x minimising ½xᵀ(gram + λ·overlaps)x − xᵀb.

    ``gram`` = VᵀGV, ``overlaps`` = VᵀV, ``gradient_products`` b = Vᵀg, for V = [P] or [P s]. When the 2×2
    system is degenerate (s parallel to P, or s = 0 at the first step) the 1-D minimiser along P is taken
    with μ = 0; when nothing is finite or the curvature along P is not positive, x = 0 (no step). No host sync.
    """
    curvature = gram + damping * overlaps
    b = gradient_products
    zero = torch.zeros_like(b[0])
    along = curvature[0, 0]
    alpha = torch.where(along > 0, b[0] / along.clamp_min(torch.finfo(along.dtype).tiny), zero)
    x = torch.stack([alpha, zero]) if len(b) == 2 else alpha[None]
    if len(b) == 2:
        determinant = curvature[0, 0] * curvature[1, 1] - curvature[0, 1] ** 2
        well_posed = determinant > 1e-10 * curvature[0, 0] * curvature[1, 1]
        safe = torch.where(well_posed, determinant, torch.ones_like(determinant))
        solution = torch.stack(
            [
                (curvature[1, 1] * b[0] - curvature[0, 1] * b[1]) / safe,
                (curvature[0, 0] * b[1] - curvature[0, 1] * b[0]) / safe,
            ]
        )
        x = torch.where(well_posed & solution.isfinite().all(), solution, x)
    x = torch.where(x.isfinite().all(), x, torch.zeros_like(x))
    change = 0.5 * x @ gram @ x - x @ b
    return x, change


@dataclass
class LevenbergMarquardt:
    """λ, moved by ω = (19/20)^interval every ``interval`` steps by the reduction ratio, kept in [minimum, maximum]."""

    damping: float
    interval: int
    minimum: float
    maximum: float = math.inf
    rejection_factor: float = REJECTION_FACTOR

    @property
    def factor(self) -> float:
        return DECAY_PER_STEP**self.interval

    def due(self, step: int) -> bool:
        return (step + 1) % self.interval == 0

    def adapt(self, ratio: float) -> None:
        """Shrink λ when the model predicted the loss well (ρ > 3/4), grow it when poorly (ρ < 1/4 or not finite)."""
        if ratio > GOOD_RATIO:
            self.damping *= self.factor
        elif not ratio >= POOR_RATIO:  # also NaN
            self.damping /= self.factor
        self.damping = min(max(self.damping, self.minimum), self.maximum)

    def reject(self) -> None:
        """A rejected step: λ grows by ``rejection_factor``."""
        self.damping = min(max(self.damping * self.rejection_factor, self.minimum), self.maximum)


def loss_at_update(params: Sequence[Tensor], loss_closure: Callable[[], Tensor | float | None]) -> float | None:
    """The closure's loss at θ − .grad (where the optimizer will step); the parameters are restored exactly."""
    params = [p for p in params if p.grad is not None]
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for param in params:
            param.sub_(param.grad)
        try:
            loss = loss_closure()
        finally:
            for param, value in zip(params, saved):
                param.copy_(value)
    return None if loss is None else float(loss)


class AutomaticStep:
    """``step_size="auto"`` for one model: the Gauss–Newton products of the batch, the previous update s and λ.

    :meth:`record` takes each micro-batch's loss and predictions before its backward; :meth:`combine` turns
    the preconditioned gradients P (in ``.grad``) into αP + μs in place; :meth:`adapt` moves λ from the loss
    at the new point.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        damping: float,
        interval: int,
        minimum: float,
        average: Callable[[list[Tensor]], None] | None = None,
    ) -> None:
        self.params = list(params)
        #: In-place mean over data-parallel ranks of the batch-dependent numbers (G's products and the losses);
        #: None in one process. The gradients are averaged already, so everything else agrees on every rank.
        self.average = average
        self.marquardt = LevenbergMarquardt(damping, interval, minimum)
        self.products = GaussNewtonProducts()
        self.loss: Tensor | None = None
        self.previous: list[Tensor] = []
        #: α, μ of the last step and the undamped model's predicted change of the loss.
        self.coefficients: Tensor | None = None
        self.predicted_change: Tensor | None = None
        #: ρ of the last adaptation (NaN before the first).
        self.ratio = math.nan
        #: Steps rejected so far (their loss rose).
        self.rejections = 0

    @classmethod
    def for_model(cls, model: nn.Module, options: KFACOptions) -> AutomaticStep | None:
        """The state of ``step_size="auto"`` over every trainable parameter of ``model``, or None when it is off."""
        if options.step_size != "auto":
            return None
        sparse = [name for name, m in model.named_modules() if getattr(m, "sparse", False) is True]
        if sparse:
            raise ValueError(
                f"LowRankKFAC: `step_size`='auto' needs dense gradients; these modules have sparse=True: {sparse}"
            )
        params = [p for p in model.parameters() if p.requires_grad]
        return cls(params, float(options.damping), options.damping_adaptation_interval, options.min_damping)

    def build(self) -> None:
        """The previous update, zero, on each parameter's device (idempotent)."""
        if not self.previous:
            self.previous = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params]

    def record(self, loss: Tensor | None, predictions: Sequence[Tensor], scale: float | Tensor = 1.0) -> None:
        """One micro-batch: its loss (summed into h) and the graphs of its Gauss–Newton products."""
        if loss is None:
            raise ValueError("LowRankKFAC.before_backward: `step_size`='auto' needs the loss: before_backward(loss)")
        if not predictions:
            raise RuntimeError(
                "step_size='auto': the prediction module's forward did not run with gradients before this backward; "
                "name the module whose output is the prediction in `mc_output_module`"
            )
        self.products.add(loss, predictions, self.params, scale)
        value = loss.detach().to(torch.float64) / scale
        self.loss = value if self.loss is None else self.loss + value

    @property
    def recorded(self) -> bool:
        return bool(self.products)

    def combine(self, raw_grads: Sequence[Tensor | None], finite: Tensor | None = None) -> None:
        """``.grad`` (P) ← αP + μs, and s ← that; ``raw_grads`` are the gradients before preconditioning (g).

        ``finite`` False (AMP skips the step): s stays as it was.
        """
        self.build()
        grads = [p.grad for p in self.params]
        vectors = [grads] + ([self.previous] if self.coefficients is not None else [])
        device = self.params[0].device
        gram = self.products.gram(vectors, device)
        if self.average is not None:
            self.average([gram])
        overlaps = _symmetric([[_inner(u, v, device) for v in vectors[: i + 1]] for i, u in enumerate(vectors)])
        gradient_products = torch.stack([_inner(v, raw_grads, device) for v in vectors])
        x, change = step_coefficients(gram, overlaps, gradient_products, self.marquardt.damping)
        alpha = x[0]
        mu = x[1] if len(x) > 1 else torch.zeros_like(alpha)
        for grad, previous in zip(grads, self.previous):
            if grad is None:  # no update of this parameter this step
                previous.zero_() if finite is None else previous.mul_(~finite)
                continue
            grad.mul_(alpha.to(grad.dtype)).addcmul_(previous, mu.to(grad.dtype))
            previous.copy_(grad if finite is None else torch.where(finite, grad, previous))
        self.coefficients = torch.stack([alpha, mu])
        self.predicted_change = change

    def adapt(self, new_loss: float) -> bool:
        """λ from ρ = (h(θ − s) − h(θ)) / (M₀(−s) − M₀(0)); one host sync. Returns whether the step stands.

        A step that raised its own batch's loss (ρ < 0, or anything not finite) is rejected: ``.grad`` and s
        become zero, so the optimizer does not move, and λ grows by ``rejection_factor``.
        """
        losses = torch.stack(
            [self.loss.to(torch.float64), torch.tensor(new_loss, dtype=torch.float64, device=self.loss.device)]
        )
        if self.average is not None:
            self.average([losses])
        (old, new_loss), predicted = losses.tolist(), float(self.predicted_change)
        self.ratio = (new_loss - old) / predicted if predicted < 0 else math.nan
        if self.ratio >= 0:
            self.marquardt.adapt(self.ratio)
            return True
        for param, previous in zip(self.params, self.previous):
            previous.zero_()
            if param.grad is not None:
                param.grad.zero_()
        self.marquardt.reject()
        self.rejections += 1
        return False

    def step(
        self,
        precondition: Callable[[], None] | None,
        finite: Tensor | None,
        loss_closure: Callable[[], Tensor | float | None] | None,
        step: int,
    ) -> None:
        """P = ``precondition()``'s direction in ``.grad`` (the plain gradient while it is None: no factors yet),
        then αP + μs into ``.grad``; on the adaptation steps, λ from the loss at the new point."""
        if not self.recorded:
            raise RuntimeError(
                "LowRankKFAC: step_size='auto' needs `before_backward(loss)` between the forward and `backward()`"
            )
        raw = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        if precondition is not None:
            precondition()
        self.combine(raw, finite)
        if loss_closure is not None and self.marquardt.due(step):
            new_loss = loss_at_update(self.params, loss_closure)
            if new_loss is not None:
                self.adapt(new_loss)  # a rejected step leaves .grad zero: the optimizer stays
        self.end_step()

    def metrics(self) -> dict[str, float | Tensor]:
        """α, μ of the last step, its reduction ratio ρ and the rejections so far (empty before the first step)."""
        if self.coefficients is None:
            return {}
        alpha, mu = self.coefficients.float()
        return {
            "step_alpha": alpha,
            "step_momentum": mu,
            "reduction_ratio": self.ratio,
            "rejected_steps": float(self.rejections),
        }

    def end_step(self) -> None:
        """Drop the batch's graphs and loss."""
        self.products.clear()
        self.loss = None

    def state_tensors(self) -> dict[str, Tensor]:
        self.build()
        started = torch.tensor(self.coefficients is not None)
        return {"damping": torch.tensor(self.marquardt.damping, dtype=torch.float64), "started": started} | {
            f"previous.{index}": tensor for index, tensor in enumerate(self.previous)
        }

    def load_state_tensors(self, state: dict[str, Tensor]) -> None:
        self.build()
        self.marquardt.damping = float(state["damping"])
        for index, tensor in enumerate(self.previous):
            tensor.copy_(state[f"previous.{index}"])
        self.coefficients = torch.zeros(2, dtype=torch.float64) if bool(state["started"]) else None
