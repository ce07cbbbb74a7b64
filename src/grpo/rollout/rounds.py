"""What generates a round of completions, chosen once from TRL's arguments: one turn per completion (the default),
turns with tools and environments (`rollout/multiturn.py`), or a user's `rollout_func` (`rollout/user_rollout.py`).

The trainer builds a `RolloutSpec` from `tools=`, `environment_factory=` and `rollout_func=` before anything
expensive (tools described, environments probed, their rows and the chat template checked), asks it for the
environments' reward functions and the chat template's `tools=`, and, once the model is loaded, for the round
source it then calls every round: `source.generate(model, rows, G) -> Episodes`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grpo.config import GRPOConfig
from grpo.data import PromptSource, check_prompt_ids, is_conversational, tokenize_prompts
from grpo.rollout.base import Episodes, Generator
from grpo.rollout.chat_templates import check_tool_template
from grpo.rollout.environments import Environments
from grpo.rollout.multiturn import MultiTurnRollout, ToolSettings
from grpo.rollout.tool_calls import ToolCallFormat, tool_call_format
from grpo.rollout.toolbox import check_tools
from grpo.rollout.user_rollout import UserRollout


class SingleTurnRollout:
    """G completions of each row's prompt, one turn each: the plain GRPO round."""

    def __init__(self, generator: Generator, tokenizer: Any, args: GRPOConfig, context_limit: int | None):
        self.generator, self.tokenizer, self.context_limit = generator, tokenizer, context_limit
        self.template_kwargs, self.max_completion_length = args.chat_template_kwargs, args.max_completion_length

    def generate(self, model: Any, rows: list[dict[str, Any]], num_generations: int) -> Episodes:
        prompts = [row["prompt"] for row in rows]
        prompt_ids = tokenize_prompts(self.tokenizer, prompts, self.template_kwargs)
        # the trainer checked a Dataset's prompts up front; an IterableDataset's are checked here, round by round
        check_prompt_ids(prompts, prompt_ids, self.tokenizer, self.max_completion_length, self.context_limit)
        generation = self.generator.generate(model, prompt_ids, num_generations)
        texts = self.tokenizer.batch_decode(generation.completion_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if is_conversational(prompts[0]) \
            else texts
        return Episodes(generation, [p for p in prompts for _ in range(num_generations)], completions)


RoundSource = SingleTurnRollout | MultiTurnRollout | UserRollout


class RolloutSpec:
    """TRL's `tools`, `environment_factory` and `rollout_func`, checked, and the round source they make."""

    def __init__(self, tools: list[Callable[..., Any]] | None, environment_factory: Any,
                 rollout_func: Callable[[list[Any]], dict[str, Any]] | None, source: PromptSource):
        """`rollout_func(prompts)`: TRL's rollout_func with its second argument (the trainer) bound by the caller."""
        self.tools = list(tools or [])
        check_tools(self.tools)
        if rollout_func is not None and (self.tools or environment_factory is not None):
            raise ValueError("rollout_func replaces grpo's generation, tool turns included: run tools inside it, or "
                             "pass tools / environment_factory without a rollout_func.")
        self.rollout_func = rollout_func
        self.environments = Environments(environment_factory) if environment_factory is not None else None
        if self.environments is not None:  # a dict of environments: each row must name one that exists
            self.environments.check_rows(source.columns, source.column("environment"))
        self.call_format: ToolCallFormat | None = None  # set by check_template

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or self.environments is not None

    def reward_functions(self) -> list[Callable[..., Any]]:
        """The environments' `get_reward`, one reward function per environment class that has one."""
        return self.environments.reward_functions() if self.environments is not None else []

    def all_tools(self) -> list[Callable[..., Any]]:
        """Every tool a prompt may be shown (all environments' at once: an upper bound on a prompt's length)."""
        return self.tools + (self.environments.tools if self.environments is not None else [])

    def template_kwargs(self, chat_template_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """`chat_template_kwargs` with the tools the template describes (none: no tool preamble)."""
        return dict(chat_template_kwargs or {}, tools=self.all_tools() or None)

    def check_template(self, tokenizer: Any, args: GRPOConfig, conversational: bool) -> None:
        """Before the model loads: tools need conversational prompts and a chat template that renders a whole tool
        exchange; the template also says how calls are written (for a rollout_func's completions too)."""
        if self.rollout_func is not None:
            self.call_format = tool_call_format(getattr(tokenizer, "chat_template", None))
            return
        if not self.uses_tools:
            return
        if not conversational:
            raise ValueError("tools and environments need conversational prompts (lists of {'role', 'content'} "
                             "messages): the chat template describes the tools to the model and renders their "
                             "results. Give prompts like [{'role': 'user', 'content': '...'}].")
        self.call_format = check_tool_template(tokenizer, args.chat_template_kwargs)

    def round_source(self, generator: Generator, tokenizer: Any, args: GRPOConfig, context_limit: int | None
                     ) -> RoundSource:
        """What generates each round."""
        eos_token_id = args.sampling_params.eos_token_id
        if self.rollout_func is not None:
            return UserRollout(self.rollout_func, tokenizer, self.call_format, eos_token_id)
        if not self.uses_tools:
            return SingleTurnRollout(generator, tokenizer, args, context_limit)
        assert self.call_format is not None, "check_template comes first"
        settings = ToolSettings(args.max_completion_length, args.max_tool_calling_iterations, args.tool_timeout,
                                args.chat_template_kwargs or {})
        return MultiTurnRollout(generator, tokenizer, self.call_format, self.tools, self.environments, settings,
                                context_limit)
