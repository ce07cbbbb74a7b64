"""Rewards for reasoning tasks, as in the Hugging Face course and open-r1: a think/answer format reward (strict
and soft) and a math accuracy reward that checks the final answer with `math-verify` (an extra:
`pip install 'grpo[math]'`)."""

from __future__ import annotations

import re
import threading
from typing import Any

from grpo.rewards.builtin import ANSWER_TAG, completion_text

# The course's patterns: the strict one wants the exact layout with newlines, the soft one only the tag order.
STRICT_FORMAT = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>\n?$", re.DOTALL)
SOFT_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def strict_format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 when the completion is exactly "<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>", else 0.0."""
    return [1.0 if STRICT_FORMAT.match(completion_text(c)) else 0.0 for c in completions]


def soft_format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 when a <think>...</think> block is followed by an <answer>...</answer> block anywhere, else 0.0."""
    return [1.0 if SOFT_FORMAT.search(completion_text(c)) else 0.0 for c in completions]


THINK_ANSWER_TAGS = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")


def tag_count_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """Partial credit on the way to the strict layout: 0.25 for each of "<think>\\n", "\\n</think>\\n",
    "\\n<answer>\\n" and "\\n</answer>" that occurs exactly once. A small model that never writes the whole
    layout unprompted still gets a graded signal from each tag it does write (the format rewards are 0 for it)."""
    return [0.25 * sum(completion_text(c).count(tag) == 1 for tag in THINK_ANSWER_TAGS) for c in completions]


def extract_final_answer(text: str) -> str | None:
    """The content of the last <answer>...</answer>, else of the last \\boxed{...} (braces matched), else None."""
    tagged = ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1].strip()
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i].strip()
            depth -= 1
    return None


def math_accuracy_reward(completions: list[Any], solution: list[Any] | None = None,
                         answer: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """1.0 when the completion's final answer equals the reference mathematically (math-verify: 1/2 == 0.5 ==
    \\frac{1}{2}), 0.0 when it differs or has no <answer>/\\boxed{} answer, None when the reference itself
    cannot be parsed (the row is skipped rather than punished). The reference comes from a `solution` or an
    `answer` column."""
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ImportError("math_accuracy_reward needs math-verify: pip install 'grpo[math]'") from e
    references = solution if solution is not None else answer
    if references is None:
        raise ValueError("math_accuracy_reward needs a 'solution' or 'answer' column in the dataset.")
    # math-verify's own time limits use SIGALRM, which only the main thread may set; elsewhere (an in-process call
    # under GRPOConfig.reward_timeout runs in a helper thread) they are off and reward_timeout is the limit
    in_main_thread = threading.current_thread() is threading.main_thread()
    parse_limit = {} if in_main_thread else {"parsing_timeout": None}
    verify_limit = {} if in_main_thread else {"timeout_seconds": None}
    rewards: list[float | None] = []
    for completion, reference in zip(completions, references):
        reference = str(reference)
        # math-verify reads LaTeX only inside delimiters: wrap a bare reference that uses LaTeX commands (words
        # wrapped in $...$ would parse as a product of symbols, so plain text stays unparsable -> None)
        bare_latex = "\\" in reference and "$" not in reference and "\\boxed" not in reference
        gold = parse(f"${reference}$", **parse_limit) if bare_latex else parse(reference, **parse_limit)
        if not gold:
            rewards.append(None)
            continue
        predicted = extract_final_answer(completion_text(completion))
        if predicted is None:
            rewards.append(0.0)
            continue
        answer = parse(f"\\boxed{{{predicted}}}", **parse_limit) or parse(predicted, **parse_limit)
        rewards.append(1.0 if verify(gold, answer, **verify_limit) else 0.0)
    return rewards
