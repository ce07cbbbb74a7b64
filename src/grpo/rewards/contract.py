"""The reward contract: how reward functions are called and what they must return.

A reward function is called as f(prompts=..., completions=..., completion_ids=..., trainer_state=...,
**columns) where every extra dataset column arrives as a keyword argument aligned with the completions. It
returns one value per completion: a number, or None for "not applicable" (skipped in the weighted sum; a
completion with no applicable reward gets advantage 0). Async functions run concurrently. A string is a
reward model (a sequence-classification checkpoint); a `PreTrainedModel` is one already loaded; an http(s)://
URL is a reward server (grpo.rewards.remote). A wrong-length return is an error, as in TRL 1.16; so are NaN and
inf, which TRL takes as None and as a reward (tests/trl_parity/test_parity_rewards.py), each naming the function.
The functions also get TRL's `log_metric` and `log_extra` (grpo.rewards.runner.RewardLogs). How the functions are
called (time limit, error policy, worker processes) is grpo.rewards.runner's business.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from grpo.rewards.remote import RemoteReward, is_reward_url

RewardFunc = Callable[..., Any]


@dataclass
class RewardFunction:
    name: str
    func: RewardFunc
    is_async: bool


def reward_func_name(func: Any) -> str:
    """TRL's naming: the function's __name__ (through functools.partial), a model's name, or the class name."""
    while isinstance(func, functools.partial):
        func = func.func
    if isinstance(func, RewardModel):
        return func.name
    if hasattr(func, "__name__"):
        return func.__name__
    return type(func).__name__


def prepare_reward_funcs(
    reward_funcs: Any, reward_processing_classes: Any = None, model_init_kwargs: dict[str, Any] | None = None,
    environment_rewards: list[RewardFunc] | tuple[()] = (),
) -> list[RewardFunction]:
    """Normalise `reward_funcs` to a list of named callables, loading reward models given as paths, then add the
    `get_reward` functions of the environments (which alone may be the run's rewards, as in TRL)."""
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    funcs = [] if funcs == [None] else funcs
    if not funcs and not environment_rewards:
        raise ValueError("reward_funcs is empty: pass at least one reward function (or an environment_factory whose "
                         "environments define get_reward()).")
    if reward_processing_classes is not None and not isinstance(reward_processing_classes, (list, tuple)):
        reward_processing_classes = [reward_processing_classes]
    if reward_processing_classes is not None and len(reward_processing_classes) != len(funcs):
        raise ValueError(
            f"reward_processing_classes has {len(reward_processing_classes)} entries for {len(funcs)} reward "
            "functions; give one per reward function (None for plain functions)."
        )
    prepared = []
    for i, func in enumerate(funcs):
        tokenizer = reward_processing_classes[i] if reward_processing_classes else None
        if is_reward_url(func):
            func = RemoteReward(func)
        elif isinstance(func, str) or _is_pretrained_model(func):
            func = RewardModel(func, tokenizer, model_init_kwargs)
        elif not callable(func):
            raise TypeError(
                f"reward_funcs[{i}] is a {type(func).__name__}; expected a callable "
                "f(completions, **kwargs) -> list[float], a reward model path, a PreTrainedModel or a reward "
                "server's http(s):// URL."
            )
        prepared.append(RewardFunction(reward_func_name(func), func, _is_coroutine_function(func)))
    prepared += [RewardFunction(reward_func_name(f), f, _is_coroutine_function(f)) for f in environment_rewards]
    taken: set[str] = set()
    for reward in prepared:  # metric names must be unique: suffix repeats with the first free _k
        name, k = reward.name, 0
        while name in taken or (name != reward.name and name in {r.name for r in prepared}):
            name, k = f"{reward.name}_{k}", k + 1
        reward.name = name
        taken.add(name)
    return prepared


def _is_coroutine_function(func: Any) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


def _is_pretrained_model(obj: Any) -> bool:
    from transformers import PreTrainedModel

    return isinstance(obj, PreTrainedModel)


def validate_rewards(name: str, values: Any, expected: int) -> list[float]:
    """Check one function's output: a sequence of `expected` numbers or None. None becomes NaN."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    elif hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # numpy arrays
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise TypeError(
            f"reward function '{name}' returned a {type(values).__name__}; it must return a list with one "
            f"number (or None) per completion, here {expected}."
        )
    if len(values) != expected:
        raise ValueError(
            f"reward function '{name}' returned {len(values)} values for {expected} completions; it must "
            "return exactly one value per completion (None where it does not apply)."
        )
    out = []
    for i, value in enumerate(values):
        if value is None:
            out.append(math.nan)
            continue
        if isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"reward function '{name}' returned {value!r} ({type(value).__name__}) at index {i}; rewards "
                "must be numbers (int, float, bool) or None."
            )
        if not math.isfinite(float(value)):
            raise ValueError(
                f"reward function '{name}' returned {value} at index {i}; rewards must be finite. Return None "
                "for a completion the function does not apply to."
            )
        out.append(float(value))
    return out


class RewardModel:
    """A sequence-classification model used as a reward: score = logits[:, 0] of prompt + completion."""

    def __init__(self, model: Any, tokenizer: Any = None, model_init_kwargs: dict[str, Any] | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model, str):
            self.name = model.rstrip("/").split("/")[-1]
            kwargs = dict(model_init_kwargs or {})
            model = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, **kwargs)
        else:
            self.name = model.config._name_or_path.rstrip("/").split("/")[-1] or type(model).__name__
        if tokenizer is None:
            trust = bool((model_init_kwargs or {}).get("trust_remote_code", False))
            tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path, trust_remote_code=trust)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.eval()
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        if isinstance(prompts[0], str):
            texts = [p + c for p, c in zip(prompts, completions)]
        else:
            texts = [
                self.tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)
            ]
        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right",
                               add_special_tokens=False).to(device)
        return self.model(**batch).logits[:, 0].float().tolist()
