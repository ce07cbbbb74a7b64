"""generation_kwargs the engine does not implement itself, run inside it through transformers' own machinery.

The engine samples with its own transforms (`rollout/sampling.py`: repetition penalty, suppressed tokens,
temperature, top-k, top-p, min-p). Any other GenerationConfig setting, from generation_kwargs or the model's own
generation config (no_repeat_ngram_size, bad_words_ids, min_new_tokens, sequence_bias, begin_suppress_tokens,
typical_p, epsilon_cutoff, eta_cutoff, exponential_decay_length_penalty, forced_eos_token_id, renormalize_logits,
stop_strings, max_time, ...), is built exactly as `generate` builds it: a GenerationConfig (the model's, with the
run's settings over it) turned into transformers' `LogitsProcessorList` and `StoppingCriteriaList` by the model's
own `_get_logits_processor` / `_get_stopping_criteria`. The list then replaces the engine's transforms for the
whole chunk, in transformers' order. Processors read each row's token history (prompt, left-padded, then the
completion so far), which the engine keeps and compacts as finished rows leave; the one processor that keeps
per-row state (the repetition penalty's left-padding lengths) is compacted with it (`keep_rows`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from grpo.models import base_model
from grpo.sampling_params import SamplingParams

# what `rollout/sampling.py:process_logits` implements itself
ENGINE_TRANSFORMS = (RepetitionPenaltyLogitsProcessor, SuppressTokensLogitsProcessor, TemperatureLogitsWarper,
                     TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)


@dataclass
class GenerationRules:
    """One chunk's logits processors (None: the engine's own transforms are all there is) and stopping criteria
    (None: EOS and max_new_tokens only)."""

    processors: LogitsProcessorList | None
    stopping: StoppingCriteriaList | None

    @property
    def needs_history(self) -> bool:
        return self.processors is not None or self.stopping is not None

    def stopped(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(rows,) bool: the rows a stopping criterion ends after the token just appended to `history`."""
        return self.stopping(history, scores).to(history.device)

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Rows `keep` (in that order) stay in the batch: per-row processor state follows them."""
        for processor in self.processors or []:
            if isinstance(processor, RepetitionPenaltyLogitsProcessor) and torch.is_tensor(
                    processor.prompt_ignore_length):
                processor.prompt_ignore_length = processor.prompt_ignore_length[keep.to(
                    processor.prompt_ignore_length.device)]


def generation_rules(model: Any, params: SamplingParams, eos_ids: list[int], pad_id: int, tokenizer: Any,
                     prompt_mask: torch.Tensor, max_new_tokens: int) -> GenerationRules:
    """The processors and stopping criteria `generate` would use for these rows (`prompt_mask`: (rows, P), left-
    padded, one row per sample), built by the model's own methods from its generation config with the run's
    settings over it."""
    model = base_model(model)
    device, width = prompt_mask.device, prompt_mask.size(1)
    config = copy.deepcopy(model.generation_config)
    config.update(**params.other_generation_kwargs)
    config.update(do_sample=params.do_sample, repetition_penalty=float(params.repetition_penalty),
                  eos_token_id=eos_ids, pad_token_id=pad_id, max_new_tokens=max_new_tokens,
                  max_length=width + max_new_tokens)
    sampling = dict(temperature=float(params.temperature), top_k=params.top_k, top_p=float(params.top_p),
                    min_p=params.min_p)
    config.update(**sampling if params.do_sample else dict.fromkeys(sampling))  # greedy: no warpers
    if params.suppress_tokens is not None:
        config.suppress_tokens = params.suppress_tokens
    config._eos_token_tensor = torch.tensor(eos_ids, device=device)
    processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=width,
                                             logits_processor=LogitsProcessorList(), device=device,
                                             model_kwargs={"attention_mask": prompt_mask})
    if all(isinstance(p, ENGINE_TRANSFORMS) for p in processors):
        processors = None
    stops = copy.deepcopy(config)  # only the criteria beyond EOS and the length, which the engine handles
    stops.max_length, stops._eos_token_tensor = None, None
    stopping = model._get_stopping_criteria(generation_config=stops, stopping_criteria=StoppingCriteriaList(),
                                            tokenizer=tokenizer)
    return GenerationRules(processors, stopping if len(stopping) else None)
