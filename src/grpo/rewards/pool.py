"""Worker processes for synchronous reward functions: CPU-heavy scoring in parallel, and calls that can be killed.

Not `concurrent.futures.ProcessPoolExecutor`: it cannot kill one stuck worker (only break the whole pool), so a
time limit would take every other call down with it. Here each worker is a process with a pipe of its own. A task
is one call of one function on a chunk of the round; the pool hands tasks to idle workers and waits on their pipes
and process sentinels at once, so it sees a result, a death (os._exit, a segfault) and a deadline as they happen.
A worker that died or overran its call is killed and replaced by a fresh one; the others go on.

Processes are started with "forkserver" (or "spawn" where there is none), never a plain fork: a fork of a
trainer holding CUDA contexts, OpenMP pools and a tokenizer's threads is not safe. The price: functions travel by
reference (module and name) and must be importable in a new interpreter, which is checked before the run starts
(`check_picklable`), and a script that trains must do so under `if __name__ == "__main__":`. Workers are
daemons, so a reward function there cannot start `multiprocessing` processes of its own (subprocesses are fine).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import select
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from grpo.rewards.calls import CallOutcome, StillRunningNotice, call_reward, timed_out

# forkserver: a clean single-threaded server process imports grpo once and forks each worker from it, so a worker
# that replaces a killed one starts in milliseconds, not the seconds an import of torch takes; spawn elsewhere.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
WORKER_START_TIMEOUT_S = 300.0  # a worker must unpickle a task (importing the function's module) within this


@dataclass
class Task:
    """One call: `func(**kwargs)` on `rows` completions; `name` and `where` describe it in notices."""

    name: str
    func: Callable[..., Any]
    kwargs: dict[str, Any]
    rows: int
    where: str


def check_picklable(name: str, func: Any) -> None:
    """Refuse, before the run starts, a function that a worker process could not receive."""
    fix = ("Define it at the top level of a module (a lambda or a function defined inside another one cannot be "
           "sent to a worker process), or set GRPOConfig.reward_num_workers=0 to score in the trainer's process.")
    try:
        pickle.dumps(func)
    except Exception as e:
        raise TypeError(f"reward function '{name}' cannot be sent to a reward worker process ({e}). {fix}") from e
    target = func.func if hasattr(func, "func") and hasattr(func, "keywords") else func  # a functools.partial
    main = sys.modules.get("__main__")
    if getattr(target, "__module__", None) == "__main__" and not getattr(main, "__file__", None):
        raise TypeError(
            f"reward function '{name}' is defined in an interactive session (a notebook or the REPL), which a "
            f"worker process cannot import. Move it to a .py module and import it from there, or set "
            "GRPOConfig.reward_num_workers=0."
        )


class _Worker:
    def __init__(self, context: Any):
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_conn, os.getpid()), daemon=True,
                                       name="grpo-reward-worker")
        self.process.start()
        child_conn.close()  # the child holds its end; ours closing lets it see EOF when the pool goes
        self.task: int | None = None  # index of the task it runs
        self.sent_at = 0.0
        self.began_at: float | None = None  # when the call began (the task unpickled, the function's module imported)
        self.notice: StillRunningNotice | None = None

    def deadline(self, timeout: float | None) -> float:
        if self.began_at is None:
            return self.sent_at + WORKER_START_TIMEOUT_S
        return self.began_at + timeout if timeout is not None else float("inf")

    def finish(self) -> None:
        self.task = None
        if self.notice is not None:
            self.notice.cancel()

    def kill(self) -> None:
        self.finish()
        self.process.kill()
        self.process.join(5)
        self.conn.close()


class WorkerPool:
    """`size` worker processes that run `Task`s and send back their `CallOutcome`s, in the tasks' order."""

    def __init__(self, size: int, say: Callable[[str], None] = print, start_method: str | None = None):
        self.context = multiprocessing.get_context(start_method or START_METHOD)
        if self.context.get_start_method() == "forkserver":  # the server imports grpo once; workers fork from it
            self.context.set_forkserver_preload([__name__])
        self.say = say
        self.workers = [_Worker(self.context) for _ in range(size)]
        self._finalizer = weakref.finalize(self, _shut_down, self.workers)

    def run(self, tasks: list[Task], timeout: float | None, stop_on_failure: bool = False) -> list[CallOutcome | None]:
        """Run every task; a call past `timeout` seconds, or whose worker dies, fails and its worker is replaced.

        With `stop_on_failure`, the first failure ends the run and the tasks not finished stay None. Whatever
        happens (an interrupt included), no worker is left busy: the next run starts clean.
        """
        outcomes: list[CallOutcome | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        try:
            while pending or self._busy():
                self._dispatch(tasks, pending, outcomes)
                self._collect(outcomes, timeout)
                if stop_on_failure and any(o is not None and not o.ok for o in outcomes):
                    break
        finally:
            for i, worker in enumerate(self.workers):
                if worker.task is not None:  # interrupted, or its result is no longer needed
                    self._replace(i)
        return outcomes

    def close(self) -> None:
        self._finalizer()

    def _busy(self) -> list[_Worker]:
        return [w for w in self.workers if w.task is not None]

    def _dispatch(self, tasks: list[Task], pending: deque[int], outcomes: list[CallOutcome | None]) -> None:
        for i in range(len(self.workers)):
            if not pending:
                return
            if self.workers[i].task is not None:
                continue
            worker = self.workers[i] if self.workers[i].process.is_alive() else self._replace(i)
            index = pending.popleft()
            task = tasks[index]
            try:
                worker.conn.send((task.func, task.kwargs, task.rows))
            except OSError:  # the worker died just now: _collect reports it
                pass
            except Exception as e:  # pickling failed, nothing was sent: the worker stays idle
                outcomes[index] = CallOutcome(failure="raised", error=f"{type(e).__name__}: its arguments cannot "
                                              f"be sent to a worker process ({e})", exception=e)
                continue
            worker.task, worker.sent_at, worker.began_at = index, time.monotonic(), None
            worker.notice = StillRunningNotice(task.name, task.where, self.say)

    def _collect(self, outcomes: list[CallOutcome | None], timeout: float | None) -> None:
        """Wait for the first message, death or deadline among the busy workers, and handle all that came."""
        busy = self._busy()
        if not busy:
            return
        first_deadline = min(w.deadline(timeout) for w in busy)
        wait_s = max(first_deadline - time.monotonic(), 0.0) if first_deadline != float("inf") else None
        wait([w.conn for w in busy] + [w.process.sentinel for w in busy], wait_s)
        now = time.monotonic()
        for worker in busy:
            i = self.workers.index(worker)
            pipe_closed = False
            if worker.conn.poll():
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):  # the process is exiting
                    message, pipe_closed = None, True
                if message == "started":
                    worker.began_at = now
                elif message is not None:
                    outcomes[worker.task] = message
                    worker.finish()
                    continue
            if pipe_closed or not worker.process.is_alive():
                outcomes[worker.task] = _died(worker)
                self._replace(i)
            elif now >= worker.deadline(timeout):
                outcomes[worker.task] = _overran(worker, timeout, now)
                self._replace(i)

    def _replace(self, i: int) -> _Worker:
        self.workers[i].kill()
        self.workers[i] = _Worker(self.context)
        return self.workers[i]


def _overran(worker: _Worker, timeout: float | None, now: float) -> CallOutcome:
    if worker.began_at is not None:
        return timed_out(timeout, now - worker.began_at)
    return CallOutcome(failure="timeout", seconds=now - worker.sent_at, error=(
        f"TimeoutError: the worker process did not begin the call within {WORKER_START_TIMEOUT_S:g} s (is "
        "importing the function's module that slow?)"))


def _died(worker: _Worker) -> CallOutcome:
    worker.process.join(5)
    code = worker.process.exitcode
    how = f"exit code {code}"
    if code is not None and code < 0:
        how = f"killed by {signal.Signals(-code).name}"
    return CallOutcome(failure="died", error=f"its worker process died ({how}) during the call")


def _exit_with_trainer(trainer_pid: int) -> None:
    """Exit when the trainer does, even in the middle of a call stuck in a loop (an idle worker exits anyway, as
    its pipe closes). Not PR_SET_PDEATHSIG: a forkserver worker's parent is the server, which each worker keeps
    alive. A daemon thread waits on a pidfd (Linux) or checks every second."""

    def watch() -> None:
        try:
            pidfd = os.pidfd_open(trainer_pid)
            select.select([pidfd], [], [])  # readable once the trainer has exited
        except (AttributeError, OSError):  # no pidfd here: poll
            while _is_running(trainer_pid):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="grpo-reward-worker-watch").start()


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shut_down(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.conn.close()  # an idle worker sees EOF and exits
    for worker in workers:
        worker.process.join(1)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(5)


def _serve(conn: Connection, trainer_pid: int) -> None:
    """A worker's loop: receive a task, say it started, run it, send the outcome; until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the trainer handles it
    _exit_with_trainer(trainer_pid)
    while True:
        try:
            func, kwargs, rows = conn.recv()
        except EOFError:
            return
        except Exception as e:  # the function or an argument could not be unpickled here
            conn.send("started")
            conn.send(CallOutcome(failure="raised", error=f"{type(e).__name__}: {e} (while receiving the call in "
                                  f"worker process {os.getpid()})"))
            continue
        conn.send("started")
        outcome = call_reward(func, kwargs, rows)
        outcome.exception = None  # exceptions do not always unpickle; the text and traceback travel instead
        try:
            conn.send(outcome)
        except Exception as e:  # a return value that cannot be pickled
            conn.send(CallOutcome(failure="raised", error=f"TypeError: its return value cannot be sent back from "
                                  f"the worker process ({e})", seconds=outcome.seconds))
