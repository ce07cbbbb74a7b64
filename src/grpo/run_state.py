"""The training loop's own state, which checkpoints save and restore. `GRPOTrainer` owns it; it lives in a module of
its own so that `grpo.checkpoint` can name these types without importing the trainer.

`TrainerState` is transformers' own (global_step, epoch, log_history, best_metric, stateful_callbacks, ...), so
callbacks written for transformers read the fields they expect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import TrainerState

from grpo.rollout import Rollout

__all__ = ["EntropyControl", "RunPosition", "TrainerState"]


@dataclass
class EntropyControl:
    """The adaptive entropy controller's state (use_adaptive_entropy): its coefficient, and the mean entropy of the
    last optimizer step, which decides whether the bonus applies (inf before the first step: it does not)."""

    coef: float
    last_entropy: float = math.inf


@dataclass
class RunPosition:
    """Where the loop is: generation rounds drawn from the data so far, and the round being trained on."""

    rounds_consumed: int = 0  # rounds taken from the prompt sampler, dynamic-sampling extras included
    epoch: float = 0.0
    round_reward: float = 0.0  # the round's mean reward, for the progress bar
    rollout: Rollout | None = None
    plan: list[list[torch.Tensor]] = field(default_factory=list)  # optimizer steps, each a list of micro-batches
    next_step: int = 0  # index into plan
    loss_sum: float = 0.0  # the finite step losses so far, for the run summary's train_loss

    @property
    def round_done(self) -> bool:
        return self.rollout is None or self.next_step >= len(self.plan)
