"""Scoring under faults: time limits, the error policy, the still-running notice and the worker-process pool.

Time bounds in these tests only guard against hangs (a 0.5 s limit on a call that sleeps 60 s must return well
within 20 s); none measures speed. Functions sent to worker processes live at the top level of this module, so
the spawned workers can import them.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from grpo.rewards import calls
from grpo.rewards.contract import prepare_reward_funcs
from grpo.rewards.pool import Task
from grpo.rewards.runner import RewardRunner, chunk_bounds

COMPLETIONS = [f"completion {i}" + "!" * i for i in range(8)]
HANG_GUARD_S = 20.0


def reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


def reward_pid(completions, **kwargs):
    return [float(os.getpid())] * len(completions)


def reward_sleeps(completions, **kwargs):
    time.sleep(60)
    return [0.0] * len(completions)


def reward_raises_on_bang3(completions, **kwargs):
    return [1.0 / (c.count("!") - 3) for c in completions]  # ZeroDivisionError on completion 3


def reward_one_short(completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def reward_exits(completions, **kwargs):
    os._exit(3)


def reward_segfaults(completions, **kwargs):
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def reward_hangs_on_last_group(completions, **kwargs):
    if any(c.endswith("!" * 7) for c in completions):
        time.sleep(60)
    return [1.0] * len(completions)


def reward_sees_state(completions, trainer_state, **kwargs):
    return [float(trainer_state.global_step + len(trainer_state.log_history))] * len(completions)


def score(funcs, runner_kwargs=None, completions=COMPLETIONS, group_size=2, trainer_state=None):
    runner = RewardRunner(prepare_reward_funcs(funcs), **(runner_kwargs or {}))
    try:
        return runner.score(completions, completions, [[1]] * len(completions), {}, trainer_state, group_size)
    finally:
        runner.close()


class Lines(list):
    """A `say` that keeps what it was told."""

    def __call__(self, message: str) -> None:
        self.append(message)


# --- time limits in the trainer's process ------------------------------------------------------------------------


def test_a_hanging_function_is_stopped_and_named():
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"'reward_sleeps' was stopped after 0.[5-9]\d* s on 8 completions: no "
                       r"result within reward_timeout=0.5 s; the call was abandoned in a background thread"):
        score([reward_len, reward_sleeps], {"timeout": 0.5})
    assert time.monotonic() - started < HANG_GUARD_S


def test_a_hanging_function_scores_none_and_is_counted_under_reward_error_none():
    lines = Lines()
    rewards, errors = score([reward_len, reward_sleeps], {"timeout": 0.5, "on_error": "none", "say": lines})
    assert rewards[:, 0].tolist() == [float(len(c)) for c in COMPLETIONS]
    assert torch.isnan(rewards[:, 1]).all()
    assert errors == {"rewards/reward_len/errors": 0.0, "rewards/reward_sleeps/errors": 8.0}
    assert len(lines) == 1 and "'reward_sleeps' was stopped" in lines[0] and "score None this round" in lines[0]


def test_a_hanging_async_function_is_cancelled():
    cancelled = asyncio.Event()

    async def slow_judge(completions, **kwargs):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return [0.0] * len(completions)

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="'slow_judge' was stopped .* the coroutine was cancelled"):
        score([slow_judge], {"timeout": 0.5})
    assert time.monotonic() - started < HANG_GUARD_S
    assert cancelled.is_set()


def test_without_a_limit_a_slow_call_says_once_that_it_is_still_running(monkeypatch):
    monkeypatch.setattr(calls, "STILL_RUNNING_NOTICE_S", 0.2)
    lines = Lines()

    def slow(completions, **kwargs):
        time.sleep(1.0)
        return [1.0] * len(completions)

    rewards, _ = score([slow], {"say": lines})
    assert rewards[:, 0].tolist() == [1.0] * 8
    assert len(lines) == 1
    assert "reward function 'slow' is still running after 0 s (8 completions, in the trainer's process)" in lines[0]
    assert "reward_timeout" in lines[0]


def test_a_fast_call_says_nothing(monkeypatch):
    monkeypatch.setattr(calls, "STILL_RUNNING_NOTICE_S", 0.5)
    lines = Lines()
    score([reward_len], {"say": lines})
    time.sleep(0.7)
    assert lines == []


def test_a_call_in_a_helper_thread_keeps_the_callers_grad_mode():
    def grad_mode(completions, **kwargs):
        return [float(torch.is_grad_enabled())] * len(completions)

    with torch.no_grad():
        rewards, _ = score([grad_mode], {"timeout": 10})
    assert rewards[:, 0].tolist() == [0.0] * 8


def test_signal_based_code_in_a_helper_thread_gets_the_way_out():
    def uses_sigalrm(completions, **kwargs):
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        return [0.0] * len(completions)

    with pytest.raises(RuntimeError, match="'uses_sigalrm' raised ValueError: signal only works in main thread.* "
                       "set reward_num_workers >= 1"):
        score([uses_sigalrm], {"timeout": 10})


# --- the error policy --------------------------------------------------------------------------------------------


def test_raise_stops_with_the_function_its_error_and_the_completion():
    with pytest.raises(RuntimeError, match=r"'reward_raises_on_bang3' raised ZeroDivisionError: .*it fails on "
                       r"completion 3: 'completion 3!!!'"):
        score([reward_raises_on_bang3])


def test_none_turns_failures_into_none_and_prints_the_traceback_once():
    lines = Lines()
    runner = RewardRunner(prepare_reward_funcs([reward_len, reward_raises_on_bang3, reward_one_short]),
                          on_error="none", say=lines)
    for _ in range(2):
        rewards, errors = runner.score(COMPLETIONS, COMPLETIONS, [[1]] * 8, {})
        assert rewards[:, 0].tolist() == [float(len(c)) for c in COMPLETIONS]
        assert torch.isnan(rewards[:, 1:]).all()
        assert errors == {"rewards/reward_len/errors": 0.0, "rewards/reward_raises_on_bang3/errors": 8.0,
                          "rewards/reward_one_short/errors": 8.0}
    failures = [line for line in lines if "score None this round" in line]
    tracebacks = [line for line in lines if "traceback of" in line]
    assert len(failures) == 4
    assert "'reward_one_short' returned 7 values for 8 completions" in failures[1]  # validation follows the policy
    assert len(tracebacks) == 1 and "ZeroDivisionError" in tracebacks[0]


def test_the_error_metric_is_only_logged_under_none():
    assert score([reward_len])[1] == {}


# --- the worker-process pool -------------------------------------------------------------------------------------


def test_chunks_are_whole_groups_in_order():
    assert chunk_bounds(8, 2, group_size=2) == [(0, 4), (4, 8)]
    assert chunk_bounds(12, 2, group_size=4) == [(0, 4), (4, 12)]
    assert chunk_bounds(8, 5, group_size=4) == [(0, 4), (4, 8)]
    assert chunk_bounds(8, 3, group_size=1) == [(0, 2), (2, 5), (5, 8)]
    assert chunk_bounds(7, 2, group_size=2) == [(0, 3), (3, 7)]  # not whole groups: rows


def test_a_pool_gives_the_in_process_result_in_order_from_other_processes():
    async def async_len(completions, **kwargs):
        return [float(len(c)) for c in completions]

    funcs = [reward_len, async_len, reward_pid]
    local, _ = score(funcs)
    pooled, _ = score(funcs, {"num_workers": 2})
    assert torch.equal(pooled[:, :2], local[:, :2])
    assert os.getpid() not in pooled[:, 2].tolist()


def test_a_pool_carries_an_exception_back_with_its_traceback():
    with pytest.raises(RuntimeError) as info:
        score([reward_raises_on_bang3], {"num_workers": 1})
    message = str(info.value)
    assert "'reward_raises_on_bang3' raised ZeroDivisionError: float division by zero in a worker process" in message
    assert "it fails on completion 3: 'completion 3!!!'" in message
    assert "Its traceback in the worker process:" in message and "c.count(\"!\") - 3" in message


@pytest.mark.parametrize(("func", "how"), [(reward_exits, r"exit code 3"), (reward_segfaults, "killed by SIGSEGV")])
def test_a_dead_worker_is_a_clear_error_and_is_replaced(func, how):
    runner = RewardRunner(prepare_reward_funcs([func]), num_workers=1)
    try:
        dead = runner.pool.workers[0].process
        with pytest.raises(RuntimeError, match=f"'{func.__name__}' failed in a worker process .*: its worker "
                           f"process died \\({how}\\)"):
            runner.score(COMPLETIONS, COMPLETIONS, [[1]] * 8, {})
        replacement = runner.pool.workers[0].process
        assert replacement is not dead and replacement.is_alive()
        outcome, = runner.pool.run([Task("reward_len", reward_len, {"completions": COMPLETIONS}, 8, "a test")], None)
        assert outcome.values == [float(len(c)) for c in COMPLETIONS]
    finally:
        runner.close()


def test_a_pool_kills_a_stuck_call_and_keeps_the_other_chunks_under_none():
    lines = Lines()
    started = time.monotonic()
    rewards, errors = score([reward_hangs_on_last_group, reward_len],
                            {"num_workers": 2, "timeout": 0.5, "on_error": "none", "say": lines})
    assert time.monotonic() - started < 3 * HANG_GUARD_S  # includes starting the worker processes (spawn)
    assert rewards[:4, 0].tolist() == [1.0] * 4 and torch.isnan(rewards[4:, 0]).all()
    assert rewards[:, 1].tolist() == [float(len(c)) for c in COMPLETIONS]
    assert errors == {"rewards/reward_hangs_on_last_group/errors": 4.0, "rewards/reward_len/errors": 0.0}
    assert any("'reward_hangs_on_last_group' was stopped after" in line and "(completions 4-7 of 8)" in line
               and "its worker process was killed and replaced" in line for line in lines)


def test_a_worker_gets_trainer_state_without_its_log_history():
    from grpo import TrainerState

    state = TrainerState(global_step=5, log_history=[{"loss": 0.0}] * 3)
    rewards, _ = score([reward_sees_state], {"num_workers": 1}, trainer_state=state)
    assert rewards[:, 0].tolist() == [5.0] * 8
    assert len(state.log_history) == 3


def test_a_worker_does_not_outlive_a_killed_trainer(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent('''
        from grpo.rewards import RewardRunner, prepare_reward_funcs
        from test_reward_runner import reward_sleeps

        if __name__ == "__main__":
            runner = RewardRunner(prepare_reward_funcs([reward_sleeps]), num_workers=1)
            print(runner.pool.workers[0].process.pid, flush=True)
            runner.score(["p"], ["c"], [[1]], {})  # the worker sleeps 60 s in this call
    '''))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    worker = int(trainer.stdout.readline())
    time.sleep(2)  # the call has begun
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.2)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("make", [lambda: (lambda completions, **kw: [0.0] * len(completions)), lambda: _local()])
def test_a_function_a_worker_cannot_import_is_refused_before_the_run(make):
    func = make()
    with pytest.raises(TypeError, match="cannot be sent to a reward worker process .* Define it at the top level "
                       "of a module .* or set GRPOConfig.reward_num_workers=0"):
        RewardRunner(prepare_reward_funcs([func]), num_workers=2)


def _local():
    def local_reward(completions, **kwargs):
        return [0.0] * len(completions)
    return local_reward


def test_async_functions_and_no_workers_need_no_pickling():
    async def local_async(completions, **kwargs):
        return [1.0] * len(completions)

    runner = RewardRunner(prepare_reward_funcs([local_async]), num_workers=2)
    assert runner.pool is None  # nothing to send: no process is started
    assert math.isclose(runner.score(COMPLETIONS, COMPLETIONS, [[1]] * 8, {})[0].sum().item(), 8.0)


# --- in training -------------------------------------------------------------------------------------------------


def reward_length_task(completions, **kwargs):
    return [-abs(20 - len(c)) for c in completions]


def reward_flaky(completions, trainer_state, **kwargs):
    if trainer_state.global_step == 1:
        raise ConnectionError("the verifier dropped the connection")
    return [0.0] * len(completions)


def _train(tmp_path, name, reward_funcs, **overrides):
    from grpo import GRPOConfig, GRPOTrainer
    from grpo.embedded import TASKS

    args = GRPOConfig(output_dir=str(tmp_path / name), num_generations=4, per_device_train_batch_size=8,
                      max_completion_length=12, max_steps=3, logging_steps=1, learning_rate=2e-3, seed=3,
                      gradient_checkpointing=False, disable_tqdm=True, save_strategy="no", **overrides)
    trainer = GRPOTrainer(model="grpo:tiny", reward_funcs=reward_funcs, args=args,
                          train_dataset=TASKS["length"].make(16, seed=1))
    trainer.train()
    trainer.reward_runner.close()
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_training_with_worker_processes_logs_the_same_loss_and_metrics(tmp_path):
    in_process = _train(tmp_path, "in-process", reward_length_task)
    pooled = _train(tmp_path, "pooled", reward_length_task, reward_num_workers=2)
    assert len(pooled) == len(in_process) == 3
    for expected, actual in zip(in_process, pooled):
        expected.pop("step_time"), actual.pop("step_time")
        assert actual == expected


def test_a_flaky_reward_does_not_stop_a_run_under_reward_error_none(tmp_path):
    records = _train(tmp_path, "flaky", [reward_length_task, reward_flaky], reward_error="none",
                     reward_num_workers=1)
    assert all(r["rewards/reward_length_task/errors"] == 0.0 for r in records)
    assert [r["rewards/reward_flaky/errors"] for r in records] == [0.0, 8.0, 0.0]  # the second round failed


def reward_logs(completions, log_metric, log_extra, **kwargs):
    """Logs as TRL's reward functions may: a scalar metric and a column of the completions table."""
    log_metric("seen", float(len(completions)))
    log_extra("length", [len(c) for c in completions])
    return [1.0] * len(completions)


async def async_reward_logs(completions, log_metric, **kwargs):
    log_metric("seen", 0.0)
    return [0.0] * len(completions)


def test_log_metric_and_log_extra_as_in_trl():
    runner = RewardRunner(prepare_reward_funcs([reward_logs, async_reward_logs]))
    try:
        runner.score(COMPLETIONS, COMPLETIONS, [[1]] * 8, {}, None, 2)
        metrics, rows = runner.take_logs(8)
        assert metrics == {"seen": 4.0}  # the mean over the round's two calls, 8 and 0
        assert rows == [{"length": len(c)} for c in COMPLETIONS]
        assert runner.take_logs(8) == ({}, [{}] * 8)  # each round's logs are taken once
        runner.logs.log_extra("short", [1, 2])
        assert runner.take_logs(8)[1] == [{}] * 8  # a column without one value per completion is left out
    finally:
        runner.close()


def test_log_metric_in_a_worker_process_says_it_is_not_available():
    with pytest.raises(Exception, match="not available to reward functions in worker processes"):
        score([reward_logs], {"num_workers": 1})
