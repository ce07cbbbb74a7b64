"""Built-in tasks for the demo and the tests: small prompt datasets with their reward functions."""

from __future__ import annotations

import random
from typing import Any

from datasets import Dataset

from grpo.rewards.builtin import accuracy_reward, length_reward

TOPICS = [
    "the sea", "a cat", "rain", "the moon", "bread", "a train", "music", "a river", "snow", "the sun", "a book",
    "a tree", "coffee", "a bridge", "the wind", "a garden", "a clock", "the city", "a lamp", "stars",
]


def length_task(num_prompts: int = 64, seed: int = 0, conversational: bool = False) -> Dataset:
    """The Hugging Face course's task: any prompt, reward -|20 - len(completion)|."""
    rng = random.Random(seed)
    prompts = [f"Write about {rng.choice(TOPICS)}:" for _ in range(num_prompts)]
    if conversational:
        return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    return Dataset.from_dict({"prompt": prompts})


def arithmetic_task(num_prompts: int = 64, seed: int = 0, max_operand: int = 9) -> Dataset:
    """A verifiable task: "a+b=" with the sum in the `answer` column; the reward needs the right answer."""
    rng = random.Random(seed)
    rows: dict[str, list[Any]] = {"prompt": [], "answer": []}
    for _ in range(num_prompts):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows["prompt"].append(f"{a}+{b}=")
        rows["answer"].append(str(a + b))
    return Dataset.from_dict(rows)


TASKS = {
    "length": (length_task, [length_reward]),
    "arithmetic": (arithmetic_task, [accuracy_reward]),
}
