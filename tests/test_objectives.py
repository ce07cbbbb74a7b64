"""The GRPO family of objectives (issue 3): loss values and gradients derived by hand, the step-level
normalisers, advantages, rewards and trainer options, and the rule that an update does not depend on how the
optimizer step is split into micro-batches."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo import GRPOConfig, GRPOTrainer
from grpo.algorithm import (
    ADVANTAGE_EPS,
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_AGGREGATORS,
    MULTI_OBJECTIVE_AGGREGATIONS,
    OBJECTIVES,
    LossSettings,
    LossStats,
    ObjectiveParams,
    StepCounts,
    all_equal_groups,
    bnpo_loss,
    dapo_loss,
    entropy_threshold,
    luspo_loss,
    micro_batch_loss,
    mix_into,
    normalize_then_sum,
    policy_loss,
    sum_then_normalize,
)
from grpo.config import LOSS_TYPES
from grpo.embedded import length_task
from grpo.packing import pack_shared_prefixes
from grpo.rewards import overlong_penalty

LN2 = math.log(2)
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
STEP = StepCounts(num_sequences=2, num_tokens=3, max_completion_length=3)
ADVANTAGES = torch.tensor([1.0, -1.0], dtype=torch.float64)
# log-probs of the 3 active tokens: row 0 (A = +1) log 0.5, log 0.25; row 1 (A = -1) log 0.5. The padding token
# has a wild value that must never matter.
LOGPS = [[math.log(0.5), math.log(0.25), -7.0], [math.log(0.5), -9.0, -9.0]]


def batch(ratios: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Leaf log-probs LOGPS and old log-probs chosen so that exp(logp - old) = ratios."""
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    old = torch.tensor(LOGPS, dtype=torch.float64) - torch.log(torch.tensor(ratios, dtype=torch.float64))
    return logps, old


def loss_and_grad(loss_type, ratios, level="token", **params):
    logps, old = batch(ratios)
    result = policy_loss(loss_type, level, logps, old, ADVANTAGES, MASK, ObjectiveParams(**params))
    loss = OBJECTIVES[loss_type].aggregate(result.per_token_loss, MASK, STEP)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.item(), grad * MASK, result


# Clip active: row 0 ratios 1.5 (> 1 + 0.2, A > 0: clipped) and 1.1; row 1 ratio 0.5 (< 1 - 0.2, A < 0: clipped).
ACTIVE = [[1.5, 1.1, 5.0], [0.5, 5.0, 5.0]]
ON_POLICY = [[1.0, 1.0, 5.0], [1.0, 5.0, 5.0]]
# clipped per-token losses: -min(1.5, 1.2) = -1.2, -min(1.1, 1.2) = -1.1, -min(-0.5, -0.8) = 0.8; sum -1.5
# on-policy (w = 1): -A per token: -1, -1, +1; sum -1
CLIPPED_LOSS = {
    # token mean over the step: sum / 3 tokens
    "dapo": (-1.5 / 3, -1 / 3),
    "bnpo": (-1.5 / 3, -1 / 3),
    # sequence means (-1.2 - 1.1) / 2 = -1.15 and 0.8, averaged over 2 sequences; on-policy (-1 + 1) / 2
    "grpo": ((-1.15 + 0.8) / 2, 0.0),
    # sum / (2 sequences x 3 max tokens)
    "dr_grpo": (-1.5 / 6, -1 / 6),
    # each sequence's token sum (= loss x length), averaged over 2 sequences
    "luspo": (-1.5 / 2, -1 / 2),
}
# on-policy d loss / d logp_t = -A x (normaliser weight of token t): d(-w A)/dlogp = -w A
CLIPPED_GRAD_WEIGHT = {"dapo": [1 / 3, 1 / 3, 1 / 3], "bnpo": [1 / 3, 1 / 3, 1 / 3],
                       "grpo": [1 / 4, 1 / 4, 1 / 2], "dr_grpo": [1 / 6, 1 / 6, 1 / 6],
                       "luspo": [1 / 2, 1 / 2, 1 / 2]}


def active_grads(grad):
    """The gradients of the three active tokens, row 0's two then row 1's one."""
    return [grad[0, 0].item(), grad[0, 1].item(), grad[1, 0].item()]


def test_registries_cover_trl_loss_types_and_levels():
    assert set(OBJECTIVES) == set(LOSS_TYPES) == {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo",
                                                  "vespo"}
    assert set(IMPORTANCE_SAMPLING_LEVELS) == {"token", "sequence"}
    assert set(MULTI_OBJECTIVE_AGGREGATIONS) == {"sum_then_normalize", "normalize_then_sum"}


@pytest.mark.parametrize("loss_type", sorted(CLIPPED_LOSS))
def test_clipped_loss_types_hand_values(loss_type):
    active, inactive = CLIPPED_LOSS[loss_type]
    loss, grad, result = loss_and_grad(loss_type, ACTIVE)
    assert loss == pytest.approx(active)
    # both clipped tokens have no gradient; the unclipped one (w = 1.1, A = 1) has -w A x weight
    weight = CLIPPED_GRAD_WEIGHT[loss_type]
    assert active_grads(grad) == pytest.approx([0.0, -1.1 * weight[1], 0.0])
    assert result.is_high_clipped[0].tolist() == [True, False, True]  # padding flags are masked out later
    assert result.is_low_clipped[1, 0].item() and not result.is_low_clipped[0].any()

    loss, grad, result = loss_and_grad(loss_type, ON_POLICY)
    assert loss == pytest.approx(inactive)
    assert active_grads(grad) == pytest.approx([-weight[0], -weight[1], weight[2]])
    assert not (result.is_high_clipped * MASK.bool()).any() and not (result.is_low_clipped * MASK.bool()).any()


def test_clip_higher_widens_only_the_upper_bound():
    # eps_high 0.6: 1.5 is inside [0.8, 1.6]; tokens -1.5, -1.1, 0.8 (low clip unchanged) -> dapo sum -1.8 / 3
    loss, grad, _ = loss_and_grad("dapo", ACTIVE, epsilon_low=0.2, epsilon_high=0.6)
    assert loss == pytest.approx(-1.8 / 3)
    assert active_grads(grad) == pytest.approx([-1.5 / 3, -1.1 / 3, 0.0])


def test_delta_caps_the_ratio_for_negative_advantages():
    # row 1 (A = -1) ratio 3: clip(3) = 1.2, so -min(-3, -1.2) = 3 without delta; with delta 2: -min(-2, -1.2) = 2
    ratios = [[1.0, 1.0, 1.0], [3.0, 1.0, 1.0]]
    loss, grad, _ = loss_and_grad("dapo", ratios)
    assert loss == pytest.approx((-1 - 1 + 3) / 3)
    assert grad[1, 0].item() == pytest.approx(3 / 3)  # d(-w A)/dlogp = -w A = 3, over 3 tokens
    loss, grad, _ = loss_and_grad("dapo", ratios, delta=2.0)
    assert loss == pytest.approx((-1 - 1 + 2) / 3)
    assert grad[1, 0].item() == 0.0  # capped: no gradient
    # a ratio below delta is untouched: row 1 ratio 1.1 -> -min(-1.1, -1.1) = 1.1 either way
    near = [[1.0, 1.0, 1.0], [1.1, 1.0, 1.0]]
    assert loss_and_grad("dapo", near, delta=2.0)[0] == pytest.approx(loss_and_grad("dapo", near)[0])


def test_cispo_hand_values():
    # l_t = -sg(min(w_t, eps_high)) A logp_t. eps_high 1.3: weights 1.3 (capped 1.5), 1.1, 0.5
    # row 0: -1.3 x 1 x log 0.5 = 1.3 ln 2; -1.1 x log 0.25 = 2.2 ln 2; row 1: -0.5 x -1 x log 0.5 = -0.5 ln 2
    # sum 3 ln 2, token mean over 3 tokens (as dapo) = ln 2
    loss, grad, result = loss_and_grad("cispo", ACTIVE, epsilon_high=1.3)
    assert loss == pytest.approx(LN2)
    # the gradient is -weight x A / 3 for every token: a capped token keeps its gradient (unlike the PPO clip)
    assert active_grads(grad) == pytest.approx([-1.3 / 3, -1.1 / 3, 0.5 / 3])
    assert (result.is_cispo_clipped * MASK.bool()).tolist() == [[True, False, False], [False, False, False]]
    # cap inactive (5.0): weight = w -> (1.5 + 2.2 - 0.5) ln 2 / 3
    loss, grad, result = loss_and_grad("cispo", ACTIVE, epsilon_high=5.0)
    assert loss == pytest.approx(3.2 * LN2 / 3)
    assert active_grads(grad) == pytest.approx([-1.5 / 3, -1.1 / 3, 0.5 / 3])
    assert not (result.is_cispo_clipped * MASK.bool()).any()


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_sapo_hand_values():
    # l = -(4 / tau) sigmoid(tau (w - 1)) A; tau = 1.0 for A > 0, 1.05 for A < 0; aggregated like grpo
    # on-policy: -(4 / tau) x 1/2 x A -> row 0: -2 per token, row 1: +2 / 1.05
    loss, grad, _ = loss_and_grad("sapo", ON_POLICY)
    assert loss == pytest.approx((-2 + 2 / 1.05) / 2)
    # d l / d logp = -(4 / tau) sigmoid'(0) tau w A = -w A = -A at w = 1; grpo weights 1/4, 1/4, 1/2
    assert active_grads(grad) == pytest.approx([-1 / 4, -1 / 4, 1 / 2])
    # away from w = 1 the gate saturates instead of clipping: w = 1.5 (A = 1), 1.1 (A = 1), 0.5 (A = -1)
    loss, grad, _ = loss_and_grad("sapo", ACTIVE)
    row0 = [-4 * sigmoid(0.5), -4 * sigmoid(0.1)]
    row1 = (4 / 1.05) * sigmoid(1.05 * -0.5)
    assert loss == pytest.approx((sum(row0) / 2 + row1) / 2)

    def slope(w, tau, a):  # d/dlogp of -(4/tau) sigmoid(tau (w - 1)) A, with dw/dlogp = w
        s = sigmoid(tau * (w - 1))
        return -4 * s * (1 - s) * w * a

    expected = [slope(1.5, 1.0, 1) / 4, slope(1.1, 1.0, 1) / 4, slope(0.5, 1.05, -1) / 2]
    assert active_grads(grad) == pytest.approx(expected)


def test_sapo_temperatures_are_chosen_by_advantage_sign():
    # on-policy the loss is -2 A / tau: tau_pos 2 -> row 0: -1 per token; tau_neg 4 -> row 1: +0.5; grpo mean
    loss, _, _ = loss_and_grad("sapo", ON_POLICY, sapo_temperature_pos=2.0, sapo_temperature_neg=4.0)
    assert loss == pytest.approx((-1 + 0.5) / 2)


def test_sequence_level_gspo_hand_values():
    # row 0: log w = (log 1.5 + log 1.1) / 2 (the padding token's ratio is ignored), w = sqrt(1.65) = 1.2845 > 1.2
    # A = 1: clipped, -1.2 on both tokens; row 1: w = 0.5, A = -1: clipped, 0.8. dapo: (-2.4 + 0.8) / 3
    loss, grad, result = loss_and_grad("dapo", ACTIVE, level="sequence")
    assert loss == pytest.approx(-1.6 / 3)
    assert active_grads(grad) == pytest.approx([0.0, 0.0, 0.0])
    assert result.is_high_clipped[0, :2].all() and result.is_low_clipped[1, 0]
    # inside the trust region: row 0 ratios 1.1 and 1/1.1 -> w = 1; row 1 ratio 1.1 -> w = 1.1
    # losses -1, -1 and -min(-1.1, -1.1) = 1.1. Every token of a row shares w, so
    # d l_t / d logp_s = -A w / |y|: row 0: -1 x 1 / 2 per token, summed over its 2 tokens: -1 each; / 3 tokens
    ratios = [[1.1, 1 / 1.1, 9.0], [1.1, 9.0, 9.0]]
    loss, grad, _ = loss_and_grad("dapo", ratios, level="sequence")
    assert loss == pytest.approx((-1 - 1 + 1.1) / 3)
    assert active_grads(grad) == pytest.approx([-1 / 3, -1 / 3, 1.1 / 3])


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", sorted(OBJECTIVES))
def test_gradient_descent_raises_positive_and_lowers_negative_advantage_tokens(loss_type, level):
    params = {"epsilon_high": 5.0} if loss_type == "cispo" else {}
    _, grad, _ = loss_and_grad(loss_type, ON_POLICY, level=level, **params)
    assert (grad[0, :2] < 0).all()  # A > 0: the loss falls as logp rises
    assert grad[1, 0] > 0  # A < 0


def test_bnpo_and_luspo_aggregators():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    step = StepCounts(num_sequences=2, num_tokens=3, max_completion_length=3)
    # bnpo over the step is the step's token mean: (1 + 2 + 4) / 3, the same as dapo
    assert bnpo_loss(per_token, mask, step).item() == pytest.approx(7 / 3) == dapo_loss(per_token, mask, step).item()
    # luspo: sequence token sums 3 and 4, averaged over 2 sequences; a sequence-level loss (B, 1) is times length
    assert luspo_loss(per_token, mask, step).item() == pytest.approx(7 / 2)
    assert luspo_loss(torch.tensor([[2.0], [-1.0]]), mask, step).item() == pytest.approx((2 * 2 - 1 * 1) / 2)
    assert set(LOSS_AGGREGATORS) == {"dapo", "grpo", "dr_grpo"}  # the distinct normalisers


@pytest.mark.parametrize("loss_type", sorted(OBJECTIVES))
def test_every_aggregator_is_split_invariant(loss_type):
    aggregate = OBJECTIVES[loss_type].aggregate
    generator = torch.Generator().manual_seed(5)
    per_token = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float64)
    step = StepCounts(num_sequences=4, num_tokens=int(mask.sum()), max_completion_length=5)
    whole = aggregate(per_token, mask, step).item()
    for split in (1, 2, 3):
        parts = aggregate(per_token[:split], mask[:split], step) + aggregate(per_token[split:], mask[split:], step)
        assert parts.item() == pytest.approx(whole, abs=1e-12)


# --- the whole loss of a micro-batch: policy loss, KL, entropy mask and bonus, step counts ------------------------

K3 = 1 - LN2  # k3 at d = logp_ref - logp = ln 2: exp(d) - d - 1 = 2 - ln 2 - 1
# the entropies of the active tokens 0.5, 1.0 | 1.5 (sum 3); padding holds wild values that must never matter
ENTROPY = [[0.5, 1.0, 9.0], [1.5, 9.0, 9.0]]
ENTROPY_MASK = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)  # drops token (0, 1)


def whole_loss(loss_type="dapo", ratios=ACTIVE, rows=slice(None), step=STEP, entropy_mask=ENTROPY_MASK, beta=0.1,
               entropy_coef=0.2, on_policy=False):
    """micro_batch_loss of `rows` of the fixture batch; returns (loss, stats, d loss / d logp, d loss / d H)."""
    logps, old = batch(ratios)
    ref = torch.tensor(LOGPS, dtype=torch.float64) + LN2
    entropy = torch.tensor(ENTROPY, dtype=torch.float64, requires_grad=True)
    settings = LossSettings(loss_type, "token", ObjectiveParams(), beta=beta, entropy_coef=entropy_coef)
    loss, stats = micro_batch_loss(logps[rows], entropy[rows], None if on_policy else old[rows], ref[rows],
                                   ADVANTAGES[rows], MASK[rows], step, settings,
                                   None if entropy_mask is None else entropy_mask[rows])
    grad_logps, grad_entropy = torch.autograd.grad(loss, (logps, entropy), allow_unused=True,
                                                   materialize_grads=True)
    return loss.item(), stats, grad_logps * MASK, grad_entropy * MASK


def test_micro_batch_loss_hand_values():
    # clipped policy losses -1.2, -1.1 | 0.8 (ACTIVE above); the entropy mask drops -1.1; k3 = 1 - ln 2 on every token
    # (the mask does not touch the KL), beta 0.1: -1.2 + 0.1 K3, 0.1 K3 | 0.8 + 0.1 K3, sum -0.4 + 0.3 K3, dapo / 3
    # entropy bonus: 0.2 x (0.5 + 1.0 + 1.5) / 3 tokens = 0.2
    policy = (-0.4 + 0.3 * K3) / 3
    loss, stats, grad_logps, grad_entropy = whole_loss()
    assert loss == pytest.approx(policy - 0.2)
    # per sequence: row 0 has 1 of its 2 tokens high-clipped, row 1 its 1 token low-clipped
    assert asdict(stats) == pytest.approx(asdict(LossStats(loss=policy - 0.2, policy_loss=policy, entropy=3.0,
                                                           kl=3 * K3, low_clipped=1, high_clipped=1,
                                                           low_clipped_min=0.0, high_clipped_max=0.5)))
    # both policy terms with a gradient are clipped or masked; d k3 / d logp = 1 - exp(d) = -1, times beta / 3
    assert active_grads(grad_logps) == pytest.approx([-0.1 / 3] * 3)
    assert active_grads(grad_entropy) == pytest.approx([-0.2 / 3] * 3)  # -c / (tokens of the step)
    # without the entropy mask token (0, 1) keeps its loss -1.1 and its gradient -w A / 3 = -1.1 / 3
    loss, stats, grad_logps, _ = whole_loss(entropy_mask=None)
    assert stats.policy_loss == pytest.approx((-1.5 + 0.3 * K3) / 3)
    assert active_grads(grad_logps) == pytest.approx([-0.1 / 3, -1.2 / 3, -0.1 / 3])
    # beta 0 and no bonus: the policy loss alone, no KL and no entropy gradient; the entropy is still reported
    loss, stats, _, grad_entropy = whole_loss(beta=0.0, entropy_coef=0.0)
    assert loss == pytest.approx(-0.4 / 3) and stats.kl == 0.0 and stats.entropy == 3.0
    assert not grad_entropy.any()
    # on-policy (no old log-probs): w = 1, losses -A: -1, -1 (masked) | 1, no clipping
    loss, stats, _, _ = whole_loss(beta=0.0, entropy_coef=0.0, on_policy=True)
    assert loss == pytest.approx(0.0) and stats.low_clipped == stats.high_clipped == 0


def test_micro_batch_loss_counts_the_whole_step():
    # grpo: sequence means (-1.2 + 0.1 K3 + 0.1 K3) / 2 and 0.8 + 0.1 K3, averaged over the 2 sequences of the step
    # = 0.1 + 0.1 K3; the entropy bonus is a token mean over the step in every loss type: 0.2 x 3 / 3
    whole, whole_stats, _, _ = whole_loss("grpo")
    assert whole == pytest.approx(0.1 + 0.1 * K3 - 0.2)
    # each row as a micro-batch of that step: row 0 (-0.6 + 0.1 K3) / 2 - 0.2 x 1.5 / 3, row 1 (0.8 + 0.1 K3) / 2 -
    # 0.2 x 1.5 / 3; they add up to the whole, and so do their stats
    first, first_stats, _, _ = whole_loss("grpo", rows=slice(0, 1))
    second, second_stats, _, _ = whole_loss("grpo", rows=slice(1, 2))
    assert first == pytest.approx((-0.6 + 0.1 * K3) / 2 - 0.1)
    assert second == pytest.approx((0.8 + 0.1 * K3) / 2 - 0.1)
    assert first + second == pytest.approx(whole)
    assert asdict(first_stats + second_stats) == pytest.approx(asdict(whole_stats))
    # row 0 in a step twice as large (4 sequences, 6 tokens): every term is halved
    bigger = StepCounts(num_sequences=4, num_tokens=6, max_completion_length=3)
    assert whole_loss("grpo", rows=slice(0, 1), step=bigger)[0] == pytest.approx(first / 2)


def test_step_metrics_hand_values_and_names():
    _, stats, _, _ = whole_loss()  # 3 tokens: entropy 3, KL 3 K3, one token clipped each way
    settings = LossSettings("dapo", "token", ObjectiveParams(), beta=0.1, entropy_coef=0.2)
    metrics = stats.step_metrics(STEP, settings)
    assert list(metrics) == ["entropy", "policy_loss", "clip_ratio/low_mean", "clip_ratio/high_mean",
                             "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max", "kl"]
    assert metrics == pytest.approx({"entropy": 1.0, "policy_loss": stats.policy_loss, "clip_ratio/low_mean": 1 / 3,
                                     "clip_ratio/high_mean": 1 / 3, "clip_ratio/region_mean": 2 / 3,
                                     "clip_ratio/low_min": 0.0, "clip_ratio/high_max": 0.5, "kl": K3})
    # no bonus, no KL: neither is logged; cispo logs its own ratio, sapo none
    assert list(stats.step_metrics(STEP, LossSettings("cispo", "token", ObjectiveParams()))) == [
        "entropy", "cispo_clip_ratio"]
    assert list(stats.step_metrics(STEP, LossSettings("sapo", "token", ObjectiveParams()))) == ["entropy"]
    empty = StepCounts(num_sequences=0, num_tokens=0, max_completion_length=3)
    assert LossStats().step_metrics(empty, settings)["entropy"] == 0.0  # an empty step divides by 1, not 0


# --- advantages, dynamic-sampling groups, entropy quantile, reference mixing -----------------------------------


def test_normalize_then_sum_hand_values():
    # two rewards, G = 2, two groups. f1 = [1, 3 | 0, 0], f2 = [10, 20 | 5, 7], weights 1 and 1
    rewards = torch.tensor([[1.0, 10.0], [3.0, 20.0], [0.0, 5.0], [0.0, 7.0]], dtype=torch.float64)
    weights = torch.tensor([1.0, 1.0])
    e = ADVANTAGE_EPS
    # f1: group 1 mean 2, Bessel std sqrt(2) -> -+1 / (sqrt 2 + e); group 2 constant -> 0
    # f2: group 1 mean 15, std sqrt(50) -> -+5 / (sqrt 50 + e); group 2 mean 6, std sqrt 2 -> -+1 / (sqrt 2 + e)
    u = 1 / (math.sqrt(2) + e) + 5 / (math.sqrt(50) + e)
    v = 1 / (math.sqrt(2) + e)
    summed = [-u, u, -v, v]  # mean 0; Bessel std over the round sqrt((2 u^2 + 2 v^2) / 3)
    std = math.sqrt((2 * u * u + 2 * v * v) / 3)
    advantages, group_std = normalize_then_sum(rewards, weights, 2, "group")
    assert advantages.tolist() == pytest.approx([s / (std + e) for s in summed])
    # group std of the plain weighted sum 11, 23 | 5, 7: sqrt(72), sqrt(2)
    assert group_std.tolist() == pytest.approx([math.sqrt(72), math.sqrt(2)])
    # sum_then_normalize: 11, 23 -> -+6 / (sqrt 72 + e); 5, 7 -> -+1 / (sqrt 2 + e)
    plain, _ = sum_then_normalize(rewards, weights, 2, "group")
    a, b = 6 / (math.sqrt(72) + e), 1 / (math.sqrt(2) + e)
    assert plain.tolist() == pytest.approx([-a, a, -b, b])


def test_all_equal_groups():
    nan = float("nan")
    rewards = torch.tensor([1.0, 1.0, 2.0, 3.0, nan, nan, 4.0, nan])
    # equal; spread 1; nothing present; a single present value
    assert all_equal_groups(rewards, 2).tolist() == [True, False, True, True]


def test_entropy_threshold_linear_quantile():
    entropies = torch.tensor([0.5, 0.1, 0.4, 0.2, 0.3])
    # the 0.8 quantile of 0.1..0.5: position 0.8 x 4 = 3.2 -> 0.4 + 0.2 x (0.5 - 0.4) = 0.42: keeps only 0.5
    assert entropy_threshold(entropies, 0.2).item() == pytest.approx(0.42)
    assert entropy_threshold(entropies, 1.0).item() == pytest.approx(0.1)  # rho = 1 keeps every token


def test_mix_into_is_trdpo_update():
    ref = [torch.tensor([1.0, 2.0])]
    mix_into(ref, [torch.tensor([3.0, 4.0])], 0.6)
    # 0.6 x 3 + 0.4 x 1 = 2.2; 0.6 x 4 + 0.4 x 2 = 3.2
    assert ref[0].tolist() == pytest.approx([2.2, 3.2])


# --- soft overlong punishment ------------------------------------------------------------------------------------


def test_overlong_penalty_hand_values():
    reward = overlong_penalty(max_completion_len=10, soft_punish_cache=4)  # safe up to 10 - 4 = 6 tokens
    ids = [[0] * n for n in (5, 6, 7, 8, 10, 11)]
    # 0, 0, (6 - 7) / 4, (6 - 8) / 4, (6 - 10) / 4 = -1, beyond L_max -1
    assert reward(completions=[""] * 6, completion_ids=ids) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="soft_punish_cache"):
        overlong_penalty(10, 11)
    with pytest.raises(ValueError, match="max_completion_len"):
        overlong_penalty(0, 0)


# --- config ------------------------------------------------------------------------------------------------------


def test_objective_fields_are_accepted_and_validated():
    config = GRPOConfig(loss_type="luspo", importance_sampling_level="sequence", delta=1.5,
                        multi_objective_aggregation="normalize_then_sum", mask_truncated_completions=True,
                        top_entropy_quantile=0.2, beta=0.04, sync_ref_model=True, dynamic_sampling=True)
    assert (config.ref_model_mixup_alpha, config.ref_model_sync_steps) == (0.6, 512)
    assert (config.sapo_temperature_pos, config.sapo_temperature_neg) == (1.0, 1.05)
    assert config.max_dynamic_sampling_rounds == 3
    with pytest.raises(ValueError, match="must be > 1 \\+ epsilon_high"):
        GRPOConfig(delta=1.1)
    with pytest.raises(ValueError, match="has no clip"):
        GRPOConfig(loss_type="sapo", delta=2.0)
    with pytest.raises(ValueError, match="beta=0"):
        GRPOConfig(sync_ref_model=True)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        GRPOConfig(top_entropy_quantile=0.0)
    with pytest.raises(ValueError, match="Did you mean 'sequence'"):
        GRPOConfig(importance_sampling_level="sequenc")
    with pytest.raises(ValueError, match="sapo_temperature_neg"):
        GRPOConfig(sapo_temperature_neg=0.0)
    with pytest.raises(ValueError, match="max_dynamic_sampling_rounds"):
        GRPOConfig(max_dynamic_sampling_rounds=-1)
    with pytest.warns(UserWarning, match="epsilon_high"):
        GRPOConfig(loss_type="cispo")
    with pytest.raises(ValueError, match="entropy_coef_min=0.5 must be <= entropy_coef_max=0.1"):
        GRPOConfig(use_adaptive_entropy=True, entropy_coef_min=0.5, entropy_coef_max=0.1)


# --- the trainer ---------------------------------------------------------------------------------------------------


def reward_len(completions, **kwargs):
    return [-abs(20 - len(c)) for c in completions]


def sgd_trainer(tmp_path, model_dir, reward=reward_len, dataset=None, **overrides):
    """A trainer whose optimizer step is params -= grad (SGD, lr 1, no clipping), so updates are gradients."""
    settings = dict(output_dir=str(tmp_path / "run"), save_strategy="no", overwrite_output_dir=True,
                    num_generations=4, per_device_train_batch_size=8,
                    max_completion_length=16, max_steps=1, logging_steps=1, gradient_checkpointing=False,
                    disable_tqdm=True, max_grad_norm=0.0, seed=3)
    settings.update(overrides)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(**settings),
                       train_dataset=dataset if dataset is not None else length_task(8),
                       processing_class=AutoTokenizer.from_pretrained(model_dir), optimizers=(optimizer, scheduler))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def step_update(trainer, rollout, micro_batches, start):
    """The parameter change of one training step taken from the weights `start` (restored first)."""
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            param.copy_(start[name])
    trainer.training_step(rollout, micro_batches)
    return {n: p.detach() - start[n] for n, p in trainer.model.named_parameters()}


def assert_same_update(first, second):
    largest = max(u.abs().max().item() for u in first.values())
    assert largest > 1e-4  # the step really moved the weights
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=1e-6 * max(largest, 1.0), rtol=1e-4)


# dapo, grpo and dr_grpo at token level are covered by tests/test_trainer.py
INVARIANCE_CASES = [dict(loss_type=t) for t in ("bnpo", "luspo", "sapo")] + [
    dict(loss_type="cispo", epsilon_high=5.0),
    dict(loss_type="dapo", importance_sampling_level="sequence"),
    dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="dapo", top_entropy_quantile=0.3, mask_truncated_completions=True),
]


@pytest.mark.parametrize("options", INVARIANCE_CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_update_does_not_depend_on_gradient_accumulation(tmp_path, tiny_model_dir, options):
    """GA 1 x batch 8 and GA 4 x batch 2 see the same 8 completions and must take the same optimizer step."""
    updates = []
    for ga, batch_size in [(1, 8), (4, 2)]:
        trainer = sgd_trainer(tmp_path, tiny_model_dir, gradient_accumulation_steps=ga,
                              per_device_train_batch_size=batch_size, **options)
        assert trainer.policy_logps.grads_in_place  # one process: the LM head and lookup add into .grad themselves
        start = snapshot(trainer.model)
        trainer.train()
        updates.append({n: p.detach() - start[n] for n, p in trainer.model.named_parameters()})
    assert_same_update(*updates)


@pytest.mark.parametrize("loss_type", sorted(OBJECTIVES))
def test_normalisers_count_the_optimizer_step_not_the_round(tmp_path, tiny_model_dir, loss_type):
    """steps_per_generation = 2 x GA: a round of 16 rows feeds two optimizer steps of 8. The first step's update
    must equal the update of those 8 rows trained as a round of their own (steps_per_generation = GA).
    TRL's dapo divides by the round's tokens here and takes a step half as large (trl#5619)."""
    extra = {"epsilon_high": 5.0} if loss_type == "cispo" else {}
    trainer = sgd_trainer(tmp_path, tiny_model_dir, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                          steps_per_generation=4, loss_type=loss_type, **extra)
    trainer._create_optimizer_and_scheduler(1)
    rollout, _ = trainer.generate_and_score(list(length_task(4)))
    assert len(rollout) == 16 and rollout.old_logps is not None  # the round spans two steps: pi_old is kept
    first_step = trainer._optimizer_steps(rollout)[0]
    start = snapshot(trainer.model)
    in_round = step_update(trainer, rollout, first_step, start)
    own = rollout.select(torch.cat(first_step))
    own.old_logps = None  # a round that feeds one step is on-policy: old = logp.detach()
    alone = step_update(trainer, own, [torch.arange(0, 4), torch.arange(4, 8)], start)
    assert_same_update(in_round, alone)


def test_the_entropy_quantile_takes_the_samplers_entropies_on_a_rounds_first_step(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    """top_entropy_quantile: where the sampler drew from the policy itself (no token suppressed), the step's
    entropies are the ones it measured: no forward, the same high-entropy tokens and the same update."""
    import grpo.trainer_rows

    trainer = sgd_trainer(tmp_path, tiny_model_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                          top_entropy_quantile=0.3, generation_kwargs={"suppress_tokens": []})
    trainer._create_optimizer_and_scheduler(1)
    rollout, _ = trainer.generate_and_score(list(length_task(2)))
    assert rollout.sampled_entropy is not None
    micro_batches = [torch.arange(0, 4), torch.arange(4, 8)]
    forwards, real = [], grpo.trainer_rows.completion_logps
    monkeypatch.setattr(grpo.trainer_rows, "completion_logps", lambda *a, **k: forwards.append(1) or real(*a, **k))
    sampled = trainer._high_entropy_masks(rollout, micro_batches)
    assert forwards == []
    measured = dataclasses.replace(rollout, sampled_entropy=None)
    by_forward = trainer._high_entropy_masks(measured, micro_batches)
    assert len(forwards) == 2 and all(torch.equal(a, b) for a, b in zip(sampled, by_forward))
    assert 0 < sum(m.sum() for m in sampled) < sum(trainer._loss_mask(rollout.select(r)).sum() for r in micro_batches)
    start = snapshot(trainer.model)
    assert_same_update(step_update(trainer, measured, micro_batches, start),
                       step_update(trainer, rollout, micro_batches, start))


def test_mask_truncated_completions_leaves_them_out_of_loss_and_normaliser(tmp_path, tiny_model_dir):
    trainer = sgd_trainer(tmp_path, tiny_model_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                          mask_truncated_completions=True)
    trainer._create_optimizer_and_scheduler(1)
    rollout, _ = trainer.generate_and_score(list(length_task(2)))
    rollout.is_eos = torch.tensor([True, False] * 4)  # pretend every other completion hit the length limit
    start = snapshot(trainer.model)
    metrics = trainer.training_step(rollout, [torch.arange(0, 4), torch.arange(4, 8)])
    masked = {n: p.detach() - start[n] for n, p in trainer.model.named_parameters()}
    # dapo: sum over the 4 terminated rows / their tokens, the same as training on those rows alone unmasked
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            param.copy_(start[name])
    trainer.args.mask_truncated_completions = False
    kept = rollout.select(torch.arange(0, 8, 2))
    trainer.training_step(kept, [torch.arange(0, 2), torch.arange(2, 4)])
    alone = {n: p.detach() - start[n] for n, p in trainer.model.named_parameters()}
    assert_same_update(masked, alone)

    trainer.args.mask_truncated_completions = True
    rollout.is_eos = torch.zeros(8, dtype=torch.bool)  # all truncated: nothing to learn from, and no NaN
    metrics = trainer.training_step(rollout, [torch.arange(0, 4), torch.arange(4, 8)])
    assert metrics["grad_norm"] == 0.0 and metrics["loss"] == 0.0


def test_loss_type_metrics(tmp_path, tiny_model_dir):
    trainer = sgd_trainer(tmp_path, tiny_model_dir, loss_type="cispo", epsilon_high=5.0, num_iterations=2,
                          max_steps=2)
    trainer.train()
    assert all("cispo_clip_ratio" in r and "clip_ratio/region_mean" not in r for r in trainer.state.log_history[:-1])
    trainer = sgd_trainer(tmp_path, tiny_model_dir, loss_type="sapo")
    trainer.train()
    assert "clip_ratio/region_mean" not in trainer.state.log_history[-2]


def test_normalize_then_sum_in_the_trainer(tmp_path, tiny_model_dir):
    def long(completions, **kwargs):
        return [float(len(c)) for c in completions]

    trainer = sgd_trainer(tmp_path, tiny_model_dir, reward=[reward_len, long], reward_weights=[1.0, 100.0],
                          multi_objective_aggregation="normalize_then_sum")
    rollout, _ = trainer.generate_and_score(list(length_task(2)))
    # the last step normalises over the round: mean 0 and (Bessel) std s / (s + 1e-4) ~ 1
    assert rollout.advantages.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert rollout.advantages.std().item() == pytest.approx(1.0, abs=1e-3)


def test_sync_ref_model_mixes_the_policy_into_the_reference(tmp_path, tiny_model_dir):
    trainer = sgd_trainer(tmp_path, tiny_model_dir, beta=0.1, sync_ref_model=True, ref_model_sync_steps=2,
                          ref_model_mixup_alpha=0.6, max_steps=2, learning_rate=1.0)
    ref_before = snapshot(trainer.ref_model)
    synced = []
    original = trainer._sync_ref_model
    trainer._sync_ref_model = lambda: (synced.append(trainer.state.global_step), original())[1]
    trainer.train()
    assert synced == [2]  # every ref_model_sync_steps optimizer steps
    policy = dict(trainer.model.named_parameters())
    for name, ref in trainer.ref_model.named_parameters():
        # ref <- 0.6 x policy + 0.4 x ref
        torch.testing.assert_close(ref.detach(), 0.6 * policy[name].detach() + 0.4 * ref_before[name])
    assert any(not torch.equal(ref_before[n], p) for n, p in trainer.ref_model.named_parameters())


# --- DAPO dynamic sampling ---------------------------------------------------------------------------------------

CONSTANT_PROMPTS = {"p0", "p2", "p4", "p6"}


def half_constant(prompts, completions, **kwargs):
    """Constant for prompts p0, p2, ...; for the others the G completions get 0, 1, 2, 3 (always a spread)."""
    return [1.0 if p in CONSTANT_PROMPTS else float(i % 4) for i, p in enumerate(prompts)]


def record_training_rows(trainer):
    seen = []
    original = trainer.training_step

    def training_step(rollout, micro_batches):
        seen.append([rollout.prompts[i] for i in torch.cat(micro_batches).tolist()])
        return original(rollout, micro_batches)

    trainer.training_step = training_step
    return seen


def test_dynamic_sampling_drops_flat_groups_and_refills_the_round(tmp_path, tiny_model_dir):
    # 4 prompts per round (16 rows), prompts in order p0..p7: the first round has 2 flat groups
    dataset = [{"prompt": f"p{i}"} for i in range(8)]
    trainer = sgd_trainer(tmp_path, tiny_model_dir, reward=half_constant, dataset=dataset, shuffle_dataset=False,
                          per_device_train_batch_size=16, dynamic_sampling=True, max_steps=2)
    seen = record_training_rows(trainer)
    trainer.train()
    for rows in seen:
        assert len(rows) == 16  # the round is full
        assert not CONSTANT_PROMPTS & set(rows)  # flat groups never reach the loss
    record = trainer.state.log_history[0]
    # round 1: p0..p3 keeps 2 groups, one extra generation p4..p7 keeps 2 more: 4 dropped, 1 extra
    assert record["dynamic_sampling/dropped_groups"] == 2 + 2
    assert record["dynamic_sampling/extra_rounds"] == 1


def test_dynamic_sampling_bound_then_fills_with_dropped_groups(tmp_path, tiny_model_dir):
    def constant(completions, **kwargs):
        return [1.0] * len(completions)

    generated = []
    trainer = sgd_trainer(tmp_path, tiny_model_dir, reward=constant, per_device_train_batch_size=8,
                          dynamic_sampling=True, max_dynamic_sampling_rounds=2)
    original = trainer.generate_and_score
    trainer.generate_and_score = lambda rows: (generated.append(len(rows)), original(rows))[1]
    seen = record_training_rows(trainer)
    with pytest.warns(UserWarning, match="same reward"):
        trainer.train()
    assert generated == [2, 2, 2]  # the first generation and at most 2 extra
    assert len(seen[0]) == 8  # topped up with dropped groups: the batch geometry is unchanged
    record = trainer.state.log_history[0]
    assert record["dynamic_sampling/extra_rounds"] == 2
    assert record["dynamic_sampling/dropped_groups"] == 6
    assert record["grad_norm"] == 0.0  # every advantage is 0


def test_num_iterations_two_stores_old_logps_once_and_moves_the_ratio(tmp_path, tiny_model_dir, monkeypatch):
    import grpo.algorithm as algorithm_module
    import grpo.trainer_rounds as trainer_module

    old_logp_passes, ratio_moves = [], []
    chunks, loss = trainer_module.completion_logps_in_chunks, algorithm_module.policy_loss

    def counting_chunks(*args, **kwargs):
        old_logp_passes.append(1)
        return chunks(*args, **kwargs)

    def recording_loss(loss_type, level, logps, old_logps, advantages, mask, params):
        ratio_moves.append(((logps.detach() - old_logps).abs() * mask).max().item())
        return loss(loss_type, level, logps, old_logps, advantages, mask, params)

    monkeypatch.setattr(trainer_module, "completion_logps_in_chunks", counting_chunks)
    monkeypatch.setattr(algorithm_module, "policy_loss", recording_loss)
    trainer = sgd_trainer(tmp_path, tiny_model_dir, num_iterations=2, max_steps=2, learning_rate=1.0)
    trainer.train()
    assert len(old_logp_passes) == 1  # one round, two optimizer steps: pi_old computed once (beta = 0: no ref)
    assert ratio_moves[0] < 1e-5  # first pass: the policy is still pi_old
    assert ratio_moves[1] > 1e-3  # second pass: the first step moved it


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_length_bucketing_leaves_the_update_unchanged(tmp_path, tiny_model_dir, loss_type):
    """An optimizer step's rows are grouped by prompt (so a micro-batch's forward computes the prompt once, see
    grpo.packing) and sorted by length within a group, groups by their longest row; the update must equal the one
    from the same rows in shuffled micro-batches, and the forwards must run on fewer tokens."""
    trainer = sgd_trainer(tmp_path, tiny_model_dir, gradient_accumulation_steps=4, per_device_train_batch_size=4,
                          loss_type=loss_type)
    trainer._create_optimizer_and_scheduler(1)
    rollout, _ = trainer.generate_and_score(list(length_task(4)))
    bucketed = trainer._optimizer_steps(rollout)[0]
    rows = torch.cat(bucketed)
    all_lengths = rollout.prompt_mask.sum(1) + rollout.completion_mask.sum(1)
    groups = rows // trainer.args.num_generations
    assert [len(set(m.tolist())) for m in groups.split(4)] == [1, 1, 1, 1]  # G = 4: one prompt a micro-batch
    for group in groups.unique():
        lengths = all_lengths[rows[groups == group]]
        assert torch.equal(lengths, lengths.sort().values)  # sorted within a group
    longest = [int(all_lengths[rows[groups == g]].max()) for g in groups.unique_consecutive()]
    assert longest == sorted(longest)  # groups by their longest row
    assert all_lengths.unique().numel() > 1  # the test needs uneven rows to mean anything
    shuffled = list(rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))].split(4))

    def forward_tokens(micro_batches):  # what each forward runs on: packed when rows share a prompt, else padded
        total = 0
        for m in micro_batches:
            batch = rollout.select(m)
            packed = pack_shared_prefixes(batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                          batch.completion_mask)
            total += packed.input_ids.numel() if packed is not None else batch.prompt_ids.numel() + \
                batch.completion_ids.numel()
        return total

    assert forward_tokens(bucketed) < forward_tokens(shuffled)
    start = snapshot(trainer.model)
    assert_same_update(step_update(trainer, rollout, bucketed, start), step_update(trainer, rollout, shuffled, start))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_a_token_budget_cuts_micro_batches_and_leaves_the_update_unchanged(tmp_path, tiny_model_dir, loss_type):
    """max_tokens_per_micro_batch bounds each forward's padded size; the step's update must not change."""
    trainer = sgd_trainer(tmp_path, tiny_model_dir, gradient_accumulation_steps=2, per_device_train_batch_size=8,
                          loss_type=loss_type)
    trainer._create_optimizer_and_scheduler(1)
    rollout, _ = trainer.generate_and_score(list(length_task(4)))
    whole = trainer._optimizer_steps(rollout)[0]
    lengths = rollout.prompt_mask.sum(1) + rollout.completion_mask.sum(1)
    budget = int(lengths.max()) * 3  # about three rows a forward
    trainer.args.max_tokens_per_micro_batch = budget
    cut = trainer._optimizer_steps(rollout)[0]
    assert len(whole) == 2 and len(cut) > len(whole)
    assert all(len(m) * int(lengths[m].max()) <= budget for m in cut)
    assert torch.equal(torch.cat(cut).sort().values, torch.cat(whole).sort().values)  # the same rows
    start = snapshot(trainer.model)
    assert_same_update(step_update(trainer, rollout, cut, start), step_update(trainer, rollout, whole, start))
