"""Reward functions: the calling contract, how a round is scored (time limit, error policy, worker processes),
remote rewards over HTTP, and the built-in rewards."""

from grpo.rewards.builtin import accuracy_reward, completion_text, length_reward, overlong_penalty
from grpo.rewards.contract import RewardFunction, RewardModel, prepare_reward_funcs
from grpo.rewards.remote import RemoteReward
from grpo.rewards.runner import RewardRunner, compute_rewards
from grpo.rewards.sandbox import (
    Isolation,
    SandboxLimits,
    SandboxResult,
    code_execution_reward,
    detect_isolation,
    extract_code,
    make_code_execution_reward,
    run_sandboxed,
)

__all__ = [
    "Isolation", "RemoteReward", "RewardFunction", "RewardModel", "RewardRunner", "SandboxLimits", "SandboxResult",
    "accuracy_reward", "code_execution_reward", "completion_text", "compute_rewards", "detect_isolation",
    "extract_code", "length_reward", "make_code_execution_reward", "overlong_penalty", "prepare_reward_funcs",
    "run_sandboxed",
]
