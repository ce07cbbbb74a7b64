"""Remote rewards: a reward function behind HTTP (`grpo serve-reward`), called by URL, tested end to end on the
loopback address: a server that works, one that is down, slow, failing (HTTP 500) or returning the wrong count.

Time bounds only guard against hangs; none measures speed.
"""

from __future__ import annotations

import json
import math
import pickle
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from grpo.recipe import reward_by_name
from grpo.rewards import RemoteReward, compute_rewards, prepare_reward_funcs
from grpo.rewards.server import make_server

PROMPTS = ["What is 3 + 4?", "What is 2 + 2?", "Say hi.", "Count to three."]
COMPLETIONS = ["7", "The answer is 4", "hi", "1 2 3"]
HANG_GUARD_S = 20.0


@contextmanager
def serving(func) -> Iterator[tuple[str, list[dict]]]:
    """A reward server for `func` on a free loopback port, in a thread; yields its URL and the requests it got."""
    requests: list[dict] = []

    def recorded(**body):
        requests.append(body)
        return func(**body)

    server = make_server(recorded, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/score", requests
    finally:
        server.shutdown()
        server.server_close()


def score(reward, columns=None, completions=COMPLETIONS):
    prepared = prepare_reward_funcs([reward])
    return compute_rewards(prepared, PROMPTS, completions, [[1]] * len(completions), columns or {})


def fails_soon(reward, match: str) -> None:
    """Scoring with `reward` raises a RuntimeError matching `match`, within HANG_GUARD_S (a hang guard)."""
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=match):
        score(reward)
    assert time.monotonic() - started < HANG_GUARD_S


def length_or_none(completions, answer=None, **kwargs):
    return [None if a is None else float(len(c)) for c, a in zip(completions, answer or [0] * len(completions))]


def test_a_url_scores_like_the_function_itself_with_every_column():
    with serving(length_or_none) as (url, requests):
        rewards = score(url, columns={"answer": ["7", "4", None, "3"]})
    assert rewards[:, 0].tolist()[:2] == [1.0, 15.0] and math.isnan(rewards[2, 0]) and rewards[3, 0] == 5.0
    assert requests == [{"prompts": PROMPTS, "completions": COMPLETIONS, "completion_ids": [[1]] * 4,
                         "answer": ["7", "4", None, "3"], "trainer_state": None}]


def test_conversational_completions_travel_as_message_lists_and_batches_keep_order():
    def content_length(completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    conversations = [[{"role": "assistant", "content": text}] for text in COMPLETIONS]
    with serving(content_length) as (url, requests):
        rewards = score(RemoteReward(url, batch_size=3), completions=conversations)
    assert rewards[:, 0].tolist() == [float(len(c)) for c in COMPLETIONS]
    assert [len(r["completions"]) for r in requests] == [3, 1]
    assert requests[0]["completions"][0] == conversations[0]


def test_the_name_comes_from_the_path_and_a_remote_reward_can_go_to_a_worker_process():
    reward = prepare_reward_funcs(["http://127.0.0.1:9/score"])[0]
    assert reward.name == "remote_score" and not reward.is_async
    assert pickle.loads(pickle.dumps(reward.func)).url == "http://127.0.0.1:9/score"
    assert reward_by_name("http://127.0.0.1:9/score") == "http://127.0.0.1:9/score"  # recipes pass URLs through


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_is_down_is_retried_then_named():
    url = f"http://127.0.0.1:{_free_port()}/score"
    fails_soon(RemoteReward(url, max_retries=2, backoff=0.01), f"the reward server at {url} cannot be reached "
               r".*Connection refused.* \(3 attempts\)\. Is it running\? `grpo serve-reward")


def test_a_slow_server_times_out():
    def slow(completions, **kwargs):
        time.sleep(5)
        return [0.0] * len(completions)

    with serving(slow) as (url, _):
        fails_soon(RemoteReward(url, request_timeout=0.3, max_retries=0),
                   f"the reward server at {url} gave no answer within request_timeout=0.3 s")


def test_http_500_is_retried_then_an_error_with_the_status_and_the_servers_message():
    def broken(completions, **kwargs):
        raise KeyError("solution")

    with serving(broken) as (url, requests):
        fails_soon(RemoteReward(url, max_retries=2, backoff=0.01), f"the reward server at {url} answered HTTP 500 "
                   ".* \\(3 attempts\\): .*reward function 'recorded' raised KeyError: 'solution'")
    assert len(requests) == 3


def test_a_server_that_fails_once_is_retried_to_success():
    calls = []

    def flaky(completions, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("the judge model is still loading")
        return [1.0] * len(completions)

    with serving(flaky) as (url, _):
        rewards = score(RemoteReward(url, backoff=0.01))
    assert rewards[:, 0].tolist() == [1.0] * 4 and len(calls) == 2


def test_a_wrong_number_of_rewards_names_the_url():
    with serving(lambda completions, **kwargs: [0.0] * (len(completions) - 1)) as (url, requests):
        fails_soon(url, f"the reward server at {url} returned 3 rewards for 4 completions; it must return one")
    assert len(requests) == 1  # not retried, and no request per completion to find the failing one


def test_a_client_error_is_not_retried():
    hits = []

    class NotFound(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            hits.append(1)
            self.send_error(404, "no such reward")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/nope"
    try:
        fails_soon(RemoteReward(url, backoff=0.01), f"the reward server at {url} answered HTTP 404 no such reward")
    finally:
        server.shutdown()
        server.server_close()
    assert hits == [1]


def test_a_timeout_and_none_policy_apply_to_remote_rewards_too():
    from grpo.rewards.runner import RewardRunner

    def slow(completions, **kwargs):
        time.sleep(3)
        return [0.0] * len(completions)

    with serving(slow) as (url, _):
        runner = RewardRunner(prepare_reward_funcs([url]), timeout=0.5, on_error="none", say=lambda line: None)
        rewards, errors = runner.score(PROMPTS, COMPLETIONS, [[1]] * 4, {})
    assert all(math.isnan(v) for v in rewards[:, 0].tolist())
    assert errors == {"rewards/remote_score/errors": 4.0}


def test_the_server_answers_a_health_check_and_refuses_a_bad_request():
    with serving(length_or_none) as (url, _):
        with urllib.request.urlopen(url, timeout=5) as response:
            assert json.loads(response.read()) == {"reward_function": "recorded"}
        request = urllib.request.Request(url, data=b'{"prompts": []}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=5)
        assert info.value.code == 400 and "completions" in info.value.read().decode()


def test_grpo_serve_reward_serves_a_builtin_from_the_command_line():
    server = subprocess.Popen([sys.executable, "-m", "grpo.cli", "serve-reward", "length", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert "grpo serve-reward: 'length_reward' at http://127.0.0.1:" in line, server.stderr.read()
        url = line.split(" at ")[1].split()[0]
        rewards = score(url)
        assert rewards.shape == (4, 1) and all(v <= 0 for v in rewards[:, 0].tolist())
    finally:
        server.terminate()
        server.wait(HANG_GUARD_S)


def test_training_with_a_reward_server(tmp_path):
    from grpo import GRPOConfig, GRPOTrainer
    from grpo.embedded import TASKS

    def reward_len(completions, **kwargs):
        return [-abs(20 - len(c)) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / "run"), num_generations=4, per_device_train_batch_size=8,
                      max_completion_length=8, max_steps=2, logging_steps=1, gradient_checkpointing=False,
                      disable_tqdm=True, save_strategy="no")
    with serving(reward_len) as (url, requests):
        trainer = GRPOTrainer(model="grpo:tiny", reward_funcs=[url], args=args,
                              train_dataset=TASKS["length"].make(16, seed=1))
        trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(requests) == 2 and all(len(r["completions"]) == 8 for r in requests)
    assert [r["rewards/remote_score/mean"] for r in records] == [r["reward"] for r in records]
