"""Tool calls in a model's turn: one parser per format, the format chosen from the chat template.

A chat template that renders tool calls fixes how a model trained on it writes them, so the template says which
parser reads them (`tool_call_format`):

- "hermes" (Qwen2.5, Qwen3, SmolLM3, Hermes, grpo's chatml_tools): `<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>`, one block per call;
- "qwen3_coder" (Qwen3-Coder, Qwen3.5): `<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function>
  </tool_call>`;
- "glm" (GLM-4.5 and later): `<tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value></tool_call>`;
- "mistral": `[TOOL_CALLS]` then a JSON list of calls, or `[TOOL_CALLS]NAME[ARGS]{...}` per call (newer templates);
- "llama3_json" (Llama 3.1, 3.2, 3.3): the whole turn is `{"name": ..., "parameters": {...}}`, after an optional
  `<|python_tag|>`.

A block that has the format's markers but cannot be read (invalid JSON, no name, arguments that are not an
object) is a `MalformedCall`: a failed call that is answered with its error, never an exception.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """A call read from the model's text."""

    name: str
    arguments: dict[str, Any]

    def as_message_entry(self) -> dict[str, Any]:
        """The entry of an assistant message's `tool_calls`, as transformers' chat templates and TRL write it."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class MalformedCall:
    """A block in the format's markers that is not a readable call."""

    name: str  # as much of the name as could be read, else "unknown"
    error: str  # why it is not a call, for the tool message the model gets back


@dataclass(frozen=True)
class ParsedTurn:
    content: str  # the turn's text less its well-formed calls (a malformed one stays, so rewards see it)
    calls: list[ToolCall | MalformedCall]


class ToolCallFormat:
    """How one template family writes calls. `markers`: strings whose presence in a chat template selects it."""

    name = ""
    markers: tuple[str, ...] = ()

    def matches(self, template: str) -> bool:
        return all(marker in template for marker in self.markers)

    def parse(self, text: str) -> ParsedTurn:
        raise NotImplementedError


class BlockFormat(ToolCallFormat):
    """Calls in delimited blocks (`pattern`, the body in group 1); `read_block` turns a body into a call. A block
    opened and never closed (the turn ended inside it) is malformed."""

    pattern: re.Pattern[str]
    opening = ""

    def parse(self, text: str) -> ParsedTurn:
        calls: list[ToolCall | MalformedCall] = []
        kept: list[str] = []
        position = 0
        for match in self.pattern.finditer(text):
            call = self.read_block(match.group(1))
            calls.append(call)
            kept.append(text[position:match.start()] if isinstance(call, ToolCall) else text[position:match.end()])
            position = match.end()
        rest = text[position:]
        if self.opening and self.opening in rest:
            calls.append(MalformedCall(_name_in(rest), f"the call is not closed: {rest.strip()[:200]!r}"))
        kept.append(rest)
        return ParsedTurn("".join(kept).strip(), calls)

    def read_block(self, body: str) -> ToolCall | MalformedCall:
        raise NotImplementedError


class HermesFormat(BlockFormat):
    name, markers, opening = "hermes", ("<tool_call>",), "<tool_call>"
    pattern = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

    def read_block(self, body: str) -> ToolCall | MalformedCall:
        return call_from_json(body, arguments_key="arguments")


class Qwen3CoderFormat(BlockFormat):
    name, markers, opening = "qwen3_coder", ("<tool_call>", "<function="), "<tool_call>"
    pattern = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
    function = re.compile(r"^\s*<function=([^>\n]+)>(.*?)</function>\s*$", re.DOTALL)
    parameter = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)

    def read_block(self, body: str) -> ToolCall | MalformedCall:
        found = self.function.match(body)
        if found is None:
            return MalformedCall("unknown", f"expected <function=NAME>...</function> in the call, got {body[:200]!r}")
        arguments = {key.strip(): _json_or_text(value) for key, value in self.parameter.findall(found.group(2))}
        return ToolCall(found.group(1).strip(), arguments)


class GlmFormat(BlockFormat):
    name, markers, opening = "glm", ("<tool_call>", "<arg_key>"), "<tool_call>"
    pattern = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
    argument = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)

    def read_block(self, body: str) -> ToolCall | MalformedCall:
        name = body.split("<arg_key>", 1)[0].strip()
        if not name:
            return MalformedCall("unknown", f"the call names no function: {body[:200]!r}")
        return ToolCall(name, {key.strip(): _json_or_text(value) for key, value in self.argument.findall(body)})


class MistralFormat(ToolCallFormat):
    name, markers = "mistral", ("[TOOL_CALLS]",)
    named_call = re.compile(r"\s*([\w.-]+)\[ARGS\]")

    def parse(self, text: str) -> ParsedTurn:
        if "[TOOL_CALLS]" not in text:
            return ParsedTurn(text.strip(), [])
        content, _, calls_text = text.partition("[TOOL_CALLS]")
        calls: list[ToolCall | MalformedCall] = []
        for piece in calls_text.split("[TOOL_CALLS]"):
            calls.extend(self._calls_in(piece))
        return ParsedTurn(content.strip(), calls)

    def _calls_in(self, piece: str) -> list[ToolCall | MalformedCall]:
        named = self.named_call.match(piece)
        if named is not None:  # NAME[ARGS]{...}
            arguments = _loads(piece[named.end():])
            if not isinstance(arguments, dict):
                return [MalformedCall(named.group(1), f"the arguments are not a JSON object: {piece[:200]!r}")]
            return [ToolCall(named.group(1), arguments)]
        listed = _loads(piece)
        if not isinstance(listed, list):
            return [call_from_json(piece, arguments_key="arguments")]
        return [call_from_json(json.dumps(entry), arguments_key="arguments") for entry in listed]


class Llama3JsonFormat(ToolCallFormat):
    name, markers = "llama3_json", ('"parameters": ', "ipython")

    def parse(self, text: str) -> ParsedTurn:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return ParsedTurn(text.strip(), [])
        pieces = body.split(";") if _loads(body) is None else [body]  # several calls join with ";"
        return ParsedTurn("", [call_from_json(p, arguments_key="parameters") for p in pieces])


# The most specific first: Qwen3-Coder and GLM templates hold <tool_call> too.
FORMATS: tuple[ToolCallFormat, ...] = (Qwen3CoderFormat(), GlmFormat(), HermesFormat(), MistralFormat(),
                                       Llama3JsonFormat())


def tool_call_format(chat_template: str | None) -> ToolCallFormat | None:
    """The parser for calls written the way `chat_template` renders them; None when it renders none we know."""
    if not chat_template:
        return None
    return next((f for f in FORMATS if f.matches(chat_template)), None)


def read_turn(tokenizer: Any, ids: list[int], call_format: ToolCallFormat | None, may_call: bool = True
              ) -> tuple[dict[str, Any], list[ToolCall | MalformedCall]]:
    """A model turn's tokens as an assistant message, and the calls it makes (with a format, and `may_call`).

    Without calls the content is the text as single-turn generation decodes it (special tokens skipped). With
    calls it is the text less the well-formed calls, read from the tokens with their special tokens (some formats
    mark calls with one, Mistral's [TOOL_CALLS]), which are then removed; the calls go in `tool_calls` as TRL and
    chat templates write them."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if call_format is None or not may_call:
        return message, []
    parsed = call_format.parse(tokenizer.decode(ids, skip_special_tokens=False))
    if not parsed.calls:
        return message, []
    content = parsed.content
    for token in tokenizer.all_special_tokens:
        content = content.replace(token, "")
    message["content"] = content.strip()
    calls = [call.as_message_entry() for call in parsed.calls if isinstance(call, ToolCall)]
    if calls:
        message["tool_calls"] = calls
    return message, parsed.calls


def call_from_json(text: str, arguments_key: str) -> ToolCall | MalformedCall:
    """A call from a JSON object {"name": ..., arguments_key: {...}}; the arguments may also be a JSON string."""
    value = _loads(text)
    if not isinstance(value, dict):
        return MalformedCall(_name_in(text), f"the call is not a JSON object: {text.strip()[:200]!r}")
    name = value.get("name")
    arguments = value.get(arguments_key, value.get("arguments", {}))
    if isinstance(arguments, str):
        arguments = _loads(arguments)
    if not isinstance(name, str) or not name:
        return MalformedCall("unknown", f"the call has no \"name\": {text.strip()[:200]!r}")
    if not isinstance(arguments, dict):
        return MalformedCall(name, f"the call's \"{arguments_key}\" is not a JSON object: {text.strip()[:200]!r}")
    return ToolCall(name, arguments)


def _loads(text: str) -> Any:
    try:
        return json.loads(text.strip())
    except ValueError:
        return None


def _json_or_text(value: str) -> Any:
    """A parameter value: JSON where it parses (numbers, objects), else the text itself."""
    parsed = _loads(value)
    return value.strip() if parsed is None and value.strip() != "null" else parsed


def _name_in(text: str) -> str:
    found = re.search(r'"name"\s*:\s*"([^"]+)"', text)
    return found.group(1) if found else "unknown"
