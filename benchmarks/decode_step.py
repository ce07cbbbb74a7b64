"""One lean decode step, timed: where a generation round's time goes on this machine.

    python benchmarks/decode_step.py [--size tiny] [--rows 32] [--cached 8 40 72 104] [--one-row-cache]

For each number of cached positions, the time of a whole decode step (all layers, the LM head) and of its
attention calls, per layer; median of alternating repeats. `--one-row-cache` makes every row's attention read
row 0's keys and values (1/rows of the bytes, same shapes and op count): the gap to the plain run is what the KV
cache's memory traffic costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import SIZES, build  # noqa: E402

from grpo.rollout import kv_cache  # noqa: E402
from grpo.rollout.decoder import LeanDecoder  # noqa: E402
from grpo.rollout.engine import _preallocated_cache  # noqa: E402


class TimedKV:
    """A copied cache whose attention calls are timed and whose step token is taken back out after each step, so
    that every step decodes at the same cache length."""

    def __init__(self, cache: Any, rows: int, cached: int, one_row: bool):
        self.copied = kv_cache.CopiedKV(cache, torch.ones(rows, cached))
        self.seconds = 0.0
        if one_row:
            for layer in cache.layers:
                layer.append = partial(_row_zero, layer.append)

    def attend(self, layer: int, q: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
        start = time.perf_counter()
        out = self.copied.attend(layer, q, kv, scale)
        self.seconds += time.perf_counter() - start
        return out

    def advance(self) -> None:
        for layer in self.copied.cache.layers:
            layer.length -= 1
            layer._refresh(layer.rows)


def _row_zero(append: Any, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = append(kv)
    return keys[:1].expand_as(keys), values[:1].expand_as(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--cached", nargs="+", type=int, default=[8, 40, 72, 104])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="steps per repeat")
    parser.add_argument("--one-row-cache", action="store_true")
    opts = parser.parse_args()
    model = build(opts.size)
    capacity = max(opts.cached) + 1
    decoder = LeanDecoder.from_model(model, capacity, opts.rows)
    tokens = torch.randint(3, model.config.vocab_size, (opts.rows,), generator=torch.Generator().manual_seed(0))
    setups = {}
    with torch.no_grad():
        for cached in opts.cached:
            cache = _preallocated_cache(model.config, capacity)
            ids = tokens.unsqueeze(1).expand(-1, cached)
            decoder.prefill(ids, torch.ones_like(ids), torch.arange(cached).expand_as(ids), cache)
            setups[cached] = TimedKV(cache, opts.rows, cached, opts.one_row_cache)
        results: dict[int, list[tuple[float, float]]] = {cached: [] for cached in setups}
        for _ in range(opts.repeats):
            for cached, kv in setups.items():
                kv.seconds = 0.0
                positions = torch.full((opts.rows,), cached)
                start = time.perf_counter()
                for _ in range(opts.steps):
                    decoder.step(tokens, positions, kv)
                seconds = (time.perf_counter() - start) / opts.steps
                results[cached].append((seconds, kv.seconds / opts.steps / len(decoder.layers)))
    print(f"{opts.size} model, {opts.rows} rows, threads={torch.get_num_threads()}"
          + (", every row reading row 0's cache" if opts.one_row_cache else ""))
    print(f"{'cached':>6} {'step us':>8} {'attention us/layer':>19}")
    for cached, runs in results.items():
        print(f"{cached:>6} {statistics.median(r[0] for r in runs) * 1e6:>8.0f} "
              f"{statistics.median(r[1] for r in runs) * 1e6:>19.0f}")


if __name__ == "__main__":
    main()
