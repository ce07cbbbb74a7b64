"""`rollout_func`: a user's function generates the round instead of the built-in generation (TRL's contract).

It is called as rollout_func(prompts, trainer), with this process's prompts, each repeated G times (one completion
per entry, as TRL's sampler hands them over), and returns a dict with `prompt_ids`, `completion_ids` and `logprobs`
(lists, one per prompt; logprobs one per completion token). An `env_mask` (one 0/1 per completion token) marks the
tokens the model did not sample, like a tool turn's, out of the loss; every other key (`logprob_token_ids`
included) reaches the reward functions as a keyword argument. grpo computes the old policy's log-probs itself, so
`logprobs` is checked and not used (TRL uses it only for vLLM's importance-sampling correction).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from grpo.rollout.base import Episodes, Generation, eos_token_ids, left_pad
from grpo.rollout.tool_calls import ToolCallFormat, read_turn

REQUIRED_KEYS = ("prompt_ids", "completion_ids", "logprobs")


class UserRollout:
    """Episodes from `rollout_func(prompts)` (the trainer binds its second argument)."""

    def __init__(self, rollout_func: Callable[[list[Any]], dict[str, Any]], tokenizer: Any,
                 call_format: ToolCallFormat | None = None, eos_token_id: int | list[int] | None = None):
        self.rollout_func, self.tokenizer, self.format = rollout_func, tokenizer, call_format
        self.eos_ids = eos_token_ids(tokenizer, eos_token_id)

    def generate(self, model: Any, rows: list[dict[str, Any]], num_generations: int) -> Episodes:
        prompts = [row["prompt"] for row in rows for _ in range(num_generations)]
        output = self.rollout_func(copy.deepcopy(prompts))  # the dataset's rows stay as they were
        n = len(prompts)
        check_output(output, n)
        completion_ids = [list(ids) for ids in output["completion_ids"]]
        env_mask = output.get("env_mask")
        prompt_ids, prompt_mask = left_pad([list(ids) for ids in output["prompt_ids"]], self.tokenizer.pad_token_id)
        ids, completion_mask = left_pad(completion_ids, self.tokenizer.pad_token_id, right=True)
        tool_mask = None if env_mask is None else left_pad([list(m) for m in env_mask], 0, right=True)[0]
        is_eos = torch.tensor([bool(c) and c[-1] in self.eos_ids for c in completion_ids])
        generation = Generation(prompt_ids, prompt_mask, ids, completion_mask, is_eos, tool_mask)
        extra = {key: list(value) for key, value in output.items() if key not in (*REQUIRED_KEYS, "env_mask")}
        conversational = bool(prompts) and isinstance(prompts[0], list)
        completions = [self._completion(c, conversational) for c in completion_ids]
        return Episodes(generation, prompts, completions, extra)

    def _completion(self, ids: list[int], conversational: bool) -> Any:
        """Text, or for conversations the assistant message (with its tool calls, when the template has a format)."""
        if not conversational:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return [read_turn(self.tokenizer, ids, self.format)[0]]


def check_output(output: Any, n: int) -> None:
    """The returned dict has the required keys, one entry per prompt in each list, and per-token lists (logprobs,
    env_mask) as long as their completion."""
    if not isinstance(output, dict):
        raise TypeError(f"rollout_func returned a {type(output).__name__}; it must return a dict with keys "
                        f"{list(REQUIRED_KEYS)}.")
    missing = [key for key in REQUIRED_KEYS if key not in output]
    if missing:
        raise ValueError(f"rollout_func must return keys {missing} in its output dict.")
    for key, value in output.items():
        if not isinstance(value, (list, tuple)) or len(value) != n:
            got = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
            raise ValueError(f"rollout_func returned '{key}' with {got} entries for {n} prompts; every key needs "
                             "one entry per prompt it was given (the prompts come repeated num_generations times).")
    for key in ("logprobs", "env_mask"):
        for i, (per_token, ids) in enumerate(zip(output.get(key) or [], output["completion_ids"])):
            if len(per_token) != len(ids):
                raise ValueError(f"rollout_func returned '{key}'[{i}] with {len(per_token)} values for a completion "
                                 f"of {len(ids)} tokens; it needs one per completion token.")
    if any(len(ids) == 0 for ids in output["prompt_ids"]):
        raise ValueError("rollout_func returned an empty prompt_ids entry; every completion needs its prompt's tokens.")
