"""Generation throughput: grpo's rollout engine vs transformers `generate`, same model and prompts, one run.

    python benchmarks/rollout_speed.py [--sizes tiny small smollm2] [--lengths 64 256] [--repeats 3] [--prompt-len 8 40]
                                       [--dtype float32] [--engine-copies bfloat16] [--device cuda]

Sampling with G = 8 completions per prompt; completion lengths vary (see benchmarks/models.py). Tokens/s counts
generated completion tokens (up to and including EOS); the mean completion length of each backend is printed
too (same model, same distribution: they should agree up to sampling noise). Runs alternate between the two
backends so that drift in machine speed hits both alike; the median of the repeats is reported. `smollm2` is
SmolLM2-135M-Instruct (grpo.catalog, fetched once) with its tokenizer and the chat-templated prompts of the
built-in chat_length task (--prompt-len does not apply).
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
from models import SIZES, IdTokenizer, build, cpu_name, prompts  # noqa: E402

from grpo import GRPOConfig  # noqa: E402
from grpo.rollout import RolloutEngine, TransformersGenerator  # noqa: E402


def timed(generator, model, prompt_ids, g) -> tuple[float, int]:
    start = time.perf_counter()
    out = generator.generate(model, prompt_ids, g)
    return time.perf_counter() - start, int(out.completion_mask.sum())


def real_model(num_prompts: int) -> tuple[Any, Any, list[list[int]]]:
    """SmolLM2-135M-Instruct, its tokenizer, and `num_prompts` chat-templated prompts as token ids."""
    from grpo import catalog
    from grpo.data import tokenize_prompts
    from grpo.embedded.tasks import chat_length_task
    from grpo.models import load_causal_lm, load_tokenizer

    path = str(catalog.fetch("smollm2-135m-instruct"))
    tokenizer = load_tokenizer(path, None, None)
    return load_causal_lm(path), tokenizer, tokenize_prompts(tokenizer, chat_length_task(num_prompts)["prompt"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=[*sorted(SIZES), "smollm2"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--prompts", type=int, default=4, help="unique prompts per round (x G = rows)")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-len", nargs=2, type=int, default=[8, 40], metavar=("MIN", "MAX"),
                        help="prompt lengths in tokens (default 8 40; chat-templated questions are often 100-300)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the model's weights (bfloat16: what a GPU run would use)")
    parser.add_argument("--engine-copies", default="float32", choices=["float32", "bfloat16"],
                        help="the engine's CPU weight copies (bfloat16: RolloutEngine(copy_dtype=), which training "
                             "does not use; the model and generate stay in --dtype)")
    opts = parser.parse_args()
    print(f"device={opts.device} cpu={cpu_name()} dtype={opts.dtype} engine copies={opts.engine_copies} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} "
          f"G={opts.num_generations} prompts/round={opts.prompts} prompt_len={opts.prompt_len[0]}-{opts.prompt_len[1]}")
    header = (f"{'model':<6} {'params':>7} {'max_new':>7} {'hf len':>7} {'grpo len':>8} {'hf tok/s':>9} "
              f"{'grpo tok/s':>10} {'ratio':>6}")
    print(header + "\n" + "-" * len(header))
    for size in opts.sizes:
        if size == "smollm2":
            model, tokenizer, prompt_ids = real_model(opts.prompts)
        else:
            model, tokenizer = build(size), IdTokenizer()
            prompt_ids = prompts(opts.prompts, model.config.vocab_size, min_len=opts.prompt_len[0],
                                 max_len=opts.prompt_len[1])
        model = model.to(opts.device, getattr(torch, opts.dtype))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for max_new in opts.lengths:
            args = GRPOConfig(num_generations=opts.num_generations, per_device_train_batch_size=opts.num_generations,
                              max_completion_length=max_new)
            backends = {"hf": TransformersGenerator(tokenizer, args.sampling_params),
                        "grpo": RolloutEngine(tokenizer, args.sampling_params, seed=0,
                                              copy_dtype=getattr(torch, opts.engine_copies))}
            torch.manual_seed(0)
            # warm-up, a whole round each: one-time costs (oneDNN generating code for new shapes, building the
            # decode kernel) are not timed
            for backend in backends.values():
                backend.generate(model, prompt_ids, opts.num_generations)
            rates: dict[str, list[float]] = {name: [] for name in backends}
            lengths: dict[str, list[float]] = {name: [] for name in backends}  # same model: should agree
            for _ in range(opts.repeats):
                for name, backend in backends.items():
                    seconds, tokens = timed(backend, model, prompt_ids, opts.num_generations)
                    rates[name].append(tokens / seconds)
                    lengths[name].append(tokens / (len(prompt_ids) * opts.num_generations))
            hf, ours = statistics.median(rates["hf"]), statistics.median(rates["grpo"])
            print(f"{size:<6} {params:>6.1f}M {max_new:>7} {statistics.mean(lengths['hf']):>7.1f} "
                  f"{statistics.mean(lengths['grpo']):>8.1f} {hf:>9.0f} {ours:>10.0f} {ours / hf:>5.2f}x")


if __name__ == "__main__":
    main()
