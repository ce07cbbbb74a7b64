"""The rollout engine's two KV-cache layouts against each other: copied prompt caches vs one shared per prompt.

    python benchmarks/shared_prefix.py [--size tiny] [--prompt-len 100 300] [--max-new 64] [--repeats 8]

The same engine generates the same prompts with `GroupKV` forced on and off (rollout/kv_cache.py), alternating in
one process so that drift in machine speed hits both alike; prints the median time per generated token of each
and their ratio (below 1: sharing is faster). The engine shares prompts of SHARED_PREFIX_MIN_TOKENS or more.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from models import SIZES, IdTokenizer, build, prompts  # noqa: E402

from grpo import GRPOConfig  # noqa: E402
from grpo.rollout import RolloutEngine, kv_cache  # noqa: E402


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
    engine = RolloutEngine(IdTokenizer(), args, seed=0)
    engine.generate(model, prompt_ids[:1], 2)  # warm-up
    default = kv_cache.SHARED_PREFIX_MIN_TOKENS
    micros: dict[str, list[float]] = {"copied": [], "shared": []}
    for _ in range(opts.repeats):
        for layout, threshold in (("copied", 10**9), ("shared", 0)):
            kv_cache.SHARED_PREFIX_MIN_TOKENS = threshold
            start = time.perf_counter()
            out = engine.generate(model, prompt_ids, opts.num_generations)
            micros[layout].append((time.perf_counter() - start) / int(out.completion_mask.sum()) * 1e6)
    kv_cache.SHARED_PREFIX_MIN_TOKENS = default
    copied, shared = statistics.median(micros["copied"]), statistics.median(micros["shared"])
    print(f"{opts.size} model, prompts {opts.prompt_len[0]}-{opts.prompt_len[1]} tokens, {opts.max_new} new: "
          f"us per token copied {copied:.1f}, shared {shared:.1f}, shared/copied {shared / copied:.2f}")


if __name__ == "__main__":
    main()
