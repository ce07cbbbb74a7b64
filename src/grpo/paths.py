"""Where grpo keeps what it builds once and reuses: the embedded model, converted models, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$GRPO_CACHE`, or `~/.cache/grpo`."""
    return Path(os.environ.get("GRPO_CACHE", Path.home() / ".cache" / "grpo"))
