"""The numerical guard: a step whose loss or gradient is NaN/inf is skipped; several in a row stop the run.

One non-finite gradient applied by Adam poisons every weight and both moment estimates for good, so such a step
is dropped rather than taken. A single bad step is usually a fluke (an overflow in one batch); several in a row
mean the run itself has diverged, and going on would only burn compute, so the run stops while its last
checkpoint, written before the trouble began, is still good.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable


class NonFiniteTrainingError(RuntimeError):
    """The run stopped because too many consecutive steps had a NaN/inf loss or gradient."""


def is_finite_step(metrics: dict[str, float]) -> bool:
    """True when the step's loss and gradient norm are finite (a NaN/inf anywhere in the gradient makes its
    norm NaN/inf, so the norm checks every gradient entry at the cost of one reduction)."""
    return math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])


class NonFiniteGuard:
    """Counts consecutive non-finite steps; warns on each, raises when `patience` are in a row."""

    def __init__(self, patience: int):
        self.patience = patience
        self.bad_steps: list[int] = []

    @property
    def healthy(self) -> bool:
        """No bad step since the last good one: the state is fit to checkpoint."""
        return not self.bad_steps

    def record(self, step: int, finite: bool, last_checkpoint: Callable[[], str]) -> None:
        if finite:
            self.bad_steps = []
            return
        self.bad_steps.append(step)
        if len(self.bad_steps) >= self.patience:
            raise NonFiniteTrainingError(
                f"steps {self.bad_steps} in a row had a NaN/inf loss or gradient, so the run stopped; "
                f"{last_checkpoint()}. Lower the learning rate, check the rewards and the model's dtype (fp16 "
                "overflows; use bf16 or float32), then resume from that checkpoint. "
                "max_consecutive_nonfinite_steps sets how many bad steps in a row are tolerated."
            )
        warnings.warn(
            f"step {step}: the loss or gradient is NaN/inf, so this optimizer step was skipped (the weights and "
            f"optimizer state are unchanged). {self.patience} such steps in a row stop the run.",
            RuntimeWarning, stacklevel=2,
        )
