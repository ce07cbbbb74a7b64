"""The training forward + backward of one group on SmolLM2-135M-Instruct in three layouts: packed with attention
by the layout (grpo.packing.GroupedAttention, what grpo runs under SDPA), packed under a mask over every pair
(what it runs under eager attention), and unpacked (G rows of prompt + completion); with what
`packing_saves_work` decides for the group in each attention.

    python benchmarks/packed_training.py [--prompt-len 30] [--lengths 64 256] [--num-generations 8] [--repeats 2]

Random token ids (the cost does not depend on them), float32, runs alternating between the layouts; the median of
the repeats after one warm-up of each is printed.
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

LAYOUTS = ("by layout", "masked", "unpacked")


def forward_backward(model: torch.nn.Module, tensors: tuple[torch.Tensor, ...], layout: str) -> float:
    """Seconds of one forward + backward in `layout`, whether or not packing_saves_work would choose it."""
    grpo.logprobs.packing_saves_work = lambda *args, **kwargs: True
    grpo.logprobs.uses_grouped_attention = lambda body: layout == "by layout"
    started = time.perf_counter()
    logps, _ = completion_logps(model, *tensors, share_prefix=layout != "unpacked")
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
    config = base_model(model).config
    g, p = opts.num_generations, opts.prompt_len
    print(f"threads={torch.get_num_threads()} G={g} prompt={p} tokens, float32, seconds of forward + backward")
    print(f"{'completion':>10} {'by layout':>10} {'masked':>7} {'unpacked':>9} {'unpacked/by layout':>19} "
          f"{'packs (by layout / masked)':>27}")
    generator = torch.Generator().manual_seed(0)
    for length in opts.lengths:
        prompt = torch.randint(100, 40000, (1, p), generator=generator).repeat(g, 1)
        completion = torch.randint(100, 40000, (g, length), generator=generator)
        tensors = (prompt, torch.ones_like(prompt), completion, torch.ones_like(completion))
        seconds: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
        for repeat in range(opts.repeats + 1):
            for layout in LAYOUTS:
                elapsed = forward_backward(model, tensors, layout)
                if repeat:  # the first of each is a warm-up
                    seconds[layout].append(elapsed)
        packed = pack_shared_prefixes(*tensors)
        decisions = [packing_saves_work(packed, g, p + length, config, grouped=grouped) for grouped in (True, False)]
        grouped, masked, plain = (statistics.median(seconds[layout]) for layout in LAYOUTS)
        print(f"{length:>10} {grouped:>10.2f} {masked:>7.2f} {plain:>9.2f} {plain / grouped:>19.2f} "
              f"{' / '.join(map(str, decisions)):>27}")


if __name__ == "__main__":
    main()
