"""Shared-prefix attention: one copy of each prompt's cache gives the same attention as G copies."""

from __future__ import annotations

import pytest
import torch

from grpo.rollout.kv_cache import GroupKV, use_shared_prefix


def concatenated_attention(q, prompt_keys, prompt_values, prompt_mask, keys, values, group, scale):
    """Plain attention of each row over its prompt's cache copied in front of its own (what `generate` does)."""
    heads, kv_heads = q.size(1), prompt_keys.size(1)
    full_keys = torch.cat([prompt_keys[group], keys], dim=2).repeat_interleave(heads // kv_heads, dim=1)
    full_values = torch.cat([prompt_values[group], values], dim=2).repeat_interleave(heads // kv_heads, dim=1)
    valid = torch.cat([prompt_mask[group], torch.ones(len(group), keys.size(2))], dim=1).bool()
    scores = (q.unsqueeze(2) @ full_keys.transpose(-1, -2)).squeeze(2) * scale  # (rows, heads, columns)
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    return (scores.softmax(-1).unsqueeze(2) @ full_values).squeeze(2)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_group_attention_equals_attention_over_copied_prompt_caches(heads, kv_heads, attention):
    torch.manual_seed(0)
    prompts, g, prompt_len, own_len, dim = 3, 4, 5, 3, 8
    prompt_kv = torch.randn(prompts, 2 * kv_heads, prompt_len, dim)
    prompt_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])  # left padding
    kv = GroupKV([prompt_kv], prompt_mask, g, capacity=own_len)
    assert kv.kernel == (attention == "kernel")
    rows = torch.tensor([7, 0, 11, 5, 2, 9, 4])  # a round after some rows left, in compacted order
    kv.keep(rows)
    earlier = torch.randn(len(rows), 2 * kv_heads, own_len - 1, dim)  # the completion tokens so far
    # the kernel finds a row's completion at its place; torch's attention, compacted in row order
    kv._kv[0][rows if kv.kernel else slice(len(rows)), :, :own_len - 1] = earlier
    kv.length = own_len - 1
    q, new = torch.randn(len(rows), heads, dim), torch.randn(len(rows), 2 * kv_heads, dim)
    ours = kv.attend(0, q, new, scale=0.3)
    own = torch.cat([earlier, new.unsqueeze(2)], dim=2)
    expected = concatenated_attention(q, prompt_kv[:, :kv_heads], prompt_kv[:, kv_heads:], prompt_mask,
                                      own[:, :kv_heads], own[:, kv_heads:], rows // g, 0.3)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_group_kv_keeps_each_row_with_its_prompt_and_copies_only_moved_rows(attention):
    prompts, g, kv_heads, dim = 2, 3, 1, 2
    kv = GroupKV([torch.zeros(prompts, 2 * kv_heads, 2, dim)], torch.ones(prompts, 2), g, capacity=4)
    kv._kv[0].zero_()  # allocated empty: stray NaNs in the unwritten positions would fail torch.equal below
    for token in range(2):  # row r writes (10 r + token) as its keys and values
        kv._kv[0][:6, :, kv.length] = (torch.arange(6.0) * 10 + token).view(6, 1, 1)
        kv.advance()
    before = kv._kv[0].clone()
    kv.keep(torch.tensor([0, 5, 2, 4]))  # rows 1 and 3 finished: 5 fills 1's place, 4 fills 3's
    assert kv.rows.tolist() == [0, 5, 2, 4]
    assert kv.group.tolist() == [0, 1, 0, 1] and kv.slot.tolist() == [0, 2, 2, 1]
    if attention == "kernel":  # each row's completion stays at its place: nothing is copied
        assert torch.equal(kv._kv[0], before)
    else:  # compacted in row order, copying only the rows that move
        assert kv._kv[0][:4, 0, :2, 0].tolist() == [[0, 1], [50, 51], [20, 21], [40, 41]]
        assert torch.equal(kv._kv[0][[0, 2]], before[[0, 2]])


def test_shared_prefix_is_used_on_cpu_with_the_kernel_and_otherwise_for_long_nonempty_prompts(attention):
    long, short = torch.ones(2, 80), torch.ones(2, 20)
    empty = long.clone()
    empty[1] = 0
    if attention == "kernel":  # one pass over both spans: sharing always pays
        assert all(use_shared_prefix(mask, g, torch.float32, 64) for mask in (long, short, empty) for g in (1, 4))
        assert not use_shared_prefix(short, 4, torch.bfloat16, 64)  # the kernel is float32: the rule below
        assert not use_shared_prefix(short, 4, torch.float32, 1024)  # nor past the kernel's head dim
    else:
        assert use_shared_prefix(long, 4, torch.float32, 64)
        assert not use_shared_prefix(long, 1, torch.float32, 64)
        assert not use_shared_prefix(short, 4, torch.float32, 64)  # short: copying is cheaper
        assert not use_shared_prefix(empty, 4, torch.float32, 64)  # would leave its samples nothing to attend to
