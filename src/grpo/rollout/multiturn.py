"""Multi-turn rollouts: generation that stops at each tool call, runs the tools and goes on with their results.

A round's episodes (G per prompt) decode their first turn together, as single-turn generation does: one prefill
per prompt, shared by its G rows. When a row's turn ends with EOS and holds tool calls, the calls start at once,
in threads or on the event loop (`rollout/toolbox.py`), while the other rows go on decoding: the engine reports each
row as it ends (`on_row_done`). When the turn's batch is done, the rows with calls wait only for calls still
running, take the tool turn (the results as the chat template renders them, then the next assistant prompt) and
decode their next turn together, each within what is left of its max_completion_length tokens. That goes on for
at most max_tool_calling_iterations tool turns (None: no limit), as in TRL. A backend without `on_row_done`
(transformers' generate, a user's generator) runs the calls after the turn instead, still all at once.

The completion is the concatenation model turn, tool turn, model turn, ... The model's tokens are kept as sampled,
never re-tokenized; the tool mask marks them (1) apart from the tool turns' (0), which the policy attends to but
the loss, the entropy and the length metrics leave out. Tool results that would not leave room for one more
token are dropped, and the episode ends with the turn that called (TRL drops them too).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from grpo.data import check_prompt_ids, tokenize_prompts
from grpo.rollout.base import Episodes, Generation, Generator, left_pad
from grpo.rollout.chat_templates import tool_turn_ids
from grpo.rollout.environments import Environments, environment_tools
from grpo.rollout.tool_calls import ToolCallFormat, read_turn
from grpo.rollout.toolbox import PendingResult, Toolbox, ToolCounts, tool_name


@dataclass(frozen=True)
class ToolSettings:
    """The GRPOConfig fields a multi-turn rollout follows."""

    max_completion_length: int
    max_tool_calling_iterations: int | None  # None: no limit; 0: tools are described but never run
    tool_timeout: float
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Episode:
    """One completion's exchange as it grows."""

    prompt: list[dict[str, Any]]
    prompt_ids: list[int]
    toolbox: Toolbox
    environment: Any = None
    completion_ids: list[int] = field(default_factory=list)
    tool_mask: list[int] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    tool_turns: int = 0
    pending: list[PendingResult] = field(default_factory=list)
    turn_open: bool = True  # decoding a turn whose tokens have not been taken yet
    ended_with_eos: bool = False

    def context(self) -> list[int]:
        return self.prompt_ids + self.completion_ids


class MultiTurnRollout:
    """Rounds of episodes with tool turns, through any `Generator`."""

    def __init__(self, generator: Generator, tokenizer: Any, call_format: ToolCallFormat,
                 tools: list[Callable[..., Any]], environments: Environments | None, settings: ToolSettings,
                 context_limit: int | None = None):
        self.generator, self.tokenizer, self.format = generator, tokenizer, call_format
        self.tools, self.environments, self.settings = tools, environments, settings
        self.context_limit = context_limit
        names = [tool_name(t) for t in tools + (environments.tools if environments else [])]
        self.tool_names = list(dict.fromkeys(names))
        parameters = inspect.signature(generator.generate).parameters
        self.reports_rows = "on_row_done" in parameters and "max_new_tokens" in parameters
        max_turns = settings.max_tool_calling_iterations
        self.max_tool_turns = float("inf") if max_turns is None else max_turns

    def generate(self, model: Any, rows: list[dict[str, Any]], num_generations: int) -> Episodes:
        episodes = self._start(rows, num_generations)
        counts = ToolCounts(self.tool_names)
        groups_share_prompts = all(episodes[i].prompt_ids == episodes[i - i % num_generations].prompt_ids
                                   for i in range(len(episodes)))
        batch, g = episodes, num_generations if groups_share_prompts else 1
        while batch:
            self._decode_turn(model, batch, g)
            batch, g = [e for e in batch if self._take_tool_turn(e, counts)], 1
        return self._episodes(episodes, counts)

    # ---- episodes ------------------------------------------------------------------------------------------
    def _start(self, rows: list[dict[str, Any]], g: int) -> list[Episode]:
        """The round's episodes: environments reset, each prompt tokenized with the tools it may call."""
        if self.environments is not None:
            started = self.environments.start_episodes(rows, g)
        else:
            started = [(None, row["prompt"]) for row in rows for _ in range(g)]
        episodes, tokenized = [], {}
        for environment, prompt in started:
            tools = self.tools + (environment_tools(environment) if environment is not None else [])
            key = (repr(prompt), type(environment))  # G episodes of a prompt usually tokenize alike
            if key not in tokenized:
                kwargs = dict(self.settings.chat_template_kwargs, tools=tools or None)  # None: no tool preamble
                tokenized[key] = tokenize_prompts(self.tokenizer, [prompt], kwargs)[0]
            episodes.append(Episode(prompt, tokenized[key], Toolbox(tools, self.settings.tool_timeout), environment))
        check_prompt_ids([e.prompt for e in episodes], [e.prompt_ids for e in episodes], self.tokenizer,
                         self.settings.max_completion_length, self.context_limit)
        return episodes

    def _decode_turn(self, model: Any, batch: list[Episode], g: int) -> None:
        """One turn of every episode in `batch` (the G rows of a group consecutive when g > 1)."""
        budgets = [self.settings.max_completion_length - len(e.completion_ids) for e in batch]
        contexts = [e.context() for e in batch[::g]]
        if self.reports_rows:
            generation = self.generator.generate(
                model, contexts, g, max_new_tokens=budgets,
                on_row_done=lambda row, ids, ended: self._end_turn(batch[row], ids, ended))
        else:
            generation = self.generator.generate(model, contexts, g)
        for i, episode in enumerate(batch):
            if episode.turn_open:  # not reported: the backend reports no rows
                ids = generation.completion_ids[i][generation.completion_mask[i].bool()].tolist()
                cut = len(ids) > budgets[i]
                self._end_turn(episode, ids[:budgets[i]], bool(generation.is_eos[i]) and not cut)

    def _end_turn(self, episode: Episode, ids: list[int], ended: bool) -> None:
        """Take a turn's tokens (`ended`: with EOS or a stop string, not cut at its budget): its assistant message,
        and the start of its tool calls when it makes any."""
        episode.turn_open = False
        episode.completion_ids += ids
        episode.tool_mask += [1] * len(ids)
        episode.ended_with_eos = ended
        # a turn cut at its budget is not read for calls: there would be no room for an answer
        message, calls = read_turn(self.tokenizer, ids, self.format, may_call=ended)
        episode.messages.append(message)
        if calls and episode.tool_turns < self.max_tool_turns:
            episode.pending = [episode.toolbox.start(call) for call in calls]

    def _take_tool_turn(self, episode: Episode, counts: ToolCounts) -> bool:
        """Append the results of the episode's calls, if it made any; whether it decodes another turn."""
        if not episode.pending:
            return False
        results = [pending.result() for pending in episode.pending]
        episode.pending = []
        for result in results:
            counts.record(result)
        messages = [result.message() for result in results]
        tool_turn = tool_turn_ids(self.tokenizer, messages, self.settings.chat_template_kwargs)
        if len(episode.completion_ids) + len(tool_turn) >= self.settings.max_completion_length:
            return False  # no room left to answer
        episode.messages += messages
        episode.completion_ids += tool_turn
        episode.tool_mask += [0] * len(tool_turn)
        episode.tool_turns += 1
        episode.turn_open = True
        return True

    def _episodes(self, episodes: list[Episode], counts: ToolCounts) -> Episodes:
        pad_id = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in episodes], pad_id)
        completion_ids, completion_mask = left_pad([e.completion_ids for e in episodes], pad_id, right=True)
        tool_mask, _ = left_pad([e.tool_mask for e in episodes], 0, right=True)
        is_eos = torch.tensor([e.ended_with_eos for e in episodes])
        generation = Generation(prompt_ids, prompt_mask, completion_ids, completion_mask, is_eos, tool_mask)
        reward_kwargs = {} if self.environments is None else {"environments": [e.environment for e in episodes]}
        return Episodes(generation, [e.prompt for e in episodes], [e.messages for e in episodes], reward_kwargs,
                        counts.sums())
