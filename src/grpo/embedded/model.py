"""The embedded default model: a tiny Llama with a character-level tokenizer, built offline in about a second.

Nothing is downloaded. The weights are a seeded random initialisation, so every machine builds the same model
bit for bit; it is cached under `~/.cache/grpo` (or `$GRPO_CACHE`) and loads like any local checkpoint, through
the same `from_pretrained` path a hub id or a user's directory takes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from grpo.paths import build_in_own_process, cache_dir, is_secondary_rank

EMBEDDED_MODEL_ID = "grpo:tiny"
_VERSION = "v3"  # bump when the recipe below changes, so stale caches are rebuilt

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARACTERS = [chr(i) for i in range(32, 127)] + ["\n"]
# Each message as <|role|>\ncontent</s>\n. With tools (docs/tools.md) a system turn lists them, an assistant turn
# writes its calls as <tool_call>{"name": ..., "arguments": ...}</tool_call>, and a result is a <|tool|> turn;
# conversations without tools render as they always did.
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>\nTools, called as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>:"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}</s>\n{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set call = call['function'] if call['function'] is defined else call %}"
    "<tool_call>{\"name\": \"{{ call['name'] }}\", \"arguments\": {{ call['arguments'] | tojson }}}</tool_call>"
    "{% endfor %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus special tokens and a small chat template."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=1024,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A 4-layer Llama, hidden size 128: about 0.6M parameters, seeded random initialisation; its generation
    config never samples a special token other than EOS."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # Completions are decoded without special tokens, so a sampled <pad> or <unk> would be an invisible
    # character: a length reward could be met with text nobody sees. Every backend honours suppress_tokens.
    model.generation_config.suppress_tokens = [i for i, t in enumerate(SPECIAL_TOKENS) if t != "</s>"]
    return model


def tiny_model_path() -> str:
    """Directory of the embedded model, built on first use. Safe when several processes race to build it."""
    target = cache_dir() / f"tiny-{_VERSION}"
    if (target / "config.json").exists():
        return str(target)
    if is_secondary_rank():
        build_in_own_process("from grpo.embedded.model import tiny_model_path; tiny_model_path()")
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="tiny-", dir=target.parent))
    tokenizer = build_tokenizer()
    build_model(vocab_size=len(tokenizer)).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a reader never sees a half-written model
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
