"""The compiled CPU sampler (`rollout/sampling.c`) against the inverse CDF worked out in float64."""

from __future__ import annotations

import pytest
import torch

from grpo.config import GRPOConfig
from grpo.rollout import sampling

pytestmark = pytest.mark.skipif(sampling.kernel() is None, reason="no C compiler: torch's sampler is used")

PARAMS = GRPOConfig(num_generations=2, per_device_train_batch_size=2).sampling_params


def kernel_tokens(logits: torch.Tensor, uniforms: torch.Tensor, threads: int = 2,
                  stats: torch.Tensor | None = None) -> torch.Tensor:
    tokens = torch.empty(logits.size(0), dtype=torch.long)
    sampling.kernel()(logits.data_ptr(), logits.stride(0), uniforms.data_ptr(), logits.size(0), logits.size(1),
                      tokens.data_ptr(), None if stats is None else stats.data_ptr(), threads)
    return tokens


def inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The first v with sum_{w <= v} p_w > u * sum p, p = softmax(logits), in float64."""
    cdf = logits.double().softmax(-1).cumsum(-1)
    return torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)


@pytest.mark.parametrize("vocab", [1, 63, 64, 65, 1000, 49152])
def test_the_kernel_inverts_the_cdf_worked_out_in_float64(vocab):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(24, vocab, generator=generator) * 4
    logits[:, ::7] = float("-inf")  # filtered tokens, in every block
    logits[:, 0] = 0.5  # a row keeps at least one token
    uniforms = torch.rand(24, dtype=torch.float64, generator=generator)
    assert torch.equal(kernel_tokens(logits, uniforms), inverse_cdf(logits, uniforms))


@pytest.mark.parametrize("vocab", [1, 65, 1000, 49152])
def test_the_kernel_measures_log_probs_and_entropy_in_the_same_pass(vocab):
    """The drawn token's log p and H = -sum p log p of softmax(logits), worked out in float64, filtered tokens
    included; asking for them draws the same tokens."""
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(24, vocab, generator=generator) * 4
    logits[:, ::7] = float("-inf")
    logits[:, 0] = 0.5
    logits[1, 1:] = -300.0  # tokens whose float32 probability is exactly 0: one-token row, entropy 0
    uniforms = torch.rand(24, dtype=torch.float64, generator=generator)
    stats = torch.empty((24, 2), dtype=torch.float64)
    tokens = kernel_tokens(logits, uniforms, stats=stats)
    assert torch.equal(tokens, kernel_tokens(logits, uniforms))
    log_probs = logits.double().log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum(-1)
    torch.testing.assert_close(stats[:, 1], entropy, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats[:, 0], log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1), rtol=1e-6, atol=1e-6)
    assert stats[1].tolist() == [0.0, 0.0] and (vocab == 1 or stats[:, 1].max() > 1)
    drawn, measured = sampling.sample_and_measure(logits, PARAMS, torch.Generator().manual_seed(1))
    assert measured.dtype == torch.float32 and torch.equal(
        drawn, sampling.sample_tokens(logits, PARAMS, torch.Generator().manual_seed(1)))
    torch.testing.assert_close(measured[:, 1].double(), entropy, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(measured[:, 0].double(), log_probs.gather(1, drawn.unsqueeze(1)).squeeze(1),
                               rtol=1e-6, atol=1e-6)


def test_rows_with_a_stride_and_any_number_of_threads():
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(16, 3000, generator=generator) * 3
    logits = wide[:, :2500]  # rows 3000 floats apart
    uniforms = torch.rand(16, dtype=torch.float64, generator=generator)
    expected = inverse_cdf(logits, uniforms)
    stats_one_thread = torch.empty((16, 2), dtype=torch.float64)
    kernel_tokens(logits, uniforms, 1, stats_one_thread)
    for threads in (1, 2, 5):
        assert torch.equal(kernel_tokens(logits, uniforms, threads), expected)
        stats = torch.empty((16, 2), dtype=torch.float64)
        assert torch.equal(kernel_tokens(logits, uniforms, threads, stats), expected)
        assert torch.equal(stats, stats_one_thread)


def test_a_token_of_probability_zero_is_never_returned():
    logits = torch.full((4, 300), float("-inf"))
    logits[:, 100:103] = torch.tensor([0.0, 1.0, -200.0])  # 102: finite, but exp(-201) is 0 in float32
    uniforms = torch.tensor([0.0, 0.5, 1 - 1e-16, 0.999999999], dtype=torch.float64)
    tokens = kernel_tokens(logits, uniforms)
    assert tokens.tolist()[0] == 100 and set(tokens.tolist()) <= {100, 101}
    assert tokens[2] == 101  # u at the very end of the CDF: the last token of positive probability


def test_rows_that_are_not_finite_are_marked_and_sampled_by_torch():
    logits = torch.zeros(3, 70)
    logits[0, 5] = float("nan")
    logits[1] = float("-inf")
    marked = kernel_tokens(logits, torch.full((3,), 0.5, dtype=torch.float64))
    assert marked[0] == -1 and marked[1] == -1 and 0 <= marked[2] < 70
    tokens = sampling.sample_tokens(logits, PARAMS, torch.Generator().manual_seed(0))
    assert tokens.dtype == torch.long and bool(((tokens >= 0) & (tokens < 70)).all())
    tokens, measured = sampling.sample_and_measure(logits, PARAMS, torch.Generator().manual_seed(0))
    assert measured is None and bool(((tokens >= 0) & (tokens < 70)).all())  # torch's path measures none


def test_sampled_tokens_follow_the_distribution_across_blocks():
    """Pearson chi-square of 40000 draws through `sample_tokens` (the kernel's path) over a vocabulary of five
    blocks with filtered tokens."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(300, generator=generator) * 2
    logits[5] = logits[200:] = float("-inf")
    draws = 40000
    tokens = sampling.sample_tokens(logits.expand(draws, -1).contiguous(), PARAMS, generator)
    counts = torch.bincount(tokens, minlength=300).double()
    probs = logits.double().softmax(-1)
    assert counts[probs == 0].sum() == 0
    support = probs > 0
    expected = probs[support] * draws
    statistic = ((counts[support] - expected) ** 2 / expected).sum().item()
    dof = int(support.sum()) - 1
    assert statistic < dof + 5 * (2 * dof) ** 0.5
