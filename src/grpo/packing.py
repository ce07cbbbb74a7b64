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

Under SDPA that attention is computed by the layout (`GroupedAttention`: the prompt's, then each row's against
its prompt and itself), not under a mask over every pair of the packed sequence, whose cost grew with the
square of a group's completion tokens.

Every completion token then sees exactly what it saw in its own row (the same keys, values and positions), so the
log-probs equal the unpacked ones up to float rounding, and so do the gradients: autograd sums each row's gradient
into the one shared prompt computation (verl calls the idea PrefixGrouper). Completion token t of row i is
predicted by the hidden state of the token before it: the last prompt token for t = 0, c^i_t otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from grpo.models import attention_widths, checkpoints_activations

PROMPT, PADDING = 0, -1  # segment ids; row i's completion is segment i + 1
GROUPED_ATTENTION = "grpo_grouped_sdpa"  # the attention implementation `grouped_attention` switches to


@dataclass
class SharedPrefixBatch:
    input_ids: torch.Tensor  # (S, L): S packed sequences, one per unique prompt
    position_ids: torch.Tensor  # (S, L)
    segments: torch.Tensor  # (S, L): PROMPT, PADDING or 1 + the row whose completion the token belongs to
    predictors: torch.Tensor  # (B, C): flat index into (S * L) of the hidden state predicting completion token t
    prompt_lengths: torch.Tensor  # (S,)
    row_starts: torch.Tensor  # (B,): flat index into (S * L) of the row's first completion token
    row_lengths: torch.Tensor  # (B,)

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
    row_starts = torch.zeros(len(prompts), dtype=torch.long)
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
            predictors[row, 1:n] = base + torch.arange(start, max(start, end - 1), device=device)  # n may be 0
            row_starts[row] = base + start
            start = end
    prompt_lengths = torch.tensor([len(prompt) for prompt in groups], device=device)
    return SharedPrefixBatch(input_ids, position_ids, segments, predictors, prompt_lengths, row_starts.to(device),
                             torch.tensor(lengths, device=device))


def supports_packing(body: torch.nn.Module, length: int) -> bool:
    """Whether `body` takes a ready 4D attention mask as it is: transformers' SDPA or eager attention (flash
    kernels read only padding masks), and no sliding window shorter than the packed sequence."""
    config = getattr(body, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", GROUPED_ATTENTION):
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or not getattr(config, "use_sliding_window", True) or window >= length


def packing_saves_work(packed: SharedPrefixBatch, rows: int, width: int, config: Any, grouped: bool = False) -> bool:
    """Whether the packed forward costs less than the unpacked one (`rows` rows of `width` tokens). A forward
    over T tokens whose attention scores A query-key pairs costs about

        T + k A  token-equivalents,   k = 6 h / (2 p) = 3 h / p

    each token going through a layer's p weights (2 p FLOPs), each pair costing QK^T and AV (4 h FLOPs; counted as
    6 h for the softmax and mask, which matches measurement better). SDPA under a mask scores every pair, masked
    or not: A = S L^2 packed, rows width^2 unpacked. So under a mask (`grouped` False: eager attention) packing
    removes the G - 1 copies of a prompt but puts a group's G completions in one sequence whose attention grows
    with its square: it pays for long prompts and short completions only (SmolLM2-135M, a 30-token prompt x 8,
    forward + backward: packed 12% faster at 64 completion tokens, 63% slower at 256). `grouped`
    (`GroupedAttention`): A = S P^2 + B C (P + C), fewer pairs than unpacked too. p = 2 h^2 + 2 h kv + 3 h i (q,
    o; k, v; the gated MLP) from the (text) config; a config without those sizes keeps packing."""
    hidden, mlp = getattr(config, "hidden_size", None), getattr(config, "intermediate_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if not (hidden and mlp and heads):
        return True
    _, kv = attention_widths(config)
    k = 3 * hidden / (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp)
    sequences, length = packed.input_ids.shape
    if grouped:
        prompt, completion = int(packed.prompt_lengths.max()), int(packed.row_lengths.max())
        pairs = sequences * prompt**2 + len(packed.row_lengths) * completion * (prompt + completion)
    else:
        pairs = sequences * length**2
    return sequences * length + k * pairs < rows * width + k * rows * width**2


def shared_prefix_hidden(body: torch.nn.Module, packed: SharedPrefixBatch, grouped: bool = False,
                         embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(B, C, H): the final hidden state that predicts each completion token (garbage where completion_mask is
    0), from one forward of the packed sequences. `grouped` (the caller's `uses_grouped_attention`): attention
    runs by the layout; the mask over every pair is passed too, for any attention that does not. `embed`: the
    input embeddings of the packed ids, computed by the caller instead of the body."""
    eager = body.config._attn_implementation == "eager"
    dtype = next(body.parameters()).dtype
    mask = packed.attention_mask(additive_dtype=dtype if eager else None)
    layout = {"attention_layout": GroupedAttention.of(packed)} if grouped else {}
    with grouped_attention(body) if grouped else nullcontext():
        tokens = dict(input_ids=packed.input_ids) if embed is None else dict(inputs_embeds=embed(packed.input_ids))
        hidden = body(**tokens, attention_mask=mask, position_ids=packed.position_ids, use_cache=False,
                      **layout).last_hidden_state
    return gather_rows(hidden.reshape(-1, hidden.size(-1)), packed.predictors)


@dataclass
class GroupedAttention:
    """A packed batch's attention computed by its layout instead of under a mask over every query-key pair.

    Under the mask, SDPA scores all L^2 pairs of a packed sequence (P + G C tokens for a group), masked or not, so
    the attention of a group of long completions grew with (G C)^2 and outweighed the prompt tokens packing saves.
    By the layout it is two dense attentions:
      prompt queries    causal over the prompt                   S x P x P pairs
      row r's queries   its prompt's P keys + its own C keys     B x C x (P + C) pairs (causal in the C)
    gathered from the packed keys and values, the outputs scattered back (autograd sums each row's gradient into
    the one prompt). Every prompt and completion token attends exactly the keys the mask allows it, so its output
    equals the masked attention's up to rounding (padding's outputs differ; nothing real attends to padding).
    P, C: the longest prompt and completion of the batch; shorter ones are masked within these shapes. Grouped-query
    models' key and value heads are read by SDPA's `enable_gqa`, not repeated per query head first: SmolLM2 (9
    query, 3 kv heads), one micro-batch of 8 x 64 completion tokens, forward + backward with checkpointing 2.72 ->
    2.58 s (2 CPU cores, the two alternating in one process, scratch script)."""

    prompt_width: int
    query_index: torch.Tensor  # (B, C): flat index into (S * L) of row r's completion token i (clamped)
    key_index: torch.Tensor  # (B, P + C): row r's prompt tokens, then its completion tokens (clamped)
    allowed: torch.Tensor  # (B, 1, C, P + C): which of those keys query i attends
    row_outputs: torch.Tensor  # (N,): the real completion tokens, as flat index into (B * C)
    positions: torch.Tensor  # (N,): ... and into (S * L)

    @classmethod
    def of(cls, packed: SharedPrefixBatch) -> GroupedAttention:
        width = packed.input_ids.size(1)
        prompt_width, longest = int(packed.prompt_lengths.max()), max(1, int(packed.row_lengths.max()))
        device = packed.row_starts.device
        sequence_start = packed.row_starts // width * width
        prompt_lengths = packed.prompt_lengths[packed.row_starts // width].unsqueeze(1)  # (B, 1)
        row_lengths = packed.row_lengths.unsqueeze(1)
        i, j = torch.arange(longest, device=device), torch.arange(prompt_width, device=device)
        own = torch.minimum(packed.row_starts.unsqueeze(1) + i, (sequence_start + width - 1).unsqueeze(1))
        prompt_keys = sequence_start.unsqueeze(1) + torch.minimum(j, prompt_lengths - 1)
        own_keys = (i.unsqueeze(1) >= i) & (i < row_lengths).unsqueeze(1)  # (B, C queries, C keys)
        prompt_allowed = (j < prompt_lengths).unsqueeze(1).expand(-1, longest, -1)
        real = (i < row_lengths).flatten().nonzero().squeeze(1)
        return cls(prompt_width, own, torch.cat([prompt_keys, own], 1),
                   torch.cat([prompt_allowed, own_keys], 2).unsqueeze(1), real, own.flatten()[real])

    def kept_bytes(self, query_width: int, kv_width: int, dtype_bytes: int) -> int:
        """Bytes a layer's attention by this layout keeps for the backward besides its tokens' own q, k, v and
        output: the rows' gathered queries (B, C) and keys and values (B, P + C), their attention's output, the
        mask. `query_width` = heads x head_dim, `kv_width` = kv heads x head_dim."""
        rows_queries, rows_keys = self.query_index.numel(), self.key_index.numel()
        return (2 * rows_queries * query_width + 2 * rows_keys * kv_width) * dtype_bytes + self.allowed.numel()

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
                 dropout: float = 0.0) -> torch.Tensor:
        """query (S, H, L, D), key and value (S, KV, L, D) -> output (S, L, H, D), as transformers' attention
        functions take and return them."""
        sequences, heads, width, dim = query.shape
        grouped = key.size(1) != heads  # SDPA shares each kv head among its query heads: no repeated copies

        def rows(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # (S, h, L, D) -> (B, h, n, D)
            flat = states.transpose(1, 2).reshape(sequences * width, -1)
            return gather_rows(flat, index).view(*index.shape, states.size(1), dim).transpose(1, 2)

        p = self.prompt_width
        prompt = F.scaled_dot_product_attention(query[:, :, :p], key[:, :, :p], value[:, :, :p], dropout_p=dropout,
                                                is_causal=True, scale=scale, enable_gqa=grouped)
        own = F.scaled_dot_product_attention(rows(query, self.query_index), rows(key, self.key_index),
                                             rows(value, self.key_index), attn_mask=self.allowed,
                                             dropout_p=dropout, scale=scale, enable_gqa=grouped)
        own = own.transpose(1, 2).reshape(-1, heads * dim).index_select(0, self.row_outputs)
        out = F.pad(prompt.transpose(1, 2), (0, 0, 0, 0, 0, width - p)).reshape(sequences * width, heads * dim)
        return out.index_copy(0, self.positions, own).view(sequences, width, heads, dim)


@contextmanager
def grouped_attention(body: torch.nn.Module) -> Iterator[None]:
    """Within it, a model on transformers' SDPA attention computes a forward given `attention_layout=` by the
    layout: its config is switched to an attention implementation that does so and is SDPA for any other call
    (masks included), and back on exit. Under gradient checkpointing the backward recomputes each layer and must
    meet the same implementation, so the trainer holds one scope over a micro-batch's forward and backward."""
    config = getattr(body, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not _register_grouped():
        yield
        return
    config._attn_implementation = GROUPED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def uses_grouped_attention(body: torch.nn.Module) -> bool:
    """Whether a packed forward of `body` computes attention by the layout (`GroupedAttention`): on SDPA, and,
    where a backward will recompute layers (gradient checkpointing), only inside an enclosing `grouped_attention`
    scope (the recomputation must save the same tensors as the forward did)."""
    attention = getattr(getattr(body, "config", None), "_attn_implementation", None)
    if attention == GROUPED_ATTENTION:
        return True
    return attention == "sdpa" and not checkpoints_activations(body) and _register_grouped()


@functools.cache
def _register_grouped() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # an older transformers: the masked SDPA it is
        return False

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  attention_layout: GroupedAttention | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if attention_layout is None or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        return attention_layout(query, key, value, scaling, dropout), None

    AttentionInterface.register(GROUPED_ATTENTION, attention)
    AttentionMaskInterface.register(GROUPED_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return True


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

