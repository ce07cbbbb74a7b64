"""How completions are sampled: `SamplingParams`, GRPOConfig's generation fields with `generation_kwargs` applied
over them (as in TRL), and which backend can run a set of generation_kwargs.

The built-in engine implements the named fields itself (ENGINE_GENERATION_KWARGS); any other GenerationConfig name
(no_repeat_ngram_size, bad_words_ids, min_new_tokens, stop_strings, typical_p, ...) runs inside the engine through
transformers' own logits processors and stopping criteria (grpo.rollout.processors). Only the names that change
how `generate` searches (beams, assisted or contrastive decoding, a cache class, guidance that runs the model
twice) need transformers' `generate`: GRPOConfig switches the run to generation_backend="transformers" for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ENGINE_GENERATION_KWARGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "do_sample",
                            "max_new_tokens", "eos_token_id", "suppress_tokens")
# name -> its neutral value (which changes nothing, so it needs no switch)
TRANSFORMERS_ONLY_GENERATION_KWARGS: dict[str, Any] = {
    "num_beams": 1, "num_beam_groups": 1, "diversity_penalty": 0.0, "length_penalty": 1.0, "early_stopping": False,
    "force_words_ids": None, "constraints": None, "assistant_model": None, "prompt_lookup_num_tokens": None,
    "penalty_alpha": None, "dola_layers": None, "guidance_scale": None, "cache_implementation": None,
    "low_memory": None, "watermarking_config": None, "custom_generate": None, "token_healing": False,
}


@dataclass(frozen=True)
class SamplingParams:
    """Every generation backend takes one (`GRPOConfig.sampling_params`); the named fields are those the built-in
    engine implements itself, the others travel in `other_generation_kwargs`."""

    temperature: float
    top_k: int  # 0: off
    top_p: float
    min_p: float | None
    repetition_penalty: float
    do_sample: bool
    max_new_tokens: int
    eos_token_id: int | list[int] | None  # None: the tokenizer's
    suppress_tokens: list[int] | None  # None: the model's generation config's
    other_generation_kwargs: dict[str, Any]  # any other GenerationConfig names

    @property
    def greedy(self) -> bool:
        return self.do_sample is False or self.top_k == 1

    @property
    def only_temperature(self) -> bool:
        """Sampling draws from softmax(logits / temperature) itself: no top-k, top-p, min-p or repetition penalty
        reshapes it (the distribution whose entropy TRL logs as `entropy`)."""
        return (not self.greedy and self.top_k == 0 and self.top_p >= 1.0 and not self.min_p
                and self.repetition_penalty == 1.0)

    @classmethod
    def resolve(cls, fields: dict[str, Any], generation_kwargs: dict[str, Any]) -> SamplingParams:
        """`fields`: the config's temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens (from
        max_completion_length) and cache_implementation; `generation_kwargs` override them, as in TRL."""
        value = {**fields, "do_sample": True, "eos_token_id": None, "suppress_tokens": None, **generation_kwargs}
        value["top_k"] = value["top_k"] or 0  # None and 0 both mean off
        other = {k: v for k, v in value.items() if k not in ENGINE_GENERATION_KWARGS and v is not None}
        return cls(**{k: value[k] for k in ENGINE_GENERATION_KWARGS}, other_generation_kwargs=other)


def unknown_generation_kwargs(kwargs: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(name, the known names) for each key that is no GenerationConfig name (TRL would ignore it silently)."""
    from transformers import GenerationConfig

    known = sorted({k for k in vars(GenerationConfig()) if not k.startswith("_")}
                   | set(TRANSFORMERS_ONLY_GENERATION_KWARGS))
    return [(name, known) for name in kwargs if name not in known]


def generation_kwargs_needing_generate(kwargs: dict[str, Any], cache_implementation: str | None) -> list[str]:
    """The generation_kwargs (and cache_implementation) that only transformers' `generate` can honour."""
    names = [k for k, neutral in TRANSFORMERS_ONLY_GENERATION_KWARGS.items() if kwargs.get(k, neutral) != neutral]
    return names + (["cache_implementation"] if cache_implementation and "cache_implementation" not in names else [])
