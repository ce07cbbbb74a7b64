"""Generation with transformers' `model.generate`: the reference backend every causal LM supports."""

from __future__ import annotations

from typing import Any

import torch

from grpo.rollout.base import Generation, eos_token_ids, left_pad, mask_after_eos, pad_and_cat
from grpo.sampling_params import SamplingParams


class TransformersGenerator:
    """Samples with `model.generate`, each unique prompt repeated G times, in chunks of `max_batch_rows`."""

    def __init__(self, tokenizer: Any, params: SamplingParams, max_batch_rows: int | None = None):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = eos_token_ids(tokenizer, params.eos_token_id)
        self.max_batch_rows = max_batch_rows
        self.generate_kwargs = dict(
            do_sample=params.do_sample, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
            top_p=params.top_p, top_k=params.top_k or None, min_p=params.min_p,
            repetition_penalty=params.repetition_penalty, pad_token_id=self.pad_id, eos_token_id=self.eos_ids,
            use_cache=True,
        )
        if params.suppress_tokens is not None:  # else generate reads the model's generation config's
            self.generate_kwargs["suppress_tokens"] = params.suppress_tokens
        self.generate_kwargs.update(params.other_generation_kwargs)  # any GenerationConfig name, as in TRL
        if params.other_generation_kwargs.get("stop_strings") is not None:
            self.generate_kwargs["tokenizer"] = tokenizer  # generate matches stop strings through it

    @torch.no_grad()
    def generate(self, model: Any, prompt_ids: list[list[int]], num_generations: int) -> Generation:
        device = next(model.parameters()).device
        repeated = [ids for ids in prompt_ids for _ in range(num_generations)]
        all_prompt_ids, all_prompt_mask = left_pad(repeated, self.pad_id)
        chunk = self.max_batch_rows or len(repeated)
        completions = []
        for start in range(0, len(repeated), chunk):
            ids = all_prompt_ids[start:start + chunk].to(device)
            mask = all_prompt_mask[start:start + chunk].to(device)
            out = model.generate(input_ids=ids, attention_mask=mask, **self.generate_kwargs)
            completions.append(out[:, ids.size(1):].cpu())
        completion_ids = pad_and_cat(completions, self.pad_id)
        completion_mask, is_eos = mask_after_eos(completion_ids, self.eos_ids)
        completion_ids = completion_ids.masked_fill(completion_mask == 0, self.pad_id)
        return Generation(all_prompt_ids, all_prompt_mask, completion_ids, completion_mask, is_eos)
