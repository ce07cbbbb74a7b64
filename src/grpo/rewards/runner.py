"""Scoring a round: every reward function called once, under the time limit, the error policy and the pool.

Where each function runs: async functions concurrently on a private event loop; reward models and environments'
`get_reward` in the trainer's process; other synchronous functions in the trainer's process too, or, with
`num_workers` > 0, in worker processes (without the `environments` argument, whose instances stay here), each
function's completions cut into that many chunks of whole groups. The coroutines are started first and run while
the pool works and then the in-process calls run, one after another.

A failed call (an exception, a timeout, a dead worker, or a return value `validate_rewards` refuses) stops the run
with an error that names the function under `on_error="raise"`; under `on_error="none"` its completions score None
(so they count in no weighted sum, and a completion no function scored gets advantage 0), the error is printed and
`rewards/<func>/errors` counts the completions of the round it failed on. Rows, not calls: how many calls a round
takes depends on num_workers, how many completions lost a reward does not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from grpo.background_loop import background_loop
from grpo.metrics import say as print_line
from grpo.rewards.calls import CallOutcome, StillRunningNotice, call_async, call_in_thread, call_reward
from grpo.rewards.contract import RewardFunction, RewardModel, validate_rewards
from grpo.rewards.failures import Failure, describe
from grpo.rewards.pool import Task, WorkerPool, check_picklable

# A piece of one function's scores: completions [start, stop) and the call that scored them (None: not run).
Piece = tuple[int, int, CallOutcome | None]


class RewardLogs:
    """TRL's `log_metric(name, value)` and `log_extra(column, values)`, handed to every reward function: scalar
    metrics, averaged over a round's calls and logged with its metrics, and extra columns of the completions table
    (completions.jsonl). A function in a worker process or behind a URL gets neither: its calls happen elsewhere."""

    def __init__(self) -> None:
        self.metrics: dict[str, list[float]] = defaultdict(list)
        self.extra: dict[str, list[Any]] = defaultdict(list)

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name].append(float(value))

    def log_extra(self, column: str, values: list[Any]) -> None:
        self.extra[column].extend(values)

    def take(self, n: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """(each metric's mean, one dict of extra columns per completion) logged since the last take; a column
        with a value per completion is kept, any other is dropped with a notice."""
        metrics = {name: sum(values) / len(values) for name, values in self.metrics.items()}
        rows: list[dict[str, Any]] = [{} for _ in range(n)]
        for column, values in self.extra.items():
            if len(values) != n:
                print_line(f"grpo: log_extra('{column}', ...) got {len(values)} values for {n} completions this "
                           "round; the column is left out of the completions table.")
                continue
            for row, value in zip(rows, values):
                row[column] = value
        self.metrics.clear()
        self.extra.clear()
        return metrics, rows


class RewardRunner:
    """Calls a run's reward functions on each round: `score` returns the (N, F) rewards and the error counts."""

    def __init__(self, reward_funcs: list[RewardFunction], timeout: float | None = None, on_error: str = "raise",
                 num_workers: int = 0, say: Callable[[str], None] = print_line):
        self.reward_funcs, self.timeout, self.on_error, self.say = reward_funcs, timeout, on_error, say
        self.pooled = [i for i, r in enumerate(reward_funcs) if num_workers > 0 and not r.is_async
                       and not isinstance(r.func, RewardModel) and not getattr(r.func, "runs_in_process", False)]
        for i in self.pooled:  # before the run starts, not at its first round
            check_picklable(reward_funcs[i].name, reward_funcs[i].func)
        self.num_workers = num_workers
        self.pool = WorkerPool(num_workers, say) if self.pooled else None
        self._explained: set[str] = set()  # functions whose first failure was printed with its traceback
        self.logs = RewardLogs()  # what the functions logged through log_metric / log_extra; see `take_logs`

    @classmethod
    def from_config(cls, reward_funcs: list[RewardFunction], args: Any) -> RewardRunner:
        return cls(reward_funcs, args.reward_timeout, args.reward_error, args.reward_num_workers)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def score(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
              columns: dict[str, list[Any]], trainer_state: Any = None, group_size: int = 1
              ) -> tuple[torch.Tensor, dict[str, float]]:
        """(N, F) float32 rewards, NaN where None or failed, and under on_error="none" the failed completions of
        each function as `rewards/<func>/errors`. Rows of a group (`group_size` in a row) share a chunk."""
        n = len(completions)
        kwargs = dict(columns, prompts=prompts, completions=completions, completion_ids=completion_ids,
                      trainer_state=trainer_state, log_extra=self.logs.log_extra, log_metric=self.logs.log_metric)
        columns_out: dict[int, list[float]] = {}
        failed: dict[int, int] = {}

        def settle(i: int, pieces: list[Piece]) -> None:
            columns_out[i], failed[i] = self._settle(i, pieces, completions)

        asynchronous = [i for i, r in enumerate(self.reward_funcs) if r.is_async]
        running = self._start_async(asynchronous, kwargs, n)
        try:
            for i, pieces in self._run_pooled(kwargs, n, group_size).items():
                settle(i, pieces)
            for i, reward in enumerate(self.reward_funcs):
                if i not in self.pooled and not reward.is_async:
                    settle(i, [(0, n, self._call_here(reward, kwargs, n))])
            if running is not None:
                for i, outcome in zip(asynchronous, running.result()):
                    settle(i, [(0, n, outcome)])
        finally:
            if running is not None:
                running.cancel()  # a failure above: the coroutines are not waited for
        rewards = torch.tensor([columns_out[i] for i in range(len(self.reward_funcs))], dtype=torch.float32)
        errors = {f"rewards/{r.name}/errors": float(failed[i]) for i, r in enumerate(self.reward_funcs)}
        return rewards.T.reshape(n, len(self.reward_funcs)), errors if self.on_error == "none" else {}

    def take_logs(self, n: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """What the reward functions logged since the last call: (metric means, extra columns per completion)."""
        return self.logs.take(n)

    # ---- where the calls run ---------------------------------------------------------------------------------
    def _call_here(self, reward: RewardFunction, kwargs: dict[str, Any], n: int) -> CallOutcome:
        notice = StillRunningNotice(reward.name, f"{n} completions, in the trainer's process", self.say)
        try:
            if self.timeout is None:
                return call_reward(reward.func, kwargs, n)
            return call_in_thread(reward.func, kwargs, n, self.timeout)
        finally:
            notice.cancel()

    def _run_pooled(self, kwargs: dict[str, Any], n: int, group_size: int) -> dict[int, list[Piece]]:
        if self.pool is None:
            return {}
        # environments live in this process (their get_reward reads them here); a worker would get copies
        portable = {k: v for k, v in kwargs.items() if k != "environments"}
        portable.update(trainer_state=_portable_state(kwargs["trainer_state"]), log_extra=_logs_elsewhere,
                        log_metric=_logs_elsewhere)
        bounds = chunk_bounds(n, self.num_workers, group_size)
        tasks, owners = [], []
        for i in self.pooled:
            reward = self.reward_funcs[i]
            for start, stop in bounds:
                chunk = {k: v[start:stop] if isinstance(v, list) and len(v) == n else v for k, v in portable.items()}
                tasks.append(Task(reward.name, reward.func, chunk, stop - start,
                                  f"completions {start}-{stop - 1} of {n}, in a worker process"))
                owners.append((i, start, stop))
        outcomes = self.pool.run(tasks, self.timeout, stop_on_failure=self.on_error == "raise")
        pieces: dict[int, list[Piece]] = {i: [] for i in self.pooled}
        for (i, start, stop), outcome in zip(owners, outcomes):
            pieces[i].append((start, stop, outcome))
        return pieces

    def _start_async(self, indices: list[int], kwargs: dict[str, Any], n: int) -> concurrent.futures.Future | None:
        if not indices:
            return None
        notices = [StillRunningNotice(self.reward_funcs[i].name, f"{n} completions, async", self.say) for i in indices]

        async def gather() -> list[CallOutcome]:
            try:
                return list(await asyncio.gather(
                    *(call_async(self.reward_funcs[i].func, kwargs, self.timeout) for i in indices)))
            finally:
                for notice in notices:
                    notice.cancel()

        return asyncio.run_coroutine_threadsafe(gather(), background_loop())

    # ---- the error policy ------------------------------------------------------------------------------------
    def _settle(self, i: int, pieces: list[Piece], completions: list[Any]) -> tuple[list[float], int]:
        """Function i's scores from its pieces; a failed piece raises, or (on_error="none") scores NaN."""
        reward = self.reward_funcs[i]
        where = "worker" if i in self.pooled else "async" if reward.is_async else "thread" if self.timeout else "here"
        values, failed = [math.nan] * len(completions), 0
        for start, stop, outcome in pieces:
            if outcome is None:  # not run: the pool stopped at another call's failure, which raises
                continue
            failure = None
            if outcome.ok:
                try:
                    values[start:stop] = validate_rewards(reward.name, outcome.values, stop - start)
                except (TypeError, ValueError) as e:  # a failure of this call like any other
                    failure = Failure(type(e), str(e))
            else:
                failure = describe(reward.name, outcome, completions, start, stop, where, self.timeout)
            if failure is None:
                continue
            if self.on_error == "raise":
                raise failure.error() from outcome.exception
            failed += stop - start
            self._report(reward.name, failure, outcome, stop - start)
        return values, failed

    def _report(self, name: str, failure: Failure, outcome: CallOutcome, rows: int) -> None:
        self.say(f"grpo: {failure.problem} Its {rows} completions score None this round (reward_error='none'; "
                 f"counted in rewards/{name}/errors).")
        if name not in self._explained and outcome.traceback:
            self._explained.add(name)
            self.say(f"grpo: the traceback of '{name}' (shown at its first failure only):\n{outcome.traceback}")


def compute_rewards(reward_funcs: list[RewardFunction], prompts: list[Any], completions: list[Any],
                    completion_ids: list[list[int]], columns: dict[str, list[Any]], trainer_state: Any = None
                    ) -> torch.Tensor:
    """Call every reward function once on the whole round, in this process. Returns (N, F) float32, NaN where
    None; any failure raises."""
    return RewardRunner(reward_funcs).score(prompts, completions, completion_ids, columns, trainer_state)[0]


def chunk_bounds(n: int, parts: int, group_size: int = 1) -> list[tuple[int, int]]:
    """[start, stop) of at most `parts` contiguous chunks of whole groups covering n rows, as equal as can be."""
    if group_size < 1 or n % group_size:
        group_size = 1
    groups = n // group_size
    parts = max(1, min(parts, groups))
    edges = [group_size * (groups * k // parts) for k in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _logs_elsewhere(*args: Any) -> None:
    """log_extra / log_metric in a worker process: the logs would stay in the worker, so calls say so."""
    raise RuntimeError("log_metric and log_extra are not available to reward functions in worker processes "
                       "(reward_num_workers > 0): log from a function that runs in the trainer's process")


def _portable_state(state: Any) -> Any:
    """What a worker process gets as trainer_state: a copy without log_history, which grows all run long."""
    if state is None or not hasattr(state, "log_history"):
        return state
    snapshot = copy.copy(state)
    snapshot.log_history = []
    return snapshot
