"""The bad-input catalogue (docs/robustness.md): each mistake is rejected with an error that names the problem and
the fix, before the expensive work it would otherwise spoil.

Each case gives the stage by which it must be caught:
    config      at GRPOConfig(...)                       nothing loaded
    load        at GRPOTrainer(...), before the model loads
    generate    at train(), before anything is generated
    first_round in the first round, before any optimizer step or checkpoint
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset, IterableDataset

import grpo.models as models_module
from grpo import GRPOConfig, GRPOTrainer
from grpo.rewards import RemoteReward
from grpo.rollout import RolloutEngine

STAGES = ("config", "load", "generate", "first_round")


def reward_len(completions, **kwargs):
    return [-abs(20 - len(c)) for c in completions]


PROMPTS = [{"prompt": f"Say {i} things."} for i in range(8)]


def args(tmp: Path, **overrides: Any) -> GRPOConfig:
    settings = dict(output_dir=str(tmp / "run"), num_generations=4, per_device_train_batch_size=8, max_steps=2,
                    max_completion_length=8, disable_tqdm=True, gradient_checkpointing=False, save_steps=1)
    return GRPOConfig(**{**settings, **overrides})


def train(tmp: Path, model: Any = "grpo:tiny", dataset: Any = None, rewards: Any = reward_len,
          resume: Any = None, **kwargs: Any) -> None:
    config = kwargs.pop("config", None) or args(tmp)
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=config,
                          train_dataset=PROMPTS if dataset is None else dataset, **kwargs)
    trainer.train(resume_from_checkpoint=resume)


def _broken_reward(result: Any) -> Callable[..., Any]:
    def broken(completions, **kwargs):
        return result(completions)
    return broken


def _raising_reward(completions, answer, **kwargs):
    return [-abs(float(a) - len(c)) for c, a in zip(completions, answer)]  # float("n/a") raises


def _stream():
    yield from PROMPTS


def _stream_with_a_pad_prompt():
    yield from PROMPTS[:3] + [{"prompt": "<pad>"}] + PROMPTS[3:]


def _hanging_reward(completions, **kwargs):
    time.sleep(30)  # abandoned in its thread after reward_timeout
    return [0.0] * len(completions)


def _exiting_reward(completions, **kwargs):
    os._exit(5)


def _unreachable_server_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/score"


def _earlier_run(tmp: Path, **overrides: Any) -> None:
    train(tmp, config=args(tmp, max_steps=1, **overrides))


def _t5_dir(tmp: Path) -> str:
    from transformers import T5Config

    T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2).save_pretrained(tmp / "t5")
    return str(tmp / "t5")


def _no_chat_template_tokenizer():
    from grpo.embedded import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


@dataclass
class Case:
    name: str
    stage: str
    trigger: Callable[[Path], Any]
    error: type[BaseException]
    problem: str  # regex: the message names the problem...
    fix: str  # ...and the fix
    setup: Callable[[Path], Any] | None = None  # e.g. an earlier run to collide with; its work is not counted


CATALOGUE = [
    Case("unknown config key", "config", lambda t: GRPOConfig(num_generation=4), TypeError,
         "unknown field 'num_generation'", "Did you mean 'num_generations'"),
    Case("num_generations < 2", "config", lambda t: GRPOConfig(num_generations=1), ValueError,
         "needs at least 2", "Set num_generations to 2 or more"),
    Case("batch not divisible into groups", "config",
         lambda t: GRPOConfig(per_device_train_batch_size=6, num_generations=4), ValueError,
         "does not divide into groups of num_generations=4", "setting num_generations to one of"),
    Case("conflicting options: generation_batch_size and steps_per_generation", "config",
         lambda t: GRPOConfig(generation_batch_size=16, steps_per_generation=2, per_device_train_batch_size=8,
                              num_generations=4), ValueError, "describe the same thing", "set only one"),
    Case("conflicting options: delta with a loss it does not apply to", "config",
         lambda t: GRPOConfig(loss_type="cispo", delta=2.0), ValueError, "delta", "loss_type"),
    Case("unknown loss type", "config", lambda t: GRPOConfig(loss_type="dapoo"), ValueError,
         "'dapoo' is not one of", "Did you mean 'dapo'"),
    Case("option TRL removed", "config", lambda t: GRPOConfig(max_prompt_length=256), TypeError,
         "removed it", "filter long prompts"),
    Case("use_vllm without vLLM", "config", lambda t: GRPOConfig(use_vllm=True), ValueError,
         "vLLM is not installed", "set use_vllm=False"),
    Case("unknown reward_error policy", "config", lambda t: GRPOConfig(reward_error="skip"), ValueError,
         "reward_error='skip' is not one of", r"\['raise', 'none'\]"),
    Case("reward_timeout of zero", "config", lambda t: GRPOConfig(reward_timeout=0), ValueError,
         "reward_timeout must be None", "a number of seconds > 0"),
    Case("dataset without a prompt column", "load", lambda t: train(t, dataset=[{"question": "hi"}] * 8), ValueError,
         r"has no 'prompt' column \(its columns: \['question'\]\)", "rename_column\\('question', 'prompt'\\)"),
    Case("empty dataset", "load", lambda t: train(t, dataset=Dataset.from_dict({"prompt": []})), ValueError,
         "train_dataset is empty", "at least one row"),
    Case("prompt of the wrong type", "load", lambda t: train(t, dataset=PROMPTS + [{"prompt": 7}]), TypeError,
         r"train_dataset\[8\]: the prompt is a int", "must be a string or a non-empty list of messages"),
    Case("empty prompt", "load", lambda t: train(t, dataset=PROMPTS + [{"prompt": ""}]), ValueError,
         r"train_dataset\[8\]: the prompt is empty", r"dataset.filter\(lambda row: row\['prompt'\].strip\(\)\)"),
    Case("prompt of special tokens only", "generate", lambda t: train(t, dataset=PROMPTS + [{"prompt": "<pad>"}]),
         ValueError, r"train_dataset\[8\] \('<pad>'\) tokenizes to only special tokens \['<s>', '<pad>'\]",
         "Drop such rows before training"),
    Case("prompt of special tokens only in an IterableDataset", "generate",
         lambda t: train(t, dataset=IterableDataset.from_generator(_stream_with_a_pad_prompt)), ValueError,
         r"prompt \d of the round \('<pad>'\) tokenizes to only special tokens", "Drop such rows before training"),
    Case("reward function a worker process cannot import", "load",
         lambda t: train(t, rewards=lambda completions, **kw: [0.0] * len(completions),
                         config=args(t, reward_num_workers=1)), TypeError,
         "'<lambda>' cannot be sent to a reward worker process", "or set GRPOConfig.reward_num_workers=0"),
    Case("dataset of the wrong type", "load", lambda t: train(t, dataset={"prompt": ["a"]}), TypeError,
         "train_dataset is a dict", "pass a datasets.Dataset"),
    Case("dataset smaller than one round", "load", lambda t: train(t, dataset=PROMPTS[:1]), ValueError,
         "has 1 prompts but one generation round needs 2", "Add prompts or lower the batch size"),
    Case("IterableDataset without max_steps", "load",
         lambda t: train(t, dataset=IterableDataset.from_generator(_stream), config=args(t, max_steps=-1)),
         ValueError, "has no length", "set GRPOConfig.max_steps"),
    Case("eval_strategy without eval_dataset", "load", lambda t: train(t, config=args(t, eval_strategy="steps")),
         ValueError, "needs an eval_dataset", "eval_dataset"),
    Case("no reward function", "load", lambda t: train(t, rewards=[]), ValueError,
         "reward_funcs is empty", "pass at least one"),
    Case("reward_weights of the wrong length", "load",
         lambda t: train(t, config=args(t, reward_weights=[1.0, 2.0])), ValueError,
         "has 2 weights for 1 reward functions", "one weight per function"),
    Case("model path that does not exist", "load", lambda t: train(t, model=str(t / "no-such-model")),
         FileNotFoundError, "does not exist", "Pass an existing directory"),
    Case("conversational prompt without a chat template", "load",
         lambda t: train(t, dataset=[{"prompt": [{"role": "user", "content": "hi"}]}] * 8,
                         processing_class=_no_chat_template_tokenizer()),
         ValueError, "no chat template", "Set tokenizer.chat_template"),
    Case("model that is not a causal LM", "generate", lambda t: train(t, model=_t5_dir(t),
                                                                       processing_class=_no_chat_template_tokenizer()),
         ValueError, "is not a causal language model", "AutoModelForCausalLM"),
    Case("prompt longer than the model's context", "generate",
         lambda t: train(t, dataset=PROMPTS + [{"prompt": "x" * 1100}]), ValueError,
         "prompt 8 is 1101 tokens; .* more than the model's context of 1024", "Drop long prompts"),
    Case("output_dir that holds another run", "generate", train, FileExistsError, "already holds checkpoints",
         "overwrite_output_dir=True", setup=lambda t: _earlier_run(t, learning_rate=1e-3)),
    Case("resume from a checkpoint of other settings", "generate",
         lambda t: train(t, config=args(t, temperature=0.5), resume=True), ValueError,
         r"different settings \(temperature: 1.0 -> 0.5\)", "Resume with the original settings", setup=_earlier_run),
    Case("resume with no checkpoint", "generate", lambda t: train(t, resume=True), FileNotFoundError,
         "holds no checkpoint", "start without resuming"),
    Case("reward function that raises", "first_round",
         lambda t: train(t, rewards=_raising_reward, dataset=[{"prompt": "a", "answer": "3"},
                                                              {"prompt": "b", "answer": "n/a"}]), RuntimeError,
         "'_raising_reward' raised ValueError: could not convert string to float: 'n/a'.*it fails on completion [04]:",
         "return None for a completion"),
    Case("reward function that hangs", "first_round",
         lambda t: train(t, rewards=_hanging_reward, config=args(t, reward_timeout=0.5)), TimeoutError,
         "'_hanging_reward' was stopped after .* no result within reward_timeout=0.5 s",
         "raise GRPOConfig.reward_timeout, or set reward_error='none'"),
    Case("reward function that kills its worker process", "first_round",
         lambda t: train(t, rewards=_exiting_reward, config=args(t, reward_num_workers=1)), RuntimeError,
         r"'_exiting_reward' failed in a worker process .* died \(exit code 5\)", "reward_num_workers=0"),
    Case("reward server that is down", "first_round",
         lambda t: train(t, rewards=RemoteReward(_unreachable_server_url(), max_retries=0)), RuntimeError,
         "the reward server at http://127.0.0.1:.* cannot be reached", "grpo serve-reward"),
    Case("reward function returning the wrong length", "first_round",
         lambda t: train(t, rewards=_broken_reward(lambda c: [0.0] * (len(c) - 1))), ValueError,
         "returned 7 values for 8 completions", "exactly one value per completion"),
    Case("reward function returning strings", "first_round",
         lambda t: train(t, rewards=_broken_reward(lambda c: ["good"] * len(c))), TypeError,
         "returned 'good' \\(str\\) at index 0", "must be numbers"),
    Case("reward function returning NaN", "first_round",
         lambda t: train(t, rewards=_broken_reward(lambda c: [float("nan")] * len(c))), ValueError,
         "returned nan at index 0", "Return None for a completion"),
    Case("reward function returning a scalar", "first_round",
         lambda t: train(t, rewards=_broken_reward(lambda c: 1.0)), TypeError,
         "returned a float", "must return a list with one number"),
]


@pytest.fixture
def expensive_work(monkeypatch) -> dict[str, int]:
    """Counts model loads, generation calls and optimizer steps."""
    counts = {"load": 0, "generate": 0}
    real_load, real_generate = models_module.load_causal_lm, RolloutEngine.generate

    def load(*a, **k):
        counts["load"] += 1
        return real_load(*a, **k)

    def generate(self, *a, **k):
        counts["generate"] += 1
        return real_generate(self, *a, **k)

    monkeypatch.setattr(models_module, "load_causal_lm", load)  # the policy and reference loads
    monkeypatch.setattr(RolloutEngine, "generate", generate)
    return counts


def test_the_catalogue_has_at_least_twenty_cases():
    assert len(CATALOGUE) >= 20 and len({c.name for c in CATALOGUE}) == len(CATALOGUE)
    assert {c.stage for c in CATALOGUE} <= set(STAGES)


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.name for c in CATALOGUE])
def test_bad_input_is_rejected_early_with_problem_and_fix(case: Case, tmp_path, expensive_work):
    if case.setup is not None:
        case.setup(tmp_path)
        expensive_work.update(load=0, generate=0)
    with pytest.raises(case.error) as info:
        case.trigger(tmp_path)
    message = str(info.value)
    assert re.search(case.problem, message), message
    assert re.search(case.fix, message), message
    if case.stage in ("config", "load"):
        assert expensive_work["load"] == 0, "the model was loaded before the error"
    if case.stage in ("config", "load", "generate"):
        assert expensive_work["generate"] == 0, "generation ran before the error"
    if case.stage == "first_round":  # caught on the first scored round: no update, nothing logged or saved
        assert expensive_work["generate"] == 1
        run = tmp_path / "run"
        assert not list(run.glob("checkpoint-*")) and (run / "metrics.jsonl").read_text() == ""


def test_a_prompt_that_tokenizes_to_nothing_names_its_row():
    """A tokenizer that adds no BOS turns an empty prompt into no tokens at all: generation would fail deep inside
    with "cannot reshape tensor of 0 elements" (or quietly continue a row of padding)."""
    from grpo.data import check_prompt_ids
    from grpo.embedded import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_bos_token = False
    prompts = ["Say 1 thing.", ""]  # an IterableDataset's later rows reach here unchecked
    ids = [tokenizer(p).input_ids for p in prompts]
    assert ids[1] == []
    with pytest.raises(ValueError, match=r"prompt 1 of the round \(''\) tokenizes to no tokens; generation needs at "
                       "least one ordinary token"):
        check_prompt_ids(prompts, ids, tokenizer, max_completion_length=8, limit=None)
