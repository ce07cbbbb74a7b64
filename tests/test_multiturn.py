"""Multi-turn rollouts with tools, end to end through the trainer, with a scripted tiny model (tests/scripted_model.py):
the model's turns are forced, so the token sequences, masks, messages, rewards' arguments and metrics are known
exactly, and tools that return, raise and hang, malformed and unknown calls, the iteration limit and the
completion budget are each checked against what they must produce."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from grpo import GRPOConfig, GRPOTrainer
from grpo.algorithm import StepCounts, micro_batch_loss
from grpo.data import tokenize_prompts
from grpo.rollout import RolloutEngine
from scripted_model import add, add_later, call, fail, ids, script_episodes, scripted_model_and_tokenizer, tool_turn

G = 2  # completions per prompt: the G rows of a prompt follow the same script



HANG_RELEASE = threading.Event()


def hang(x: str) -> str:
    """Never returns in time.

    Args:
        x: Anything.
    """
    HANG_RELEASE.wait(timeout=30)
    return "late"


TOOLS = [add, add_later, fail, hang]
SEEN: list[dict] = []  # what the reward function was called with, per round


def record_reward(prompts, completions, completion_ids, **kwargs):
    SEEN.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs))
    return [float(len(c)) for c in completions]


def error(text: str) -> str:
    return str({"error": text})


@pytest.fixture(scope="module")
def scripted():
    model, tokenizer = scripted_model_and_tokenizer()
    yield model, tokenizer
    HANG_RELEASE.set()


def make_trainer(tmp_path, scripted, tools=TOOLS, rows=None, trainer_kwargs=None, **overrides) -> GRPOTrainer:
    model, tokenizer = scripted
    settings = dict(output_dir=str(tmp_path), num_generations=G, per_device_train_batch_size=G,
                    max_completion_length=160, tool_timeout=0.5, learning_rate=1e-3, gradient_checkpointing=False,
                    disable_tqdm=True, report_to="none", seed=0, remove_unused_columns=False, beta=0.0)
    settings.update(overrides)
    args = GRPOConfig(**settings)
    dataset = rows or [{"prompt": [{"role": "user", "content": "q"}]}]
    return GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=record_reward, args=args,
                       train_dataset=dataset, tools=tools, **(trainer_kwargs or {}),
                       generator=RolloutEngine(tokenizer, args.sampling_params, lean=False))


def scripted_rows(trainer, scripted, episodes, tools=TOOLS, observation="", per_episode=None):
    model, tokenizer = scripted
    return script_episodes(model, tokenizer, episodes, trainer.args.max_completion_length, tools, observation,
                           per_episode)


def completion_of(rollout, row: int) -> list[int]:
    return rollout.completion_ids[row][rollout.completion_mask[row].bool()].tolist()


def tool_mask_of(rollout, row: int) -> list[int]:
    return rollout.tool_mask[row][rollout.completion_mask[row].bool()].tolist()


def expected_mask(tokenizer, segments: list[tuple[str, str]]) -> list[int]:
    return [int(who == "model") for who, text in segments for _ in ids(tokenizer, text)]


def assistant(content: str = "", calls: list[tuple[str, dict]] | None = None) -> dict:
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]
    return message


def tool(name: str, content: str) -> dict:
    return {"role": "tool", "name": name, "content": content}


OK = [("model", call("add", '{"a":2,"b":3}')), ("tool", tool_turn("5")), ("model", "5</s>")]
ASYNC = [("model", call("add_later", '{"a":4,"b":4}')), ("tool", tool_turn("8")), ("model", "8</s>")]
NO_CALL = [("model", "42</s>")]


def test_tool_calls_run_and_their_results_join_the_completion(tmp_path, scripted):
    """A sync and an async tool: each call's result is appended as a tool turn, generation goes on after it; the
    tool turn's tokens are masked out of the loss; rewards see the whole exchange as messages; TRL's metrics."""
    _, tokenizer = scripted
    trainer = make_trainer(tmp_path, scripted)
    rows, expected = scripted_rows(trainer, scripted, [OK, ASYNC, NO_CALL])
    SEEN.clear()
    rollout, metrics = trainer.generate_and_score(rows)

    for episode, segments in enumerate([OK, ASYNC, NO_CALL]):
        for row in range(episode * G, (episode + 1) * G):
            assert completion_of(rollout, row) == expected[episode]
            assert tool_mask_of(rollout, row) == expected_mask(tokenizer, segments)
            assert bool(rollout.is_eos[row])
    messages = SEEN[-1]["completions"]
    assert messages[0] == [assistant(calls=[("add", {"a": 2, "b": 3})]), tool("add", "5"), assistant("5")]
    assert messages[2] == [assistant(calls=[("add_later", {"a": 4, "b": 4})]), tool("add_later", "8"),
                           assistant("8")]
    assert messages[4] == [assistant("42")]
    assert SEEN[-1]["completion_ids"][0] == expected[0]  # the whole completion, tool turns included, as in TRL
    assert SEEN[-1]["episode"] == [0, 0, 1, 1, 2, 2]  # dataset columns still arrive
    # 4 calls over 6 completions, none failed; per tool, grpo's own names
    assert metrics["tools/call_frequency"] == pytest.approx(4 / 6)
    assert metrics["tools/failure_frequency"] == 0.0
    assert metrics["tools/add/call_frequency"] == pytest.approx(2 / 6)
    assert metrics["tools/add_later/call_frequency"] == pytest.approx(2 / 6)
    assert metrics["tools/fail/call_frequency"] == 0.0
    # lengths count the model's tokens only
    model_lengths = [sum(expected_mask(tokenizer, s)) for s in (OK, ASYNC, NO_CALL)]
    assert metrics["completions/max_length"] == max(model_lengths)
    assert metrics["completions/mean_length"] == pytest.approx(sum(model_lengths) / 3)


def test_faults_are_failure_turns_not_crashes(tmp_path, scripted):
    """Malformed JSON, an unknown tool, a tool that raises and one that hangs past tool_timeout: each answers the
    model with its error as the tool message, counts as a failed call, and the episode goes on."""
    malformed = '<tool_call>{"name":"add","arguments":{"a":2</tool_call></s>'
    not_json = '{"name":"add","arguments":{"a":2'
    episodes = [
        [("model", malformed),
         ("tool", tool_turn(error(f"invalid tool call: the call is not a JSON object: {not_json!r}"))),
         ("model", "?</s>")],
        [("model", call("mul", "{}")),
         ("tool", tool_turn(error("Tool mul not found. The tools are: add, add_later, fail, hang."))),
         ("model", "?</s>")],
        [("model", call("fail", '{"x":"a"}')), ("tool", tool_turn(error("boom"))), ("model", "!</s>")],
        [("model", call("hang", '{"x":"a"}')),
         ("tool", tool_turn(error("tool 'hang' did not return within tool_timeout=0.5 s"))), ("model", "!</s>")],
    ]
    trainer = make_trainer(tmp_path, scripted, max_completion_length=200)
    rows, expected = scripted_rows(trainer, scripted, episodes)
    SEEN.clear()
    rollout, metrics = trainer.generate_and_score(rows)  # the hung calls are cut off: their result is the error
    for episode in range(len(episodes)):
        assert completion_of(rollout, episode * G) == expected[episode]
    messages = SEEN[-1]["completions"]
    assert messages[0][0] == assistant(malformed.removesuffix("</s>"))  # a malformed call stays as text
    assert messages[0][1]["name"] == "add"
    assert messages[2][0] == assistant(calls=[("mul", {})]) and messages[2][1]["name"] == "mul"
    assert messages[4][1] == tool("fail", error("boom"))
    assert messages[6][2] == assistant("!")
    assert metrics["tools/call_frequency"] == 1.0
    assert metrics["tools/failure_frequency"] == 1.0
    # per tool: a malformed call counts under the tool it names; an unknown name in the totals only
    assert metrics["tools/fail/failure_frequency"] == 1.0 and metrics["tools/hang/failure_frequency"] == 1.0
    assert metrics["tools/fail/call_frequency"] == pytest.approx(2 / 8)
    assert metrics["tools/add/call_frequency"] == pytest.approx(2 / 8)
    assert metrics["tools/add/failure_frequency"] == 1.0 and metrics["tools/add_later/call_frequency"] == 0.0


def repeated_calls(turns: int) -> list[tuple[str, str]]:
    """The model calls add(k, 1) in each of `turns` turns, then answers."""
    segments: list[tuple[str, str]] = []
    for k in range(turns):
        segments += [("model", call("add", f'{{"a":{k},"b":1}}')), ("tool", tool_turn(str(k + 1)))]
    return segments + [("model", "done</s>")]


@pytest.mark.parametrize("limit", [0, 1, 3, None])
def test_max_tool_calling_iterations(tmp_path, scripted, limit):
    """At most `limit` tool turns: the turn after the last allowed one keeps its calls as text (not run) and ends
    the completion; 0 describes the tools but runs none; None lets all four run."""
    _, tokenizer = scripted
    trainer = make_trainer(tmp_path, scripted, max_completion_length=330, max_tool_calling_iterations=limit)
    full = repeated_calls(4)
    rows, expected = scripted_rows(trainer, scripted, [full])
    SEEN.clear()
    rollout, metrics = trainer.generate_and_score(rows)
    kept = full if limit is None else full[:2 * limit + 1]  # model turns and tool turns up to the unanswered call
    length = len(ids(tokenizer, "".join(text for _, text in kept)))
    assert completion_of(rollout, 0) == expected[0][:length]
    assert tool_mask_of(rollout, 0) == expected_mask(tokenizer, kept)
    runs = 4 if limit is None else limit
    assert metrics["tools/call_frequency"] == runs
    messages = SEEN[-1]["completions"][0]
    assert [m["role"] for m in messages] == ["assistant", "tool"] * runs + ["assistant"]
    assert ("tool_calls" in messages[-1]) == (limit is not None)  # the last turn's call, shown but not run


def test_a_tool_turn_that_leaves_no_room_ends_the_episode_and_turns_stop_at_the_budget(tmp_path, scripted):
    """max_completion_length counts all turns: a tool result that would leave no room to answer is dropped
    (the episode ends with the calling turn, as in TRL), and a turn is cut at what is left of the budget."""
    _, tokenizer = scripted
    call_length = len(ids(tokenizer, OK[0][1]))
    turn_length = len(ids(tokenizer, OK[1][1]))
    trainer = make_trainer(tmp_path, scripted, max_completion_length=call_length + turn_length)  # no room after
    rows, expected = scripted_rows(trainer, scripted, [OK])
    SEEN.clear()
    rollout, metrics = trainer.generate_and_score(rows)
    assert completion_of(rollout, 0) == expected[0][:call_length]
    assert SEEN[-1]["completions"][0] == [assistant(calls=[("add", {"a": 2, "b": 3})])]
    assert metrics["tools/call_frequency"] == 1.0  # the call ran; its result did not fit

    long_answer = [OK[0], OK[1], ("model", "x" * 40 + "</s>")]
    budget = call_length + turn_length + 10
    trainer = make_trainer(tmp_path / "cut", scripted, max_completion_length=budget)
    rows, expected = scripted_rows(trainer, scripted, [long_answer])
    rollout, _ = trainer.generate_and_score(rows)
    assert completion_of(rollout, 0) == expected[0][:budget]  # the answer cut to 10 tokens
    assert not bool(rollout.is_eos[0])


def test_loss_gradient_is_zero_on_tool_result_tokens(tmp_path, scripted):
    """The loss's gradient with respect to the per-token log-probs: zero on every tool-turn token, non-zero on the
    model's, and the entropy metric averages the model's tokens only."""
    trainer = make_trainer(tmp_path, scripted)
    rows, _ = scripted_rows(trainer, scripted, [OK, NO_CALL])
    rollout, _ = trainer.generate_and_score(rows)
    rollout.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])  # a signal on every row
    inputs = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    logps, entropy, _ = trainer.policy_logps(*inputs, 1.0, with_entropy=True)
    logps.retain_grad()
    mask = trainer._loss_mask(rollout)
    counts = StepCounts(len(rollout), int(mask.sum()), trainer.args.max_completion_length)
    loss, stats = micro_batch_loss(logps, entropy, None, None, rollout.advantages, mask, counts,
                                   trainer._loss_settings())
    loss.backward()
    tool_tokens = rollout.completion_mask.bool() & ~rollout.tool_mask.bool()
    model_tokens = rollout.completion_mask.bool() & rollout.tool_mask.bool()
    assert tool_tokens.sum() > 0
    assert torch.all(logps.grad[tool_tokens] == 0)
    assert torch.all(logps.grad[model_tokens] != 0)
    expected_entropy = (entropy.detach() * model_tokens).sum() / model_tokens.sum()
    assert stats.step_metrics(counts, trainer._loss_settings())["entropy"] == pytest.approx(
        float(expected_entropy), rel=1e-5)


def test_rows_calling_tools_do_not_stall_rows_still_decoding(tmp_path, scripted):
    """A row whose turn ends with a call starts it at once, while the batch's other rows decode: the slow tool's
    wait overlaps the long row's decoding."""
    started: list[float] = []

    def slow(x: str) -> str:
        """Takes a while.

        Args:
            x: Anything.
        """
        started.append(time.monotonic())
        time.sleep(0.3)
        return "ok"

    tools = [slow]
    early = [("model", call("slow", '{"x":"a"}')), ("tool", tool_turn("ok")), ("model", "k</s>")]
    long_turn = [("model", "y" * 120 + "</s>")]
    trainer = make_trainer(tmp_path, scripted, tools=tools)
    rows, expected = scripted_rows(trainer, scripted, [early, long_turn], tools=tools)
    engine, finished = trainer.generator, []
    original = engine.generate

    def timed(*args, **kwargs):
        result = original(*args, **kwargs)
        finished.append(time.monotonic())
        return result

    engine.generate = timed
    rollout, _ = trainer.generate_and_score(rows)
    assert completion_of(rollout, 0) == expected[0] and completion_of(rollout, G) == expected[1]
    assert len(started) == G and max(started) < finished[0]  # both calls began before the first turn was done


class Counter:
    """An environment: `reset` takes the row (and appends to the prompt), its public method is the tool,
    `get_reward` reads what the episode did."""

    instances = 0

    def __init__(self):
        Counter.instances += 1
        self.total, self.start = 0, None

    def reset(self, start: int, **row) -> str:
        self.total, self.start = 0, start
        return f" start={start}"

    def bump(self, by: int) -> str:
        """Add to the counter.

        Args:
            by: How much.
        """
        self.total += by
        return str(self.start + self.total)

    def get_reward(self) -> float:
        return float(self.total)


class Greeter:
    def reset(self, **row) -> None:
        self.greeted = False

    async def greet(self, name: str) -> str:
        """Greet someone.

        Args:
            name: Who.
        """
        self.greeted = True
        return f"hi {name}"

    async def get_reward(self) -> float:
        return 10.0 if self.greeted else -1.0


def test_environment_factory_resets_per_episode_and_owns_the_reward(tmp_path, scripted):
    """One environment per episode, reset with its row (the string it returns joins the prompt), its methods the
    tools, its get_reward() a reward function named after the class (weight 1) that reads the episode's state."""
    episodes = [[("model", call("bump", '{"by":2}')), ("tool", tool_turn("7")), ("model", "7</s>")],
                [("model", "no</s>")]]
    dataset = [{"prompt": [{"role": "user", "content": "q"}], "start": 5}]
    trainer = make_trainer(tmp_path, scripted, tools=None, rows=dataset,
                           trainer_kwargs=dict(environment_factory=Counter))
    rows, expected = scripted_rows(trainer, scripted, episodes, tools=[Counter().bump], observation=" start=5")
    rows = [dict(row, start=5) for row in rows]
    Counter.instances = 0
    SEEN.clear()
    rollout, metrics = trainer.generate_and_score(rows)
    assert completion_of(rollout, 0) == expected[0] and completion_of(rollout, 2) == expected[1]
    assert Counter.instances == 3  # a pool: the probe instance is reused, more made only as a round needs them
    assert [r.name for r in trainer.reward_funcs] == ["record_reward", "Counter"]
    assert rollout.rewards_per_func[:, 1].tolist() == [2.0, 2.0, 0.0, 0.0]
    assert metrics["rewards/Counter/mean"] == 1.0
    assert SEEN[-1]["prompts"][0][-1]["content"].endswith(" start=5")
    assert rows[0]["prompt"][0]["content"] == "q"  # the dataset's row is left as it was
    assert [type(e) for e in SEEN[-1]["environments"]] == [Counter] * 4
    assert metrics["tools/bump/call_frequency"] == 0.5
    rollout, _ = trainer.generate_and_score(rows)  # the next round reuses the pool
    assert Counter.instances == 3


def test_a_dict_of_environments_chosen_by_the_environment_column(tmp_path, scripted):
    """Each row's `environment` picks its factory: its prompt shows only that environment's tools, and each
    class's get_reward scores its own episodes (None for the others); async tools and async get_reward work."""
    episodes = [[("model", call("bump", '{"by":1}')), ("tool", tool_turn("6")), ("model", "6</s>")],
                [("model", call("greet", '{"name":"bo"}')), ("tool", tool_turn("hi bo")), ("model", ":)</s>")]]
    factories = {"counter": Counter, "greeter": Greeter}
    dataset = [{"prompt": [{"role": "user", "content": "q"}], "start": 5, "environment": "counter"}]
    trainer = make_trainer(tmp_path, scripted, tools=None, rows=dataset,
                           trainer_kwargs=dict(environment_factory=factories))
    rows, expected = scripted_rows(trainer, scripted, episodes,
                                   per_episode=[([Counter().bump], " start=5"), ([Greeter().greet], "")])
    rows = [dict(row, start=5, environment=name) for row, name in zip(rows, ["counter", "greeter"])]
    SEEN.clear()
    rollout, metrics = trainer.generate_and_score(rows)
    assert completion_of(rollout, 0) == expected[0] and completion_of(rollout, 2) == expected[1]
    assert [r.name for r in trainer.reward_funcs] == ["record_reward", "Counter", "Greeter"]
    rewards = rollout.rewards_per_func[:, 1:]
    assert rewards[:2, 0].tolist() == [1.0, 1.0] and rewards[2:, 1].tolist() == [10.0, 10.0]
    assert rewards[:2, 1].isnan().all() and rewards[2:, 0].isnan().all()
    assert SEEN[-1]["completions"][2][1] == tool("greet", "hi bo")
    with pytest.raises(ValueError, match="environment='nope'"):
        trainer.generate_and_score([dict(rows[0], environment="nope")])


def test_a_dict_of_environments_needs_an_environment_column(tmp_path, scripted):
    dataset = [{"prompt": [{"role": "user", "content": "q"}], "start": 5}]
    with pytest.raises(ValueError, match="'environment' column"):
        make_trainer(tmp_path, scripted, tools=None, rows=dataset,
                     trainer_kwargs=dict(environment_factory={"counter": Counter}))


def test_rollout_func_replaces_generation(tmp_path, scripted):
    """TRL's rollout_func(prompts, trainer): called with the round's prompts (each repeated G times) and the
    trainer; its completion ids are the completions, `env_mask` masks tokens out of the loss and the lengths,
    and every extra key reaches the reward functions."""
    _, tokenizer = scripted
    called = []
    model_part, feedback, answer = ids(tokenizer, "ab"), ids(tokenizer, "[obs]"), ids(tokenizer, "c</s>")
    completion = model_part + feedback + answer

    def rollout_func(prompts, trainer):
        called.append((prompts, trainer))
        n = len(prompts)
        prompt_ids = tokenize_prompts(trainer.processing_class, prompts)
        return {"prompt_ids": prompt_ids, "completion_ids": [completion] * n,
                "logprobs": [[-0.5] * len(completion)] * n,
                "env_mask": [[1] * len(model_part) + [0] * len(feedback) + [1] * len(answer)] * n,
                "tag": [f"t{i}" for i in range(n)]}

    trainer = make_trainer(tmp_path, scripted, tools=None, trainer_kwargs=dict(rollout_func=rollout_func))
    rows = [{"prompt": [{"role": "user", "content": "x"}]}, {"prompt": [{"role": "user", "content": "y"}]}]
    SEEN.clear()
    rollout, metrics = trainer.generate_and_score(rows)
    prompts, passed_trainer = called[-1]
    assert passed_trainer is trainer and [p[0]["content"] for p in prompts] == ["x", "x", "y", "y"]
    assert completion_of(rollout, 3) == completion and bool(rollout.is_eos[3])
    assert tool_mask_of(rollout, 0) == [1, 1, 0, 0, 0, 0, 0, 1, 1]
    assert SEEN[-1]["tag"] == ["t0", "t1", "t2", "t3"] and "env_mask" not in SEEN[-1]
    assert SEEN[-1]["completions"][0] == [assistant("ab[obs]c")]
    assert metrics["completions/mean_length"] == 4.0  # the masked-out feedback is not the model's length
    assert "tools/call_frequency" not in metrics

    def short(prompts, trainer):
        output = rollout_func(prompts, trainer)
        output["logprobs"][0] = [-0.5]
        return output

    bad = make_trainer(tmp_path / "bad", scripted, tools=None, trainer_kwargs=dict(rollout_func=short))
    with pytest.raises(ValueError, match=r"'logprobs'\[0\] with 1 values for a completion of 9 tokens"):
        bad.generate_and_score(rows)
    missing = make_trainer(tmp_path / "missing", scripted, tools=None,
                           trainer_kwargs=dict(rollout_func=lambda prompts, trainer: {"prompt_ids": []}))
    with pytest.raises(ValueError, match=r"must return keys \['completion_ids', 'logprobs'\]"):
        missing.generate_and_score(rows)
    with pytest.raises(ValueError, match="rollout_func replaces grpo's generation"):
        make_trainer(tmp_path / "both", scripted, trainer_kwargs=dict(rollout_func=rollout_func))
