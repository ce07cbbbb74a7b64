"""The loss terms of TRL 1.16 beyond the GRPO family (issue 17), by hand-worked numbers: VESPO's gamma weight,
DeepSeek-V3.2's off-policy sequence mask and bias-corrected KL, Skywork-OR1's adaptive entropy coefficient, the
MoE router loss, the per-sequence clip extremes; then each through the trainer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from grpo import GRPOConfig, GRPOTrainer
from grpo.algorithm import (
    LossSettings,
    LossStats,
    ObjectiveParams,
    StepCounts,
    adaptive_entropy_coef,
    applied_entropy_coef,
    micro_batch_loss,
    off_policy_mask,
    policy_loss,
    vespo_log_weights,
)
from grpo.embedded import length_task

LN2 = math.log(2)
# Two completions: row 0 (A = +1) two tokens, log-probs log 0.5 and log 0.25; row 1 (A = -1) one token, log 0.5.
# Padding carries wild values that must never matter.
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
ADVANTAGES = torch.tensor([1.0, -1.0], dtype=torch.float64)
LOGPS = [[math.log(0.5), math.log(0.25), -7.0], [math.log(0.5), -9.0, -9.0]]
STEP = StepCounts(num_sequences=2, num_tokens=3, max_completion_length=3)


def leaf_logps_and_old(ratios):
    """Leaf log-probs LOGPS and old log-probs with exp(logp - old) = ratios."""
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    old = torch.tensor(LOGPS, dtype=torch.float64) - torch.log(torch.tensor(ratios, dtype=torch.float64))
    return logps, old


def loss_and_grads(settings, ratios=None, ref_shift=None, aux_loss=None):
    """micro_batch_loss of the batch; `ratios` None: on-policy. Returns (loss, stats, d loss / d logp masked)."""
    logps, old = leaf_logps_and_old(ratios or [[1.0] * 3] * 2)
    ref = None if ref_shift is None else torch.tensor(LOGPS, dtype=torch.float64) + ref_shift
    loss, stats = micro_batch_loss(logps, torch.zeros_like(logps), None if ratios is None else old, ref, ADVANTAGES,
                                   MASK, STEP, settings, aux_loss=aux_loss)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.item(), stats, [grad[0, 0].item(), grad[0, 1].item(), grad[1, 0].item()]


# --- VESPO ----------------------------------------------------------------------------------------------------


def test_vespo_weight_is_the_clamped_sum_of_token_log_ratios():
    logps, old = leaf_logps_and_old([[2.0, 1.0, 99.0], [0.5, 99.0, 99.0]])  # padding ratios are masked out
    assert vespo_log_weights(logps, old, MASK).squeeze(1).tolist() == pytest.approx([LN2, -LN2])
    far = torch.tensor([[30.0, 30.0, 0.0], [-30.0, 0.0, 0.0]], dtype=torch.float64)  # token log ratios
    # each token clamped to [-20, 20], then the sum to [log 1e-8, 20]
    assert vespo_log_weights(far, torch.zeros_like(far), MASK).squeeze(1).tolist() == pytest.approx(
        [20.0, math.log(1e-8)])


def test_vespo_loss_hand_values():
    """phi(w) = exp(lambda + k log w - lambda w), detached; l = -phi A logp, token mean over the step.
    Row 0: w = 2 (token ratios 2, 1), A > 0, k = 2, lambda = 3: phi = e^3 4 e^-6 = 4 e^-3.
    Row 1: w = 0.5, A < 0, k = 3, lambda = 2: phi = e^2 0.125 e^-1 = e / 8."""
    phi0, phi1 = 4 * math.exp(-3), math.e / 8
    settings = LossSettings("vespo", "token", ObjectiveParams())
    loss, stats, grads = loss_and_grads(settings, ratios=[[2.0, 1.0, 5.0], [0.5, 5.0, 5.0]])
    expected = (-phi0 * (math.log(0.5) + math.log(0.25)) + phi1 * math.log(0.5)) / 3
    assert loss == pytest.approx(expected)
    assert grads == pytest.approx([-phi0 / 3, -phi0 / 3, phi1 / 3])  # phi is a weight: no gradient through it
    metrics = stats.step_metrics(STEP, settings)
    assert metrics["vespo/phi_seq_mean"] == pytest.approx((phi0 + phi1) / 2)
    assert "clip_ratio/low_mean" not in metrics
    # on-policy w = 1: phi = 1 for either sign, the plain policy gradient -A / tokens
    loss, stats, grads = loss_and_grads(settings)
    assert grads == pytest.approx([-1 / 3, -1 / 3, 1 / 3])
    assert stats.phi == pytest.approx(2.0)


def test_vespo_weight_vanishes_far_off_policy_instead_of_overflowing():
    logps, old = leaf_logps_and_old([[1e9, 1e9, 1.0], [1e-9, 1.0, 1.0]])
    result = policy_loss("vespo", "token", logps, old, ADVANTAGES, MASK, ObjectiveParams())
    assert torch.isfinite(result.per_token_loss).all()
    # w = e^20 (clamped): phi underflows to 0; w = 1e-8 (clamped): phi = e^(2 + 3 log 1e-8) ~ 7e-24
    assert result.phi.squeeze(1).tolist() == pytest.approx([0.0, math.exp(2 + 3 * math.log(1e-8))])


# --- DeepSeek-V3.2: off-policy sequence mask and bias-corrected KL ---------------------------------------------


def test_off_policy_mask_drops_only_negative_sequences_that_drifted():
    """keep_i = 1[A_i >= 0 or mean_t (old - logp) <= threshold]. Row 0 (A > 0) drifted by log 4 a token and stays;
    row 1 (A < 0, ratio 0.5: mean KL estimate log 2 = 0.693) goes at threshold 0.5, stays at 0.7."""
    logps, old = leaf_logps_and_old([[0.25, 0.25, 9.0], [0.5, 9.0, 9.0]])
    assert off_policy_mask(ADVANTAGES, logps, old, MASK, 0.5).squeeze(1).tolist() == [1.0, 0.0]
    assert off_policy_mask(ADVANTAGES, logps, old, MASK, 0.7).squeeze(1).tolist() == [1.0, 1.0]


def test_off_policy_mask_removes_the_sequence_from_the_policy_loss_but_not_the_normaliser():
    settings = LossSettings("dapo", "token", ObjectiveParams(), off_policy_mask_threshold=0.5)
    # ratios 1.1, 1.1 | 0.9 (inside the clip): losses -1.1, -1.1 | 0.9; row 1 (KL estimate -log 0.9 = 0.105) stays
    loss, _, _ = loss_and_grads(settings, ratios=[[1.1, 1.1, 1.0], [0.9, 1.0, 1.0]])
    assert loss == pytest.approx((-2.2 + 0.9) / 3)
    # row 1 at ratio 0.5 (clipped to 0.8, loss 0.8) drifted by log 2 > 0.5: dropped, still 3 tokens in the mean
    loss, _, grads = loss_and_grads(settings, ratios=[[1.1, 1.1, 1.0], [0.5, 1.0, 1.0]])
    assert loss == pytest.approx(-2.2 / 3)
    assert grads[2] == 0.0


def test_bias_corrected_kl_multiplies_k3_by_the_ratio():
    """ref = logp + log 2: k3 = exp(log 2) - log 2 - 1 = 1 - log 2 per token, d k3 / d logp = 1 - e^d = -1.
    Corrected, the term is w k3 with d(w k3)/d logp = w (dk3/dlogp + k3): on-policy (w = 1) -log 2, not -1."""
    k3 = 1 - LN2
    plain = LossSettings("dapo", "token", ObjectiveParams(), beta=0.1)
    corrected = LossSettings("dapo", "token", ObjectiveParams(), beta=0.1, bias_correction_kl=True)
    loss, stats, grads = loss_and_grads(plain, ref_shift=LN2)
    # on-policy policy loss -A per token: -1, -1, +1, plus beta k3 on each of the 3 tokens, over 3 tokens
    assert loss == pytest.approx((-1 + 0.3 * k3) / 3) and stats.kl == pytest.approx(3 * k3)
    assert grads == pytest.approx([(-1 - 0.1) / 3, (-1 - 0.1) / 3, (1 - 0.1) / 3])
    loss, stats, grads = loss_and_grads(corrected, ref_shift=LN2)
    assert loss == pytest.approx((-1 + 0.3 * k3) / 3)  # w = 1: the same value ...
    assert grads == pytest.approx([(-1 - 0.1 * LN2) / 3, (-1 - 0.1 * LN2) / 3, (1 - 0.1 * LN2) / 3])  # ... not grad
    # off-policy, ratio 1.1 on every token: the logged kl is the corrected one, w k3
    _, stats, _ = loss_and_grads(corrected, ratios=[[1.1, 1.1, 1.0], [1.1, 1.0, 1.0]], ref_shift=LN2)
    assert stats.kl == pytest.approx(3 * 1.1 * k3)


# --- Skywork-OR1: adaptive entropy coefficient -----------------------------------------------------------------


def test_adaptive_entropy_coefficient_hand_values():
    # c += delta while H <= target, c -= delta above it, within [low, high]
    assert adaptive_entropy_coef(0.1, entropy=0.15, target=0.2, delta=0.005, low=0.0, high=1.0) == pytest.approx(0.105)
    assert adaptive_entropy_coef(0.1, entropy=0.20, target=0.2, delta=0.005, low=0.0, high=1.0) == pytest.approx(0.105)
    assert adaptive_entropy_coef(0.1, entropy=0.25, target=0.2, delta=0.005, low=0.0, high=1.0) == pytest.approx(0.095)
    assert adaptive_entropy_coef(0.999, 0.1, 0.2, 0.005, 0.0, 1.0) == 1.0
    assert adaptive_entropy_coef(0.002, 0.3, 0.2, 0.005, 0.0, 1.0) == 0.0
    # the bonus applies only while the last step's entropy was at or below the target (none before a first step)
    assert applied_entropy_coef(0.1, last_entropy=math.inf, target=0.2) == 0.0
    assert applied_entropy_coef(0.1, last_entropy=0.2, target=0.2) == 0.1
    assert applied_entropy_coef(0.1, last_entropy=0.3, target=0.2) == 0.0


# --- the MoE router loss and the per-sequence clip extremes ------------------------------------------------------


def test_router_loss_is_weighted_by_the_micro_batch_share_of_the_step():
    """L += alpha aux B / N_S: this micro-batch holds 2 of the step's 4 sequences."""
    step = StepCounts(num_sequences=4, num_tokens=3, max_completion_length=3)
    settings = LossSettings("dapo", "token", ObjectiveParams(), router_aux_loss_coef=0.01)
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    aux = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss, stats = micro_batch_loss(logps, torch.zeros_like(logps), None, None, ADVANTAGES, MASK, step, settings,
                                   aux_loss=aux)
    assert loss.item() == pytest.approx((-1 - 1 + 1) / 3 + 0.01 * 2.0 * 2 / 4)
    assert torch.autograd.grad(loss, aux)[0].item() == pytest.approx(0.01 * 2 / 4)
    assert stats.aux_loss == pytest.approx(1.0)  # two such micro-batches add up to the step's mean aux loss
    assert stats.step_metrics(step, settings)["aux_loss"] == pytest.approx(1.0)


def test_clip_extremes_over_sequences_combine_by_min_and_max():
    a = LossStats(low_clipped_min=0.5, high_clipped_max=0.25, low_clipped=1.0)
    b = LossStats(low_clipped_min=0.0, high_clipped_max=1.0, low_clipped=2.0)
    total = a + b
    assert (total.low_clipped_min, total.high_clipped_max, total.low_clipped) == (0.0, 1.0, 3.0)


# --- through the trainer -------------------------------------------------------------------------------------------


def reward_len(completions, **kwargs):
    return [-abs(20 - len(c)) for c in completions]


def run(tmp_path, model_dir, **overrides) -> GRPOTrainer:
    settings = dict(output_dir=str(tmp_path / "run"), save_strategy="no", overwrite_output_dir=True,
                    num_generations=4, per_device_train_batch_size=8, max_completion_length=12, max_steps=2,
                    logging_steps=1, learning_rate=1e-3, gradient_checkpointing=False, disable_tqdm=True)
    settings.update(overrides)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward_len, args=GRPOConfig(**settings),
                          train_dataset=length_task(8))
    trainer.train()
    return trainer


def test_adaptive_entropy_in_training_and_its_state_in_checkpoints(tmp_path, tiny_model_dir):
    """Target 50 nats (far above the tiny model's entropy): the coefficient grows by delta each step, and the bonus
    starts at the second step (the first has no earlier entropy). The controller's state is in the checkpoint."""
    trainer = run(tmp_path, tiny_model_dir, max_steps=3, use_adaptive_entropy=True, entropy_coef=0.01,
                  entropy_coef_delta=0.02, entropy_target=50.0, save_strategy="steps", save_steps=3)
    steps = trainer.state.log_history[:-1]
    assert [r["entropy_coef"] for r in steps] == pytest.approx([0.03, 0.05, 0.07])
    assert steps[0]["loss"] == pytest.approx(steps[0]["policy_loss"])  # no bonus yet
    assert steps[1]["loss"] == pytest.approx(steps[1]["policy_loss"] - 0.03 * steps[1]["entropy"], rel=1e-4)
    saved = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    assert saved["entropy_control"]["coef"] == pytest.approx(0.07)


@pytest.mark.parametrize("settings, metric", [
    (dict(loss_type="vespo", num_iterations=2), "vespo/phi_seq_mean"),
    (dict(off_policy_mask_threshold=0.5, num_iterations=2), "clip_ratio/low_min"),
    (dict(beta=0.1, use_bias_correction_kl=True), "kl"),
])
def test_new_objectives_train(tmp_path, tiny_model_dir, settings, metric):
    records = run(tmp_path, tiny_model_dir, **settings).state.log_history[:-1]
    assert all(metric in r and math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
