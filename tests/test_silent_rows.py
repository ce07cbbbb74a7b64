"""Rows whose advantage is exactly 0 leave the training forward/backward (`skip_zero_advantage_rows`): the same
update, metrics included, for fewer rows trained."""

from __future__ import annotations

import pytest
import torch

from grpo import GRPOConfig, GRPOTrainer
from grpo.algorithm import LossSettings, ObjectiveParams, group_advantages
from grpo.batching import even_passes, split_silent
from grpo.embedded import length_task


def test_split_silent_keeps_the_order_and_cuts_again():
    lengths = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12])
    silent = torch.tensor([False, True, True, False, False, True, False, False])
    micro_batches = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])]
    trained, quiet = split_silent(micro_batches, silent, lengths, batch_size=4, max_tokens=None)
    assert [t.tolist() for t in trained] == [[0, 3, 4, 6], [7]]
    assert quiet.tolist() == [1, 2, 5]
    # max_tokens cuts the trained rows as it cut the plan: 4 rows x 11 tokens > 40, so two pieces of 2
    trained, _ = split_silent(micro_batches, silent, lengths, batch_size=4, max_tokens=40)
    assert [t.tolist() for t in trained] == [[0, 3], [4, 6], [7]]
    assert split_silent(micro_batches, torch.ones(8, dtype=torch.bool), lengths, 4, None)[0] == []


def test_even_passes_cuts_then_borrows_silent_rows():
    lengths = torch.arange(10) + 5
    passes, spare = even_passes([torch.tensor([0, 1, 2])], 2, lengths, torch.tensor([7, 8]))
    assert [p.tolist() for p in passes] == [[0, 1], [2]] and spare.tolist() == [7, 8]
    passes, spare = even_passes([torch.tensor([0])], 3, lengths, torch.tensor([7, 8, 9]))
    assert [p.tolist() for p in passes] == [[0], [7], [8]] and spare.tolist() == [9]
    passes, spare = even_passes([], 1, lengths, torch.tensor([7, 8]))
    assert [p.tolist() for p in passes] == [[7]] and spare.tolist() == [8]
    assert even_passes([torch.tensor([3])], 1, lengths, torch.tensor([7]))[0][0].tolist() == [3]


def test_a_group_of_equal_rewards_gets_exactly_zero_advantages():
    grouped = torch.full((1, 7), 0.1)
    assert (grouped - grouped.mean(1, keepdim=True)).abs().max() > 0  # the float mean misses 0.1 here
    rewards = torch.tensor([0.1] * 7 + [0.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5])
    for scale in ("group", "batch", "none"):
        advantages, _ = group_advantages(rewards, 7, scale)
        assert advantages[:7].eq(0).all() and advantages[7:].ne(0).any()


@pytest.mark.parametrize("change, silent", [
    ({}, True), ({"loss_type": "cispo"}, True), ({"loss_type": "sapo"}, True), ({"beta": 0.1}, False),
    ({"entropy_coef": 0.01}, False), ({"entropy_bonus": True}, False), ({"router_aux_loss_coef": 0.01}, False),
    ({"loss_type": "vespo"}, False),
])
def test_which_losses_let_a_zero_advantage_row_go(change, silent):
    settings = dict(loss_type="dapo", importance_sampling_level="token", params=ObjectiveParams()) | change
    assert LossSettings(**settings).zero_advantage_is_silent is silent


def half_silent(completions, silent, **kwargs):
    """All-equal rewards for the prompts marked silent, the completion's length for the others."""
    return [1.0 if s else float(len(c)) for c, s in zip(completions, silent)]


def train(tmp_path, tiny_model_dir, name, reward, **overrides):
    """Two optimizer steps on the tiny model; returns the logged steps, the weights, the rows each training
    forward with gradients saw and those each no-grad forward of the policy saw. AdamW's epsilon is raised so
    that its first step, g / (|g| + eps), does not turn float rounding in gradients near 0 (other micro-batches,
    other rounding) into differences of the learning rate's size."""
    dataset = length_task(8).add_column("silent", [i % 2 == 0 for i in range(8)])
    args = GRPOConfig(**{**dict(output_dir=str(tmp_path / name), save_strategy="no", num_generations=4,
                                per_device_train_batch_size=4, gradient_accumulation_steps=2, max_completion_length=12,
                                max_steps=2, logging_steps=1, learning_rate=1e-2, weight_decay=0.1, adam_epsilon=1e-4,
                                disable_tqdm=True, seed=5), **overrides})
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward, args=args, train_dataset=dataset)
    rows_trained, rows_measured, forward = [], [], trainer.policy_logps.forward

    def counted(prompt_ids, *args, **kwargs):
        (rows_trained if torch.is_grad_enabled() else rows_measured).append(len(prompt_ids))
        return forward(prompt_ids, *args, **kwargs)

    trainer.policy_logps.forward = counted
    trainer.train()
    steps = [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    return steps, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, rows_trained, rows_measured


def assert_same_run(skipped, every_row):
    for a, b in zip(skipped[0], every_row[0], strict=True):
        keys = ("loss", "grad_norm", "entropy", "clip_ratio/low_min", "clip_ratio/region_mean", "reward")
        assert a.keys() == b.keys()
        for key in set(keys) & b.keys():  # a round's second pass logs no round metrics
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    for name, weight in every_row[1].items():
        torch.testing.assert_close(skipped[1][name], weight, rtol=0, atol=2e-6, msg=name)


def test_skipping_silent_rows_gives_the_same_steps_for_fewer_rows(tmp_path, tiny_model_dir):
    skipped = train(tmp_path, tiny_model_dir, "skip", half_silent)
    every_row = train(tmp_path, tiny_model_dir, "all", half_silent, skip_zero_advantage_rows=False)
    assert_same_run(skipped, every_row)
    assert every_row[2] == [4, 4, 4, 4]  # two micro-batches of 4 rows a step
    assert any(s["frac_reward_zero_std"] == 0.5 for s in skipped[0])  # a step with half its groups silent
    heard = [round(8 * (1 - step["frac_reward_zero_std"])) for step in skipped[0]]
    assert 0 < sum(heard) < 16 and sum(skipped[2]) == sum(heard)  # only the groups with a signal were trained
    assert len(skipped[2]) == sum(h > 0 for h in heard)  # each step's rows in one micro-batch, not two
    # the embedded model's generation config suppresses tokens, so the sampler's entropy is not the policy's:
    # the silent rows' entropy comes from a no-grad forward
    assert sum(skipped[3]) == 16 - sum(heard) and every_row[3] == []


UNSUPPRESSED = {"suppress_tokens": []}  # the sampler then draws from softmax(logits / T) itself


def test_the_samplers_entropy_spares_the_silent_rows_their_forward(tmp_path, tiny_model_dir):
    """Sampling from softmax(logits / T) itself, the engine measures each token's entropy; on a round's first step
    (the weights that sampled) the silent rows' entropy is that, with no forward, and the step logs what training
    every row logs."""
    skipped = train(tmp_path, tiny_model_dir, "skip", half_silent, generation_kwargs=UNSUPPRESSED)
    every_row = train(tmp_path, tiny_model_dir, "all", half_silent, generation_kwargs=UNSUPPRESSED,
                      skip_zero_advantage_rows=False)
    assert_same_run(skipped, every_row)
    heard = [round(8 * (1 - step["frac_reward_zero_std"])) for step in skipped[0]]
    assert sum(heard) < 16 and sum(skipped[2]) == sum(heard) and skipped[3] == []
    bf16 = train(tmp_path, tiny_model_dir, "bf16", half_silent, generation_kwargs=UNSUPPRESSED, bf16=True)
    assert sum(bf16[3]) == 16 - sum(heard)  # bf16 autocast in training: the sampler's float32 entropy is not its


def test_a_step_with_every_row_silent_still_steps_the_optimizer(tmp_path, tiny_model_dir):
    def constant(completions, **kwargs):
        return [2.0] * len(completions)

    skipped = train(tmp_path, tiny_model_dir, "skip", constant)
    every_row = train(tmp_path, tiny_model_dir, "all", constant, skip_zero_advantage_rows=False)
    assert skipped[2] == []  # no training forward at all
    assert_same_run(skipped, every_row)  # weight decay moved the weights the same way in both
    assert skipped[0][-1]["grad_norm"] == 0.0


def test_a_loss_that_reads_every_row_trains_every_row(tmp_path, tiny_model_dir):
    rows = train(tmp_path, tiny_model_dir, "kl", half_silent, beta=0.1)[2]
    assert rows == [4, 4, 4, 4]


def test_rows_with_no_loss_token_are_left_out_too(tmp_path, tiny_model_dir):
    """mask_truncated_completions: a truncated completion has no token in the loss, whatever its advantage."""
    skipped = train(tmp_path, tiny_model_dir, "skip", half_silent, mask_truncated_completions=True)
    every_row = train(tmp_path, tiny_model_dir, "all", half_silent, mask_truncated_completions=True,
                      skip_zero_advantage_rows=False)
    assert_same_run(skipped, every_row)
    truncated = [s["completions/clipped_ratio"] for s in skipped[0]]
    heard = [8 * (1 - s["frac_reward_zero_std"]) for s in skipped[0]]
    assert any(t > 0 for t in truncated) and sum(skipped[2]) < sum(heard)  # fewer rows than the groups with signal


def test_off_policy_rounds_compute_old_logps_only_for_rows_the_loss_reads(tmp_path, tiny_model_dir, monkeypatch):
    """num_iterations = 2: the old policy's log-probs are computed for the rows with a signal only, and the two
    passes over the round take the same steps as with every row computed and trained."""
    import grpo.trainer_rounds

    computed, real = [], grpo.trainer_rounds.completion_logps_in_chunks

    def counted(model, rollout, temperature, chunk_rows, rows=None):
        computed.append(len(rollout) if rows is None else len(rows))
        return real(model, rollout, temperature, chunk_rows, rows=rows)

    monkeypatch.setattr(grpo.trainer_rounds, "completion_logps_in_chunks", counted)
    skipped = train(tmp_path, tiny_model_dir, "skip", half_silent, num_iterations=2, max_steps=4)
    every_row = train(tmp_path, tiny_model_dir, "all", half_silent, num_iterations=2, max_steps=4,
                      skip_zero_advantage_rows=False)
    assert_same_run(skipped, every_row)
    rounds = len(computed) // 2
    heard = [round(8 * (1 - s["frac_reward_zero_std"])) for s in skipped[0] if "frac_reward_zero_std" in s]
    assert computed[rounds:] == [8] * rounds and computed[:rounds] == heard and sum(heard) < 8 * rounds


def test_after_a_rounds_first_step_the_silent_rows_entropy_comes_from_a_forward(tmp_path, tiny_model_dir):
    """num_iterations = 2: the round's second pass trains weights that did not sample it, so the sampler's
    entropies no longer describe them; the logged entropy is still what training every row logs."""
    skipped = train(tmp_path, tiny_model_dir, "skip", half_silent, num_iterations=2, max_steps=4,
                    generation_kwargs=UNSUPPRESSED)
    every_row = train(tmp_path, tiny_model_dir, "all", half_silent, num_iterations=2, max_steps=4,
                      generation_kwargs=UNSUPPRESSED, skip_zero_advantage_rows=False)
    assert_same_run(skipped, every_row)
    silent = [8 - round(8 * (1 - s["frac_reward_zero_std"])) for s in skipped[0] if "frac_reward_zero_std" in s]
    assert sum(skipped[3]) == sum(silent) > 0  # each round's silent rows, measured once: on its second pass
