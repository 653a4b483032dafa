"""Hyperparameters that change with the optimizer step: a number, or a callable of the step.

``damping``, ``kl_clip`` and ``factor_decay`` take either. The classes here are plain
callables with typed constructors, so LightningCLI builds them from YAML
(``class_path: lightning_lrkfac.schedules.StepMilestones``, ``init_args: {...}``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from numbers import Real


def _finite(name: str, value: object, what: str = "a finite number") -> float:
    if not isinstance(value, Real) or isinstance(value, bool) or not float("-inf") < float(value) < float("inf"):
        raise ValueError(f"schedule `{name}` must be {what}, got {value!r}")
    return float(value)


class Schedule(ABC):
    """A hyperparameter as a function of the optimizer step."""

    @abstractmethod
    def __call__(self, step: int) -> float: ...

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({arguments})"


class Constant(Schedule):
    """The same value at every step."""

    def __init__(self, value: float) -> None:
        self.value = _finite("value", value)

    def __call__(self, step: int) -> float:
        return self.value


class ExponentialDecay(Schedule):
    """``initial · rate^(step // every)``, never below ``minimum``."""

    def __init__(self, initial: float, rate: float, every: int = 1, minimum: float = 0.0) -> None:
        self.initial = _finite("initial", initial)
        self.rate = _finite("rate", rate)
        if self.rate <= 0.0:
            raise ValueError(f"schedule `rate` must be > 0, got {rate!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"schedule `every` must be a positive integer, got {every!r}")
        self.every = every
        self.minimum = _finite("minimum", minimum)

    def __call__(self, step: int) -> float:
        return max(self.initial * self.rate ** (step // self.every), self.minimum)


class StepMilestones(Schedule):
    """``initial``, multiplied by ``factor`` at each milestone step reached (as MultiStepLR)."""

    def __init__(self, initial: float, milestones: Sequence[int], factor: float = 0.1) -> None:
        self.initial = _finite("initial", initial)
        if isinstance(milestones, (str, bytes)) or not all(isinstance(m, int) and m >= 0 for m in milestones):
            raise ValueError(f"schedule `milestones` must be a list of step numbers ≥ 0, got {milestones!r}")
        self.milestones = sorted(milestones)
        self.factor = _finite("factor", factor)

    def __call__(self, step: int) -> float:
        return self.initial * self.factor ** sum(step >= m for m in self.milestones)


class LinearWarmup(Schedule):
    """From ``start`` at step 0 linearly to ``end`` at step ``steps``, then ``end``."""

    def __init__(self, start: float, end: float, steps: int) -> None:
        self.start, self.end = _finite("start", start), _finite("end", end)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"schedule `steps` must be a positive integer, got {steps!r}")
        self.steps = steps

    def __call__(self, step: int) -> float:
        share = min(step, self.steps) / self.steps
        return self.start + share * (self.end - self.start)


def as_schedule(value: float | Callable[[int], float]) -> Callable[[int], float]:
    """A number becomes :class:`Constant`; a callable is used as it is."""
    return value if callable(value) else Constant(value)
