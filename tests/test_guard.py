"""The numerical guard: NaN/inf steps are skipped with a warning; several in a row stop the run, checkpoint kept."""

from __future__ import annotations

import pytest
import torch

from grpo import GRPOConfig, GRPOTrainer
from grpo.checkpoint import checkpoints
from grpo.embedded import TASKS
from grpo.guard import NonFiniteGuard, NonFiniteTrainingError, is_finite_step


def reward_len(completions, **kwargs):
    return [-abs(20 - len(c)) for c in completions]


def _trainer_with_nan_steps(tmp_path, bad_steps: set[int], **overrides) -> tuple[GRPOTrainer, list[int]]:
    """A trainer whose training forward passes return NaN at the given optimizer steps (GA=1: one pass a step),
    and a list that records each optimizer.step() call."""
    settings = dict(output_dir=str(tmp_path / "run"), num_generations=4, per_device_train_batch_size=8,
                    max_completion_length=8, max_steps=4, logging_steps=1, learning_rate=1e-2,
                    gradient_checkpointing=False, disable_tqdm=True, save_strategy="no",
                    skip_zero_advantage_rows=False)  # every row trained: one training-mode forward a step
    settings.update(overrides)
    trainer = GRPOTrainer(model="grpo:tiny", reward_funcs=reward_len, args=GRPOConfig(**settings),
                          train_dataset=TASKS["length"].make(24, seed=2))
    forward_count = [0]

    def poison(module, inputs, output):
        if not module.training:  # generation and no-grad passes stay clean
            return None
        forward_count[0] += 1
        return output * float("nan") if forward_count[0] in bad_steps else None

    trainer.model.model.norm.register_forward_hook(poison)
    applied: list[int] = []
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=settings["learning_rate"])
    optimizer.register_step_post_hook(lambda *_: applied.append(len(applied) + 1))
    trainer.optimizer = optimizer
    return trainer, applied


def test_a_nonfinite_step_is_skipped_with_a_warning_naming_it(tmp_path):
    trainer, applied = _trainer_with_nan_steps(tmp_path, bad_steps={2})
    with pytest.warns(RuntimeWarning, match="step 2: the loss or gradient is NaN/inf"):
        output = trainer.train()
    assert output.global_step == 4
    assert len(applied) == 3  # steps 1, 3 and 4 updated the weights; step 2 did not
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    trainer, applied = _trainer_with_nan_steps(tmp_path, bad_steps={3, 4, 5, 6}, max_steps=8, save_strategy="steps",
                                               save_steps=2)
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteTrainingError, match=r"steps \[3, 4, 5\].*checkpoint-2"):
        trainer.train()
    assert len(applied) == 2
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["checkpoint-2"]  # none written at the bad step 4
    assert not (tmp_path / "run" / "model.safetensors").exists()  # no final model from a diverged run
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_guard_counts_only_consecutive_bad_steps():
    guard = NonFiniteGuard(patience=2)
    with pytest.warns(RuntimeWarning):
        guard.record(1, False, lambda: "")
    guard.record(2, True, lambda: "")
    assert guard.healthy
    with pytest.warns(RuntimeWarning):
        guard.record(3, False, lambda: "")
    assert not guard.healthy
    with pytest.raises(NonFiniteTrainingError, match=r"\[3, 4\].*no checkpoint"):
        guard.record(4, False, lambda: "no checkpoint was written yet")
    assert is_finite_step({"loss": 0.5, "grad_norm": 1.0})
    assert not is_finite_step({"loss": float("nan"), "grad_norm": 1.0})
    assert not is_finite_step({"loss": 0.5, "grad_norm": float("inf")})
