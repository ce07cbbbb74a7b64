"""Reward functions: the calling contract and the built-in rewards."""

from grpo.rewards.builtin import accuracy_reward, completion_text, length_reward, overlong_penalty
from grpo.rewards.contract import RewardFunction, RewardModel, compute_rewards, prepare_reward_funcs

__all__ = [
    "RewardFunction", "RewardModel", "accuracy_reward", "completion_text", "compute_rewards", "length_reward",
    "overlong_penalty", "prepare_reward_funcs",
]
