"""The KV cache of the lean decode step, in two layouts behind one interface (`attend`, `advance`, `keep`).

A round decodes G completions of each prompt. Every one of them attends to the same prompt keys and values, then
to its own completion's.

- `CopiedKV`: each row holds a copy of its prompt's cache followed by its own (what `generate` does): one
  attention call per layer over one cache.
- `GroupKV`: each prompt's keys and values are stored once, and a group's G queries read them in one attention
  call (the shared prefix of Hydragen, arXiv 2402.05099, and cascade attention); each row's own completion is a
  second call, and the two are merged exactly by their log-normalisers. A prompt is stored and read once
  instead of G times, which matters because a decode step on CPU is bound by the memory traffic of its KV
  reads; the price is a handful of extra small ops per layer. The engine picks it on CPU for prompts of
  `SHARED_PREFIX_MIN_TOKENS` or more. Measured on a 2-core CPU with `benchmarks/shared_prefix.py` (G = 8,
  4 prompts; time per generated token, shared / copied): 0.75 and 0.90 for the tiny model with 100-300-token
  prompts and 64 and 256 new tokens, 0.95 for the small model (100-300, 64); with 8-40-token prompts 1.03 and
  1.14, where the completions dominate the cache.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# torch's CPU flash-attention kernel, which returns the log-normaliser with the output (no public op does)
CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
SHARED_PREFIX_MIN_TOKENS = 64


def use_shared_prefix(prompt_mask: torch.Tensor, g: int) -> bool:
    """Whether a round of the left-padded prompts of `prompt_mask` (prompts, P) decodes with `GroupKV`: on CPU,
    for prompts long enough that sharing them pays, none of them empty."""
    lengths = prompt_mask.sum(-1)
    return (prompt_mask.device.type == "cpu" and CPU_FLASH is not None and g > 1
            and int(lengths.max()) >= SHARED_PREFIX_MIN_TOKENS and int(lengths.min()) > 0)


def attention_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask `allowed` as attention's mask: additive on CPU (CPU attention would convert a boolean
    mask in every layer), boolean elsewhere and under autocast."""
    if allowed.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))


class CopiedKV:
    """Each row's copy of its prompt's cache followed by its own completion's (a transformers cache of
    `PreallocatedLayer`s, its rows already repeated G times), and the attention mask: one attention call per
    layer."""

    def __init__(self, cache: Any, prompt_mask: torch.Tensor):
        """`prompt_mask` (rows, P): 1 on prompt tokens, 0 on left padding."""
        self.cache = cache
        self.mask = attention_mask(prompt_mask.bool().view(prompt_mask.size(0), 1, 1, -1), cache.layers[0].keys.dtype)
        self.advance()

    def attend(self, layer: int, q: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
        """Append the new token's keys and values `kv` (rows, 2 kv_heads, dim) to `layer` and return its
        attention output (rows, heads, dim) for the queries `q` (rows, heads, dim)."""
        keys, values = self.cache.layers[layer].append(kv)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=self.mask, scale=scale,
                                             enable_gqa=keys.size(1) != q.size(1))
        return out.view(q.shape)

    def advance(self) -> None:
        """The next token's column: attended to by its own row."""
        self.mask = F.pad(self.mask, (0, 1), value=True if self.mask.dtype == torch.bool else 0.0)

    def keep(self, indices: torch.Tensor) -> None:
        self.cache.batch_select_indices(indices)
        self.mask = self.mask[indices]


class GroupKV:
    """Per layer: the prompts' keys and values, one copy per prompt, and each live row's completion keys and
    values in a buffer sized for the whole completion. Rows that finish leave (`keep`); a row keeps its place
    in its prompt's group, so its prompt part needs no copy at all."""

    def __init__(self, prompt_kv: list[torch.Tensor], prompt_mask: torch.Tensor, g: int, capacity: int):
        """`prompt_kv`: per layer, the keys then the values of the left-padded prompts' prefill, (prompts,
        2 kv_heads, P, dim); `prompt_mask` (prompts, P): 1 on prompt tokens, 0 on padding. Row r of the round is
        sample r % g of prompt r // g; `capacity`: the most completion tokens a row can reach."""
        prompts, two_kv_heads, _, dim = prompt_kv[0].shape
        self.g, self.kv_heads, self.prompt_kv = g, two_kv_heads // 2, prompt_kv
        self.prompt_bias = torch.zeros(prompt_mask.shape, dtype=prompt_kv[0].dtype, device=prompt_mask.device
                                       ).masked_fill_(prompt_mask == 0, float("-inf")).view(prompts, 1, 1, -1)
        self._kv = [kv.new_empty((prompts * g, two_kv_heads, capacity, dim)) for kv in prompt_kv]
        self.length = 0  # completion tokens written
        self.rows = torch.arange(prompts * g, device=prompt_mask.device)  # each live row's place in the round
        self._queries: torch.Tensor | None = None  # every place's query, for the prompt part
        self._refresh()

    @classmethod
    def from_prefill(cls, cache: Any, prompt_mask: torch.Tensor, g: int, capacity: int) -> GroupKV:
        """From a cache of `PreallocatedLayer`s that holds just the prefill of the prompts (`prompt_mask`)."""
        return cls([layer._kv for layer in cache.layers], prompt_mask, g, capacity)

    def _refresh(self) -> None:
        self.group, self.slot = self.rows // self.g, self.rows % self.g

    def attend(self, layer: int, q: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
        """Append the new token's keys and values `kv` (rows, 2 kv_heads, dim) to `layer` and return its
        attention output (rows, heads, dim) for the queries `q` (rows, heads, dim):

            out_r = softmax([q_r K_p(r)^T, q_r K_r^T] * scale + [b_p(r), 0]) [V_p(r); V_r]

        (p(r): the row's prompt, b: 0 on prompt tokens, -inf on padding), computed as two attentions merged by
        their log-normalisers l = logsumexp(scores):

            out_r = o_p + (o_r - o_p) / (1 + e^(l_p - l_r)) = lerp(o_r, o_p, sigmoid(l_p - l_r))

        A kv head's queries (grouped-query attention) go side by side as extra query positions."""
        rows, heads, dim = q.shape
        kv_heads, end = self.kv_heads, self.length + 1
        per_kv = heads // kv_heads
        buffer = self._kv[layer]
        buffer[:rows, :, self.length] = kv
        q = q.view(rows, kv_heads, per_kv, dim)
        own, own_lse = CPU_FLASH(q, buffer[:rows, :kv_heads, :end], buffer[:rows, kv_heads:, :end], scale=scale)
        if self._queries is None:  # places of rows that left keep stale (finite) queries, never read back
            self._queries = q.new_zeros((self.prompt_kv[0].size(0) * self.g, kv_heads, per_kv, dim))
        self._queries.index_copy_(0, self.rows, q)
        prompts = self.prompt_kv[layer].size(0)
        grouped = self._queries.view(prompts, self.g, kv_heads, per_kv, dim).transpose(1, 2)
        grouped = grouped.reshape(prompts, kv_heads, self.g * per_kv, dim)  # a view unless per_kv > 1
        prompt_keys, prompt_values = self.prompt_kv[layer].split(kv_heads, dim=1)
        shared, shared_lse = CPU_FLASH(grouped, prompt_keys, prompt_values, attn_mask=self.prompt_bias, scale=scale)
        shared = shared.view(prompts, kv_heads, self.g, per_kv, dim)[self.group, :, self.slot]
        shared_lse = shared_lse.view(prompts, kv_heads, self.g, per_kv)[self.group, :, self.slot]
        out = torch.lerp(own, shared, torch.sigmoid(shared_lse - own_lse).unsqueeze(-1))
        return out.view(rows, heads, dim)

    def advance(self) -> None:
        self.length += 1

    def keep(self, indices: torch.Tensor) -> None:
        """Keep live rows `indices`, in that order: only the rows that change place are copied."""
        moved = (indices != torch.arange(indices.numel(), device=indices.device)).nonzero().squeeze(1)
        if moved.numel() and self.length:
            for buffer in self._kv:
                buffer[moved, :, :self.length] = buffer[indices[moved], :, :self.length]
        self.rows = self.rows[indices]
        self._refresh()
