"""Chat templates for tool calling: choosing one, checking that it can carry a tool exchange, and the tokens of a
tool turn.

A multi-turn rollout never re-tokenizes the conversation: the model's tokens stay as sampled, and each tool turn
adds the tokens the template renders for the tool results (`tool_turn_ids`). That needs a template which renders
tool calls and tool messages, and renders earlier turns the same whatever follows them (prefix-preserving);
`check_tool_template` refuses any other before a model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from grpo.rollout.tool_calls import ToolCallFormat, tool_call_format

TEMPLATES = Path(__file__).with_name("templates")
SHIPPED_TEMPLATES = {path.stem: path for path in TEMPLATES.glob("*.jinja")}  # chatml_tools: ChatML + Qwen2.5 tools


def set_chat_template(tokenizer: Any, path: str) -> None:
    """GRPOConfig.chat_template_path (TRL's SFTConfig name): a Jinja file (.jinja, .j2), the name of a template grpo
    ships ("chatml_tools"), or a tokenizer's directory or hub id whose chat template is copied. Unlike TRL's SFT,
    no tokens are added: the template must use tokens the tokenizer has."""
    if path in SHIPPED_TEMPLATES:
        tokenizer.chat_template = SHIPPED_TEMPLATES[path].read_text(encoding="utf-8")
        return
    file = Path(path)
    if file.suffix in (".jinja", ".j2"):
        if not file.is_file():
            raise FileNotFoundError(f"GRPOConfig.chat_template_path: no template file at {path}.")
        tokenizer.chat_template = file.read_text(encoding="utf-8")
        return
    from transformers import AutoTokenizer

    try:
        template = AutoTokenizer.from_pretrained(path).chat_template
    except OSError as e:
        raise ValueError(
            f"GRPOConfig.chat_template_path={path!r} is neither a .jinja file, a template grpo ships "
            f"({', '.join(SHIPPED_TEMPLATES)}), nor a tokenizer that loads: {e}"
        ) from e
    if not template:
        raise ValueError(f"GRPOConfig.chat_template_path={path!r}: that tokenizer has no chat template.")
    tokenizer.chat_template = template


# Distinct strings, so the check can tell which part of the exchange a template drops.
_NAME, _KEY, _VALUE, _RESULT = "tool_name_q8v2", "arg_key_k3m7", "arg_value_w5d1", "tool_result_z4c9"


def _exchange(name: str, arguments: dict[str, Any]) -> list[dict[str, Any]]:
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]


def check_tool_template(tokenizer: Any, template_kwargs: dict[str, Any] | None = None) -> ToolCallFormat:
    """The format the template writes calls in, once it is known to render a whole tool exchange (the call's name
    and arguments, the tool's result) and to be prefix-preserving; otherwise an error that says what is missing
    and how to fix it."""
    fix = ("Set GRPOConfig.chat_template_path to a template that renders tools (for ChatML models such as SmolLM2: "
           "'chatml_tools', which grpo ships), or set tokenizer.chat_template.")
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(f"tools need a chat template, and the tokenizer has none. {fix}")
    messages = [*_exchange(_NAME, {_KEY: _VALUE}), {"role": "tool", "name": _NAME, "content": _RESULT}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, **(template_kwargs or {}))
    except Exception as e:  # jinja's TemplateError, or a template indexing into what it does not expect
        raise ValueError(f"the chat template cannot render a tool call and its result ({e}). {fix}") from e
    missing = [what for what, sentinel in (("the tool call's name", _NAME), ("its arguments", _KEY),
                                           ("the tool's result", _RESULT)) if sentinel not in rendered]
    if missing:
        raise ValueError(f"the chat template cannot render tools: it drops {' and '.join(missing)} of a tool "
                         f"exchange. {fix}")
    call_format = tool_call_format(template)
    if call_format is None:
        raise ValueError("the chat template renders tool calls in a format grpo does not read (it reads "
                         "<tool_call> JSON or XML, GLM, Mistral [TOOL_CALLS] and Llama 3 JSON calls). Use a template "
                         "of one of those families via GRPOConfig.chat_template_path.")
    tool_turn_ids(tokenizer, [{"role": "tool", "name": _NAME, "content": _RESULT}], template_kwargs)
    return call_format


def tool_turn_ids(tokenizer: Any, tool_messages: list[dict[str, Any]],
                  template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """The tokens that follow an assistant turn's EOS: `tool_messages` as the template renders them, then the
    prompt of the model's next turn. Read off two renderings of a stand-in conversation, with and without the
    results; a template whose first rendering is not a prefix of the second cannot be continued this way."""
    kwargs = dict(template_kwargs or {}, tokenize=True, return_dict=False)
    before = tokenizer.apply_chat_template(_exchange(tool_messages[0]["name"], {}), add_generation_prompt=False,
                                           **kwargs)
    after = tokenizer.apply_chat_template(_exchange(tool_messages[0]["name"], {}) + tool_messages,
                                          add_generation_prompt=True, **kwargs)
    ends = [i for i, token in enumerate(before) if token == tokenizer.eos_token_id]
    if ends:  # the assistant turn ends at its EOS; what the template writes after it (a newline) comes next
        before = before[:ends[-1] + 1]
    if after[:len(before)] != before:
        raise ValueError(
            "the chat template is not prefix-preserving: it renders an assistant turn differently once a tool result "
            "follows it, so the tokens the model sampled cannot be continued with the result. Use a template that "
            "renders each message independently of the ones after it (GRPOConfig.chat_template_path)."
        )
    return list(after[len(before):])
