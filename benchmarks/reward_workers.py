"""Reward scoring in worker processes against the trainer's process: math-verify on one round of completions.

    python benchmarks/reward_workers.py [--completions 64] [--workers 1 2] [--repeats 5]

Scores one round (`--completions` completions of about 200 tokens, groups of 8, each ending in a \\boxed{} or
<answer> final answer checked against a `solution` column by `grpo.rewards.reasoning.math_accuracy_reward`) in
the trainer's process (reward_num_workers=0) and with each `--workers` count, the settings taking turns so that
drift in machine speed hits all alike. Each runner scores a round once before timing (worker processes start,
math-verify and sympy are imported). Prints the median seconds per round of each and the in-process time divided
by it (the speed-up). On a machine with fewer free cores than workers the speed-up is capped accordingly.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from grpo.rewards import RewardRunner, prepare_reward_funcs
from grpo.rewards.reasoning import math_accuracy_reward

GROUP_SIZE = 8
# (the reference answer, a few ways a model writes it or gets it wrong)
ANSWERS = [
    ("\\frac{1}{2}", ["\\frac{1}{2}", "0.5", "1/2", "\\frac{2}{4}", "\\frac{1}{3}"]),
    ("2\\sqrt{3}", ["2\\sqrt{3}", "\\sqrt{12}", "3.4641", "\\sqrt{3}"]),
    ("x^2 + 2x + 1", ["(x+1)^2", "x^2 + 2x + 1", "x^2 + 1", "(x+1)(x+1)"]),
    ("\\pi/4", ["\\frac{\\pi}{4}", "0.785398", "45", "\\pi/2"]),
    ("-7", ["-7", "7", "-\\frac{14}{2}", "-7.0"]),
    ("\\{1, 2, 3\\}", ["\\{1,2,3\\}", "\\{3,2,1\\}", "\\{1,2\\}", "1, 2, 3"]),
    ("\\frac{3}{8}", ["0.375", "\\frac{6}{16}", "\\frac{3}{7}", "3/8"]),
    ("e^{2}", ["e^2", "\\exp(2)", "7.389", "2e"]),
]
WORDS = ("first we simplify the expression then substitute the value and check the boundary case so the result "
         "follows from the identity above because both sides agree").split()


def round_of_completions(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`n` completions of about 200 tokens of reasoning and a final answer, and each one's reference solution."""
    rng = random.Random(seed)
    completions, solutions = [], []
    for i in range(n):
        solution, candidates = ANSWERS[(i // GROUP_SIZE) % len(ANSWERS)]
        reasoning = " ".join(rng.choice(WORDS) for _ in range(130)) + f" so $x = {rng.randint(2, 99)}$."
        answer = rng.choice(candidates)
        final = f"<answer>{answer}</answer>" if rng.random() < 0.5 else f"The answer is \\boxed{{{answer}}}."
        completions.append(f"<think>\n{reasoning}\n</think>\n{final}")
        solutions.append(solution)
    return completions, solutions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--completions", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()
    completions, solutions = round_of_completions(opts.completions)
    prompts, ids = ["Solve the problem."] * len(completions), [[0]] * len(completions)
    settings = {0: "in process", **{w: f"{w} worker{'s' if w > 1 else ''}" for w in opts.workers}}
    runners = {w: RewardRunner(prepare_reward_funcs([math_accuracy_reward]), num_workers=w) for w in settings}
    seconds: dict[int, list[float]] = {w: [] for w in settings}
    try:
        expected = None
        for repeat in range(opts.repeats + 1):
            for workers, runner in runners.items():
                start = time.perf_counter()
                rewards, _ = runner.score(prompts, completions, ids, {"solution": solutions}, group_size=GROUP_SIZE)
                if repeat > 0:  # the first round warms up
                    seconds[workers].append(time.perf_counter() - start)
                expected = rewards if expected is None else expected
                assert rewards.allclose(expected, equal_nan=True), f"{settings[workers]} scored differently"
    finally:
        for runner in runners.values():
            runner.close()
    medians = {w: statistics.median(times) for w, times in seconds.items()}
    print(f"math_accuracy_reward on {len(completions)} completions (about 200 tokens, mean reward "
          f"{expected.nanmean().item():.2f}), median of {opts.repeats} rounds; seconds per round (speed-up over "
          "in process): " + ", ".join(f"{settings[w]} {s:.3f} ({medians[0] / s:.2f}x)" for w, s in medians.items()))


if __name__ == "__main__":  # worker processes import this module: they must not run the benchmark
    main()
