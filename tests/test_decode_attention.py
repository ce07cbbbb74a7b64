"""The compiled CPU decode-attention kernel against attention worked out in float64, and how the CPU kernels'
library is built (cpu_kernels.py)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from grpo import cpu_kernels as module
from grpo.paths import run_first
from grpo.rollout.decode_attention import available, decode_attention, kernel

needs_kernel = pytest.mark.skipif(kernel() is None, reason="no C compiler to build the kernel with")


def reference(q, prompt_kv, prompt_start, own_kv, length, places, g, scale):
    """Attention in float64 of each row over its prompt's positions from prompt_start, then its own first
    `length` (every kv head's keys repeated for its query heads)."""
    rows, heads, _ = q.shape
    kv_heads = own_kv.size(1) // 2
    prompt_kv, own_kv = prompt_kv[places // g].double(), own_kv[places, :, :length].double()
    keys = torch.cat([prompt_kv[:, :kv_heads], own_kv[:, :kv_heads]], dim=2)
    values = torch.cat([prompt_kv[:, kv_heads:], own_kv[:, kv_heads:]], dim=2)
    keys, values = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (keys, values))
    scores = torch.einsum("rhd,rhtd->rht", q.double(), keys) * scale
    hidden = torch.arange(keys.size(2)) < prompt_start[places // g].long().view(rows, 1, 1)
    return torch.einsum("rht,rhtd->rhd", scores.masked_fill(hidden, float("-inf")).softmax(-1), values)


def test_the_kernel_is_built_exactly_where_a_c_compiler_is():
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert (kernel() is not None) == (compiler is not None and sys.platform == "linux")


@needs_kernel
# dims 16, 48, 64 and 128 take the vector path (a multiple of 16; 64 and 128 as constants), 40 the scalar one; 12
# query heads over one kv head are two passes of at most 8 (MAX_GROUP)
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 48), (4, 2, 64), (6, 1, 16), (8, 2, 128), (12, 1, 40),
                                                (12, 1, 64)])
# (300, 4) and (40, 600): spans of more than one of the kernel's 256-position blocks
@pytest.mark.parametrize("prompt_length,length", [(7, 1), (5, 9), (300, 4), (40, 600)])
def test_kernel_equals_attention_worked_out_in_float64(heads, kv_heads, dim, prompt_length, length):
    torch.manual_seed(length + dim)
    prompts, g = 3, 2
    places = torch.tensor([4, 0, 5, 3, 1])  # a round after row 2 left, in compacted order
    # q and the step's keys and values: views of a fused q/k/v projection; the caches have spare capacity
    qkv = torch.randn(len(places), heads + 2 * kv_heads, dim)
    q, new = qkv[:, :heads], qkv[:, heads:]
    prompt_kv = torch.randn(prompts, 2 * kv_heads, prompt_length, dim) * 2
    prompt_start = torch.tensor([0, prompt_length - 1, prompt_length], dtype=torch.int32)  # the last: empty
    own_kv = torch.randn(prompts * g, 2 * kv_heads, length + 3, dim) * 2
    before = own_kv.clone()
    out = decode_attention(q, prompt_kv, prompt_start, own_kv, length, places, g, 0.2, new=new)
    # the step's keys and values are written at position length - 1 of each live row's place, nothing else
    assert torch.equal(own_kv[places, :, length - 1], new)
    before[places, :, length - 1] = new
    assert torch.equal(own_kv, before)
    expected = reference(q, prompt_kv, prompt_start, own_kv, length, places, g, 0.2)
    # float32 sums over up to 640 positions of values up to ~8: about 1e-5 of rounding
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=5e-5)
    # without a new token the cache is read as it is: the same answer
    torch.testing.assert_close(decode_attention(q, prompt_kv, prompt_start, own_kv, length, places, g, 0.2), out,
                               rtol=0, atol=0)
    if prompt_length > 1:  # the prompt starts are read
        assert not torch.allclose(decode_attention(q, prompt_kv, torch.zeros_like(prompt_start), own_kv, length,
                                                   places, g, 0.2), out)


@needs_kernel
def test_the_answer_does_not_depend_on_the_number_of_threads():
    """Each (row, kv head) is summed by one thread in one order, so rollouts are reproducible on any machine."""
    torch.manual_seed(0)
    q, prompt_kv, own_kv = torch.randn(7, 4, 32), torch.randn(2, 4, 30, 32), torch.randn(8, 4, 50, 32)
    start, places = torch.tensor([3, 0], dtype=torch.int32), torch.tensor([0, 7, 2, 5, 4, 1, 6])
    threads = torch.get_num_threads()
    try:
        outs = []
        for count in (1, 3):
            torch.set_num_threads(count)
            outs.append(decode_attention(q, prompt_kv, start, own_kv, 50, places, 4, 0.3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@needs_kernel
def test_loading_the_kernel_keeps_denormal_numbers():
    """Linked with -ffast-math, gcc adds start-up code that sets flush-to-zero for the whole process."""
    kernel()
    tiny = torch.tensor([1e-39])
    assert (tiny * 1.0).item() > 0


def test_the_kernel_takes_float32_caches_on_cpu_outside_autocast():
    cpu = torch.device("cpu")
    assert available(torch.float32, cpu, 128) == (kernel() is not None)
    assert not available(torch.bfloat16, cpu, 128)
    assert not available(torch.float32, torch.device("cuda"), 128)
    assert not available(torch.float32, cpu, 1024)  # past the kernel's accumulator
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not available(torch.float32, cpu, 128)


@needs_kernel
def test_the_library_is_built_once_and_then_taken_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path))
    first = module.build()
    assert first.parent == tmp_path / "kernels" and first.exists()
    built_at = first.stat().st_mtime_ns
    assert module.build() == first and first.stat().st_mtime_ns == built_at
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no scratch files left behind


def test_without_a_working_compiler_torch_operations_are_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "false")
    with pytest.raises(subprocess.CalledProcessError):
        module.build()
    with caplog.at_level(logging.INFO, logger=module.__name__):
        assert module.library.__wrapped__() is None
    assert "torch's operations are used" in caplog.text
    monkeypatch.setenv("GRPO_CPU_KERNELS", "0")
    monkeypatch.delenv("CC")
    assert module.library.__wrapped__() is None


def test_each_build_step_falls_back_to_its_next_command(tmp_path):
    """-march=native, then generic code; glibc's vector maths, then none: the first that works is kept."""
    marker = tmp_path / "ran"
    run_first([["false"], ["touch", str(marker)], ["false"]])
    assert marker.exists()
    with pytest.raises(subprocess.CalledProcessError):
        run_first([["false"], ["false"]])
