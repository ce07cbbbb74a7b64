"""What a failed reward call says: the problem (which function, what happened, on which completions) and the
fix. The runner raises it under reward_error="raise" and prints the problem alone under "none"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from grpo.rewards.calls import CallOutcome

CONTRACT_REMINDER = (
    "and keyword arguments prompts, completions, completion_ids, trainer_state, log_metric, log_extra and one per "
    "dataset column; accept **kwargs for the ones you don't use, and return None for a completion the function "
    "cannot score."
)


@dataclass
class Failure:
    error_type: type[Exception]
    problem: str
    fix: str = ""
    traceback: str = ""  # the worker's, which no exception chain carries back

    def error(self) -> Exception:
        trace = f"\nIts traceback in the worker process:\n{self.traceback}" if self.traceback else ""
        return self.error_type(f"{self.problem} {self.fix}".rstrip() + trace)


def describe(name: str, outcome: CallOutcome, completions: list[Any], start: int, stop: int, where: str,
             timeout: float | None) -> Failure:
    """The failure of one call of `name` on completions[start:stop]; `where` is "worker", "thread", "async" or
    "here" (the trainer's process, its own thread)."""
    n, rows = len(completions), stop - start
    in_worker = f" in a worker process (completions {start}-{stop - 1} of {n})" if where == "worker" else ""
    if outcome.failure == "timeout":
        how = {"worker": "its worker process was killed and replaced", "async": "the coroutine was cancelled",
               "thread": "the call was abandoned in a background thread, where it may still run"}[where]
        return Failure(
            TimeoutError,
            f"reward function '{name}' was stopped after {outcome.seconds:.1f} s{in_worker} on {rows} completions: "
            f"{outcome.error.removeprefix('TimeoutError: ')}; {how}.",
            "Make it faster or raise GRPOConfig.reward_timeout, or set reward_error='none' to score such calls None "
            "instead of stopping the run.",
        )
    if outcome.failure == "died":
        return Failure(
            RuntimeError,
            f"reward function '{name}' failed{in_worker}: {outcome.error} (a crash in native code, os._exit or "
            "sys.exit); a new worker process replaces it.",
            "Run with reward_num_workers=0 to see the crash in the trainer's process, or set reward_error='none' to "
            "score such calls None.",
        )
    if outcome.failing_row is not None:
        row = start + outcome.failing_row
        shown = f"it fails on completion {row}: {repr(completions[row])[:200]}"
    else:
        shown = f"the first: {repr(completions[start])[:200]}" if rows else "none"
    fix = CONTRACT_REMINDER
    if where == "thread" and "signal" in outcome.error and "thread" in outcome.error:
        fix += (" With reward_timeout set, an in-process call runs in a helper thread, where signal-based code (such "
                "as math-verify's own time limits) cannot run: set reward_num_workers >= 1 to run it in the main "
                "thread of a worker process.")
    return Failure(
        RuntimeError,
        f"reward function '{name}' raised {outcome.error}{in_worker}.",
        f"It was called with {rows} completions ({shown}) {fix}",
        outcome.traceback if where == "worker" else "",
    )
