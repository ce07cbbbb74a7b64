"""grpo's compiled CPU kernels, one library built from source on first use: the decode step's
(`rollout/decode_attention.c`, `rollout/decode_linear.c`, `rollout/decode_layers.c`, which runs a step's layers
with those two, and the sampler, `rollout/sampling.c`) and the training step's fused element-wise steps
(`fused_ops.c`).

Building takes a C compiler with OpenMP (gcc or clang: `$CC`, else `cc` on PATH) and about a second. The library
is cached under `~/.cache/grpo/kernels` (or `$GRPO_CACHE/kernels`), keyed by sources, compiler and CPU, since it
is built for the CPU it runs on (-march=native). It needs libgomp, the OpenMP runtime torch's Linux wheels load,
so that its threads are torch's own (a torch built on another runtime would run a second pool). Where there is
no compiler, the platform is not Linux, or `GRPO_CPU_KERNELS=0`, `library()` is None and both steps use
torch's operations: the same numbers to rounding, slower.

-ffast-math (vectorised exp) is used to compile only, not to link: gcc would otherwise link in a start-up file
that turns on flush-to-zero for the whole process when the library loads.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from grpo.paths import compiled_library, load_compiled, run_first

HERE = Path(__file__).parent
SOURCES = [*(HERE / "rollout" / name for name in ("decode_attention.c", "decode_linear.c", "decode_layers.c",
                                                  "sampling.c")),
           HERE / "fused_ops.c"]
COMPILE_FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-fPIC", "-std=gnu99"]
ARCH_FLAGS = [["-march=native"], []]  # a compiler that cannot target the host's own CPU builds generic code
LINK_FLAGS = [["-shared", "-fopenmp", "-lmvec", "-lm"], ["-shared", "-fopenmp", "-lm"]]  # without glibc's libmvec
logger = logging.getLogger(__name__)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be built (logged once, at INFO)."""
    return load_compiled(build, "CPU kernels", "torch's operations are used", logger)


# C argument types of the kernels' entry points: pointers to tensor data, strides in elements, ints
POINTER, STRIDE, INT = ctypes.c_void_p, ctypes.c_long, ctypes.c_int


def entry(name: str, argtypes: list[Any], restype: Any = None) -> Any:
    """The library's function `name` with its C signature set, or None where the library cannot be built."""
    compiled = library()
    if compiled is None:
        return None
    function = getattr(compiled, name)
    function.argtypes, function.restype = argtypes, restype
    return function


def build() -> Path:
    """The compiled library, built unless the cache has it. Raises OSError (no compiler) or
    subprocess.CalledProcessError (it failed)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler: install gcc or set $CC")
    key = [*(source.read_text() for source in SOURCES), str(COMPILE_FLAGS + ARCH_FLAGS + LINK_FLAGS), _cpu_flags()]

    def compile_and_link(scratch: Path, library: Path) -> None:
        objects = [scratch / f"{source.stem}.o" for source in SOURCES]
        for source, output in zip(SOURCES, objects):
            run_first([[compiler, *COMPILE_FLAGS, *arch, "-c", str(source), "-o", str(output)] for arch in ARCH_FLAGS])
        run_first([[compiler, *map(str, objects), "-o", str(library), *flags] for flags in LINK_FLAGS])

    return compiled_library("cpu_kernels", compiler, key, compile_and_link)


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith("flags")), "")
