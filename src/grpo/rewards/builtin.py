"""Built-in reward functions. Each follows the reward contract: f(completions, **kwargs) -> list[float | None]."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """The text of a completion: a plain string, or the last message's content in conversational form."""
    if isinstance(completion, str):
        return completion
    return str(completion[-1]["content"]) if completion else ""


def length_reward(completions: list[Any], target_length: int = 20, **kwargs: Any) -> list[float]:
    """The course's length reward: -|target_length - len(completion)| (0 at exactly 20 characters)."""
    return [-abs(target_length - len(completion_text(c))) for c in completions]


def accuracy_reward(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float | None]:
    """1.0 when the first number in the completion equals the `answer` column, else 0.0.

    Rows whose answer is None are not applicable and return None.
    """
    rewards: list[float | None] = []
    for completion, expected in zip(completions, answer):
        if expected is None:
            rewards.append(None)
            continue
        found = _NUMBER.search(completion_text(completion))
        rewards.append(1.0 if found and _same_number(found.group(), str(expected)) else 0.0)
    return rewards


def problem_reward(completions: list[Any], answers: list[Any], **kwargs: Any) -> list[float | None]:
    """The course's verifiable reward for problems with an `answers` column: 1.0 when the completion's final
    answer equals it, else 0.0. The final answer is the last number inside the last <answer>...</answer> if
    there is one, else the last number of the completion (a worked answer ends with its result). Rows whose
    answer is None are not applicable and return None."""
    rewards: list[float | None] = []
    for completion, expected in zip(completions, answers):
        if expected is None:
            rewards.append(None)
            continue
        text = completion_text(completion)
        tagged = ANSWER_TAG.findall(text)
        numbers = _NUMBER.findall(tagged[-1] if tagged else text)
        rewards.append(1.0 if numbers and _same_number(numbers[-1], str(expected)) else 0.0)
    return rewards


def overlong_penalty(max_completion_len: int, soft_punish_cache: int) -> Callable[..., list[float]]:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13) as a reward function, by completion length |y|:

        0                               if |y| <= L_max - L_cache
        (L_max - L_cache - |y|) / L_cache   if L_max - L_cache < |y| <= L_max   (from 0 down to -1)
        -1                              if |y| > L_max

    L_max = max_completion_len, L_cache = soft_punish_cache; |y| counts completion tokens (`completion_ids`).
    Add it to the task's reward functions; set L_max to max_completion_length.
    """
    if not isinstance(max_completion_len, int) or max_completion_len < 1:
        raise ValueError(f"overlong_penalty: max_completion_len must be a positive integer, got {max_completion_len!r}")
    if not isinstance(soft_punish_cache, int) or not 0 <= soft_punish_cache <= max_completion_len:
        raise ValueError(f"overlong_penalty: soft_punish_cache must be an integer in [0, max_completion_len="
                         f"{max_completion_len}], got {soft_punish_cache!r}")
    safe_length = max_completion_len - soft_punish_cache

    def overlong_reward(completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        rewards = []
        for ids in completion_ids:
            length = len(ids)
            if length <= safe_length:
                rewards.append(0.0)
            elif length <= max_completion_len:
                rewards.append((safe_length - length) / soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards

    return overlong_reward


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip() == b.strip()
