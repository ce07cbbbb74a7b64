"""The CPU decode-attention kernel of the shared prompt cache, compiled from `decode_attention.c` on first use.

A decode step's attention reads every live row's cached keys and values for one query each: its prompt's, then
its own completion's. torch's CPU flash-attention kernel does one span with two BLAS calls per (row, head), which
for one query are mostly call overhead and poorly prefetched reads, and two spans take two calls and a merge.
The kernel in `decode_attention.c` makes one pass per (row, kv head) over both spans, writing the step's keys and
values on the way, and the G rows of a prompt read its cache one after another while it is in the CPU's cache
(see `rollout/kv_cache.py` for the layout, `benchmarks/decode_step.py` and `benchmarks/shared_prefix.py` for
what it saves).

Built with the other CPU kernels by `cpu_kernels.py` (a C compiler with OpenMP, cached per CPU); where it cannot
be, `kernel()` is None and the engine uses torch's attention: the same numbers, slower.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from grpo.cpu_kernels import INT, POINTER, STRIDE, entry

MAX_DIM = 512  # the kernel's accumulator size (decode_attention.c)


def decode_attention(q: torch.Tensor, prompt_kv: torch.Tensor, prompt_start: torch.Tensor, own_kv: torch.Tensor,
                     length: int, places: torch.Tensor, g: int, scale: float, new: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Attention of one query per row and head over its prompt's cache, then its own (`kernel()` not None):

        out[r, h] = softmax_t(scale q[r, h] . k_t) v_t,  t over prompt p's positions [prompt_start[p], P), then
                    the row's own [0, length);  p = places[r] // g,  kv head of h: h // (heads / kv_heads)

    q (rows, heads, dim). `prompt_kv` (prompts, 2 kv_heads, P, dim) and `own_kv` (places, 2 kv_heads, capacity,
    dim): the keys, then the values; row r's completion is place places[r] (int64) of `own_kv`; `prompt_start`
    (prompts,) int32; length >= 1. `new` (rows, 2 kv_heads, dim), the step's keys then values, is first written
    at position length - 1 of each row's place. Any strides with the last dim contiguous. Returns out (rows,
    heads, dim)."""
    rows, heads, dim = q.shape
    out = q.new_empty((rows, heads, dim))
    kernel()(q.data_ptr(), q.stride(0), q.stride(1),
             prompt_kv.data_ptr(), *prompt_kv.stride()[:3], prompt_kv.size(2), prompt_start.data_ptr(),
             own_kv.data_ptr(), *own_kv.stride()[:3], length, places.data_ptr(), g,
             None if new is None else new.data_ptr(), *((0, 0) if new is None else new.stride()[:2]),
             out.data_ptr(), rows, heads, own_kv.size(1) // 2, dim, scale, torch.get_num_threads())
    return out


def available(dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    """Whether the kernel is built and takes caches of `dtype` on `device` with heads of `head_dim`: float32 on
    CPU, not under autocast (which computes the keys in bfloat16), head dims up to MAX_DIM."""
    return (dtype == torch.float32 and device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and head_dim <= MAX_DIM and kernel() is not None)


@functools.cache
def kernel() -> Callable[..., None] | None:
    """The compiled kernel's entry point, or None where the CPU kernels cannot be built (`cpu_kernels.library`)."""
    return entry("grpo_decode_attention", [POINTER, STRIDE, STRIDE,  # q
                                           POINTER, STRIDE, STRIDE, STRIDE, INT, POINTER,  # prompts' cache, start
                                           POINTER, STRIDE, STRIDE, STRIDE, INT, POINTER, INT,  # the rows' own cache
                                           POINTER, STRIDE, STRIDE,  # the step's keys and values
                                           POINTER, *[INT] * 4, ctypes.c_float, INT])  # out, shapes, scale, threads
