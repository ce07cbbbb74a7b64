"""Offline benchmark models: seeded random Llamas whose completions end at varied lengths.

A random model almost never samples EOS from a 32k vocabulary, so every completion would run to the limit and
the benchmark would not show what happens when rows finish early. The EOS row of the (untied) output layer is
scaled up so that EOS fires in some contexts and not others: completion lengths then spread over the whole range.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SIZES = {
    # name: (vocab, hidden, layers, intermediate, heads, eos_scale)
    "tiny": (2048, 192, 4, 512, 4, 24.0),
    "small": (32000, 384, 8, 1024, 6, 24.0),
}
EOS_ID, PAD_ID, BOS_ID = 2, 0, 1


def build(size: str, seed: int = 0) -> LlamaForCausalLM:
    vocab, hidden, layers, intermediate, heads, eos_scale = SIZES[size]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         intermediate_size=intermediate, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS_ID] *= eos_scale
    return model


def cpu_name() -> str:
    """The CPU the numbers came from (the same 2-core benchmarks read half as fast on one VM as on another):
    /proc/cpuinfo's model name with its family and model, where a VM's name alone ("AMD EPYC") says little."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def add_group_arguments(parser: Any) -> None:
    """The command-line options of `smollm2_group`'s micro-batch, and the repeats to time."""
    parser.add_argument("--prompt-len", type=int, default=35)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)


def smollm2_group(prompt_len: int, length: int, num_generations: int) -> tuple[LlamaForCausalLM, tuple]:
    """SmolLM2-135M-Instruct in float32 for training (SDPA attention), and one group as a micro-batch of
    compare_trl's: G completions of `length` random tokens behind one `prompt_len`-token prompt, as (prompt_ids,
    prompt_mask, completion_ids, completion_mask)."""
    from grpo import catalog
    from grpo.models import load_causal_lm

    model = load_causal_lm(str(catalog.fetch("smollm2-135m-instruct")), {"dtype": torch.float32})
    model.config._attn_implementation = "sdpa"
    model.train()
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(100, model.config.vocab_size, (1, prompt_len), generator=g)
    completion_ids = torch.randint(100, model.config.vocab_size, (num_generations, length), generator=g)
    return model, (prompt_ids.repeat(num_generations, 1), torch.ones(num_generations, prompt_len, dtype=torch.long),
                   completion_ids, torch.ones(num_generations, length, dtype=torch.long))


def prompts(num: int, vocab: int, seed: int = 0, min_len: int = 8, max_len: int = 40) -> list[list[int]]:
    """Token-id prompts of uneven lengths, min_len to max_len tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (num,), generator=g)
    return [[BOS_ID] + torch.randint(3, vocab, (int(n) - 1,), generator=g).tolist() for n in lengths]


class IdTokenizer:
    """The few tokenizer attributes the generators read."""

    pad_token_id = PAD_ID
    eos_token_id = EOS_ID
