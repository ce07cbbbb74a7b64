"""Built-in tasks for the demo, the recipes and the tests: prompt sets generated offline from a seed, with their
reward functions.

Each task has a train and an eval split that never share a prompt (a prompt's split is fixed by a hash of its
text), so held-out evaluation means what it says whatever the number of prompts asked for.

- `length`, `arithmetic`: plain-text prompts for the embedded tiny model (`a+b=`, `Write about the sea:`).
- `chat_length`: the course's length task as chat messages, for instruct models.
- `word_problems`: arithmetic word problems with an `answers` column, scored by `problem_reward` (the course's
  verifiable-reward shape).
- `format`: the course's think/answer layout, shown once by a worked example earlier in the chat, scored by
  the strict and soft format rewards and a per-tag partial credit.
- `format_word_problems`: both at once, the answer read from the `<answer>` tag.
- `calculator_word_problems`: word problems after two worked examples that call a `calculator` tool, for
  training with `tools=[grpo.tools.calculator]` (docs/tools.md).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from grpo.rewards.builtin import accuracy_reward, length_reward, problem_reward
from grpo.rewards.reasoning import soft_format_reward, strict_format_reward, tag_count_reward

SPLITS = ("train", "eval")
TOPICS = [
    "the sea", "a cat", "rain", "the moon", "bread", "a train", "music", "a river", "snow", "the sun", "a book",
    "a tree", "coffee", "a bridge", "the wind", "a garden", "a clock", "the city", "a lamp", "stars",
]
# One worked example as an earlier turn of the chat: SmolLM2-135M-Instruct never writes the tags when only told
# to (0 of 64 samples with a system prompt alone), but copies an example's layout now and then (about 1 in 6
# writes a tag, 1 in 60 the whole layout): a start from which RL can learn the layout.
FORMAT_EXAMPLE = [
    {"role": "user", "content": "Tom has 2 pens. He buys 3 more. How many pens does Tom have now?"},
    {"role": "assistant", "content": "<think>\nTom starts with 2 pens and buys 3 more, so 2 + 3 = 5.\n</think>\n"
                                     "<answer>\n5\n</answer>"},
]




def _calculator_turns(expression: str, result: str, answer: str) -> list[dict[str, Any]]:
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
    return [{"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "calculator", "content": result}, {"role": "assistant", "content": answer}]


# SmolLM2-135M-Instruct, shown the calculator's schema, calls it in about 1 sample of 10 000; after these two
# worked examples, with the question asking for it, in about 1 of 9 (0.5 of 100 after the examples alone): a start
# from which RL can learn when the calculator pays.
CALCULATOR_INSTRUCTION = " Use the calculator tool to compute the answer."
CALCULATOR_EXAMPLES = [
    {"role": "user", "content": "Ana has 7 apples. She buys 5 more. How many apples does Ana have now?"
                                + CALCULATOR_INSTRUCTION},
    *_calculator_turns("7 + 5", "12", "Ana has 12 apples."),
    {"role": "user", "content": "There are 3 boxes with 4 books in each box. How many books are there in all?"
                                + CALCULATOR_INSTRUCTION},
    *_calculator_turns("3 * 4", "12", "There are 12 books."),
]


def _split_of(text: str) -> str:
    """'eval' for one prompt in five, by a hash of its text (stable across machines and Python runs)."""
    return "eval" if hashlib.sha256(text.encode()).digest()[0] % 5 == 0 else "train"


def _take(candidates: Iterator[dict[str, Any]], num_prompts: int, split: str) -> list[dict[str, Any]]:
    """The first `num_prompts` candidate rows whose prompt text falls in `split`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; the built-in tasks have {list(SPLITS)}.")
    rows: list[dict[str, Any]] = []
    for row in candidates:
        if _split_of(row["text"]) == split:
            rows.append(row)
            if len(rows) == num_prompts:
                return rows
    raise ValueError(f"this task has fewer than {num_prompts} distinct {split} prompts; ask for fewer.")


def _chat(text: str, example: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return [*(example or []), {"role": "user", "content": text}]


def _topics(rng: random.Random) -> Iterator[dict[str, Any]]:
    while True:  # repeats are fine: the course's length task has few distinct prompts too
        yield {"text": f"Write about {rng.choice(TOPICS)}:"}


def length_task(num_prompts: int = 64, seed: int = 0, conversational: bool = False, split: str = "train"
                ) -> Dataset:
    """The Hugging Face course's task: any prompt, reward -|20 - len(completion)|."""
    rows = _take(_topics(random.Random(seed)), num_prompts, split)
    if conversational:
        return Dataset.from_dict({"prompt": [_chat(r["text"]) for r in rows]})
    return Dataset.from_dict({"prompt": [r["text"] for r in rows]})


def chat_length_task(num_prompts: int = 64, seed: int = 0, split: str = "train") -> Dataset:
    """The length task with chat prompts, for instruct models."""
    return length_task(num_prompts, seed, conversational=True, split=split)


def arithmetic_task(num_prompts: int = 64, seed: int = 0, max_operand: int = 9, split: str = "train") -> Dataset:
    """A verifiable task: "a+b=" with the sum in the `answer` column; the reward needs the right answer."""
    rng = random.Random(seed)

    def sums() -> Iterator[dict[str, Any]]:
        while True:
            a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
            yield {"text": f"{a}+{b}=", "answer": str(a + b)}

    rows = _take(sums(), num_prompts, split)
    return Dataset.from_dict({"prompt": [r["text"] for r in rows], "answer": [r["answer"] for r in rows]})


# (question template, operation); a subtraction's first number is never the smaller one
WORD_PROBLEMS: list[tuple[str, str]] = [
    ("{name} has {a} {things}. {pronoun} buys {b} more. How many {things} does {name} have now?", "+"),
    ("{name} had {a} {things} and gave {b} of them away. How many {things} does {name} have left?", "-"),
    ("There are {a} boxes with {b} {things} in each box. How many {things} are there in all?", "*"),
    ("{name} picks {a} {things} in the morning and {b} in the afternoon. How many {things} did {name} pick?", "+"),
    ("A shelf holds {a} {things}. {b} are taken off. How many {things} are still on the shelf?", "-"),
    ("{name} buys {a} bags of {things} with {b} in each bag. How many {things} is that?", "*"),
]
OPERATIONS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                                    "*": lambda a, b: a * b}
NAMES = [("Sam", "He"), ("Ana", "She"), ("Leo", "He"), ("Mia", "She"), ("Omar", "He"), ("Zoe", "She"),
         ("Ravi", "He"), ("Lena", "She")]
THINGS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "coins"]


def _word_problems(rng: random.Random) -> Iterator[dict[str, Any]]:
    seen: set[str] = set()
    while True:
        template, operation = rng.choice(WORD_PROBLEMS)
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        if operation == "-":
            a, b = max(a, b), min(a, b)
        name, pronoun = rng.choice(NAMES)
        text = template.format(name=name, pronoun=pronoun, things=rng.choice(THINGS), a=a, b=b)
        if text not in seen:  # every problem once, so train and eval prompts are distinct problems
            seen.add(text)
            yield {"text": text, "answers": str(OPERATIONS[operation](a, b))}


def word_problems_task(num_prompts: int = 64, seed: int = 0, split: str = "train",
                       example: list[dict[str, Any]] | None = None, instruction: str = "") -> Dataset:
    """Arithmetic word problems (one operation on two numbers from 2 to 12) as chat prompts, with the answer in
    an `answers` column, as in the course's `problem_reward` example."""
    rows = _take(_word_problems(random.Random(seed)), num_prompts, split)
    return Dataset.from_dict({"prompt": [_chat(r["text"] + instruction, example) for r in rows],
                              "answers": [r["answers"] for r in rows]})


def format_task(num_prompts: int = 64, seed: int = 0, split: str = "train") -> Dataset:
    """Word problems after one worked example in the <think>/<answer> layout (FORMAT_EXAMPLE)."""
    return word_problems_task(num_prompts, seed, split, example=FORMAT_EXAMPLE)


def calculator_task(num_prompts: int = 64, seed: int = 0, split: str = "train") -> Dataset:
    """Word problems after two worked examples that call the calculator (CALCULATOR_EXAMPLES)."""
    return word_problems_task(num_prompts, seed, split, example=CALCULATOR_EXAMPLES,
                              instruction=CALCULATOR_INSTRUCTION)


@dataclass(frozen=True)
class Task:
    """A prompt set and the rewards that score it. `make(num_prompts, seed=..., split=...)` builds the set."""

    make: Callable[..., Dataset]
    reward_funcs: list[Callable[..., Any]]
    reward_weights: list[float] | None = None
    chat: bool = False  # conversational prompts: for models with a chat template


TASKS: dict[str, Task] = {
    "length": Task(length_task, [length_reward]),
    "arithmetic": Task(arithmetic_task, [accuracy_reward]),
    "chat_length": Task(chat_length_task, [length_reward], chat=True),
    "word_problems": Task(word_problems_task, [problem_reward], chat=True),
    # tag_count: partial credit per tag, the graded signal a small model needs before it ever writes the layout
    "format": Task(format_task, [tag_count_reward, soft_format_reward, strict_format_reward], [0.5, 0.5, 0.5],
                   chat=True),
    "format_word_problems": Task(format_task, [tag_count_reward, soft_format_reward, strict_format_reward,
                                               problem_reward], [0.25, 0.25, 0.25, 1.0], chat=True),
    "calculator_word_problems": Task(calculator_task, [problem_reward], chat=True),
}
