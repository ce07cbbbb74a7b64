"""Reward functions: the calling contract and the built-in rewards."""

from grpo.rewards.builtin import accuracy_reward, completion_text, length_reward
from grpo.rewards.contract import RewardFunction, RewardModel, compute_rewards, prepare_reward_funcs

__all__ = [
    "RewardFunction", "RewardModel", "accuracy_reward", "completion_text", "compute_rewards", "length_reward",
    "prepare_reward_funcs",
]
