"""The math of GRPO as pure functions on tensors. Imports only torch.

Notation: N completions in a generation round, G completions per prompt (a group), T completion tokens,
F reward functions, m the completion mask (1 on real tokens), A the advantage, w the policy ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

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
    A group whose rewards are all equal gets A = 0 exactly (its float mean can differ from the rewards in the
    last bit), so the trainer can tell the rows that carry no signal (`skip_zero_advantage_rows`).
    Returns (advantages (N,), group_std (N/G,)), the latter for the `frac_reward_zero_std` metric.
    """
    grouped = rewards.view(-1, num_generations)
    group_mean = torch.nanmean(grouped, dim=1, keepdim=True)
    group_std = nanstd(grouped, dim=1)
    centered = torch.where(all_equal_groups(rewards, num_generations).unsqueeze(1), 0.0, grouped - group_mean)
    if scale_rewards == "group":
        advantages = centered / (group_std.unsqueeze(1) + ADVANTAGE_EPS)
    elif scale_rewards == "batch":
        advantages = centered / (nanstd(rewards) + ADVANTAGE_EPS)
    elif scale_rewards == "none":
        advantages = centered
    else:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}")
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0), group_std


def sum_then_normalize(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int, scale_rewards: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's multi-reward advantage: r = sum_f w_f r_f (NaN-skipping), then `group_advantages`."""
    return group_advantages(combine_rewards(rewards_per_func, weights), num_generations, scale_rewards)


def normalize_then_sum(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int, scale_rewards: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """GDPO (arXiv 2601.05242): normalise each reward within its group, sum, then normalise over the round.

    a_if = (r_if - mean_g r_f) / (std_g r_f + 1e-4);  s_i = sum_f w_f a_if (NaN-skipping);
    A_i = (s_i - mean s) / (std s + 1e-4) over the whole round. `scale_rewards` is ignored, as in TRL, so a
    reward with a large range cannot drown the others. Returns (advantages, group std of sum_f w_f r_f), the
    latter for `frac_reward_zero_std`.
    """
    grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.size(1))  # (N/G, G, F)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = nanstd(grouped, dim=1).unsqueeze(1)
    normalised = ((grouped - mean) / (std + ADVANTAGE_EPS)).reshape(rewards_per_func.shape)
    summed = combine_rewards(normalised, weights)
    advantages = (summed - torch.nanmean(summed)) / (nanstd(summed) + ADVANTAGE_EPS)
    group_std = nanstd(combine_rewards(rewards_per_func, weights).view(-1, num_generations), dim=1)
    return torch.nan_to_num(advantages, nan=0.0), group_std


AdvantageFn = Callable[[torch.Tensor, torch.Tensor, int, str], tuple[torch.Tensor, torch.Tensor]]
MULTI_OBJECTIVE_AGGREGATIONS: dict[str, AdvantageFn] = {
    "sum_then_normalize": sum_then_normalize, "normalize_then_sum": normalize_then_sum,
}


def all_equal_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(N/G,) bool: groups whose present rewards are all equal (or absent), so every advantage in them is 0.

    DAPO's dynamic sampling (arXiv 2503.14476, eq. 11) drops these groups: they carry no gradient signal.
    """
    grouped = rewards.view(-1, num_generations)
    spread = torch.nan_to_num(grouped.nan_to_num(-torch.inf).amax(1) - grouped.nan_to_num(torch.inf).amin(1))
    return ~(spread > 0)


def entropy_threshold(entropies: torch.Tensor, rho: float) -> torch.Tensor:
    """The (1 - rho) quantile of the given token entropies (80/20 rule, arXiv 2506.01939).

    Only tokens with entropy >= it ("forking tokens", the top rho fraction) keep their policy loss.
    torch.quantile's linear interpolation, as TRL. entropies: the 1-D entropies of the active tokens.
    """
    if entropies.numel() == 0:
        return torch.tensor(-torch.inf)
    return torch.quantile(entropies.float(), 1 - rho)


def mix_into(target: list[torch.Tensor], source: list[torch.Tensor], alpha: float) -> None:
    """TR-DPO reference update (arXiv 2404.09656): ref <- alpha * policy + (1 - alpha) * ref, in place."""
    with torch.no_grad():
        for ref, policy in zip(target, source):
            ref.mul_(1 - alpha).add_(policy.to(ref.dtype), alpha=alpha)


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


def entropy_from_logits(logits: torch.Tensor, chunk_rows: int = 8) -> torch.Tensor:
    """Per-token entropy in nats, H = -sum_v p_v log p_v, chunked over rows like `selective_log_softmax`.

    Differentiable (the entropy bonus needs it); pass detached logits when only the value is wanted."""
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


@dataclass(frozen=True)
class ObjectiveParams:
    """The scalars a per-token policy loss reads (GRPOConfig's names)."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0


@dataclass
class PolicyLoss:
    """A per-token policy loss and its clip indicators, every tensor broadcast to (B, T)."""

    per_token_loss: torch.Tensor  # (B, T)
    is_low_clipped: torch.Tensor  # (B, T) bool: w < 1 - eps_low and A < 0
    is_high_clipped: torch.Tensor  # (B, T) bool: w > 1 + eps_high and A > 0
    is_cispo_clipped: torch.Tensor | None = None  # (B, T) bool, cispo only: w > eps_high and A > 0
    phi: torch.Tensor | None = None  # (B, 1), vespo only: each sequence's gamma weight
    ratio: torch.Tensor | None = None  # (B, T) or (B, 1): exp of the importance_sampling_level's log weight


def token_log_weights(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level importance weight (PPO, GRPO): log w_t = logp_t - logp_old_t, shape (B, T)."""
    return logps - old_logps


def sequence_log_weights(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO sequence-level weight (arXiv 2507.18071): log w_i = sum_t m_t (logp_t - old_t) / |y_i|.

    The length-normalised sequence likelihood ratio, shape (B, 1); every token of a sequence shares it, and its
    gradient reaches every token. An empty row (|y_i| = 0) gets log w = 0.
    """
    return ((logps - old_logps) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)


LogWeights = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
IMPORTANCE_SAMPLING_LEVELS: dict[str, LogWeights] = {"token": token_log_weights, "sequence": sequence_log_weights}


def clipped_loss(
    log_weights: torch.Tensor, logps: torch.Tensor, advantages: torch.Tensor, params: ObjectiveParams
) -> PolicyLoss:
    """PPO's clipped surrogate (GRPO, arXiv 2402.03300 eq. 3): l = -min(w A, clip(w, 1 - eps_low, 1 + eps_high) A).

    With `delta` (INTELLECT-2's two-sided clip, arXiv 2505.07291) the unclipped branch uses min(w, delta), so
    a negative advantage cannot push a large ratio without bound; as in TRL the cap is applied after the
    clipped ratio is formed. Clip-higher (DAPO, arXiv 2503.14476) is eps_high > eps_low.
    """
    ratio = torch.exp(log_weights)
    clipped_ratio = torch.clamp(ratio, 1 - params.epsilon_low, 1 + params.epsilon_high)
    capped_ratio = ratio if params.delta is None else torch.clamp(ratio, max=params.delta)
    adv = advantages.unsqueeze(1)
    per_token_loss = -torch.min(capped_ratio * adv, clipped_ratio * adv)
    shape = logps.shape
    return PolicyLoss(
        per_token_loss=per_token_loss.expand(shape),
        is_low_clipped=((ratio < 1 - params.epsilon_low) & (adv < 0)).expand(shape),
        is_high_clipped=((ratio > 1 + params.epsilon_high) & (adv > 0)).expand(shape),
    )


def cispo_loss(
    log_weights: torch.Tensor, logps: torch.Tensor, advantages: torch.Tensor, params: ObjectiveParams
) -> PolicyLoss:
    """CISPO (MiniMax-M1, arXiv 2506.13585): l_t = -sg(min(w_t, eps_high)) A logp_t.

    The importance weight is capped and detached, so no token's gradient is dropped (unlike the PPO clip);
    only its size is bounded. `epsilon_high` is the cap eps_max here (ScaleRL uses 5.0).
    """
    ratio = torch.exp(log_weights)
    weight = torch.clamp(ratio, max=params.epsilon_high).detach()
    adv = advantages.unsqueeze(1)
    shape = logps.shape
    no_clip = torch.zeros(shape, dtype=torch.bool, device=logps.device)
    return PolicyLoss(
        per_token_loss=-weight * adv * logps,
        is_low_clipped=no_clip,
        is_high_clipped=no_clip,
        is_cispo_clipped=((ratio > params.epsilon_high) & (adv > 0)).expand(shape),
    )


def sapo_loss(
    log_weights: torch.Tensor, logps: torch.Tensor, advantages: torch.Tensor, params: ObjectiveParams
) -> PolicyLoss:
    """SAPO (Soft Adaptive Policy Optimization, arXiv 2511.20347): l = -(4 / tau) sigmoid(tau (w - 1)) A.

    A soft gate instead of the hard clip: at w = 1 its slope in w is exactly 1 (the plain policy gradient) and
    it decays smoothly away from 1. tau = sapo_temperature_pos where A > 0, sapo_temperature_neg otherwise.
    """
    ratio = torch.exp(log_weights)
    adv = advantages.unsqueeze(1)
    tau = torch.where(adv > 0, params.sapo_temperature_pos, params.sapo_temperature_neg).to(ratio.dtype)
    per_token_loss = -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * adv
    shape = logps.shape
    no_clip = torch.zeros(shape, dtype=torch.bool, device=logps.device)
    return PolicyLoss(per_token_loss=per_token_loss.expand(shape), is_low_clipped=no_clip, is_high_clipped=no_clip)


def vespo_log_weights(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """VESPO's sequence weight, in log space, shape (B, 1) (the sum, not GSPO's mean, of the token log ratios):

        log w_i = clamp( sum_t m_it clamp(logp_it - old_it, -20, 20), log 1e-8, 20 )
    """
    log_ratio = torch.clamp(logps - old_logps, -20.0, 20.0)
    return torch.clamp((log_ratio * mask).sum(-1, keepdim=True), math.log(1e-8), 20.0)


def vespo_loss(
    log_weights: torch.Tensor, logps: torch.Tensor, advantages: torch.Tensor, params: ObjectiveParams
) -> PolicyLoss:
    """VESPO (arXiv 2602.10693): l_it = -sg(phi(w_i)) A_i logp_it with the gamma weight

        phi(w) = e^lambda w^k e^(-lambda w) = exp(lambda + k log w - lambda w),   phi(1) = 1,

    (k, lambda) = (vespo_k_pos, vespo_lambda_pos) where A >= 0, (vespo_k_neg, vespo_lambda_neg) where A < 0,
    lambda at least 1e-4; w from `vespo_log_weights`. phi is detached (a weight on the policy gradient) and 0
    where it overflows, as in TRL.
    """
    adv = advantages.unsqueeze(1)
    positive = adv >= 0
    k = torch.where(positive, params.vespo_k_pos, params.vespo_k_neg).to(log_weights.dtype)
    lam = torch.where(positive, params.vespo_lambda_pos, params.vespo_lambda_neg).to(log_weights.dtype).clamp(min=1e-4)
    log_weights = log_weights.detach()
    phi = torch.exp(lam + k * log_weights - lam * torch.exp(log_weights)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    no_clip = torch.zeros(logps.shape, dtype=torch.bool, device=logps.device)
    return PolicyLoss(per_token_loss=-phi * adv * logps, is_low_clipped=no_clip, is_high_clipped=no_clip, phi=phi)


def clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> PolicyLoss:
    """Token-level `clipped_loss` from log-probs: w_t = exp(logp_t - logp_old_t), advantages (B,).

    When on-policy (old = logp.detach()) w = 1 and the gradient is A * grad logp, REINFORCE with a group baseline.
    """
    params = ObjectiveParams(epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    return clipped_loss(logps - old_logps, logps, advantages, params)


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


def bnpo_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, step: StepCounts) -> torch.Tensor:
    """BNPO-style token mean: sum_{i,t in S} l_it m_it / sum_{i,t in S} m_it.

    TRL's bnpo is the token mean of each micro-batch divided by the accumulation steps, so its scale depends on
    the split. Its split-free, step-level equivalent is the token mean over the optimizer step, which is exactly
    `dapo_loss` here (in TRL the two differ only in the scope of the token count).
    """
    return dapo_loss(per_token_loss, mask, step)


def luspo_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, step: StepCounts) -> torch.Tensor:
    """LUSPO (arXiv 2602.05261): (1/|S|) sum_i [ sum_t l_it m_it ].

    Each sequence's loss scaled by its length (for a sequence-level loss l_i: l_i x |y_i|), averaged over the
    sequences of the optimizer step S (TRL: the micro-batch mean divided by gradient_accumulation_steps, the
    same thing when every micro-batch has the same number of rows). The paper pairs it with GSPO's sequence
    ratio, removing GSPO's bias toward short completions.
    """
    return (per_token_loss * mask).sum() / max(step.num_sequences, 1)


LossAggregator = Callable[[torch.Tensor, torch.Tensor, StepCounts], torch.Tensor]
# The three distinct token normalisers, by the paper that introduced them.
LOSS_AGGREGATORS: dict[str, LossAggregator] = {"dapo": dapo_loss, "grpo": grpo_loss, "dr_grpo": dr_grpo_loss}

PolicyLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ObjectiveParams], PolicyLoss]


@dataclass(frozen=True)
class Objective:
    """What a `loss_type` selects: the per-token policy loss, how it is aggregated over the step, and, for a loss
    with a weight of its own (vespo), the log weight it reads instead of importance_sampling_level's."""

    policy_loss: PolicyLossFn
    aggregate: LossAggregator
    log_weights: LogWeights | None = None


# loss_type -> objective (TRL's names, reference section 3.7).
OBJECTIVES: dict[str, Objective] = {
    "grpo": Objective(clipped_loss, grpo_loss),
    "bnpo": Objective(clipped_loss, bnpo_loss),
    "dr_grpo": Objective(clipped_loss, dr_grpo_loss),
    "dapo": Objective(clipped_loss, dapo_loss),
    "luspo": Objective(clipped_loss, luspo_loss),
    "cispo": Objective(cispo_loss, dapo_loss),
    "sapo": Objective(sapo_loss, grpo_loss),
    "vespo": Objective(vespo_loss, dapo_loss, log_weights=vespo_log_weights),
}


def policy_loss(
    loss_type: str,
    importance_sampling_level: str,
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    params: ObjectiveParams,
) -> PolicyLoss:
    """The per-token loss of `loss_type` at `importance_sampling_level` ("token" or "sequence", GSPO); its `ratio`
    is that level's w, which also weights a bias-corrected KL."""
    objective = OBJECTIVES[loss_type]
    log_weights = IMPORTANCE_SAMPLING_LEVELS[importance_sampling_level](logps, old_logps, mask)
    own = log_weights if objective.log_weights is None else objective.log_weights(logps, old_logps, mask)
    result = objective.policy_loss(own, logps, advantages, params)
    result.ratio = torch.exp(log_weights)
    return result


def off_policy_mask(advantages: torch.Tensor, logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor,
                    threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, eq. 9), shape (B, 1): 0 drops a sequence.

        keep_i = 1[A_i >= 0  or  sum_t m_it (logp_old_it - logp_it) / sum_t m_it <= threshold]

    The mean token KL(pi_old || pi_theta) estimate of a sequence, with logp detached: only sequences with a negative
    advantage that drifted too far from the policy that sampled them leave the policy loss.
    """
    kl = ((old_logps - logps.detach()) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return ((advantages.unsqueeze(1) >= 0) | (kl <= threshold)).to(mask.dtype)


def adaptive_entropy_coef(coef: float, entropy: float, target: float, delta: float, low: float, high: float
                          ) -> float:
    """Skywork-OR1's entropy controller (arXiv 2505.22312), once per optimizer step:

        c <- clip(c + delta, low, high)  if H <= target,   clip(c - delta, low, high)  otherwise

    H is the step's mean token entropy. The bonus itself applies only while the last step's H <= target
    (`applied_entropy_coef`), so c can grow while entropy is low and fades once it has recovered.
    """
    return min(coef + delta, high) if entropy <= target else max(coef - delta, low)


def applied_entropy_coef(coef: float, last_entropy: float, target: float) -> float:
    """The coefficient the adaptive controller applies this step: c where the last step's H <= target, else 0
    (before any step, H = inf: no bonus)."""
    return coef if last_entropy <= target else 0.0


@dataclass(frozen=True)
class LossSettings:
    """What the loss reads from GRPOConfig besides the data: the objective and the weights of its extra terms."""

    loss_type: str  # the per-token loss and its aggregation (OBJECTIVES)
    importance_sampling_level: str  # "token" or "sequence" (IMPORTANCE_SAMPLING_LEVELS)
    params: ObjectiveParams
    beta: float = 0.0  # KL coefficient
    entropy_coef: float = 0.0  # entropy bonus coefficient, as applied this step
    entropy_bonus: bool = False  # whether the run has an entropy bonus (adaptive: even while its coefficient is 0)
    bias_correction_kl: bool = False  # the k3 term times the policy ratio (DeepSeek-V3.2's unbiased KL)
    off_policy_mask_threshold: float | None = None  # DeepSeek-V3.2's sequence mask (None: off)
    router_aux_loss_coef: float = 0.0  # MoE load-balancing loss weight

    @property
    def zero_advantage_is_silent(self) -> bool:
        """Whether a row with A = 0, or with no token in the loss mask, adds exactly 0 to the loss, its gradient
        and every statistic but the entropy (and 0 to the per-sequence clip fractions): true of every policy loss
        here, which is A times a weight, unless a term without A is on (the KL, the entropy bonus, the MoE router
        loss) or, for vespo, phi(w) is summed over every sequence."""
        return (self.beta == 0 and not self.entropy_bonus and self.entropy_coef == 0 and not self.router_aux_loss_coef
                and self.loss_type != "vespo")


@dataclass
class LossStats:
    """What a micro-batch's loss reports, summed over its tokens in the mask m; `a + b` adds two micro-batches'
    (the two per-sequence extremes take their min and max instead).

    `loss` is the value backpropagated, `policy_loss` the same before the entropy bonus and the MoE term.
    """

    loss: float = 0.0
    policy_loss: float = 0.0
    entropy: float = 0.0  # sum_t m_t H_t
    kl: float = 0.0  # sum_t m_t k3_t (times the ratio when bias-corrected; 0 when beta = 0)
    low_clipped: float = 0.0  # tokens with w < 1 - eps_low and A < 0
    high_clipped: float = 0.0  # tokens with w > 1 + eps_high and A > 0
    cispo_clipped: float = 0.0  # cispo: tokens whose weight was capped
    phi: float = 0.0  # vespo: sum_i phi_i over sequences
    aux_loss: float = 0.0  # MoE: the router loss, weighted by each micro-batch's share of the step's sequences
    low_clipped_min: float = math.inf  # the smallest per-sequence fraction of low-clipped tokens
    high_clipped_max: float = 0.0  # the largest per-sequence fraction of high-clipped tokens

    EXTREMES = ("low_clipped_min", "high_clipped_max")

    def __add__(self, other: LossStats) -> LossStats:
        total = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        total["low_clipped_min"] = min(self.low_clipped_min, other.low_clipped_min)
        total["high_clipped_max"] = max(self.high_clipped_max, other.high_clipped_max)
        return LossStats(**total)

    def step_metrics(self, step: StepCounts, settings: LossSettings) -> dict[str, float]:
        """TRL's logged names for a whole step's stats: token means over the step's tokens, clip ratios for the loss
        types that clip, `policy_loss` only with an entropy bonus, `kl` only when beta > 0, `aux_loss` for MoE."""
        tokens = max(step.num_tokens, 1)
        metrics = {"entropy": self.entropy / tokens}
        if settings.entropy_bonus or settings.entropy_coef > 0:
            metrics["policy_loss"] = self.policy_loss
        if settings.loss_type == "cispo":
            metrics["cispo_clip_ratio"] = self.cispo_clipped / tokens
        elif settings.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"] = self.phi / max(step.num_sequences, 1)
        elif settings.loss_type != "sapo":
            low, high = self.low_clipped / tokens, self.high_clipped / tokens
            metrics.update({"clip_ratio/low_mean": low, "clip_ratio/high_mean": high,
                            "clip_ratio/region_mean": low + high,
                            "clip_ratio/low_min": 0.0 if math.isinf(self.low_clipped_min) else self.low_clipped_min,
                            "clip_ratio/high_max": self.high_clipped_max})
        if settings.beta > 0:
            metrics["kl"] = self.kl / tokens
        if settings.router_aux_loss_coef:
            metrics["aux_loss"] = self.aux_loss
        return metrics


def micro_batch_loss(
    logps: torch.Tensor,
    entropy: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    step: StepCounts,
    settings: LossSettings,
    entropy_mask: torch.Tensor | None = None,
    aux_loss: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """A micro-batch's share of the loss of its optimizer step S, and its statistics:

        L = agg_S( o_i e_t l_t + beta r_t k3_t, m ) - c sum_t m_t H_t / sum_{S} m + alpha aux B / N_S

    l_t is the per-token loss of `loss_type` at `importance_sampling_level`, from w = exp(logp - logp_old)
    (old_logps None: on-policy, logp_old = logp.detach(), so w = 1); o the off-policy sequence mask
    (`off_policy_mask`, all ones when off); e the entropy mask (1 on the tokens at or above the step's entropy
    quantile, all ones without one; the KL term stays on every token, as in TRL); k3 = exp(d) - d - 1 with
    d = logp_ref - logp (`kl_k3`), times r = w when bias-corrected (r = 1 otherwise: w's value is 1 on-policy, its
    gradient is not); agg_S the loss type's aggregation, normalised by the counts of the whole step
    (`StepCounts`); H the token entropy and c = entropy_coef, a token mean over S; aux the model's MoE router loss
    (`aux_loss`, alpha = router_aux_loss_coef), weighted by the micro-batch's B of the step's N_S sequences.
    Every term is normalised over S, so the micro-batches' losses add up to the step's whatever the split.
    Shapes: (B, T) but advantages (B,).
    """
    if old_logps is None:
        old_logps = logps.detach()
    result = policy_loss(settings.loss_type, settings.importance_sampling_level, logps, old_logps, advantages, mask,
                         settings.params)
    per_token_loss = result.per_token_loss
    if settings.off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_mask(advantages, logps, old_logps, mask,
                                                          settings.off_policy_mask_threshold)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    kl_sum = 0.0
    if settings.beta > 0:
        kl = kl_k3(logps, ref_logps)
        if settings.bias_correction_kl:
            kl = kl * result.ratio
        per_token_loss = per_token_loss + settings.beta * kl
        kl_sum = (kl.detach() * mask).sum().item()
    loss = OBJECTIVES[settings.loss_type].aggregate(per_token_loss, mask, step)
    before_bonus = loss.item()
    entropy_sum = (entropy * mask).sum()
    if settings.entropy_coef > 0:
        loss = loss - settings.entropy_coef * entropy_sum / max(step.num_tokens, 1)
    aux_share = 0.0
    if aux_loss is not None and settings.router_aux_loss_coef:
        weighted_aux = aux_loss * len(mask) / max(step.num_sequences, 1)
        loss = loss + settings.router_aux_loss_coef * weighted_aux
        aux_share = weighted_aux.item()
    low_per_sequence, high_per_sequence = (_per_sequence(flags, mask)
                                           for flags in (result.is_low_clipped, result.is_high_clipped))
    stats = LossStats(
        loss=loss.item(), policy_loss=before_bonus, entropy=entropy_sum.item(), kl=kl_sum,
        low_clipped=_count(result.is_low_clipped, mask), high_clipped=_count(result.is_high_clipped, mask),
        cispo_clipped=0.0 if result.is_cispo_clipped is None else _count(result.is_cispo_clipped, mask),
        phi=0.0 if result.phi is None else result.phi.sum().item(), aux_loss=aux_share,
        low_clipped_min=low_per_sequence.min().item() if len(mask) else math.inf,
        high_clipped_max=high_per_sequence.max().item() if len(mask) else 0.0,
    )
    return loss, stats


def _per_sequence(flags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's fraction of flagged tokens: sum_t m_t 1[flag_t] / sum_t m_t (0 for an empty sequence)."""
    return (flags.float() * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def _count(flags: torch.Tensor, mask: torch.Tensor) -> float:
    """How many tokens in the mask are flagged: sum_t m_t 1[flag_t]."""
    return (flags.float() * mask).sum().item()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(values * mask) / sum(mask), NaN when the mask is empty."""
    total = mask.sum()
    if total == 0:
        return torch.tensor(float("nan"))
    return (values * mask).sum() / total
