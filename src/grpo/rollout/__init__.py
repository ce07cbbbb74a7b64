"""Generation backends behind one small interface, and the `Rollout` batch they feed."""

from grpo.rollout.base import Generation, Generator, Rollout
from grpo.rollout.engine import RolloutEngine
from grpo.rollout.hf_generate import TransformersGenerator

__all__ = ["Generation", "Generator", "Rollout", "RolloutEngine", "TransformersGenerator"]
