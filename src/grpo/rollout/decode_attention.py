"""The CPU decode-attention kernel of the shared prompt cache, compiled from `decode_attention.c` on first use.

A decode step's attention reads every live row's cached keys and values for one query each: its prompt's, then
its own completion's. torch's CPU flash-attention kernel does one span with two BLAS calls per (row, head), which
for one query are mostly call overhead and poorly prefetched reads, and two spans take two calls and a merge.
The kernel in `decode_attention.c` makes one pass per (row, kv head) over both spans, writing the step's keys and
values on the way, and the G rows of a prompt read its cache one after another while it is in the CPU's cache
(see `rollout/kv_cache.py` for the layout, `benchmarks/decode_step.py` and `benchmarks/shared_prefix.py` for
what it saves).

Building it takes a C compiler with OpenMP (gcc or clang: `$CC`, else `cc` on PATH) and well under a second.
The library is cached under `~/.cache/grpo/kernels` (or `$GRPO_CACHE/kernels`), keyed by source, compiler and
CPU, since it is built for the CPU it runs on (-march=native). It needs libgomp, the OpenMP runtime torch's Linux
wheels load, so that its threads are torch's own (a torch built on another runtime would run a second pool).
Where there is no compiler, the platform is not Linux, or `GRPO_CPU_KERNELS=0`, `kernel()` is None and the
engine uses torch's attention: the same numbers, slower.

-ffast-math (vectorised exp) is used to compile only, not to link: gcc would otherwise link in a start-up file
that turns on flush-to-zero for the whole process when the library loads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from grpo.paths import cache_dir

SOURCE = Path(__file__).with_name("decode_attention.c")
MAX_DIM = 512  # the kernel's accumulator size (decode_attention.c)
COMPILE_FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-fPIC", "-std=c99"]
ARCH_FLAGS = [["-march=native"], []]  # a compiler that cannot target the host's own CPU builds generic code
LINK_FLAGS = [["-shared", "-fopenmp", "-lmvec", "-lm"], ["-shared", "-fopenmp", "-lm"]]  # without glibc's libmvec
logger = logging.getLogger(__name__)


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
    """The compiled kernel's entry point, or None where it cannot be built (logged once, at INFO)."""
    if os.environ.get("GRPO_CPU_KERNELS", "1") == "0":
        return None
    if sys.platform != "linux":
        logger.info("decode attention kernel: not built on %s; torch's attention is used", sys.platform)
        return None
    try:
        function = ctypes.CDLL(str(build())).grpo_decode_attention
    except (OSError, subprocess.SubprocessError) as error:
        detail = (getattr(error, "stderr", None) or b"").decode(errors="replace").strip()[-500:]
        logger.info("decode attention kernel unavailable (%s %s); torch's attention is used", error, detail)
        return None
    pointer, stride, integer = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    function.argtypes = [pointer, stride, stride,  # q
                         pointer, stride, stride, stride, integer, pointer,  # the prompts' cache, its start
                         pointer, stride, stride, stride, integer, pointer, integer,  # the rows' own cache
                         pointer, stride, stride,  # the step's keys and values
                         pointer, *[integer] * 4, ctypes.c_float, integer]  # out, shapes, scale, threads
    function.restype = None
    return function


def build() -> Path:
    """The compiled library, built unless the cache has it. Raises OSError (no compiler) or
    subprocess.CalledProcessError (it failed)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler: install gcc or set $CC")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, str(COMPILE_FLAGS + ARCH_FLAGS + LINK_FLAGS),
                                    _cpu_flags()]).encode())
    target = _cache_dir() / f"decode_attention-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        objects, library = Path(scratch, "kernel.o"), Path(scratch, "kernel.so")
        _run_first([[compiler, *COMPILE_FLAGS, *arch, "-c", str(SOURCE), "-o", str(objects)] for arch in ARCH_FLAGS])
        _run_first([[compiler, str(objects), "-o", str(library), *flags] for flags in LINK_FLAGS])
        os.replace(library, target)  # atomic: processes building at once each leave a whole library
    return target


def _run_first(commands: list[list[str]]) -> None:
    """Run the first of `commands` that succeeds; if none does, raise the last one's error."""
    for command in commands[:-1]:
        if subprocess.run(command, capture_output=True).returncode == 0:
            return
    subprocess.run(commands[-1], check=True, capture_output=True)


def _cache_dir() -> Path:
    base = cache_dir() / "kernels"
    try:
        base.mkdir(parents=True, exist_ok=True)
        return base
    except OSError:  # a read-only home: a directory of this process's own
        return Path(tempfile.mkdtemp(prefix="grpo-kernels-"))


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith("flags")), "")
