"""The course's format rewards and the math accuracy reward (math-verify)."""

from __future__ import annotations

import pytest

from grpo.rewards.reasoning import (
    extract_final_answer,
    math_accuracy_reward,
    soft_format_reward,
    strict_format_reward,
)

GOOD = "<think>\n2 and 2 make 4\n</think>\n<answer>\n4\n</answer>\n"


@pytest.mark.parametrize("text, strict, soft", [
    (GOOD, 1.0, 1.0),
    ("<think>2+2</think> <answer>4</answer>", 0.0, 1.0),  # no newlines: only the soft pattern holds
    ("<answer>4</answer><think>late</think>", 0.0, 0.0),  # wrong order
    ("4", 0.0, 0.0),
    ("Sure! " + GOOD, 0.0, 1.0),  # text before the think block
])
def test_format_rewards(text, strict, soft):
    assert strict_format_reward([text]) == [strict]
    assert soft_format_reward([text]) == [soft]
    conversational = [[{"role": "assistant", "content": text}]]
    assert strict_format_reward(conversational) == [strict] and soft_format_reward(conversational) == [soft]


@pytest.mark.parametrize("text, expected", [
    ("<answer> 7 </answer>", "7"),
    ("first <answer>1</answer> then <answer>2</answer>", "2"),
    ("so \\boxed{\\frac{1}{2}} is it", "\\frac{1}{2}"),
    ("\\boxed{a} and finally \\boxed{{b}}", "{b}"),
    ("no answer here", None),
    ("\\boxed{unclosed", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_math_accuracy_reward_checks_values_not_strings():
    completions = ["<answer>0.5</answer>", "so \\boxed{\\frac{1}{2}}", "<answer>1/3</answer>", "I think 0.5",
                   "<answer>4</answer>"]
    solutions = ["$\\frac{1}{2}$", "0.5", "$\\frac{1}{2}$", "$\\frac{1}{2}$", "not math at all ???"]
    rewards = math_accuracy_reward(completions, solution=solutions)
    assert rewards[:4] == [1.0, 1.0, 0.0, 0.0]  # the last has no <answer>/boxed answer to check
    assert rewards[4] is None  # an unparsable reference skips the row instead of punishing it
    assert math_accuracy_reward(["<answer>12</answer>"], answer=["12"]) == [1.0]
    with pytest.raises(ValueError, match="'solution' or 'answer' column"):
        math_accuracy_reward(["<answer>1</answer>"])


@pytest.mark.parametrize("completion, reference, expected", [
    # fractions
    ("<answer>\\frac{1}{2}</answer>", "0.5", 1.0),
    ("<answer>1/2</answer>", "$\\frac{1}{2}$", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("<answer>\\frac{2}{4}</answer>", "\\frac{1}{2}", 1.0),
    ("<answer>0.333</answer>", "\\frac{1}{3}", 0.0),  # a rounded decimal is not the fraction
    # LaTeX forms
    ("<answer>\\sqrt{4}</answer>", "2", 1.0),
    ("<answer>2\\pi</answer>", "2\\pi", 1.0),
    ("<answer>6.28</answer>", "$2\\pi$", 0.0),
    ("<answer>x = 3</answer>", "3", 1.0),
    ("<answer>(1, 2)</answer>", "$(1,2)$", 1.0),
    ("<answer>50\\%</answer>", "0.5", 1.0),
    # units and formatting
    ("<answer>5 cm</answer>", "5", 1.0),
    ("\\boxed{5\\text{ cm}}", "5", 1.0),
    ("<answer>1,000</answer>", "1000", 1.0),
    ("<answer>-3</answer>", "3", 0.0),
])
def test_math_accuracy_on_tricky_answers(completion, reference, expected):
    assert math_accuracy_reward([completion], solution=[reference]) == [expected]


def test_math_accuracy_runs_under_reward_timeout_in_a_helper_thread():
    """math-verify's own time limits need the main thread; under reward_timeout an in-process call has another."""
    from grpo.rewards import RewardRunner, prepare_reward_funcs

    runner = RewardRunner(prepare_reward_funcs([math_accuracy_reward]), timeout=60)
    completions = ["<answer>1/2</answer>", "\\boxed{3}", "no answer"]
    rewards, _ = runner.score(["q"] * 3, completions, [[1]] * 3, {"solution": ["0.5", "3", "2"]})
    assert rewards[:, 0].tolist() == [1.0, 1.0, 0.0]
