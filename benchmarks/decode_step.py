"""One lean decode step, timed: where a generation round's time goes on this machine.

    python benchmarks/decode_step.py [--size tiny] [--prompts 4] [--num-generations 8] [--prompt-len 24]
                                     [--completion 8 32 64 128]

A round's state is frozen at a completion length: each prompt prefilled once, each of its G rows `--completion`
tokens into its own completion, and steps timed there (the step's token is taken back out after each). Two
layouts, alternating: the shared prompt cache read by the compiled decode-attention kernel (GroupKV, the CPU
default: rollout/decode_attention.py) and copied prompt caches read by torch's attention (CopiedKV, the layout
without the kernel). Prints the median time of a whole step (all layers, the LM head) and of its attention calls
(the cache write included) per layer, and their ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import SIZES, build  # noqa: E402

from grpo.rollout.base import left_pad  # noqa: E402
from grpo.rollout.decode_attention import kernel  # noqa: E402
from grpo.rollout.decoder import LeanDecoder  # noqa: E402
from grpo.rollout.engine import _preallocated_cache  # noqa: E402
from grpo.rollout.kv_cache import CopiedKV, GroupKV  # noqa: E402


class TimedKV:
    """A cache whose attention calls are timed and which stays at the same length from step to step."""

    def __init__(self, kv: CopiedKV | GroupKV):
        self.kv, self.seconds = kv, 0.0

    def attend(self, layer: int, q: torch.Tensor, new: torch.Tensor, scale: float) -> torch.Tensor:
        start = time.perf_counter()
        out = self.kv.attend(layer, q, new, scale)
        self.seconds += time.perf_counter() - start
        return out

    def advance(self) -> None:  # GroupKV writes the step at its length until advanced; a copied cache appends
        if isinstance(self.kv, CopiedKV):
            for layer in self.kv.cache.layers:
                layer.length -= 1
                layer._refresh(layer.rows)


def frozen_round(decoder: LeanDecoder, model: Any, prompt_ids: list[list[int]], g: int, completion: int,
                 shared: bool) -> TimedKV:
    """The caches of a round `completion` tokens in (random completion keys and values)."""
    ids, mask = left_pad(prompt_ids, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = _preallocated_cache(model.config, ids.size(1) + (0 if shared else completion + 1))
    decoder.prefill(ids, mask, positions, cache)
    if shared:
        kv: CopiedKV | GroupKV = GroupKV.from_prefill(cache, mask, g, completion + 1)
        assert kv.kernel
        for buffer in kv._kv:
            buffer[:, :, :completion].normal_()
        kv.length = completion
    else:
        cache.batch_repeat_interleave(g)
        for layer in cache.layers:
            layer.update(*torch.randn(2, layer.rows, layer.keys.size(1), completion, layer.keys.size(-1)))
        kv = CopiedKV(cache, torch.cat([mask, torch.ones(len(prompt_ids), completion)], 1).repeat_interleave(g, 0))
    return TimedKV(kv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=24, help="longest prompt; the others are shorter")
    parser.add_argument("--completion", nargs="+", type=int, default=[8, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="steps per repeat")
    opts = parser.parse_args()
    if kernel() is None:
        sys.exit("the decode-attention kernel could not be built here (see rollout/decode_attention.py)")
    model, g = build(opts.size), opts.num_generations
    rows = opts.prompts * g
    prompt_ids = [[1] + list(range(3, 3 + opts.prompt_len - 1 - 3 * i)) for i in range(opts.prompts)]
    decoder = LeanDecoder.from_model(model, opts.prompt_len + max(opts.completion) + 1, rows)
    tokens = torch.randint(3, model.config.vocab_size, (rows,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        setups = {(completion, shared): frozen_round(decoder, model, prompt_ids, g, completion, shared)
                  for completion in opts.completion for shared in (True, False)}
        results: dict[tuple[int, bool], list[tuple[float, float]]] = {key: [] for key in setups}
        for _ in range(opts.repeats):
            for (completion, shared), kv in setups.items():
                kv.seconds = 0.0
                positions = torch.full((rows,), opts.prompt_len + completion)
                start = time.perf_counter()
                for _ in range(opts.steps):
                    decoder.step(tokens, positions, kv)
                seconds = (time.perf_counter() - start) / opts.steps
                results[completion, shared].append((seconds, kv.seconds / opts.steps / len(decoder.layers)))
    print(f"{opts.size} model, {rows} rows ({opts.prompts} prompts x G = {g}), prompts up to {opts.prompt_len} "
          f"tokens, threads={torch.get_num_threads()}; microseconds; kernel: shared prompt cache and the compiled "
          f"kernel, torch: copied caches and torch's attention")
    print(f"{'completion':>10} {'step kernel':>11} {'step torch':>10} {'ratio':>6} {'attention/layer kernel':>22} "
          f"{'torch':>6} {'ratio':>6}")
    for completion in opts.completion:
        step, attention = (statistics.median(r[i] for r in results[completion, True]) * 1e6 for i in (0, 1))
        torch_step, torch_attention = (statistics.median(r[i] for r in results[completion, False]) * 1e6
                                       for i in (0, 1))
        print(f"{completion:>10} {step:>11.0f} {torch_step:>10.0f} {torch_step / step:>5.2f}x {attention:>22.0f} "
              f"{torch_attention:>6.0f} {torch_attention / attention:>5.2f}x")


if __name__ == "__main__":
    main()
