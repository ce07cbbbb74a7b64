"""The rollout engine's KV-cache layouts against each other, same engine, same prompts, one process.

    python benchmarks/shared_prefix.py [--size tiny] [--prompt-len 100 300] [--max-new 64] [--repeats 8]

Three ways to decode on CPU (rollout/kv_cache.py): the default, a shared prompt cache read by the compiled
decode-attention kernel (rollout/decode_attention.py); and, as without the kernel, copied prompt caches or a
shared one read by torch's flash kernel (two calls a layer, merged by log-normalisers). They alternate so that
drift in machine speed hits all alike; prints the median time per generated token of each and its ratio to the
kernel's. Without the kernel the engine shares prompts of SHARED_PREFIX_MIN_TOKENS or more.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import SIZES, IdTokenizer, build, prompts  # noqa: E402

from grpo import GRPOConfig  # noqa: E402
from grpo.rollout import RolloutEngine, kv_cache  # noqa: E402
from grpo.rollout.decode_attention import kernel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--prompt-len", nargs=2, type=int, default=[100, 300], metavar=("MIN", "MAX"))
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=8)
    opts = parser.parse_args()
    model = build(opts.size)
    prompt_ids = prompts(opts.prompts, model.config.vocab_size, min_len=opts.prompt_len[0],
                         max_len=opts.prompt_len[1])
    args = GRPOConfig(num_generations=opts.num_generations, per_device_train_batch_size=opts.num_generations,
                      max_completion_length=opts.max_new)
    engine = RolloutEngine(IdTokenizer(), args.sampling_params, seed=0)
    engine.generate(model, prompt_ids[:1], 2)  # warm-up
    if kernel() is None:
        sys.exit("the decode-attention kernel could not be built here (see rollout/decode_attention.py)")
    layouts = {"kernel": (kv_cache.available, 0), "torch copied": (no_kernel, 10**9), "torch shared": (no_kernel, 0)}
    micros: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(opts.repeats):
        for name, (available, threshold) in layouts.items():
            with mock.patch.multiple(kv_cache, available=available, SHARED_PREFIX_MIN_TOKENS=threshold):
                start = time.perf_counter()
                out = engine.generate(model, prompt_ids, opts.num_generations)
            micros[name].append((time.perf_counter() - start) / int(out.completion_mask.sum()) * 1e6)
    medians = {name: statistics.median(times) for name, times in micros.items()}
    print(f"{opts.size} model, prompts {opts.prompt_len[0]}-{opts.prompt_len[1]} tokens, {opts.max_new} new; "
          "us per token (ratio to the kernel's): "
          + ", ".join(f"{name} {us:.1f} ({us / medians['kernel']:.2f})" for name, us in medians.items()))


def no_kernel(dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    return False

if __name__ == "__main__":
    main()
