"""Where grpo keeps what it builds once and reuses: the embedded model, converted models, compiled kernels."""

from __future__ import annotations

import os
import subprocess
import sys
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
