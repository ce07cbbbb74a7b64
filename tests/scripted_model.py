"""A scripted tiny model for multi-turn tests: the embedded Llama whose sampled tokens follow a script.

While generating (no gradient), the token `script[p]` gets +100 on its logit at input position p, so sampling picks
it whatever the temperature; with gradient (the training forward) it is the plain tiny model, so the loss and its
gradient are real. A script is keyed by absolute position, so episodes that should behave differently are given
prompts of different lengths whose completions occupy disjoint position windows (`Script.add`).

The chat template is a compact one with tool calls in the Qwen2.5/Hermes format, so that the tool preamble is
short (the tiny model's context is 1024 tokens): a system line naming the tools, each message as
<|role|>\\ncontent</s>\\n, calls as <tool_call>{json}</tool_call>.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from transformers import LlamaForCausalLM

from grpo.data import tokenize_prompts
from grpo.embedded import build_model, build_tokenizer

COMPACT_TOOL_TEMPLATE = (
    "{% if tools %}<|system|>\ntools:{% for tool in tools %} {{ tool.function.name }}{% endfor %}</s>\n{% endif %}"
    "{% for message in messages %}<|{{ message.role }}|>\n{{ message.content or '' }}"
    "{% for call in message.tool_calls or [] %}"
    "<tool_call>{\"name\": \"{{ call.function.name }}\", \"arguments\": {{ call.function.arguments | tojson }}}"
    "</tool_call>{% endfor %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
FORCE = 100.0


class ScriptedLlama(LlamaForCausalLM):
    """The tiny Llama; `script` (a long tensor, -1 where free) forces the next token at each input position."""

    script: torch.Tensor | None = None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              logits_to_keep=logits_to_keep, **kwargs)
        if torch.is_grad_enabled() or self.script is None:
            return out
        if position_ids is None:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.size(1):]
        positions = position_ids[:, -out.logits.size(1):].clamp(max=len(self.script) - 1)
        forced = self.script.to(positions.device)[positions]
        bias = torch.zeros_like(out.logits).scatter_(-1, forced.clamp(min=0).unsqueeze(-1),
                                                     FORCE * (forced >= 0).unsqueeze(-1).to(out.logits.dtype))
        out.logits = out.logits + bias
        return out


def scripted_model_and_tokenizer(seed: int = 0) -> tuple[ScriptedLlama, Any]:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = COMPACT_TOOL_TEMPLATE
    plain = build_model(len(tokenizer), seed=seed)
    model = ScriptedLlama(plain.config)
    model.load_state_dict(plain.state_dict())
    model.generation_config = plain.generation_config
    return model, tokenizer


def ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text as the model would sample it (special tokens such as </s> as themselves)."""
    return tokenizer(text, add_special_tokens=False).input_ids


class Script:
    """Positions -> forced tokens, built episode by episode from the prompt and the completion's segments."""

    def __init__(self, tokenizer: Any, length: int = 1024):
        self.tokenizer = tokenizer
        self.table = torch.full((length,), -1, dtype=torch.long)
        self.windows: list[tuple[int, int]] = []

    def add(self, prompt_ids: list[int], segments: list[tuple[str, str]]) -> list[int]:
        """Force the model's segments ("model", text) of an episode whose completion is `segments` in order
        ("tool" segments are the tool turns' text, not forced). Returns the completion's expected token ids."""
        start = len(prompt_ids)
        completion: list[int] = []
        for who, text in segments:
            for token in ids(self.tokenizer, text):
                position = start + len(completion)
                if who == "model":  # the token at `position` is predicted at position - 1
                    assert self.table[position - 1] in (-1, token), f"scripts overlap at position {position}"
                    self.table[position - 1] = token
                completion.append(token)
        window = (start - 1, start + len(completion))
        assert all(window[1] <= a or b <= window[0] for a, b in self.windows), "episodes' windows overlap"
        self.windows.append(window)
        return completion


def call(name: str, arguments: str) -> str:
    """A model turn that calls `name` with `arguments` (JSON text) in the Hermes format, then ends."""
    return f'<tool_call>{{"name":"{name}","arguments":{arguments}}}</tool_call></s>'


def tool_turn(content: str) -> str:
    """What the compact template renders after an assistant turn's </s>: the tool message, the next prompt."""
    return f"\n<|tool|>\n{content}</s>\n<|assistant|>\n"


def script_episodes(model: ScriptedLlama, tokenizer: Any, episodes: list[list[tuple[str, str]]],
                    max_completion_length: int, tools: list[Any] | None = None, observation: str = "",
                    per_episode: list[tuple[list[Any], str]] | None = None
                    ) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """One dataset row per episode, its prompt padded so that the episodes' position windows are disjoint, and
    the model scripted to play each episode's model turns. `observation`: what an environment's reset appends to
    the prompt the model sees; `per_episode`: (tools, observation) of each episode instead. Returns the rows and
    each episode's expected completion ids."""
    script, rows, expected, start = Script(tokenizer), [], [], 0
    for i, segments in enumerate(episodes):
        shown, added = per_episode[i] if per_episode else (tools, observation)

        def seen_prompt_ids(content: str, shown: Any = shown, added: str = added) -> list[int]:
            return tokenize_prompts(tokenizer, [[{"role": "user", "content": content + added}]],
                                    {"tools": shown})[0]

        content = "q"
        while len(prompt_ids := seen_prompt_ids(content)) < start:  # pad (a BPE may merge several dots)
            content += "." * (start - len(prompt_ids))
        expected.append(script.add(prompt_ids, segments))
        rows.append({"prompt": [{"role": "user", "content": content}], "episode": i})
        start = len(prompt_ids) + max_completion_length + 2
    model.script = script.table
    return rows, expected


# Tools the scripted episodes call (their docstrings are the schema the chat template shows).
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


async def add_later(a: int, b: int) -> int:
    """Add two integers, asynchronously.

    Args:
        a: The first.
        b: The second.
    """
    await asyncio.sleep(0.01)
    return a + b


def fail(x: str) -> str:
    """Always fails.

    Args:
        x: Anything.
    """
    raise ValueError("boom")
