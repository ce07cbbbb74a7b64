"""Generation backends behind one small interface, the `Rollout` batch they feed, and multi-turn rollouts (tools,
environments, a user's rollout_func) built on them."""

from typing import Any

from grpo.config import GRPOConfig
from grpo.rollout.base import Episodes, Generation, Generator, Rollout
from grpo.rollout.chat_templates import set_chat_template
from grpo.rollout.engine import RolloutEngine
from grpo.rollout.hf_generate import TransformersGenerator
from grpo.rollout.rounds import RolloutSpec, RoundSource

__all__ = ["Episodes", "Generation", "Generator", "Rollout", "RolloutEngine", "RolloutSpec", "RoundSource",
           "TransformersGenerator", "default_generator", "set_chat_template"]


def default_generator(tokenizer: Any, args: GRPOConfig, rank: int = 0) -> Generator:
    """The configured backend: the built-in engine, or transformers `generate`. The engine samples from float32
    weight copies on CPU even when training runs in bf16 (`RolloutEngine`'s `copy_dtype` says why)."""
    if args.generation_backend == "transformers":
        return TransformersGenerator(tokenizer, args.sampling_params, max_batch_rows=args.generation_max_batch_rows)
    # each process samples its own stream; one stream for all would correlate the processes' samples
    return RolloutEngine(tokenizer, args.sampling_params, max_batch_rows=args.generation_max_batch_rows,
                         seed=args.seed + rank)

