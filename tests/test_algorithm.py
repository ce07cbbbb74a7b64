"""The pure tensor math of GRPO, checked against numbers worked out by hand."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from grpo.algorithm import (
    ADVANTAGE_EPS,
    LOSS_AGGREGATORS,
    StepCounts,
    clipped_surrogate,
    combine_rewards,
    dapo_loss,
    dr_grpo_loss,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    kl_k3,
    masked_mean,
    nanstd,
    selective_log_softmax,
)

NAN = float("nan")


def assert_close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=1e-6, equal_nan=True)


# --- advantages --------------------------------------------------------------------------------------------------

REWARDS = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0])
# group 1: mean 2.5, deviations -1.5 -0.5 0.5 1.5, sum of squares 5, Bessel variance 5/3; group 2: all equal, std 0
DEVIATIONS = [-1.5, -0.5, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0]
GROUP1_STD = math.sqrt(5 / 3)


def test_group_advantages_group_scaling():
    advantages, group_std = group_advantages(REWARDS, num_generations=4, scale_rewards="group")
    assert_close(group_std, [GROUP1_STD, 0.0])
    assert_close(advantages, [d / (GROUP1_STD + 1e-4) for d in DEVIATIONS[:4]] + [0.0] * 4)
    assert ADVANTAGE_EPS == 1e-4


def test_group_advantages_batch_scaling():
    # all 8 values: mean 10/8 = 1.25; squared deviations 0.0625 + 0.5625 + 3.0625 + 7.5625 + 4 * 1.5625 = 17.5
    batch_std = math.sqrt(17.5 / 7)  # = sqrt(2.5)
    advantages, group_std = group_advantages(REWARDS, num_generations=4, scale_rewards="batch")
    assert_close(group_std, [GROUP1_STD, 0.0])
    # still centered on each group's own mean, only the scale is the batch's
    assert_close(advantages, [d / (batch_std + 1e-4) for d in DEVIATIONS])


def test_group_advantages_none_is_only_centered():
    advantages, _ = group_advantages(REWARDS, num_generations=4, scale_rewards="none")
    assert_close(advantages, DEVIATIONS)


def test_group_advantages_nan_rewards_are_left_out():
    rewards = torch.tensor([1.0, NAN, 3.0, 5.0, 2.0, 2.0, NAN, NAN, NAN, NAN, NAN, 7.0])
    # group 1 present: 1, 3, 5 -> mean 3, squares 4 + 0 + 4 = 8, variance 8 / 2 = 4, std 2
    # group 2 present: 2, 2 -> std 0; group 3 has a single value -> std NaN, every advantage 0
    advantages, group_std = group_advantages(rewards, num_generations=4, scale_rewards="group")
    assert_close(group_std, [2.0, 0.0, NAN])
    assert_close(advantages, [-2 / 2.0001, 0.0, 0.0, 2 / 2.0001] + [0.0] * 8)

    centered, _ = group_advantages(rewards, num_generations=4, scale_rewards="none")
    assert_close(centered, [-2.0, 0.0, 0.0, 2.0] + [0.0] * 8)
    with pytest.raises(ValueError):
        group_advantages(rewards, num_generations=4, scale_rewards="bogus")

    # batch: present 1, 3, 5, 2, 2, 7 -> mean 20/6 = 10/3; variance sum((x - 10/3)^2) / 5
    values = [1, 3, 5, 2, 2, 7]
    batch_std = math.sqrt(sum((v - 10 / 3) ** 2 for v in values) / 5)
    scaled, _ = group_advantages(rewards, num_generations=4, scale_rewards="batch")
    # group 3's only value equals its own mean: centered 0
    assert_close(scaled, [-2 / (batch_std + 1e-4), 0.0, 0.0, 2 / (batch_std + 1e-4)] + [0.0] * 8)


# --- rewards and statistics --------------------------------------------------------------------------------------


def test_combine_rewards_weights_and_nan_skipping():
    rewards_per_func = torch.tensor([[1.0, 2.0], [NAN, 3.0], [-4.0, NAN], [NAN, NAN]])
    weights = torch.tensor([0.5, 2.0])
    # 0.5*1 + 2*2 = 4.5; only 2*3 = 6; only 0.5*-4 = -2; nothing applies -> NaN
    assert_close(combine_rewards(rewards_per_func, weights), [4.5, 6.0, -2.0, NAN])


def test_nanstd_matches_statistics_stdev():
    values = [0.3, -1.2, 4.0, 2.5, 0.0, 7.1]
    assert nanstd(torch.tensor(values, dtype=torch.float64)).item() == pytest.approx(statistics.stdev(values))

    rows = torch.tensor([[1.0, NAN, 4.0, 6.0], [2.0, 3.0, 5.0, 8.0], [NAN, NAN, 9.0, NAN]], dtype=torch.float64)
    expected = [statistics.stdev([1.0, 4.0, 6.0]), statistics.stdev([2.0, 3.0, 5.0, 8.0]), NAN]
    assert_close(nanstd(rows, dim=1), expected)
    # dim=None: every present value of the tensor
    present = [1.0, 4.0, 6.0, 2.0, 3.0, 5.0, 8.0, 9.0]
    assert nanstd(rows).item() == pytest.approx(statistics.stdev(present))


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 4) / 3)
    assert math.isnan(masked_mean(values, torch.zeros_like(mask)).item())


# --- log-probabilities, entropy, KL --------------------------------------------------------------------------------


def test_selective_log_softmax_hand_example():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # softmax = [1/4, 3/4]
    index = torch.tensor([[0, 1]])
    assert_close(selective_log_softmax(logits, index), [[math.log(0.25), math.log(0.75)]])


def test_selective_log_softmax_matches_torch_across_chunks():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, 11, generator=generator)
    index = torch.randint(0, 11, (5, 4), generator=generator)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    for chunk_rows in (1, 2, 8):
        torch.testing.assert_close(selective_log_softmax(logits, index, chunk_rows=chunk_rows), expected)
    assert selective_log_softmax(logits.bfloat16(), index).dtype == torch.float32


def test_entropy_from_logits():
    vocab = 7
    assert_close(entropy_from_logits(torch.zeros(3, 2, vocab), chunk_rows=2), torch.full((3, 2), math.log(vocab)))
    two_way = torch.tensor([[[0.0, math.log(3.0)]]])  # p = [1/4, 3/4]
    assert_close(entropy_from_logits(two_way), [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])


def test_kl_k3_hand_values():
    logps = torch.tensor([math.log(0.5), math.log(0.3)])
    ref_logps = torch.tensor([math.log(0.25), math.log(0.3)])
    # d = log 0.25 - log 0.5 = log 0.5 -> exp(d) - d - 1 = 0.5 - log 0.5 - 1; equal policies -> 0
    assert_close(kl_k3(logps, ref_logps), [0.5 - math.log(0.5) - 1, 0.0])


def test_kl_k3_is_non_negative():
    generator = torch.Generator().manual_seed(1)
    logps, ref_logps = torch.randn(2, 64, 16, generator=generator) * 3
    assert (kl_k3(logps, ref_logps) >= 0).all()


# --- clipped surrogate ---------------------------------------------------------------------------------------------


def surrogate(ratio, advantage, epsilon_low=0.2, epsilon_high=0.2):
    """One token with policy ratio `ratio`; returns the result and the leaf logp for gradients."""
    logps = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    old_logps = torch.full((1, 1), -math.log(ratio), dtype=torch.float64)  # exp(0 - old) = ratio
    advantages = torch.tensor([advantage], dtype=torch.float64)
    return clipped_surrogate(logps, old_logps, advantages, epsilon_low, epsilon_high), logps


def grad_of_loss(result, logps):
    (grad,) = torch.autograd.grad(result.per_token_loss.sum(), logps)
    return grad.item()


def test_clipped_surrogate_on_policy_is_minus_advantage():
    logps = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -3.0, -0.7]])
    result = clipped_surrogate(logps, logps.clone(), torch.tensor([0.7, -1.3]), 0.2, 0.2)
    assert_close(result.per_token_loss, [[-0.7] * 3, [1.3] * 3])
    assert not result.is_low_clipped.any() and not result.is_high_clipped.any()


@pytest.mark.parametrize(
    "ratio, advantage, loss, low_clipped, high_clipped, grad",
    [
        # -min(1.5 * 1, 1.2 * 1) = -1.2: clipped branch, no gradient
        (1.5, 1.0, -1.2, False, True, 0.0),
        # -min(0.5 * -1, 0.8 * -1) = -min(-0.5, -0.8) = 0.8: clipped branch, no gradient
        (0.5, -1.0, 0.8, True, False, 0.0),
        # -min(1.5 * -1, 1.2 * -1) = -min(-1.5, -1.2) = 1.5: not clipped, d/dlogp (-w A) = -1.5 * -1 = 1.5
        (1.5, -1.0, 1.5, False, False, 1.5),
        # -min(0.5 * 1, 0.8 * 1) = -0.5: not clipped, gradient -0.5 * 1
        (0.5, 1.0, -0.5, False, False, -0.5),
        # inside the trust region: -w A, gradient -w A
        (1.1, 2.0, -2.2, False, False, -2.2),
        (0.9, -2.0, 1.8, False, False, 1.8),
    ],
)
def test_clipped_surrogate_clipping_and_gradient(ratio, advantage, loss, low_clipped, high_clipped, grad):
    result, logps = surrogate(ratio, advantage)
    assert result.per_token_loss.item() == pytest.approx(loss)
    assert result.is_low_clipped.item() is low_clipped
    assert result.is_high_clipped.item() is high_clipped
    assert grad_of_loss(result, logps) == pytest.approx(grad, abs=1e-12)


def test_clipped_surrogate_gradient_sign_follows_advantage():
    # descending the loss raises logp of tokens with A > 0 and lowers it for A < 0
    positive, logps = surrogate(1.0, 0.8)
    assert grad_of_loss(positive, logps) < 0
    negative, logps = surrogate(1.0, -0.8)
    assert grad_of_loss(negative, logps) > 0


def test_clipped_surrogate_clip_higher():
    # ratio 1.25, A = 1: with eps_high 0.28 the upper bound is 1.28, not clipped: loss -1.25
    wide, logps = surrogate(1.25, 1.0, epsilon_low=0.2, epsilon_high=0.28)
    assert wide.per_token_loss.item() == pytest.approx(-1.25)
    assert not wide.is_high_clipped.item()
    assert grad_of_loss(wide, logps) == pytest.approx(-1.25)
    # the same token with the symmetric eps 0.2: -min(1.25, 1.2) = -1.2, clipped
    narrow, _ = surrogate(1.25, 1.0, epsilon_low=0.2, epsilon_high=0.2)
    assert narrow.per_token_loss.item() == pytest.approx(-1.2)
    assert narrow.is_high_clipped.item()
    # the lower bound still uses eps_low: ratio 0.75, A = -1 -> -min(-0.75, -0.8) = 0.8, low-clipped
    low, _ = surrogate(0.75, -1.0, epsilon_low=0.2, epsilon_high=0.28)
    assert low.per_token_loss.item() == pytest.approx(0.8)
    assert low.is_low_clipped.item()


# --- loss aggregation ----------------------------------------------------------------------------------------------

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
STEP = StepCounts(num_sequences=2, num_tokens=3, max_completion_length=3)


def test_loss_aggregators_hand_values():
    # masked sum 1 + 2 + 4 = 7 over 3 tokens
    assert dapo_loss(PER_TOKEN, MASK, STEP).item() == pytest.approx(7 / 3)
    # sequence means (1 + 2) / 2 = 1.5 and 4 / 1 = 4, averaged over 2 sequences
    assert grpo_loss(PER_TOKEN, MASK, STEP).item() == pytest.approx((1.5 + 4) / 2)
    # 7 / (2 sequences x 3 max tokens)
    assert dr_grpo_loss(PER_TOKEN, MASK, STEP).item() == pytest.approx(7 / 6)
    assert LOSS_AGGREGATORS == {"dapo": dapo_loss, "grpo": grpo_loss, "dr_grpo": dr_grpo_loss}


def test_loss_aggregators_use_step_counts_not_micro_batch_counts():
    # the first row alone as a micro-batch of a 2-sequence, 3-token step
    first, first_mask = PER_TOKEN[:1], MASK[:1]
    assert dapo_loss(first, first_mask, STEP).item() == pytest.approx(3 / 3)
    assert grpo_loss(first, first_mask, STEP).item() == pytest.approx(1.5 / 2)
    assert dr_grpo_loss(first, first_mask, STEP).item() == pytest.approx(3 / 6)


def test_grpo_loss_empty_sequence_contributes_zero():
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert grpo_loss(PER_TOKEN, mask, STEP).item() == pytest.approx(1.5 / 2)


@pytest.mark.parametrize("name", sorted(LOSS_AGGREGATORS))
@pytest.mark.parametrize("split", [1, 2, 3])
def test_loss_aggregators_are_split_invariant(name, split):
    aggregate = LOSS_AGGREGATORS[name]
    generator = torch.Generator().manual_seed(2)
    per_token = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float64)
    step = StepCounts(num_sequences=4, num_tokens=int(mask.sum()), max_completion_length=5)
    whole = aggregate(per_token, mask, step)
    halves = aggregate(per_token[:split], mask[:split], step) + aggregate(per_token[split:], mask[split:], step)
    assert halves.item() == pytest.approx(whole.item(), abs=1e-12)
