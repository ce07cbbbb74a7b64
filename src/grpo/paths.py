"""Where grpo keeps what it builds once and reuses: the embedded model, converted models, compiled kernels."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """`$GRPO_CACHE`, or `~/.cache/grpo`."""
    return Path(os.environ.get("GRPO_CACHE", Path.home() / ".cache" / "grpo"))


def is_secondary_rank() -> bool:
    """Whether this is a process other than rank 0 of a torch.distributed run."""
    import torch

    distributed = torch.distributed
    return distributed.is_available() and distributed.is_initialized() and distributed.get_rank() > 0


def build_in_own_process(statement: str) -> None:
    """Run `statement` (Python) in a fresh process outside torch.distributed: transformers' save_pretrained writes
    nothing on a rank other than 0, so such a rank would publish an incomplete directory into the cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", statement], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building into grpo's cache failed in a helper process ({statement}):\n"
                           + "\n".join(result.stderr.strip().splitlines()[-6:]))


def load_compiled(build: Callable[[], Path], what: str, otherwise: str, logger: logging.Logger) -> ctypes.CDLL | None:
    """The library `build()` makes, loaded; None where compiled code is switched off (`GRPO_CPU_KERNELS=0`) or
    cannot be built (not Linux, no compiler, a failed build: logged at INFO, "<what> ...; <otherwise>")."""
    if os.environ.get("GRPO_CPU_KERNELS", "1") == "0":
        return None
    if sys.platform != "linux":
        logger.info("%s: not built on %s; %s", what, sys.platform, otherwise)
        return None
    try:
        return ctypes.CDLL(str(build()))
    except (OSError, subprocess.SubprocessError) as error:
        detail = (getattr(error, "stderr", None) or b"").decode(errors="replace").strip()[-500:]
        logger.info("%s unavailable (%s %s); %s", what, error, detail, otherwise)
        return None


def compiled_library(stem: str, compiler: str, key: list[str], build: Callable[[Path, Path], None]) -> Path:
    """`<cache>/kernels/<stem>-<hash>.so`, made by `build(scratch_directory, output)` unless the cache has it. The
    hash covers the compiler's version and `key`, which must hold everything else that changes the binary
    (sources, flags, CPU)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    directory = cache_dir() / "kernels"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: a directory of this process's own
        directory = Path(tempfile.mkdtemp(prefix="grpo-kernels-"))
    digest = hashlib.sha256(chr(0).join([*key, version]).encode()).hexdigest()[:16]
    target = directory / f"{stem}-{digest}.so"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            output = Path(scratch, f"{stem}.so")
            build(Path(scratch), output)
            os.replace(output, target)  # atomic: processes building at once each leave a whole library
    return target


def run_first(commands: list[list[str]]) -> None:
    """Run the first of `commands` that succeeds; if none does, raise the last one's error."""
    for command in commands[:-1]:
        if subprocess.run(command, capture_output=True).returncode == 0:
            return
    subprocess.run(commands[-1], check=True, capture_output=True)
