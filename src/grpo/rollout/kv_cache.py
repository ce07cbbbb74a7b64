"""The KV cache of the lean decode step, in two layouts behind one interface (`attend`, `advance`, `keep`).

A round decodes G completions of each prompt. Every one of them attends to the same prompt keys and values, then
to its own completion's.

- `GroupKV`: each prompt's keys and values are stored once, shared by its G rows (the shared prefix of
  Hydragen, arXiv 2402.05099, and cascade attention), and each row's completion in a buffer of its own. On CPU
  in float32 one call of the compiled kernel of `rollout/decode_attention.py` per layer attends over both spans
  and writes the step's keys and values: a prompt's cache is read by its G rows one after another and stays in
  the CPU's cache, so a step reads about the completions' keys and values from memory, not G copies of the
  prompts'. That is the CPU layout whenever the kernel is built. Without it, each span is a call of torch's
  flash kernel and the two are merged exactly by their log-normalisers, which pays only for long prompts
  (`SHARED_PREFIX_MIN_TOKENS`).
- `CopiedKV`: each row holds a copy of its prompt's cache followed by its own (what `generate` does): one call of
  torch's attention per layer. The layout on GPUs and on CPU without the kernel for short prompts.

Measured on a 2-core CPU, tiny model, G = 8, 4 prompts (`benchmarks/decode_step.py`, one step of 32 rows with
prompts of up to 24 tokens, 64 completion tokens in): kernel over the shared cache 2849 us a step, 164 us of
attention a layer; torch over copies 3784 and 365. Whole rounds (`benchmarks/shared_prefix.py`, 100-300-token
prompts, 64 new tokens), time per token: kernel 1.00, torch over copies 1.63, torch over a shared cache 1.20.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from grpo.rollout.decode_attention import available, decode_attention

# torch's CPU flash-attention kernel, which returns the log-normaliser with the output (no public op does)
CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
SHARED_PREFIX_MIN_TOKENS = 64


def use_shared_prefix(prompt_mask: torch.Tensor, g: int, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a round of the left-padded prompts of `prompt_mask` (prompts, P), cached in `dtype` with heads of
    `head_dim`, decodes with `GroupKV`: on CPU, always where the decode kernel takes the cache (the same test
    `GroupKV` makes); with torch's attention, for prompts long enough that sharing them pays, none of them
    empty."""
    if prompt_mask.device.type != "cpu" or prompt_mask.size(1) == 0:
        return False
    if available(dtype, prompt_mask.device, head_dim):
        return True
    lengths = prompt_mask.sum(-1)
    return (CPU_FLASH is not None and g > 1 and int(lengths.max()) >= SHARED_PREFIX_MIN_TOKENS
            and int(lengths.min()) > 0)


def attention_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask `allowed` as attention's mask: additive on CPU (CPU attention would convert a boolean
    mask in every layer), boolean elsewhere and under autocast."""
    if allowed.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def first_columns(prompt_mask: torch.Tensor) -> torch.Tensor | None:
    """Each row's first prompt column (int32), if every row of `prompt_mask` is left padding then prompt."""
    pads = prompt_mask.size(1) - prompt_mask.sum(-1)
    columns = torch.arange(prompt_mask.size(1), device=prompt_mask.device)
    return pads.to(torch.int32) if bool((prompt_mask == (columns >= pads.unsqueeze(1))).all()) else None


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
    """Per layer: the prompts' keys and values, one copy per prompt, and each row's completion keys and values in
    a buffer sized for the whole completion. Rows that finish leave (`keep`); a row keeps its place in its
    prompt's group, so its prompt part needs no copy at all, nor, with the kernel, its own."""

    def __init__(self, prompt_kv: list[torch.Tensor], prompt_mask: torch.Tensor, g: int, capacity: int):
        """`prompt_kv`: per layer, the keys then the values of the left-padded prompts' prefill, (prompts,
        2 kv_heads, P, dim); `prompt_mask` (prompts, P): 1 on prompt tokens, 0 on padding. Row r of the round is
        sample r % g of prompt r // g; `capacity`: the most completion tokens a row can reach."""
        prompts, two_kv_heads, _, dim = prompt_kv[0].shape
        self.g, self.kv_heads, self.prompt_kv = g, two_kv_heads // 2, prompt_kv
        self.prompt_start = first_columns(prompt_mask)
        self.kernel = self.prompt_start is not None and available(prompt_kv[0].dtype, prompt_kv[0].device, dim)
        self.prompt_bias = None  # for torch's flash kernel: 0 on prompt tokens, -inf on padding
        if not self.kernel:
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

    @property
    def own_kv(self) -> list[torch.Tensor]:
        """Per layer, the rows' completion keys then values, (places, 2 kv_heads, capacity, dim): a row's at
        its place in `rows`."""
        return self._kv

    def _refresh(self) -> None:
        self.group, self.slot = self.rows // self.g, self.rows % self.g

    def attend(self, layer: int, q: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
        """Append the new token's keys and values `kv` (rows, 2 kv_heads, dim) to `layer` and return its
        attention output (rows, heads, dim) for the queries `q` (rows, heads, dim):

            out_r = softmax([q_r K_p(r)^T, q_r K_r^T] * scale + [b_p(r), 0]) [V_p(r); V_r]

        (p(r): the row's prompt, b: 0 on prompt tokens, -inf on padding). The kernel computes this in one pass
        over both spans (and writes kv); torch's flash kernel takes two calls, merged by their log-normalisers
        l = logsumexp(scores):

            out_r = o_p + (o_r - o_p) / (1 + e^(l_p - l_r)) = lerp(o_r, o_p, sigmoid(l_p - l_r))

        with a kv head's queries (grouped-query attention) side by side as extra query positions."""
        if self.kernel:  # each row's completion stays at its place: `rows`
            return decode_attention(q, self.prompt_kv[layer], self.prompt_start, self._kv[layer], self.length + 1,
                                    self.rows, self.g, scale, new=kv)
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
        """Keep live rows `indices`, in that order. The kernel finds each row's completion at its place; torch's
        attention reads the live rows' completions as one block, so the rows that move in it are copied."""
        if not self.kernel and self.length:
            moved = (indices != torch.arange(indices.numel(), device=indices.device)).nonzero().squeeze(1)
            for buffer in self._kv:
                if moved.numel():
                    buffer[moved, :, :self.length] = buffer[indices[moved], :, :self.length]
        self.rows = self.rows[indices]
        self._refresh()
