"""One optimizer for the engine's finished steps and AdamW for everything else (Lightning's automatic optimization
takes one optimizer): the pattern of Muon's recommended setup, for ``step_size="normalized"`` (and ``soap``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


class KFACWithAdamW(torch.optim.Optimizer):
    """θ ← θ − lr·(.grad + wd·θ) on the parameters whose ``.grad`` is the engine's finished step, AdamW on the rest.

    The engine says which parameters those are (``LowRankKFAC.check_optimizer``, which the callback calls at fit
    start); a step before that raises. The AdamW parameters move at ``adamw_lr``, which follows ``lr`` when a
    scheduler changes it (it is kept as their ratio); weight decay is decoupled on both. One ``param_groups`` list
    as given (schedulers and gradient clipping reach every parameter) and one ``state``: checkpoints resume bit for
    bit. In YAML: ``optimizer: {class_path: lightning_lrkfac.optim.KFACWithAdamW, init_args: {lr: 0.02}}``.
    """

    #: Read by the engine's optimizer check: ``.grad`` of the handed parameters is taken as the finished step.
    takes_finished_steps = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.02,
        adamw_lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        for name, value in {"lr": lr, "adamw_lr": adamw_lr, "eps": eps}.items():
            if not value > 0:
                raise ValueError(f"KFACWithAdamW: `{name}` must be > 0, got {value!r}")
        if not all(0.0 <= beta < 1.0 for beta in betas) or len(betas) != 2:
            raise ValueError(f"KFACWithAdamW: `betas` must be two numbers in [0, 1), got {betas!r}")
        if weight_decay < 0:
            raise ValueError(f"KFACWithAdamW: `weight_decay` must be ≥ 0, got {weight_decay!r}")
        defaults = {
            "lr": lr,
            "adamw_ratio": adamw_lr / lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)
        self.finished: set[int] | None = None

    def take_finished_steps(self, parameters: Iterable[Tensor]) -> None:
        """The parameters whose ``.grad`` is a finished step (the engine's handled layers); AdamW moves the others."""
        self.finished = {id(p) for p in parameters}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if self.finished is None:
            raise RuntimeError(
                "KFACWithAdamW: call `kfac.check_optimizer(optimizer)` once before the first step (the callback does), "
                "so that the optimizer knows which parameters take the engine's finished steps"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            adamw = [p for p in group["params"] if p.grad is not None and id(p) not in self.finished]
            for parameter in group["params"]:
                if parameter.grad is not None and id(parameter) in self.finished:
                    parameter.mul_(1.0 - lr * decay).sub_(parameter.grad, alpha=lr)
            if adamw:
                self._adamw(group, adamw, lr * group["adamw_ratio"], decay)
        return loss

    def _adamw(self, group: dict, params: list[Tensor], lr: float, decay: float) -> None:
        """torch.optim.AdamW's update (decoupled decay, bias-corrected moments) on ``params``."""
        beta1, beta2 = group["betas"]
        for parameter in params:
            state = self.state[parameter]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
            state["step"] += 1
            step = float(state["step"])
            grad = parameter.grad
            parameter.mul_(1.0 - lr * decay)
            state["exp_avg"].lerp_(grad, 1.0 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denominator = (state["exp_avg_sq"].sqrt() / (1.0 - beta2**step) ** 0.5).add_(group["eps"])
            parameter.addcdiv_(state["exp_avg"], denominator, value=-lr / (1.0 - beta1**step))
