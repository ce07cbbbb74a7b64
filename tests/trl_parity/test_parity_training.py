"""The same configurations trained by TRL 1.16's GRPOTrainer and by grpo's: both accept them, and a user observes
the same log_history keys (every step, evaluation and the run summary), the same `train()` return value, the same
reward-function arguments (names, types, lengths, conversational form), the same `trainer.state` fields and values,
and the same callback events.

Where grpo deliberately logs more than TRL, the extra keys are listed by name in `GRPO_ONLY_STEP_KEYS` and
`GRPO_ONLY_EVAL_KEYS`."""

from __future__ import annotations

import pytest
from parity import Case

from grpo.config import LOSS_TYPES

# One optimizer step each unless the case is about the schedule; see parity.BASE_SETTINGS for the rest.
CASES: dict[str, Case] = {
    # data
    "standard": Case(),
    "conversational": Case(data="conversational"),
    "extra-columns": Case(data="columns"),
    "extra-columns-async": Case(data="columns", rewards=("length", "async")),
    "unused-columns-removed": Case({"remove_unused_columns": True}, data="columns"),
    "iterable-dataset": Case(data="iterable"),
    # group sizes, odd ones included, and batch geometry
    "G3-batch6": Case({"num_generations": 3, "per_device_train_batch_size": 6}),
    "G5-batch5": Case({"num_generations": 5, "per_device_train_batch_size": 5}),
    "G6-batch6": Case({"num_generations": 6, "per_device_train_batch_size": 6}),
    "G8-batch8": Case({"num_generations": 8, "per_device_train_batch_size": 8}),
    "G3-batch3-GA2": Case({"num_generations": 3, "per_device_train_batch_size": 3,
                           "gradient_accumulation_steps": 2}),
    "G4-batch2-GA2": Case({"num_generations": 4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}),
    "steps-per-generation-2": Case({"steps_per_generation": 2, "max_steps": 2}),
    "num-iterations-2": Case({"num_iterations": 2, "max_steps": 2}),
    # the objective: every loss type
    **{f"loss-{loss}": Case({"loss_type": loss}) for loss in LOSS_TYPES},
    "beta-0.1": Case({"beta": 0.1}),
    "sequence-level-importance-sampling": Case({"importance_sampling_level": "sequence", "num_iterations": 2}),
    "entropy-and-truncation-masks": Case({"top_entropy_quantile": 0.5, "mask_truncated_completions": True}),
    # rewards
    "two-rewards-weighted": Case({"reward_weights": [1.0, 0.5]}, rewards=("length", "async")),
    "async-reward": Case(rewards=("async",)),
    "some-none-rewards": Case(rewards=("length", "some_none")),
    "all-none-rewards": Case(rewards=("length", "all_none")),
    "reward-logs-a-metric": Case(rewards=("length", "log_metric")),
    "reward-model": Case(rewards=("reward_model",)),
    "reward-model-conversational": Case(rewards=("reward_model", "length"), data="conversational"),
    # generation keywords the engine runs through transformers' processors
    "generation-kwargs-suppress-tokens": Case({"generation_kwargs": {"suppress_tokens": [5, 6]}}),
    # PEFT, evaluation, callbacks
    "lora": Case(peft=True),
    "eval-every-step": Case({"eval_strategy": "steps", "eval_steps": 1, "per_device_eval_batch_size": 4,
                             "max_steps": 2}, eval_data=True),
    "eval-G3": Case({"eval_strategy": "steps", "eval_steps": 1, "num_generations": 3,
                     "per_device_train_batch_size": 6, "per_device_eval_batch_size": 6}, eval_data=True),
    "callbacks-eval-logging-2": Case({"max_steps": 2, "logging_steps": 2, "eval_strategy": "steps",
                                      "eval_steps": 1, "per_device_eval_batch_size": 4},
                                     eval_data=True, callbacks=True),
}

# Metrics grpo logs that TRL does not: in training none; in evaluation, the share of completions whose weighted
# reward reaches 1 (grpo's pass@1, as `grpo eval` reports it).
GRPO_ONLY_STEP_KEYS: set[str] = set()
GRPO_ONLY_EVAL_KEYS = {"eval_pass@1"}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_same_observations(run_both, case):
    trl, grpo = run_both(case).values()
    assert (trl.refused_at, trl.error) == (None, ""), "the configuration must be valid for TRL"
    assert (grpo.refused_at, grpo.error) == (None, "")
    assert [keys - GRPO_ONLY_STEP_KEYS for keys in grpo.step_keys] == trl.step_keys
    assert [keys - GRPO_ONLY_EVAL_KEYS for keys in grpo.eval_keys] == trl.eval_keys
    assert grpo.summary_keys == trl.summary_keys
    assert grpo.output == trl.output
    assert sorted(grpo.reward_calls) == sorted(trl.reward_calls)  # async functions run concurrently
    assert grpo.state_fields == trl.state_fields
    assert grpo.state_values == trl.state_values
    assert grpo.events == trl.events
