"""The built-in rollout engine: GRPO's generation pattern made cheap.

A round samples G completions of each unique prompt. transformers' `generate` would prefill every prompt G
times and keep decoding rows that already emitted EOS. Here each unique prompt is prefilled once and its KV
cache serves its G rows (on CPU stored once and shared by them, elsewhere copied to them: see
`rollout/kv_cache.py`), all rows decode together with the cache, and a row that ends leaves the batch (its cache
rows are dropped), so finished completions stop costing compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from grpo.models import accepts_logits_to_keep
from grpo.rollout.base import Generation, eos_token_ids, left_pad, pad_and_cat
from grpo.rollout.decoder import LeanDecoder
from grpo.rollout.kv_cache import CopiedKV, GroupKV, use_shared_prefix
from grpo.rollout.processors import generation_rules
from grpo.rollout.sampling import process_logits, sample_and_measure
from grpo.sampling_params import SamplingParams

RowDone = Callable[[int, list[int], bool], None]  # (row, its tokens, whether it ended: EOS or a stop)


@dataclass(frozen=True)
class Turn:
    """What a multi-turn rollout adds to a chunk's decoding: each row's token budget and who to tell as rows end
    (`first_row`: the chunk's first row in the whole call)."""

    budgets: torch.Tensor | None
    first_row: int
    on_row_done: RowDone | None


class RolloutEngine:
    """Generates G completions per prompt with a shared prefill, KV-cached decoding and batch compaction.

    `max_batch_rows` bounds the rows decoded at once (a round larger than that is processed in chunks of whole
    prompt groups); on a CUDA out-of-memory error the chunk is halved and retried. Llama-family models decode
    with `LeanDecoder` (`lean=False`: always through transformers' forward). `copy_dtype` bfloat16 makes its CPU
    weight copies bfloat16 where the CPU multiplies them natively: 1.35x faster decoding (SmolLM2), for
    generation from fixed weights only. The trainer never sets it: a sampler whose weights are rounded to
    bfloat16 misses most small updates (after one Adam step at lr 5e-5 only 16% of SmolLM2's matrix entries
    change their bfloat16 value) and disagrees with the float32 policy by 1.7e-2 per token in log-prob (float32
    copies: 9e-6); SmolLM2 on the length task (lr 5e-5, 12 steps, benchmarks/sampler_precision.py) reached
    reward -153, -18 and -38 with bfloat16 copies against -12, -12 and -16 with float32 ones (seeds 42, 7, 3).
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, max_batch_rows: int | None = None, seed: int = 0,
                 lean: bool = True, copy_dtype: torch.dtype = torch.float32):
        self.tokenizer = tokenizer  # stop_strings need it
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = eos_token_ids(tokenizer, params.eos_token_id)
        self.max_new_tokens = params.max_new_tokens
        self.params = params
        self.max_batch_rows = max_batch_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.lean = lean
        self.copy_dtype = copy_dtype
        self._device_generator: torch.Generator | None = None  # created from `generator` on first CUDA use

    def state_dict(self) -> dict[str, Any]:
        """The sampling random state, for exact resume."""
        device = self._device_generator
        return {"generator": self.generator.get_state(),
                "device_generator": None if device is None else (str(device.device), device.get_state())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._device_generator = None
        if state["device_generator"] is not None:
            device, device_state = state["device_generator"]
            self._device_generator = torch.Generator(device=device)
            self._device_generator.set_state(device_state)

    @torch.no_grad()
    def generate(self, model: Any, prompt_ids: list[list[int]], num_generations: int,
                 max_new_tokens: list[int] | None = None, on_row_done: RowDone | None = None) -> Generation:
        """`max_new_tokens`: a budget per row (default: max_completion_length each). `on_row_done(row, ids, ended)`
        is called as each row ends, with EOS or a stop string (ended) or at its budget, while the others still
        decode (multi-turn rollouts start its tool calls then); without budgets, rows that run to
        max_completion_length are not reported."""
        g = num_generations
        budgets = None if max_new_tokens is None else torch.tensor(max_new_tokens, dtype=torch.long)
        prompts_per_chunk = max(1, (self.max_batch_rows or len(prompt_ids) * g) // g)
        longest = self.max_new_tokens if budgets is None else int(budgets.max())
        capacity = max(len(ids) for ids in prompt_ids) + longest
        rows = min(len(prompt_ids), prompts_per_chunk) * g
        decoder = LeanDecoder.from_model(model, capacity, rows, copy_dtype=self.copy_dtype) if self.lean else None
        pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        start = 0
        while start < len(prompt_ids):
            chunk = prompt_ids[start:start + prompts_per_chunk]
            rows_of_chunk = slice(start * g, (start + len(chunk)) * g)
            try:
                pieces.append(self._generate_chunk(model, decoder, chunk, g, Turn(
                    None if budgets is None else budgets[rows_of_chunk], start * g, on_row_done)))
            except torch.OutOfMemoryError:
                if prompts_per_chunk == 1 or on_row_done is not None:  # reported rows may have started tools
                    raise
                prompts_per_chunk = max(1, prompts_per_chunk // 2)
                torch.cuda.empty_cache()
                continue
            start += len(chunk)
        repeated = [ids for ids in prompt_ids for _ in range(g)]
        all_prompt_ids, all_prompt_mask = left_pad(repeated, self.pad_id)
        completion_ids = pad_and_cat([p[0] for p in pieces], self.pad_id)
        lengths = torch.cat([p[1] for p in pieces])
        completion_mask = (torch.arange(completion_ids.size(1)).unsqueeze(0) < lengths.unsqueeze(1)).long()
        is_eos = torch.cat([p[2] for p in pieces]) & (lengths > 0)
        logps = entropies = None
        if all(p[3] is not None for p in pieces):  # (rows, T, 2): log-prob, entropy
            stats = pad_and_cat([p[3].flatten(1) for p in pieces], 0.0).unflatten(1, (-1, 2))
            logps, entropies = (stats[..., i] * completion_mask for i in (0, 1))
        return Generation(all_prompt_ids, all_prompt_mask, completion_ids, completion_mask, is_eos, logps=logps,
                          entropies=entropies)

    def _generate_chunk(self, model: Any, decoder: LeanDecoder | None, prompt_ids: list[list[int]], g: int,
                        turn: Turn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns completion ids (rows, T) right-padded, lengths (rows,), whether each row ended (EOS or a
        stopping criterion such as stop_strings) rather than ran out of max_new_tokens or its budget, and each
        token's (log-prob, entropy) (rows, T, 2) where the sampler measured them (`Generation.logps`, `.entropies`),
        else None."""
        device = next(model.parameters()).device
        budgets = None if turn.budgets is None else turn.budgets.to(device)
        max_new = self.max_new_tokens if budgets is None else int(budgets.max())
        ids, mask = (t.to(device) for t in left_pad(prompt_ids, self.pad_id))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        shared = decoder is not None and use_shared_prefix(mask, g, decoder.embed.weight.dtype, decoder.head_dim)
        # a shared prefix keeps the prompts' cache as it is; copies get room for the completions after them
        cache = _preallocated_cache(model.config, ids.size(1) + (0 if shared else max_new))
        if decoder is not None:
            logits = decoder.prefill(ids, mask, positions, cache)
        else:
            keep_last = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, **keep_last)
            cache, logits = out.past_key_values, out.logits[:, -1]
        kv: CopiedKV | GroupKV | None  # the lean decoder's cache
        if shared:  # each prompt's keys and values stored once, read once per step by all G of its samples
            kv = GroupKV.from_prefill(cache, mask, g, max_new)
        else:  # one prefill per prompt, its cache copied to its G samples
            cache.batch_repeat_interleave(g)
            kv = CopiedKV(cache, mask.repeat_interleave(g, dim=0)) if decoder is not None else None
        logits = logits.repeat_interleave(g, dim=0)
        mask = mask.repeat_interleave(g, dim=0)
        next_position = positions[:, -1:].repeat_interleave(g, dim=0) + 1
        penalize = self.params.repetition_penalty != 1.0
        # generation_kwargs beyond the engine's own transforms, as transformers' processors (rollout/processors.py)
        rules = generation_rules(model, self.params, self.eos_ids, self.pad_id, self.tokenizer, mask, max_new)
        history = None  # each row's tokens so far, for the repetition penalty and transformers' processors
        if penalize or rules.needs_history:
            history = ids.repeat_interleave(g, dim=0).masked_fill(mask == 0, self.pad_id)
        rows = ids.size(0) * g
        tokens = torch.full((rows, max_new), self.pad_id, dtype=torch.long, device=device)
        lengths = torch.full((rows,), max_new, dtype=torch.long, device=device)
        ended = torch.zeros(rows, dtype=torch.bool, device=device)
        active = torch.arange(rows, device=device)  # the original row of each row still decoding
        eos = torch.tensor(self.eos_ids, device=device)
        suppressed = self._suppressed_ids(model, device)
        # the sampler's log-probs and entropies are the policy's where it draws from softmax(logits / T) as it is
        measures = self.params.only_temperature and rules.processors is None and suppressed is None
        stats = torch.zeros((rows, max_new, 2), dtype=torch.float32) if measures else None

        for step in range(max_new):
            if rules.processors is not None:
                processed = rules.processors(history, logits.float())
            else:
                processed = process_logits(logits, self.params, history if penalize else None, suppressed)
            new_tokens, measured = sample_and_measure(processed, self.params, self._generator_for(device),
                                                      measure=stats is not None)
            if measured is None:  # not wanted, or a step the compiled sampler did not take (CUDA, a NaN row)
                stats = None
            else:
                stats[active, step] = measured
            tokens[active, step] = new_tokens
            if history is not None:
                history = torch.cat([history, new_tokens.unsqueeze(1)], dim=1)
            finished = torch.isin(new_tokens, eos)
            if rules.stopping is not None:
                finished |= rules.stopped(history, processed)
            ended[active[finished]] = True  # a row cut at its budget below has not ended
            if budgets is not None:
                finished |= budgets[active] <= step + 1
            any_finished = bool(finished.any())
            if any_finished:
                lengths[active[finished]] = step + 1
                if turn.on_row_done is not None:
                    for row in active[finished].tolist():
                        turn.on_row_done(turn.first_row + row, tokens[row, :step + 1].tolist(), bool(ended[row]))
            if step == max_new - 1:
                break
            if any_finished:  # finished rows leave the batch, its cache and the processors' state
                keep = fill_from_the_end(finished)
                if keep.numel() == 0:
                    break
                if kv is not None:
                    kv.keep(keep)
                else:
                    cache.batch_select_indices(keep)
                active, mask, next_position = active[keep], mask[keep], next_position[keep]
                new_tokens = new_tokens[keep]
                if history is not None:
                    history = history[keep]
                rules.keep_rows(keep)
            if kv is not None:
                logits = decoder.step(new_tokens, next_position.squeeze(1), kv)
            else:
                mask = torch.cat([mask, mask.new_ones((mask.size(0), 1))], dim=1)
                logits = model(input_ids=new_tokens.unsqueeze(1), attention_mask=mask, position_ids=next_position,
                               past_key_values=cache, use_cache=True).logits[:, -1]
            next_position = next_position + 1
        used = int(lengths.max())
        return (tokens[:, :used].cpu(), lengths.cpu(), ended.cpu(),
                None if stats is None else stats[:, :used])

    def _suppressed_ids(self, model: Any, device: torch.device) -> torch.Tensor | None:
        """Token ids never to sample: generation_kwargs' `suppress_tokens`, else the model's generation config's
        (as `generate` does: the embedded model suppresses its padding, unknown and BOS tokens this way)."""
        ids = self.params.suppress_tokens
        if ids is None:
            ids = getattr(getattr(model, "generation_config", None), "suppress_tokens", None)
        return torch.tensor(ids, dtype=torch.long, device=device) if ids else None

    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        # Sampling on the CPU generator keeps runs reproducible across devices only on CPU; on CUDA a device
        # generator seeded from it keeps sampling on the GPU.
        if device.type == "cpu":
            return self.generator
        if self._device_generator is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            self._device_generator = torch.Generator(device=device).manual_seed(seed)
        return self._device_generator


def fill_from_the_end(finished: torch.Tensor) -> torch.Tensor:
    """The rows to keep, in their new order, when the `finished` rows leave: each hole below the new row count
    is filled by a live row from above it, so compacting the KV cache copies only as many rows as finished
    (keeping the order would shift, and copy, every row after the first finished one)."""
    live = ~finished
    count = int(live.sum())
    order = torch.arange(count, device=finished.device)
    order[finished[:count]] = live[count:].nonzero().squeeze(1) + count  # as many holes below as movers above
    return order


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer that writes into a buffer sized for the whole completion instead of growing by
    `torch.cat` (a copy of the whole cache at every decoded token), and compacts rows in place. Keys and values
    share one buffer, (rows, 2 kv_heads, capacity, head_dim), so that a decode step writes both with one copy
    (`append`)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0  # positions written
        self.rows = 0  # live rows; the buffer may hold more from before a compaction

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            rows, heads, _, dim = key_states.shape
            self._kv = key_states.new_empty((rows, 2 * heads, self.capacity, dim))
            self.rows = rows
        end = self.length + key_states.size(-2)
        heads = key_states.size(1)
        self._kv[:self.rows, :heads, self.length:end] = key_states
        self._kv[:self.rows, heads:, self.length:end] = value_states
        self.length = end
        self._refresh(self.rows)
        return self.keys, self.values

    def append(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one position: `kv` (rows, 2 kv_heads, head_dim), the keys then the values; returns the whole
        keys and values."""
        self._kv[:self.rows, :, self.length] = kv
        self.length += 1
        self._refresh(self.rows)
        return self.keys, self.values

    def _refresh(self, rows: int) -> None:
        self.rows = rows
        heads = self._kv.size(1) // 2
        self.keys = self._kv[:rows, :heads, :self.length]
        self.values = self._kv[:rows, heads:, :self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length > 0:  # only the written positions are copied, not the whole capacity
            old, rows = self._kv[:self.rows], self.rows
            self._kv = old.new_empty((rows * repeats, *old.shape[1:]))
            self._kv.view(rows, repeats, *old.shape[1:])[..., :self.length, :] = old[:, None, :, :self.length]
            self._refresh(rows * repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices`, in that order, in place: only the rows that change place are copied."""
        if self.length > 0:
            rows = indices.numel()
            moved = (indices != torch.arange(rows, device=indices.device)).nonzero().squeeze(1)
            if moved.numel():
                self._kv[moved, :, :self.length] = self._kv[indices[moved], :, :self.length]
            self._refresh(rows)


def _preallocated_cache(config: Any, capacity: int) -> DynamicCache:
    """A DynamicCache whose full-attention layers are preallocated (and sliding-window layers whose window
    holds the whole sequence, the same thing); other layer kinds (shorter windows, linear attention) keep
    transformers' own implementation."""
    cache = DynamicCache(config=config)
    if cache.layers and all(_holds_everything(layer, capacity) for layer in cache.layers):
        cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


def _holds_everything(layer: Any, capacity: int) -> bool:
    """Whether `layer` keeps every position of a `capacity`-long sequence."""
    return type(layer) is DynamicLayer or (type(layer) is DynamicSlidingWindowLayer
                                           and layer.sliding_window >= capacity)
