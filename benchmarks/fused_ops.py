"""The training forward + backward of one micro-batch on SmolLM2-135M-Instruct with and without grpo's fused
element-wise kernels (grpo.fused_ops: RMSNorm, SwiGLU, rotary embedding), as the trainer runs it.

    python benchmarks/fused_ops.py [--prompt-len 35] [--length 64] [--num-generations 8] [--repeats 7]
                                   [--gradient-checkpointing on off]

One group (G completions of `--length` tokens behind one prompt: compare_trl's micro-batch), random token ids,
float32, packed with attention by the layout, the head's and embedding's gradients added in place; transformers'
own modules and the fused ones alternate in one process, so drift in the machine's speed hits both alike. Prints
the median forward and backward seconds of each after a warm-up, and the ratio. On the 2-core CPU (2026-12-05):

    checkpointing  on: transformers' modules fwd 0.642 + bwd 1.701 = 2.343 s; fused fwd 0.594 + bwd 1.595 = 2.189 s;
                       1.07x
    checkpointing off: transformers' modules fwd 0.687 + bwd 1.218 = 1.906 s; fused fwd 0.635 + bwd 1.103 = 1.739 s;
                       1.10x
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from grpo.allocator import keep_freed_memory
from grpo.fused_ops import fused_ops
from grpo.logprobs import completion_logps
from grpo.packing import grouped_attention

sys.path.insert(0, str(Path(__file__).parent))
from models import add_group_arguments, smollm2_group  # noqa: E402


def forward_backward(model: torch.nn.Module, tensors: tuple[torch.Tensor, ...], fused: bool) -> tuple[float, float]:
    """Seconds of the forward (log-probs) and of the backward, in one scope as the trainer holds it."""
    with grouped_attention(model.model), fused_ops(model.model) if fused else nullcontext():
        started = time.perf_counter()
        logps, _ = completion_logps(model, *tensors, grads_in_place=True)
        forward = time.perf_counter() - started
        logps.sum().backward()
    model.zero_grad(set_to_none=True)
    return forward, time.perf_counter() - started - forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_group_arguments(parser)
    parser.add_argument("--gradient-checkpointing", nargs="+", default=["on", "off"], choices=["on", "off"])
    opts = parser.parse_args()
    model, tensors = smollm2_group(opts.prompt_len, opts.length, opts.num_generations)
    print(f"SmolLM2-135M, G={opts.num_generations}, prompt {opts.prompt_len} + completions {opts.length} tokens, "
          f"float32, {torch.get_num_threads()} threads; median of {opts.repeats} after a warm-up")
    with keep_freed_memory():  # as the trainer runs: freed blocks reused, not faulted in again
        for checkpointing in opts.gradient_checkpointing:
            if checkpointing == "on":
                model.gradient_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
            seconds: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            for repeat in range(opts.repeats + 1):
                for fused in (False, True) if repeat % 2 == 0 else (True, False):
                    timing = forward_backward(model, tensors, fused)
                    if repeat:
                        seconds[fused].append(timing)
            (f0, b0), (f1, b1) = ([statistics.median(t[i] for t in seconds[fused]) for i in (0, 1)]
                                  for fused in (False, True))
            print(f"checkpointing {checkpointing:>3}: transformers' modules fwd {f0:.3f} + bwd {b0:.3f} = "
                  f"{f0 + b0:.3f} s; fused fwd {f1:.3f} + bwd {b1:.3f} = {f1 + b1:.3f} s; "
                  f"{(f0 + b0) / (f1 + b1):.2f}x")


if __name__ == "__main__":
    main()
