"""Shared-prefix packing: a micro-batch's rows that share a prompt are laid out as one sequence, the prompt once
and then each row's completion, so the prompt's layers are computed once per group instead of once per row.

GRPO samples G completions of every prompt, and a chat-templated prompt is often as long as the completion, so
the usual layout (each row = its own left-padded prompt + right-padded completion) spends about P / (P + C) of the
training forward and backward on G copies of the same prompt. Packed, a group of G rows costs P + sum_i C_i tokens
instead of G (P + C); padding inside rows is gone too (groups are padded to the longest group only).

    tokens     [ p_1 ... p_P | c^1_1 ... c^1_n1 | c^2_1 ... c^2_n2 | ... | pad ]
    positions  [ 0 ...  P-1  | P ...  P+n1-1    | P ...  P+n2-1    | ... ]
    attention  prompt tokens: causal within the prompt; completion tokens of row i: the whole prompt and the
               earlier tokens of row i (never another row's); padding: the prompt and other padding

Every completion token then sees exactly what it saw in its own row (the same keys, values and positions), so the
log-probs equal the unpacked ones up to float rounding, and so do the gradients: autograd sums each row's gradient
into the one shared prompt computation (verl calls the idea PrefixGrouper). Completion token t of row i is
predicted by the hidden state of the token before it: the last prompt token for t = 0, c^i_t otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PROMPT, PADDING = 0, -1  # segment ids; row i's completion is segment i + 1


@dataclass
class SharedPrefixBatch:
    input_ids: torch.Tensor  # (S, L): S packed sequences, one per unique prompt
    position_ids: torch.Tensor  # (S, L)
    segments: torch.Tensor  # (S, L): PROMPT, PADDING or 1 + the row whose completion the token belongs to
    predictors: torch.Tensor  # (B, C): flat index into (S * L) of the hidden state predicting completion token t

    def attention_mask(self, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
        """(S, 1, L, L): True (or 0.0) where query q may attend key k: k <= q, and k is a prompt token or in
        q's own segment. Boolean for SDPA; additive (0 / dtype min) for eager attention."""
        length = self.segments.size(1)
        position = torch.arange(length, device=self.segments.device)
        causal = position.unsqueeze(0) <= position.unsqueeze(1)  # [q, k]
        query, key = self.segments.unsqueeze(2), self.segments.unsqueeze(1)
        allowed = causal & ((key == PROMPT) | (key == query))
        allowed = allowed.unsqueeze(1)
        if additive_dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(additive_dtype).min)


def pack_shared_prefixes(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                         completion_mask: torch.Tensor, pad_id: int = 0) -> SharedPrefixBatch | None:
    """The packed layout of a micro-batch (left-padded prompts, right-padded completions), or None when no two
    rows share a prompt (nothing to save) or a prompt is empty (no token to predict the first completion token)."""
    prompts = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(prompt_ids, prompt_mask)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(row)
    if len(groups) == len(prompts) or any(len(prompt) == 0 for prompt in groups):
        return None
    lengths = completion_mask.sum(1).tolist()
    width = max(len(prompt) + sum(lengths[row] for row in rows) for prompt, rows in groups.items())
    device = completion_ids.device
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long, device=device)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long, device=device)
    segments = torch.full((len(groups), width), PADDING, dtype=torch.long, device=device)
    predictors = torch.zeros(completion_ids.shape, dtype=torch.long, device=device)
    for sequence, (prompt, rows) in enumerate(groups.items()):
        size, base = len(prompt), sequence * width
        input_ids[sequence, :size] = torch.tensor(prompt, device=device)
        position_ids[sequence, :size] = torch.arange(size, device=device)
        segments[sequence, :size] = PROMPT
        start = size
        for row in rows:
            n = lengths[row]
            end = start + n
            input_ids[sequence, start:end] = completion_ids[row, :n]
            position_ids[sequence, start:end] = torch.arange(size, size + n, device=device)
            segments[sequence, start:end] = row + 1
            predictors[row, 0] = base + size - 1
            predictors[row, 1:n] = base + torch.arange(start, end - 1, device=device)
            start = end
    return SharedPrefixBatch(input_ids, position_ids, segments, predictors)


def supports_packing(body: torch.nn.Module, length: int) -> bool:
    """Whether `body` takes a ready 4D attention mask as it is: transformers' SDPA or eager attention (flash
    kernels read only padding masks), and no sliding window shorter than the packed sequence."""
    config = getattr(body, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or not getattr(config, "use_sliding_window", True) or window >= length


def packing_saves_work(packed: SharedPrefixBatch, rows: int, width: int, config: Any) -> bool:
    """Whether the packed forward costs less than the unpacked one (`rows` rows of `width` tokens). A forward
    over S sequences of L tokens costs about

        S L (1 + k L),   k = 6 h / (2 p) = 3 h / p

    token-equivalents: each token goes through a layer's p weights (2 p FLOPs), and attention runs over every
    query-key pair of a sequence, masked or not (QK^T and AV are 4 h FLOPs a pair; counted as 6 h for the softmax
    and mask, which matches measurement better). Packing removes the G - 1 copies of a prompt but puts a group's
    G completions in one sequence, whose attention grows with its square, so it pays for long prompts and short
    completions. Measured on SmolLM2-135M (benchmarks/packed_training.py: a 30-token prompt x 8, forward +
    backward): packed 12% faster at 64 completion tokens, 63% slower at 256. p = 2 h^2 + 2 h kv + 3 h i (q, o;
    k, v; the gated MLP) from the (text) config; a config without those sizes keeps packing."""
    hidden, mlp = getattr(config, "hidden_size", None), getattr(config, "intermediate_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if not (hidden and mlp and heads):
        return True
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    k = 3 * hidden / (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp)
    sequences, length = packed.input_ids.shape
    return sequences * length * (1 + k * length) < rows * width * (1 + k * width)


def shared_prefix_hidden(body: torch.nn.Module, packed: SharedPrefixBatch) -> torch.Tensor:
    """(B, C, H): the final hidden state that predicts each completion token (garbage where completion_mask is
    0), from one forward of the packed sequences."""
    eager = body.config._attn_implementation == "eager"
    dtype = next(body.parameters()).dtype
    mask = packed.attention_mask(additive_dtype=dtype if eager else None)
    hidden = body(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                  use_cache=False).last_hidden_state
    return gather_rows(hidden.reshape(-1, hidden.size(-1)), packed.predictors)


def gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows[index] (index of any shape; the result gains rows' last dim), with a backward that sums the gradient
    of a repeated index in a fixed order. A group's last prompt token predicts the first token of all G
    completions, so `predictors` repeats it: on CPU the backward of `rows[index]` (index_put_ with accumulate)
    sums repeats in an order that varies with thread timing, so two runs with the same seed drifted apart in the
    last bits (the demo: gradients first differed about 40 steps in, 2 threads); index_select's backward
    (index_add_) sums them in index order. On CUDA it is the other way round (index_add_ uses atomics,
    index_put_ sorts)."""
    if rows.device.type == "cuda":
        return rows[index]
    return rows.index_select(0, index.flatten()).view(*index.shape, rows.size(-1))

