"""One reward-function call, made so that it can fail, hang or crash without taking the trainer with it.

`call_reward` runs a call and turns an exception into a `CallOutcome` (with the first completion the function
fails on when called on it alone, so the error can show it); the same function runs in the trainer's process and
in the worker processes of `grpo.rewards.pool`. `call_in_thread` adds a time limit in the trainer's process: a
Python thread cannot be killed, so a call past its limit is abandoned in a daemon thread (it may keep running
until it returns or the process exits) and reported as timed out. `call_async` cancels a coroutine instead. Any
call still running after `STILL_RUNNING_NOTICE_S` says so once, with or without a limit.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

STILL_RUNNING_NOTICE_S = 60.0  # a module constant, so tests can shorten it
MOST_ROWS_SEARCHED = 64  # rows tried one by one to find the completion a failing function fails on

Failure = Literal["raised", "timeout", "died"]


@dataclass
class CallOutcome:
    """What one call gave: its return value, or why it has none. Plain data, so it crosses process boundaries."""

    values: Any = None
    failure: Failure | None = None
    error: str = ""  # "ValueError: could not convert string to float: 'n/a'"
    traceback: str = ""  # where it raised; from a worker process the only trace there is
    failing_row: int | None = None  # the first row the function fails on alone, when one was found
    seconds: float = 0.0
    exception: BaseException | None = field(default=None, repr=False)  # in-process only, to chain the error

    @property
    def ok(self) -> bool:
        return self.failure is None


def call_reward(func: Callable[..., Any], kwargs: dict[str, Any], rows: int) -> CallOutcome:
    """Call `func(**kwargs)` on `rows` completions; an exception becomes the outcome, not a raise."""
    started = time.monotonic()
    try:
        return CallOutcome(values=func(**kwargs), seconds=time.monotonic() - started)
    except Exception as e:
        return CallOutcome(failure="raised", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(),
                           failing_row=_first_failing_row(func, kwargs, rows), seconds=time.monotonic() - started,
                           exception=e)


def _first_failing_row(func: Callable[..., Any], kwargs: dict[str, Any], rows: int) -> int | None:
    """A function can opt out (RemoteReward does, as a request per row to a failing server costs minutes)."""
    if not getattr(func, "find_failing_completion", True):
        return None
    for i in range(min(rows, MOST_ROWS_SEARCHED)):
        one = {k: v[i:i + 1] if isinstance(v, list) and len(v) == rows else v for k, v in kwargs.items()}
        try:
            func(**one)
        except Exception:
            return i
    return None


def call_in_thread(func: Callable[..., Any], kwargs: dict[str, Any], rows: int, timeout: float) -> CallOutcome:
    """`call_reward` in a daemon thread, waited for at most `timeout` seconds; past it the thread is abandoned."""
    finished: list[CallOutcome] = []
    grad_enabled = torch.is_grad_enabled()  # grad mode is per thread: the helper gets the caller's

    def run() -> None:
        with torch.set_grad_enabled(grad_enabled):
            finished.append(call_reward(func, kwargs, rows))

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True, name="grpo-reward-call")
    thread.start()
    thread.join(timeout)
    if finished:
        return finished[0]
    return timed_out(timeout, time.monotonic() - started)


async def call_async(func: Callable[..., Any], kwargs: dict[str, Any], timeout: float | None) -> CallOutcome:
    """Await an async reward function, cancelled past `timeout` seconds (None: no limit)."""
    started = time.monotonic()
    try:
        values = await asyncio.wait_for(func(**kwargs), timeout)
    except asyncio.TimeoutError:
        return timed_out(timeout, time.monotonic() - started)
    except Exception as e:
        return CallOutcome(failure="raised", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(),
                           seconds=time.monotonic() - started, exception=e)
    return CallOutcome(values=values, seconds=time.monotonic() - started)


def timed_out(limit: float | None, seconds: float) -> CallOutcome:
    return CallOutcome(failure="timeout", error=f"TimeoutError: no result within reward_timeout={limit:g} s",
                       seconds=seconds)


class StillRunningNotice:
    """Prints once that a call is still running, if it runs for STILL_RUNNING_NOTICE_S; `cancel` when it ends.

    A timer thread rather than a check in the caller, which is blocked in the call it would report on.
    """

    def __init__(self, name: str, where: str, say: Callable[[str], None]):
        self.started = time.monotonic()
        self.timer = threading.Timer(STILL_RUNNING_NOTICE_S, lambda: say(
            f"grpo: reward function '{name}' is still running after {time.monotonic() - self.started:.0f} s "
            f"({where}). Set GRPOConfig.reward_timeout to stop calls that take too long."))
        self.timer.daemon = True
        self.timer.start()

    def cancel(self) -> None:
        self.timer.cancel()
