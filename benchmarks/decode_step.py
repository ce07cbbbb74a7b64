"""One lean decode step, timed: where a generation round's time goes on this machine.

    python benchmarks/decode_step.py [--size tiny] [--prompts 4] [--num-generations 8] [--prompt-len 24]
                                     [--completion 8 32 64 128]

A round's state is frozen at a completion length: each prompt prefilled once, each of its G rows `--completion`
tokens into its own completion, and steps timed there (the step's token is taken back out after each). Two
layouts, alternating: the shared prompt cache read by the compiled decode-attention kernel (GroupKV, the CPU
default: rollout/decode_attention.py) and copied prompt caches read by torch's attention (CopiedKV, the layout
without the kernel). Prints the median time of a whole step (all layers, the LM head) and of its attention calls
(the cache write included) per layer, and their ratios. Both run layer by layer, so that attention calls can be
timed (the default over the shared cache is one call for all layers: `--linears`).

    python benchmarks/decode_step.py --linears [--size smollm2] [--prompts 2]

compares instead the step's linears on the shared cache, alternating: all layers in one call into C
(rollout/decode_layers.py, the default where a C compiler is), the compiled kernel of rollout/decode_linear.py
called layer by layer, and oneDNN's packed weights (the fallback without a compiler).
`--size smollm2` is SmolLM2-135M-Instruct (grpo.catalog), its prompts random token ids.
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

from grpo.rollout import decode_linear  # noqa: E402
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


def timed_steps(decoder: LeanDecoder, kv: TimedKV, tokens: torch.Tensor, position: int, steps: int
                ) -> tuple[float, float]:
    """Seconds a step and seconds of attention a layer, over `steps` steps at the same length (attention: nan
    where the layers run in one call, which makes no attention call of its own)."""
    kv.seconds = 0.0
    positions = torch.full((tokens.numel(),), position)
    one_call = decoder.one_call is not None and decoder.one_call.runs(kv.kv)
    start = time.perf_counter()
    for _ in range(steps):
        if one_call:  # on the cache itself, taken back to the same length
            decoder.step(tokens, positions, kv.kv)
            kv.kv.length -= 1
        else:
            decoder.step(tokens, positions, kv)
    seconds = (time.perf_counter() - start) / steps
    return seconds, float("nan") if one_call else kv.seconds / steps / len(decoder.layers)


def compare_linears(model: Any, prompt_ids: list[list[int]], opts: argparse.Namespace) -> None:
    """The step in one call, with the compiled linear kernel layer by layer, and with oneDNN's packed weights,
    same shared caches."""
    g, rows = opts.num_generations, len(prompt_ids) * opts.num_generations
    capacity = opts.prompt_len + max(opts.completion) + 1
    one_call_step, kernel_step = (LeanDecoder.from_model(model, capacity, rows) for _ in range(2))
    kernel_step.one_call = None
    available, decode_linear.available = decode_linear.available, lambda *args: False
    try:
        onednn_step = LeanDecoder.from_model(model, capacity, rows)
    finally:
        decode_linear.available = available
    layouts = {"one call": one_call_step, "kernel": kernel_step, "oneDNN": onednn_step}
    assert one_call_step.one_call is not None and onednn_step.one_call is None
    assert kernel_step.lm_head.layout == "kernel" and onednn_step.lm_head.layout == "packed"
    tokens = torch.randint(3, model.config.vocab_size, (rows,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        setups = {(completion, name): frozen_round(decoder, model, prompt_ids, g, completion, True)
                  for completion in opts.completion for name, decoder in layouts.items()}
        results: dict[tuple[int, str], list[float]] = {key: [] for key in setups}
        for _ in range(opts.repeats):
            for (completion, name), kv in setups.items():
                seconds, _ = timed_steps(layouts[name], kv, tokens, opts.prompt_len + completion, opts.steps)
                results[completion, name].append(seconds)
    print(f"{opts.size}, {rows} rows ({len(prompt_ids)} prompts x G = {g}), threads={torch.get_num_threads()}; "
          f"median ms a step: all layers in one call; the compiled linear kernel layer by layer; oneDNN's packed "
          f"weights; ratios to the one call")
    print(f"{'completion':>10} {'one call':>8} {'kernel':>8} {'oneDNN':>8} {'kernel/one':>10} {'oneDNN/one':>10}")
    for completion in opts.completion:
        one_ms, kernel_ms, onednn_ms = (statistics.median(results[completion, name]) * 1e3 for name in layouts)
        print(f"{completion:>10} {one_ms:>8.1f} {kernel_ms:>8.1f} {onednn_ms:>8.1f} {kernel_ms / one_ms:>9.2f}x "
              f"{onednn_ms / one_ms:>9.2f}x")


def load(size: str) -> Any:
    if size != "smollm2":
        return build(size)
    from grpo import catalog
    from grpo.models import load_causal_lm

    return load_causal_lm(str(catalog.fetch("smollm2-135m-instruct"))).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=[*sorted(SIZES), "smollm2"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=24, help="longest prompt; the others are shorter")
    parser.add_argument("--completion", nargs="+", type=int, default=[8, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="steps per repeat")
    parser.add_argument("--linears", action="store_true", help="compare the linears' layouts instead")
    opts = parser.parse_args()
    if kernel() is None or not decode_linear.available():
        sys.exit("the CPU decode kernels could not be built here (see cpu_kernels.py)")
    model, g = load(opts.size), opts.num_generations
    rows = opts.prompts * g
    prompt_ids = [[1] + list(range(3, 3 + opts.prompt_len - 1 - 3 * i)) for i in range(opts.prompts)]
    if opts.linears:
        return compare_linears(model, prompt_ids, opts)
    decoder = LeanDecoder.from_model(model, opts.prompt_len + max(opts.completion) + 1, rows)
    decoder.one_call = None  # layer by layer, so that the attention calls can be timed
    tokens = torch.randint(3, model.config.vocab_size, (rows,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        setups = {(completion, shared): frozen_round(decoder, model, prompt_ids, g, completion, shared)
                  for completion in opts.completion for shared in (True, False)}
        results: dict[tuple[int, bool], list[tuple[float, float]]] = {key: [] for key in setups}
        for _ in range(opts.repeats):
            for (completion, shared), kv in setups.items():
                results[completion, shared].append(timed_steps(decoder, kv, tokens, opts.prompt_len + completion,
                                                               opts.steps))
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
