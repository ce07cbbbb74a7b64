"""The generation interface and the `Rollout`: one generation round, carried from the sampler to the loss."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class Generation:
    """What a generator returns for N = (unique prompts) x G rows, the G samples of a prompt consecutive."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, C) right-padded; the EOS token, if sampled, is kept and masked in
    completion_mask: torch.Tensor  # (N, C) 1 up to and including the first EOS
    is_eos: torch.Tensor  # (N,) bool: the completion ended with EOS rather than at max_completion_length
    tool_mask: torch.Tensor | None = None  # (N, C) multi-turn: 1 on the model's tokens, 0 on tool turns' tokens
    # (N, C) float32 each, where the engine measured them (its compiled sampler, nothing but the temperature shaping
    # the distribution), 0 past the end: each token's log-prob and entropy of softmax(logits / temperature) as the
    # sampler drew it
    logps: torch.Tensor | None = None
    entropies: torch.Tensor | None = None

    def model_token_mask(self) -> torch.Tensor:
        """1 on the tokens the model sampled: the completion mask, less tool turns."""
        return self.completion_mask if self.tool_mask is None else self.completion_mask * self.tool_mask


@dataclass
class Episodes:
    """A round from a multi-turn rollout (tools, environments) or a user's `rollout_func`: the tokens, and what the
    reward functions see, one entry per completion."""

    generation: Generation
    prompts: list[Any]  # each completion's prompt as the model saw it (an environment's reset may add to it)
    completions: list[Any]  # conversations: the whole exchange, assistant turns, tool calls and tool results
    reward_kwargs: dict[str, list[Any]] = field(default_factory=dict)  # environments, rollout_func's extra keys
    tool_counts: dict[str, float] | None = None  # calls and failures (`ToolCounts.sums`), when tools ran


class Generator(Protocol):
    """A generation backend. `prompt_ids` are the unique prompts of a round; each is sampled G times.

    A backend may also take `max_new_tokens` (one budget per row, instead of max_completion_length for all) and
    `on_row_done(row, token_ids, ended)` (called as each row ends, with EOS or a stop string (ended) or at its
    budget, while the others decode), as the built-in engine does; multi-turn rollouts use them where they exist
    (see `rollout/multiturn.py`).
    """

    def generate(self, model: Any, prompt_ids: list[list[int]], num_generations: int) -> Generation: ...


def eos_token_ids(tokenizer: Any, eos_token_id: int | list[int] | None) -> list[int]:
    """The ids that end a completion, as a list: `eos_token_id` (from generation_kwargs, it overrides as in TRL)
    or the tokenizer's."""
    eos = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def left_pad(sequences: list[list[int]], pad_id: int, right: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of the sequences padded to the longest with `pad_id` on the left (`right`: on the right)."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            columns = slice(0, len(s)) if right else slice(width - len(s), width)
            ids[i, columns] = torch.tensor(s)
            mask[i, columns] = 1
    return ids, mask


def pad_and_cat(tensors: list[torch.Tensor], value: float, left: bool = False) -> torch.Tensor:
    """Concatenate (n_i, T_i) tensors row-wise, padding each to the widest T on the left or the right."""
    width = max(t.size(1) for t in tensors)
    pads = [(width - t.size(1), 0) if left else (0, width - t.size(1)) for t in tensors]
    return torch.cat([torch.nn.functional.pad(t, pad, value=value) for t, pad in zip(tensors, pads)])


def mask_after_eos(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion mask (1 up to and including the first EOS) and whether each row reached an EOS."""
    is_eos_token = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    has_eos = is_eos_token.any(dim=1)
    first_eos = torch.where(has_eos, is_eos_token.int().argmax(dim=1), completion_ids.size(1))
    positions = torch.arange(completion_ids.size(1), device=completion_ids.device)
    return (positions.unsqueeze(0) <= first_eos.unsqueeze(1)).long(), has_eos


@dataclass
class Rollout:
    """One generation round: token tensors, rewards, advantages and the log-probs the loss needs."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # (N, C) right-padded
    completion_mask: torch.Tensor
    is_eos: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,)
    rewards_per_func: torch.Tensor  # (N, F), NaN where a function returned None
    old_logps: torch.Tensor | None = None  # (N, C) policy log-probs at generation time, when off-policy
    ref_logps: torch.Tensor | None = None  # (N, C) reference-model log-probs, when beta > 0
    tool_mask: torch.Tensor | None = None  # (N, C) multi-turn: 0 on tool turns' tokens, which the loss leaves out
    # (N, C) `Generation.entropies`, kept while the weights are those that sampled (dropped after the round's first
    # optimizer step): the step's entropies without a forward (`StepRows._without_silent_rows`, `_high_entropy_masks`)
    sampled_entropy: torch.Tensor | None = None
    prompts: list[Any] = field(default_factory=list)
    completions: list[Any] = field(default_factory=list)
    extra: list[dict[str, Any]] = field(default_factory=list)  # per row: columns reward functions gave log_extra

    def __len__(self) -> int:
        return self.completion_ids.size(0)

    def row_lengths(self) -> torch.Tensor:
        """(N,) each row's prompt + completion tokens: what micro-batches are sorted and cut by (`grpo.batching`)."""
        return self.prompt_mask.sum(1) + self.completion_mask.sum(1)

    @classmethod
    def concat(cls, pieces: list[Rollout], pad_id: int) -> Rollout:
        """Stack rollouts row-wise, re-padding prompts on the left and completions on the right."""
        pad_values = {"prompt_ids": pad_id, "completion_ids": pad_id}  # masks and log-probs pad with 0
        joined: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            values = [getattr(p, f.name) for p in pieces]
            if values[0] is None or isinstance(values[0], list):
                joined[f.name] = None if values[0] is None else [item for v in values for item in v]
            elif values[0].dim() == 2 and f.name != "rewards_per_func":
                joined[f.name] = pad_and_cat(values, pad_values.get(f.name, 0), left=f.name.startswith("prompt"))
            else:
                joined[f.name] = torch.cat(values)
        return cls(**joined)

    def select(self, rows: torch.Tensor) -> Rollout:
        """The given rows, with padding columns that none of them uses trimmed away."""
        picked: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                picked[f.name] = value[rows.to(value.device)]
            elif isinstance(value, list):  # empty: `extra` of a round saved before it existed
                picked[f.name] = [value[i] for i in rows.tolist()] if value else []
            else:
                picked[f.name] = value
        batch = Rollout(**picked)
        prompt_start = int((batch.prompt_mask.sum(0) > 0).int().argmax())
        completion_end = int(batch.completion_mask.sum(1).max())
        batch.prompt_ids, batch.prompt_mask = batch.prompt_ids[:, prompt_start:], batch.prompt_mask[:, prompt_start:]
        for name in ("completion_ids", "completion_mask", "old_logps", "ref_logps", "tool_mask", "sampled_entropy"):
            value = getattr(batch, name)
            if value is not None:
                setattr(batch, name, value[:, :completion_end])
        return batch
