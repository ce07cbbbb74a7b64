"""Generation backends behind one small interface, and the `Rollout` batch they feed."""

from typing import Any

from grpo.config import GRPOConfig
from grpo.rollout.base import Generation, Generator, Rollout
from grpo.rollout.engine import RolloutEngine
from grpo.rollout.hf_generate import TransformersGenerator

__all__ = ["Generation", "Generator", "Rollout", "RolloutEngine", "TransformersGenerator", "default_generator"]


def default_generator(tokenizer: Any, args: GRPOConfig, rank: int = 0) -> Generator:
    """The configured backend: the built-in engine, or transformers `generate`."""
    if args.generation_backend == "transformers":
        return TransformersGenerator(tokenizer, args.sampling_params, max_batch_rows=args.generation_max_batch_rows)
    # each process samples its own stream; one stream for all would correlate the processes' samples
    return RolloutEngine(tokenizer, args.sampling_params, max_batch_rows=args.generation_max_batch_rows,
                         seed=args.seed + rank)

