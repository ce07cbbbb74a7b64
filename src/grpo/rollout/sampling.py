"""Sampling transforms as pure functions on a (rows, vocab) logits tensor, in transformers' order and meaning:
repetition penalty, then temperature, top-k, top-p, min-p. Removed tokens get -inf. The settings come in one
`SamplingParams` (`GRPOConfig.sampling_params`). `sample_tokens` draws one token per row from the result (on CPU
with the compiled `sampling.c`)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from grpo.cpu_kernels import INT, POINTER, STRIDE, entry
from grpo.sampling_params import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (arXiv 1909.05858): for tokens already seen, l -> l / p if l > 0 else l * p."""
    if penalty == 1.0:
        return logits
    scores = logits.gather(1, seen_ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, seen_ids, scores)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits of each row (k = 0: keep all)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (arXiv 1904.09751): keep the most likely tokens whose probabilities sum to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[:, -1] = False  # always keep the most likely token
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Min-p sampling (arXiv 2407.01082): drop tokens with p < min_p x p_max."""
    if not min_p:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen_ids: torch.Tensor | None = None,
                   suppressed_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The sampling distribution's logits (float32): every transform of `params` applied in transformers' order;
    `suppressed_ids` (the generation config's `suppress_tokens`) can never be sampled, greedy included."""
    logits = logits.float()
    if seen_ids is not None:
        logits = apply_repetition_penalty(logits, seen_ids, params.repetition_penalty)
    if suppressed_ids is not None:
        logits = logits.index_fill(1, suppressed_ids, float("-inf"))
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def sample_tokens(processed: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
                  ) -> torch.Tensor:
    """One token per row from softmax(processed) (argmax when greedy).

    Sampling inverts the CDF with one uniform draw per row: the first v with cumsum(p)_v > u, far cheaper than
    `torch.multinomial` or a Gumbel race, which draw a random number per vocabulary entry. On CPU the compiled
    kernel (`sampling.c`) sums the probabilities (float32 exps) in double in one pass over each row, adding no
    error beyond double rounding, and never draws a token of probability 0 (SmolLM2's 16 rows x 49152: 0.28
    against 2.1 ms). Elsewhere torch's float32 cumulative sum is exact up to its rounding (on SmolLM2's next-token
    distributions a total variation of 1.8e-4 from softmax(processed), mean log-prob equal to 4 decimals).
    """
    return sample_and_measure(processed, params, generator, measure=False)[0]


def sample_and_measure(processed: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                       measure: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sample_tokens`, and (`measure`, where the compiled kernel samples) a (rows, 2) float32 tensor of each drawn
    token's log-probability and each row's entropy of softmax(processed), in nats, from the kernel's own pass over
    the row (x the logit less the row's max, S = sum exp(x): log p = x_token - log S, H = log S - sum p x / S);
    None elsewhere. The same uniforms are drawn either way, so measuring never changes the tokens."""
    if params.greedy:  # on the logits: softmax can round two close ones to the same probability, a false tie
        return processed.argmax(dim=-1), None
    if _kernel_applies(processed):
        rows, vocab = processed.shape
        uniforms = torch.rand(rows, dtype=torch.float64, generator=generator)
        tokens = torch.empty(rows, dtype=torch.long)
        stats = torch.empty((rows, 2), dtype=torch.float64) if measure else None
        kernel()(processed.data_ptr(), processed.stride(0), uniforms.data_ptr(), rows, vocab, tokens.data_ptr(),
                 None if stats is None else stats.data_ptr(), torch.get_num_threads())
        if bool((tokens >= 0).all()):  # -1: a row's max or sum was not finite (NaN logits): torch's path says how
            return tokens, None if stats is None else stats.float()
        # torch's path draws its own uniforms after these: a NaN row fails there too, with torch's message
    probs = torch.softmax(processed, dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand((probs.size(0), 1), generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.size(1) - 1), None


def _kernel_applies(processed: torch.Tensor) -> bool:
    return (processed.device.type == "cpu" and processed.dtype == torch.float32 and processed.dim() == 2
            and processed.stride(1) == 1 and processed.size(1) > 0 and kernel() is not None)


@functools.cache
def kernel() -> Callable[..., None] | None:
    """The compiled sampler's entry point, or None where the CPU kernels cannot be built (`cpu_kernels.library`)."""
    return entry("grpo_sample_tokens", [POINTER, STRIDE, POINTER, INT, INT, POINTER, POINTER, INT])
