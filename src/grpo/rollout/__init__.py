"""Generation backends behind one small interface, the `Rollout` batch they feed, and multi-turn rollouts (tools,
environments, a user's rollout_func) built on them."""

from collections.abc import Callable
from typing import Any

from grpo.config import GRPOConfig
from grpo.rollout.base import Episodes, Generation, Generator, Rollout
from grpo.rollout.chat_templates import check_tool_template, set_chat_template
from grpo.rollout.engine import RolloutEngine
from grpo.rollout.environments import Environments
from grpo.rollout.hf_generate import TransformersGenerator
from grpo.rollout.multiturn import MultiTurnRollout, ToolSettings
from grpo.rollout.tool_calls import ToolCallFormat, tool_call_format
from grpo.rollout.toolbox import check_tools
from grpo.rollout.user_rollout import UserRollout

__all__ = ["Environments", "Episodes", "Generation", "Generator", "MultiTurnRollout", "Rollout", "RolloutEngine",
           "TransformersGenerator", "UserRollout", "check_episodes", "check_tools", "default_generator",
           "episode_source", "set_chat_template"]


def default_generator(tokenizer: Any, args: GRPOConfig, rank: int = 0) -> Generator:
    """The configured backend: the built-in engine, or transformers `generate`."""
    if args.generation_backend == "transformers":
        return TransformersGenerator(tokenizer, args.sampling_params, max_batch_rows=args.generation_max_batch_rows)
    # each process samples its own stream; one stream for all would correlate the processes' samples
    return RolloutEngine(tokenizer, args.sampling_params, max_batch_rows=args.generation_max_batch_rows,
                         seed=args.seed + rank)


def check_episodes(tokenizer: Any, args: GRPOConfig, tools: list[Any], environments: Environments | None,
                   rollout_func: Any, conversational: bool) -> ToolCallFormat | None:
    """Before the model loads: what tools, environments or a rollout_func need from the prompts and the chat
    template. Returns the format tool calls are written in (None: no tool calls to read)."""
    if rollout_func is not None:
        if tools or environments is not None:
            raise ValueError("rollout_func replaces grpo's generation, tool turns included: run tools inside it, or "
                             "pass tools / environment_factory without a rollout_func.")
        return tool_call_format(getattr(tokenizer, "chat_template", None))
    if not tools and environments is None:
        return None
    if not conversational:
        raise ValueError("tools and environments need conversational prompts (lists of {'role', 'content'} "
                         "messages): the chat template describes the tools to the model and renders their results. "
                         "Give prompts like [{'role': 'user', 'content': '...'}].")
    return check_tool_template(tokenizer, args.chat_template_kwargs)


def episode_source(generator: Generator, tokenizer: Any, args: GRPOConfig, call_format: ToolCallFormat | None,
                   tools: list[Callable[..., Any]], environments: Environments | None,
                   rollout_func: Callable[[list[Any]], dict[str, Any]] | None, context_limit: int | None
                   ) -> MultiTurnRollout | UserRollout | None:
    """What generates a round instead of plain single-turn generation (None: nothing does)."""
    eos_token_id = args.sampling_params.eos_token_id
    if rollout_func is not None:
        return UserRollout(rollout_func, tokenizer, call_format, eos_token_id)
    if call_format is None:
        return None
    settings = ToolSettings(args.max_completion_length, args.max_tool_calling_iterations, args.tool_timeout,
                            args.chat_template_kwargs or {}, eos_token_id)
    return MultiTurnRollout(generator, tokenizer, call_format, tools, environments, settings, context_limit)
