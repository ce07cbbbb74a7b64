"""The training loop's own state, which checkpoints save and restore. `GRPOTrainer` owns it; it lives in a module of
its own so that `grpo.checkpoint` can name these types without importing the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from grpo.rollout import Rollout


@dataclass
class TrainerState:
    """Progress of a run, as in transformers: `global_step` counts optimizer steps."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    num_input_tokens_seen: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunPosition:
    """Where the loop is: generation rounds drawn from the data so far, and the round being trained on."""

    rounds_consumed: int = 0  # rounds taken from the prompt sampler, dynamic-sampling extras included
    epoch: float = 0.0
    round_reward: float = 0.0  # the round's mean reward, for the progress bar
    rollout: Rollout | None = None
    plan: list[list[torch.Tensor]] = field(default_factory=list)  # optimizer steps, each a list of micro-batches
    next_step: int = 0  # index into plan

    @property
    def round_done(self) -> bool:
        return self.rollout is None or self.next_step >= len(self.plan)
