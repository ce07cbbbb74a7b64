"""Gradient checkpointing that recomputes only what peak memory needs (grpo.recompute) against recomputing every
layer, on SmolLM2-135M-Instruct, as the trainer runs a step of two micro-batches.

    python benchmarks/recompute.py [--prompt-len 35] [--length 64] [--num-generations 8] [--repeats 7]

Each micro-batch is one group of compare_trl's (G completions of `--length` random tokens behind one prompt,
packed, fused kernels, the LM head's and embedding's gradients added in place), float32, checkpointing on. A step:
two micro-batches' forward and backward, gradients accumulated, then freed as the optimizer step would. Only the
first micro-batch can differ: it starts before the layers' gradients exist, so `recompute_where_memory_needs` lets
its top layers keep their activations. The two variants alternate in one process; printed: the layers kept, the
median seconds of the first micro-batch's forward + backward of each, and, after the every-layer warm-up step and
after all steps, the high-water mark of memory in use by large tensors (the tensor cache's count: equal when
keeping layers raised no peak of memory in use) and the peak RSS (which may gain up to the cache's slack, 64 MiB:
idle blocks the kept activations leave behind). On the 2-core CPU (2026-12-05):

    python benchmarks/recompute.py
    8 of 30 layers kept; first micro-batch: every layer recomputed 2.126 s, 8 layers kept 2.029 s (1.05x)
    after the every-layer steps / after all steps: high water of large tensors in use 681 / 681 MiB, peak RSS
    1732 / 1747 MiB
    python benchmarks/recompute.py --length 20 --repeats 5
    27 of 30 layers kept; first micro-batch: every layer recomputed 0.897 s, 27 layers kept 0.774 s (1.16x)
    ... high water of large tensors in use 588 / 588 MiB, peak RSS 1600 / 1667 MiB

(With the scope off in both, the same `--length 20` run's peak RSS goes 1600 -> 1609 MiB.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from grpo.allocator import keep_freed_memory, tensor_cache_stats
from grpo.fused_ops import fused_ops
from grpo.logprobs import completion_logps
from grpo.packing import grouped_attention
from grpo.recompute import recompute_where_memory_needs

sys.path.insert(0, str(Path(__file__).parent))
from models import add_group_arguments, smollm2_group  # noqa: E402


def peak_rss() -> int:
    """The process's peak resident memory so far (VmHWM), bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def step(model, tensors, keep: bool, kept: list[int]) -> float:
    """Two micro-batches, gradients accumulated, then freed; returns the first one's forward + backward seconds."""
    seconds = 0.0
    for micro_batch in range(2):
        started = time.perf_counter()
        with (grouped_attention(model.model), fused_ops(model.model),
              recompute_where_memory_needs(model.model) if keep else nullcontext()):
            logps, _ = completion_logps(model, *tensors, grads_in_place=True)
            kept.append(sum(not layer.gradient_checkpointing for layer in model.model.layers))
            logps.sum().backward()
        if micro_batch == 0:
            seconds = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_group_arguments(parser)
    opts = parser.parse_args()
    model, tensors = smollm2_group(opts.prompt_len, opts.length, opts.num_generations)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    seconds: dict[bool, list[float]] = {False: [], True: []}
    kept: list[int] = []
    with keep_freed_memory():
        step(model, tensors, False, kept)  # warm-up, and the peak of recomputing every layer
        every_layer_peak, every_layer_rss = tensor_cache_stats()["high_water"], peak_rss()
        for repeat in range(opts.repeats):
            for keep in (False, True) if repeat % 2 == 0 else (True, False):
                seconds[keep].append(step(model, tensors, keep, kept))
        peak, rss = tensor_cache_stats()["high_water"], peak_rss()
    every, ours = statistics.median(seconds[False]), statistics.median(seconds[True])
    layers = max(kept)
    print(f"{layers} of {len(model.model.layers)} layers kept; first micro-batch: every layer recomputed "
          f"{every:.3f} s, {layers} layers kept {ours:.3f} s ({every / ours:.2f}x)")
    print(f"after the every-layer steps / after all steps: high water of large tensors in use "
          f"{every_layer_peak / 2**20:.0f} / {peak / 2**20:.0f} MiB, peak RSS {every_layer_rss / 2**20:.0f} / "
          f"{rss / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
