"""The training forward + backward of one group, packed (the prompt once, grpo.packing) against unpacked (G rows of
prompt + completion), on SmolLM2-135M-Instruct, with what `packing_saves_work` decides for the group.

    python benchmarks/packed_training.py [--prompt-len 30] [--lengths 64 256] [--num-generations 8] [--repeats 2]

Random token ids (the cost does not depend on them), float32, runs alternating between the layouts; the median of
the repeats after one warm-up of each is printed. The packed layout's attention covers every query-key pair of
the group's one sequence, so it pays for long prompts and short completions only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import grpo.logprobs
from grpo import catalog
from grpo.logprobs import completion_logps
from grpo.models import base_model, load_causal_lm
from grpo.packing import pack_shared_prefixes, packing_saves_work


def forward_backward(model: torch.nn.Module, tensors: tuple[torch.Tensor, ...], packed: bool) -> float:
    """Seconds of one forward + backward; packed whether or not packing_saves_work would choose it."""
    grpo.logprobs.packing_saves_work = lambda *args: True
    started = time.perf_counter()
    logps, _ = completion_logps(model, *tensors, share_prefix=packed)
    logps.sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=30)
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args()
    model = load_causal_lm(str(catalog.fetch("smollm2-135m-instruct")))
    g, p = opts.num_generations, opts.prompt_len
    print(f"threads={torch.get_num_threads()} G={g} prompt={p} tokens, float32, seconds of forward + backward")
    print(f"{'completion':>10} {'packed':>7} {'unpacked':>9} {'packed/unpacked':>16} {'packing_saves_work':>19}")
    generator = torch.Generator().manual_seed(0)
    for length in opts.lengths:
        prompt = torch.randint(100, 40000, (1, p), generator=generator).repeat(g, 1)
        completion = torch.randint(100, 40000, (g, length), generator=generator)
        tensors = (prompt, torch.ones_like(prompt), completion, torch.ones_like(completion))
        seconds: dict[bool, list[float]] = {True: [], False: []}
        for repeat in range(opts.repeats + 1):
            for packed in (True, False):
                elapsed = forward_backward(model, tensors, packed)
                if repeat:  # the first of each is a warm-up
                    seconds[packed].append(elapsed)
        decision = packing_saves_work(pack_shared_prefixes(*tensors), g, p + length, base_model(model).config)
        on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
        print(f"{length:>10} {on:>7.2f} {off:>9.2f} {on / off:>16.2f} {str(decision):>19}")


if __name__ == "__main__":
    main()
