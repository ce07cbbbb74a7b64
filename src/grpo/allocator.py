"""Freed memory kept in the process while a CPU run trains, without letting it raise peak RSS.

A training step allocates and frees the same large tensors every step: the activations a forward keeps for the
backward (about 0.9 GB a micro-batch for SmolLM2-135M at 8 x 64 completion tokens), the LM head's logits, the
gradients. glibc serves blocks over its mmap threshold (128 KiB, rising to at most 32 MiB) with fresh mmaps and
unmaps them when freed, and gives the top of its heap back once more than twice that is free; either way the
next step touches new pages, and every 4 KiB page costs a page fault (a fresh 113 MB tensor took 23-35 ms to
zero here, an already-touched one 2.5 ms). Told to keep what is freed (M_MMAP_MAX 0, M_TRIM_THRESHOLD
unlimited), glibc puts everything in one heap, where long-lived blocks (a checkpointed layer's input, a
gradient) split the freed space into holes it can neither reuse nor return: about 500 MiB of a 3.4 GB peak.

So inside `keep_freed_memory` torch's CPU tensors of 128 KiB and more go to grpo's tensor cache
(`tensor_cache.cpp`, a c10 CPU allocator compiled on first use): each block its own mapping; a freed block kept
for the next tensor of its size class, or resized (mremap, its touched pages kept) for one within a factor 2;
idle blocks unmapped before the memory mapped would pass the high-water mark of memory in use by 64 MiB. So
peak RSS is what tensors use at the peak plus at most 64 MiB, and steady steps touch few new pages. Measured on
SmolLM2-135M, G 8, 64 tokens, 2 CPU cores (`GRPOTrainer` with `benchmarks/compare_trl.py`'s settings, 8 steps,
glibc keeping freed memory against the cache, one run each, alternating): gradient checkpointing on, peak RSS
3476 against 3064 MiB, steps 3-8 9.2-10.4 against 9.1-10.5 s; off, 4353 against 3926 MiB, 7.5-8.9 against
7.6-8.8 s. Where the cache cannot be built (no C++ compiler or torch headers, not Linux, `GRPO_CPU_KERNELS=0`)
glibc keeps freed memory as before. On exit the default allocator and glibc's defaults come back and the free
memory is returned.

Left alone where the user set glibc's malloc through its MALLOC_* environment variables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from grpo.paths import compiled_library, load_compiled

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
NEVER = -1  # M_TRIM_THRESHOLD -1: trimming off (mallopt(3))

MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                    "MALLOC_ARENA_MAX")

TENSOR_CACHE_SOURCE = Path(__file__).with_name("tensor_cache.cpp")
TENSOR_CACHE_THRESHOLD = 128 * 1024  # smaller tensors stay with malloc: many, short-lived, cheap to fault in
TENSOR_CACHE_SLACK = 64 * 2**20  # idle memory allowed past the high-water mark of memory in use
logger = logging.getLogger(__name__)


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (whose mallopt this module sets), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[str | None]:
    """Within it, freed memory is kept for reuse. Yields how: "tensor cache" (torch's CPU allocator is the
    tensor cache), "glibc" (malloc keeps everything freed), or None (disabled, or MALLOC_* set by the user)."""
    if not enabled or any(name in os.environ for name in MALLOC_VARIABLES):
        yield None
        return
    cache = tensor_cache()
    if cache is not None and cache.grpo_tensor_cache_install(TENSOR_CACHE_THRESHOLD, TENSOR_CACHE_SLACK):
        try:
            yield "tensor cache"
        finally:
            cache.grpo_tensor_cache_uninstall()
        return
    libc = glibc()
    if libc is None:
        yield None
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, NEVER)
    try:
        yield "glibc"
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def tensor_cache_stats() -> dict[str, int]:
    """The tensor cache's counters: bytes in use, idle and the high-water mark of in use; blocks reused, freshly
    mapped and unmapped ({} where the cache is not built)."""
    cache = tensor_cache()
    if cache is None:
        return {}
    values = (ctypes.c_long * 6)()
    cache.grpo_tensor_cache_stats(values)
    return dict(zip(("in_use", "idle", "high_water", "reused", "mapped", "unmapped"), values))


@functools.cache
def tensor_cache() -> ctypes.CDLL | None:
    """The compiled tensor cache, or None where it cannot be built (logged once, at INFO)."""
    library = load_compiled(build_tensor_cache, "tensor cache", "glibc keeps freed memory instead", logger)
    if library is not None:
        library.grpo_tensor_cache_install.argtypes = [ctypes.c_long, ctypes.c_long]
        library.grpo_tensor_cache_install.restype = ctypes.c_int
        library.grpo_tensor_cache_uninstall.argtypes = []
        library.grpo_tensor_cache_stats.argtypes = [ctypes.POINTER(ctypes.c_long)]
    return library


def build_tensor_cache() -> Path:
    """The compiled tensor cache, built against this torch's c10 unless grpo's cache has it. Raises OSError (no
    C++ compiler or torch headers) or subprocess.CalledProcessError (it failed)."""
    import torch

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OSError("no C++ compiler: install g++ or set $CXX")
    torch_dir = Path(torch.__file__).parent
    if not (torch_dir / "include" / "c10" / "core" / "CPUAllocator.h").exists():
        raise OSError(f"torch's C++ headers are not installed under {torch_dir}")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)  # libstdc++'s string layout must match libc10's
    flags = ["-O2", "-std=c++17", "-fPIC", "-shared", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_dir / 'include'}",
             f"-L{torch_dir / 'lib'}", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    key = [TENSOR_CACHE_SOURCE.read_text(), str(flags), torch.__version__]

    def compile_and_link(scratch: Path, library: Path) -> None:
        subprocess.run([compiler, str(TENSOR_CACHE_SOURCE), "-o", str(library), *flags], check=True,
                       capture_output=True)

    return compiled_library("tensor_cache", compiler, key, compile_and_link)
