"""Offline benchmark models: seeded random Llamas whose completions end at varied lengths.

A random model almost never samples EOS from a 32k vocabulary, so every completion would run to the limit and
the benchmark would not show what happens when rows finish early. The EOS row of the (untied) output layer is
scaled up so that EOS fires in some contexts and not others: completion lengths then spread over the whole range.
"""

from __future__ import annotations

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


def prompts(num: int, vocab: int, seed: int = 0, min_len: int = 8, max_len: int = 40) -> list[list[int]]:
    """Token-id prompts of uneven lengths, min_len to max_len tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (num,), generator=g)
    return [[BOS_ID] + torch.randint(3, vocab, (int(n) - 1,), generator=g).tolist() for n in lengths]


class IdTokenizer:
    """The few tokenizer attributes the generators read."""

    pad_token_id = PAD_ID
    eos_token_id = EOS_ID
