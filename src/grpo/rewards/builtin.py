"""Built-in reward functions. Each follows the reward contract: f(completions, **kwargs) -> list[float | None]."""

from __future__ import annotations

import re
from typing import Any

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


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


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip() == b.strip()
