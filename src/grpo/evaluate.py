"""Evaluation of a model on a prompt dataset: mean reward and pass@k over k sampled completions per prompt."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from grpo.algorithm import combine_rewards
from grpo.metrics import MetricsWindow
from grpo.rollout import Rollout


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, arXiv 2107.03374): 1 - C(n - c, k) / C(n, k).

    The probability that at least one of k completions drawn without replacement from the n sampled ones is
    correct, given that c of the n are.
    """
    if k > num_samples:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {num_samples}.")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


Score = Callable[[list[dict[str, Any]], int], tuple[Rollout, dict[str, float]]]
"""score(rows, G): sample G completions of each prompt row (a prompt's consecutive) and score them, as
`GRPOTrainer.generate_and_score` does with its model, generator and reward functions."""


def evaluate(score: Score, rows: list[dict[str, Any]], ks: list[int], pass_threshold: float, num_generations: int,
             reward_names: list[str], reward_weights: torch.Tensor, prompts_per_batch: int = 8,
             progress: bool = False) -> dict[str, Any]:
    """Sample `num_generations` completions per prompt and score them through `score`, `prompts_per_batch` prompts
    at a time; report the mean reward (weighted by `reward_weights`), each reward function's mean, and pass@k,
    where a completion counts as correct when its weighted reward is at least `pass_threshold`, with its standard
    error over prompts (`pass@k_stderr`), and `batch_metrics`, the mean over batches of the metrics `score` reports
    (NaN ignored). `progress`: a progress bar over the batches."""
    g = num_generations
    totals, per_func, correct, window = [], [], [], MetricsWindow()
    batches = range(0, len(rows), prompts_per_batch)
    for start in tqdm(batches, desc="evaluating", unit="batch", disable=not progress, dynamic_ncols=True):
        rollout, batch_metrics = score(rows[start:start + prompts_per_batch], g)
        window.add(batch_metrics)
        total = combine_rewards(rollout.rewards_per_func, reward_weights)
        totals.append(total)
        per_func.append(rollout.rewards_per_func)
        correct += (total.view(-1, g) >= pass_threshold).sum(1).tolist()
    total = torch.cat(totals)
    by_func = torch.cat(per_func)
    results: dict[str, Any] = {
        "num_prompts": len(rows),
        "num_generations": g,
        "mean_reward": torch.nanmean(total).item(),
        **{f"rewards/{name}/mean": torch.nanmean(by_func[:, i]).item() for i, name in enumerate(reward_names)},
        "pass_threshold": pass_threshold,
        "num_batches": len(batches),
        "batch_metrics": window.average(),
    }
    for k in ks:
        per_prompt = torch.tensor([pass_at_k(g, c, k) for c in correct], dtype=torch.float64)
        results[f"pass@{k}"] = per_prompt.mean().item()
        # how far the estimate could move with other prompts: the standard error of the mean over prompts
        results[f"pass@{k}_stderr"] = (per_prompt.std() / math.sqrt(len(correct))).item() if len(correct) > 1 else 0.0
    return results


def trainer_metrics(results: dict[str, Any], prefix: str, seconds: float, epoch: float) -> dict[str, Any]:
    """An `evaluate` run during training under TRL's names: <prefix>_loss, _runtime, _samples_per_second,
    _steps_per_second, every batch metric (<prefix>_reward, _rewards/<func>/mean, _completions/..., _entropy, ...),
    then grpo's <prefix>_pass@1, and the epoch."""
    batch_metrics = dict(results["batch_metrics"])
    metrics = {f"{prefix}_loss": batch_metrics.pop("loss", None), f"{prefix}_runtime": round(seconds, 4),
               f"{prefix}_samples_per_second": round(results["num_prompts"] * results["num_generations"] / seconds, 3),
               f"{prefix}_steps_per_second": round(results["num_batches"] / seconds, 3)}
    metrics |= {f"{prefix}_{name}": value for name, value in batch_metrics.items()}
    return metrics | {f"{prefix}_pass@1": results["pass@1"], "epoch": epoch}
