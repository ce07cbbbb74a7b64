"""The math of GRPO as pure functions on tensors. Imports only torch.

Notation: N completions in a generation round, G completions per prompt (a group), T completion tokens,
F reward functions, m the completion mask (1 on real tokens), A the advantage, w the policy ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ADVANTAGE_EPS = 1e-4


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs: sqrt(sum (x - mean)^2 / (n - 1)).

    Over all elements when dim is None. NaN where fewer than two values are present.
    """
    if dim is None:
        x, dim = x.reshape(-1), 0
    present = ~torch.isnan(x)
    count = present.sum(dim=dim)
    centered = torch.where(present, x - torch.nanmean(x, dim=dim, keepdim=True), torch.zeros_like(x))
    var = (centered**2).sum(dim=dim) / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))


def combine_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over reward functions, skipping NaN ("not applicable"): r_i = sum_f w_f r_if.

    rewards_per_func: (N, F), NaN where a function returned None. A row where every function is NaN gives NaN.
    """
    weighted = rewards_per_func * weights.to(rewards_per_func.dtype).unsqueeze(0)
    total = torch.nansum(weighted, dim=1)
    all_nan = torch.isnan(rewards_per_func).all(dim=1)
    return torch.where(all_nan, torch.full_like(total, float("nan")), total)


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages: A_i = (r_i - mean_g r) / (std + 1e-4).

    rewards: (N,) with the G completions of a prompt in consecutive rows; NaN rows are left out of the
    group statistics and get A = 0. std is Bessel-corrected and taken per group ("group"), over the whole
    round ("batch"), or not used at all ("none": A_i = r_i - mean_g r, Dr. GRPO).
    Returns (advantages (N,), group_std (N/G,)), the latter for the `frac_reward_zero_std` metric.
    """
    grouped = rewards.view(-1, num_generations)
    group_mean = torch.nanmean(grouped, dim=1, keepdim=True)
    group_std = nanstd(grouped, dim=1)
    centered = grouped - group_mean
    if scale_rewards == "group":
        advantages = centered / (group_std.unsqueeze(1) + ADVANTAGE_EPS)
    elif scale_rewards == "batch":
        advantages = centered / (nanstd(rewards) + ADVANTAGE_EPS)
    elif scale_rewards == "none":
        advantages = centered
    else:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}")
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0), group_std


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_rows: int = 8) -> torch.Tensor:
    """log softmax(logits)[index] = logits[index] - logsumexp(logits), in float32, a few rows at a time.

    logits: (B, T, V); index: (B, T). Working row by row bounds the float32 copy to (chunk_rows, T, V).
    """
    out = []
    for rows, ids in zip(logits.split(chunk_rows), index.split(chunk_rows)):
        rows = rows.float()
        picked = rows.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(rows, dim=-1))
    return torch.cat(out)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, chunk_rows: int = 8) -> torch.Tensor:
    """Per-token entropy in nats, H = -sum_v p_v log p_v, chunked over rows like `selective_log_softmax`."""
    out = []
    for rows in logits.split(chunk_rows):
        logp = torch.log_softmax(rows.float(), dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per token: exp(d) - d - 1 with d = ref - logp.

    Non-negative, zero where the two policies agree, unbiased for the KL under samples from pi_theta.
    """
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


@dataclass
class ClippedSurrogate:
    per_token_loss: torch.Tensor  # (B, T)
    is_low_clipped: torch.Tensor  # (B, T) bool: w < 1 - eps_low and A < 0
    is_high_clipped: torch.Tensor  # (B, T) bool: w > 1 + eps_high and A > 0


def clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> ClippedSurrogate:
    """PPO's clipped surrogate per token: l_t = -min(w_t A, clip(w_t, 1 - eps_low, 1 + eps_high) A).

    w_t = exp(logp_t - logp_old_t). advantages: (B,), one per completion. When on-policy (old = logp.detach())
    w = 1 and the gradient is A * grad logp, REINFORCE with a group baseline.
    """
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1)
    per_token_loss = -torch.min(ratio * adv, clipped_ratio * adv)
    return ClippedSurrogate(
        per_token_loss=per_token_loss,
        is_low_clipped=(ratio < 1 - epsilon_low) & (adv < 0),
        is_high_clipped=(ratio > 1 + epsilon_high) & (adv > 0),
    )


@dataclass(frozen=True)
class StepCounts:
    """Counts over a whole optimizer step (all its micro-batches), fixed before its first micro-batch runs.

    Normalising by them makes the step's gradient independent of how its rows are split into micro-batches.
    """

    num_sequences: int
    num_tokens: int
    max_completion_length: int


def dapo_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, step: StepCounts) -> torch.Tensor:
    """DAPO token-level loss (arXiv 2503.14476, eq. 12): sum_{i,t in S} l_it m_it / sum_{i,t in S} m_it.

    S is the optimizer step; this call returns the share of its micro-batch.
    """
    return (per_token_loss * mask).sum() / max(step.num_tokens, 1)


def grpo_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, step: StepCounts) -> torch.Tensor:
    """Original GRPO (arXiv 2402.03300, eq. 3): (1/|S|) sum_i [ sum_t l_it m_it / sum_t m_it ].

    Each sequence's token mean, averaged over the sequences of the optimizer step S.
    """
    per_sequence = (per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_sequence.sum() / max(step.num_sequences, 1)


def dr_grpo_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, step: StepCounts) -> torch.Tensor:
    """Dr. GRPO (arXiv 2503.20783): sum_{i,t in S} l_it m_it / (|S| x max_completion_length).

    A constant normaliser, so long and short completions are not weighted differently.
    """
    return (per_token_loss * mask).sum() / max(step.num_sequences * step.max_completion_length, 1)


LossAggregator = Callable[[torch.Tensor, torch.Tensor, StepCounts], torch.Tensor]
LOSS_AGGREGATORS: dict[str, LossAggregator] = {"dapo": dapo_loss, "grpo": grpo_loss, "dr_grpo": dr_grpo_loss}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(values * mask) / sum(mask), NaN when the mask is empty."""
    total = mask.sum()
    if total == 0:
        return torch.tensor(float("nan"))
    return (values * mask).sum() / total
