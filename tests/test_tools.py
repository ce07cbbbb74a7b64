"""Tool calling's parts on their own: one parser per template format, the toolbox (sync and async tools, faults as
results), chat templates that can or cannot carry a tool exchange, the built-in tools, and the settings."""

from __future__ import annotations

import asyncio
import time

import pytest

from grpo import GRPOConfig, GRPOTrainer
from grpo.embedded import build_tokenizer
from grpo.recipe import build_run, load_recipe
from grpo.rollout.chat_templates import SHIPPED_TEMPLATES, check_tool_template, set_chat_template, tool_turn_ids
from grpo.rollout.tool_calls import FORMATS, MalformedCall, ToolCall, read_turn, tool_call_format
from grpo.rollout.toolbox import Toolbox, ToolCounts, check_tools
from grpo.tools import calculator, run_python

HERMES, QWEN3_CODER, GLM, MISTRAL, LLAMA3 = (next(f for f in FORMATS if f.name == n) for n in (
    "hermes", "qwen3_coder", "glm", "mistral", "llama3_json"))


# ---- parsers ------------------------------------------------------------------------------------------------
def test_hermes_reads_each_call_and_keeps_the_rest_as_content():
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n' \
           '<tool_call>{"name": "neg", "arguments": "{\\"x\\": 3}"}</tool_call>'
    parsed = HERMES.parse(text)
    assert parsed.calls == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("neg", {"x": 3})]
    assert parsed.content == "Let me add."


@pytest.mark.parametrize("body, name, why", [
    ('{"name": "add", "arguments": {"a": 1', "add", "not a JSON object"),
    ('{"arguments": {}}', "unknown", 'no "name"'),
    ('{"name": "add", "arguments": [1, 2]}', "add", "is not a JSON object"),
])
def test_hermes_malformed_calls_are_failures_with_a_reason(body, name, why):
    parsed = HERMES.parse(f"<tool_call>{body}</tool_call>")
    assert len(parsed.calls) == 1 and isinstance(parsed.calls[0], MalformedCall)
    assert parsed.calls[0].name == name and why in parsed.calls[0].error
    assert body in parsed.content  # a malformed call stays in the text rewards see


def test_an_unclosed_call_is_malformed():
    parsed = HERMES.parse('ok <tool_call>{"name": "add", "arguments": {}}')
    assert parsed.calls == [MalformedCall("add", parsed.calls[0].error)] and "not closed" in parsed.calls[0].error


def test_the_other_formats():
    assert QWEN3_CODER.parse("<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n<parameter=s>\nhi there"
                             "\n</parameter>\n</function>\n</tool_call>").calls == [ToolCall("add", {"a": 1,
                                                                                                   "s": "hi there"})]
    assert GLM.parse("<tool_call>add<arg_key>a</arg_key><arg_value>1</arg_value><arg_key>b</arg_key>"
                     "<arg_value>x</arg_value></tool_call>").calls == [ToolCall("add", {"a": 1, "b": "x"})]
    assert MISTRAL.parse('sure[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}]').calls == [
        ToolCall("add", {"a": 1})]
    assert MISTRAL.parse('[TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]neg[ARGS]{"x": 2}').calls == [
        ToolCall("add", {"a": 1}), ToolCall("neg", {"x": 2})]
    assert LLAMA3.parse('<|python_tag|>{"name": "add", "parameters": {"a": 1}}').calls == [ToolCall("add", {"a": 1})]
    assert LLAMA3.parse("The answer is 3.").calls == []


@pytest.mark.parametrize("marker, expected", [
    ("{{ '<tool_call>\\n' + tool_call | tojson }}", "hermes"),
    ("<tool_call>\\n<function={{ name }}>", "qwen3_coder"),
    ("<tool_call>{{ name }}<arg_key>{{ k }}</arg_key>", "glm"),
    ("[TOOL_CALLS]{{ calls }}", "mistral"),
    ('{"name": "{{ n }}", "parameters": {{ p }}}<|eot_id|>ipython', "llama3_json"),
    ("{{ message.content }}", None),
])
def test_the_format_is_chosen_from_the_template(marker, expected):
    found = tool_call_format("{% for message in messages %}" + marker + "{% endfor %}")
    assert (found.name if found else None) == expected


def test_read_turn_writes_calls_as_trl_does():
    tokenizer = build_tokenizer()
    text = 'hm<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call></s>'
    message, calls = read_turn(tokenizer, tokenizer(text, add_special_tokens=False).input_ids, HERMES)
    assert message == {"role": "assistant", "content": "hm",
                       "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]}
    assert calls == [ToolCall("add", {"a": 1})]
    message, calls = read_turn(tokenizer, tokenizer(text, add_special_tokens=False).input_ids, HERMES,
                               may_call=False)  # a turn cut at its budget
    assert calls == [] and "tool_calls" not in message


# ---- the toolbox ----------------------------------------------------------------------------------------------
def double(x: int) -> int:
    """Double a number.

    Args:
        x: The number.
    """
    return 2 * x


async def slow_double(x: int) -> int:
    """Double a number, slowly.

    Args:
        x: The number.
    """
    await asyncio.sleep(10)
    return 2 * x


def explode(x: int) -> int:
    """Raise.

    Args:
        x: Ignored.
    """
    raise RuntimeError(f"no {x}")


def test_toolbox_runs_sync_and_async_tools_and_turns_faults_into_results():
    box = Toolbox([double, slow_double, explode], timeout=0.3)
    started = time.monotonic()
    pending = [box.start(ToolCall("double", {"x": 4})), box.start(ToolCall("slow_double", {"x": 1})),
               box.start(ToolCall("explode", {"x": 1})), box.start(ToolCall("nope", {})),
               box.start(ToolCall("double", {"y": 1})), box.start(MalformedCall("double", "bad json"))]
    results = [p.result() for p in pending]
    assert time.monotonic() - started < 5  # the coroutine was cancelled at the timeout
    assert [(r.name, r.failed) for r in results] == [("double", False), ("slow_double", True), ("explode", True),
                                                     ("nope", True), ("double", True), ("double", True)]
    assert results[0].content == "8"
    assert results[1].content == str({"error": "tool 'slow_double' did not return within tool_timeout=0.3 s"})
    assert results[2].content == str({"error": "no 1"})
    assert "Tool nope not found" in results[3].content and "unexpected keyword argument 'y'" in results[4].content
    assert results[5].content == str({"error": "invalid tool call: bad json"})
    counts = ToolCounts(["double", "slow_double", "explode"])
    for result in results:
        counts.record(result)
    assert counts.sums() == {"calls": 6.0, "failures": 5.0, "double/calls": 3.0, "double/failures": 2.0,
                             "slow_double/calls": 1.0, "slow_double/failures": 1.0, "explode/calls": 1.0,
                             "explode/failures": 1.0}


def test_check_tools_names_what_is_wrong():
    def undocumented(x):
        return x

    with pytest.raises(ValueError, match="tool 'undocumented' cannot be described"):
        check_tools([undocumented])
    with pytest.raises(ValueError, match="two tools are named 'double'"):
        check_tools([double, double])
    with pytest.raises(TypeError, match=r"tools\[0\] is a str"):
        check_tools(["double"])


# ---- chat templates -----------------------------------------------------------------------------------------
NO_TOOLS = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}" \
           "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"


def test_a_template_that_cannot_render_tools_is_refused_with_the_fix():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = NO_TOOLS
    with pytest.raises(ValueError, match="drops the tool call's name and its arguments.*chatml_tools"):
        check_tool_template(tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="the tokenizer has none"):
        check_tool_template(tokenizer)


def test_the_trainer_refuses_tools_with_such_a_template_before_loading_the_model(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = NO_TOOLS
    with pytest.raises(ValueError, match="cannot render tools"):
        GRPOTrainer(model="grpo:tiny", processing_class=tokenizer, reward_funcs=lambda completions, **k: [0.0],
                    args=GRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2),
                    train_dataset=[{"prompt": [{"role": "user", "content": "hi"}]}], tools=[double])
    with pytest.raises(ValueError, match="need conversational prompts"):
        GRPOTrainer(model="grpo:tiny", reward_funcs=lambda completions, **k: [0.0],
                    args=GRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2),
                    train_dataset=[{"prompt": "hi"}], tools=[double])


def test_the_embedded_template_renders_tools_and_continues_after_a_result():
    tokenizer = build_tokenizer()
    assert check_tool_template(tokenizer).name == "hermes"
    suffix = tool_turn_ids(tokenizer, [{"role": "tool", "name": "double", "content": "8"}])
    assert tokenizer.decode(suffix) == "\n<|tool|>\n8</s>\n<|assistant|>\n"
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|user|>\nhi</s>\n"  # without tools the template renders as it always did


def test_chatml_tools_with_smollm2s_tokenizer(smollm2_dir):
    """SmolLM2's own template renders no tool calls; the shipped ChatML one does, with SmolLM2's tokens, and
    renders a conversation without tools exactly as SmolLM2's own template does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    conversation = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    own = tokenizer.apply_chat_template(conversation, tokenize=False)
    with pytest.raises(ValueError, match="cannot render tools"):
        check_tool_template(tokenizer)
    set_chat_template(tokenizer, "chatml_tools")
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == own
    assert check_tool_template(tokenizer).name == "hermes"
    suffix = tool_turn_ids(tokenizer, [{"role": "tool", "name": "calculator", "content": "5"}])
    assert tokenizer.decode(suffix) == "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n" \
                                       "<|im_start|>assistant\n"
    assert "chatml_tools" in SHIPPED_TEMPLATES


def test_chat_template_path_takes_a_file_and_refuses_what_is_not_one(tmp_path):
    tokenizer = build_tokenizer()
    (tmp_path / "t.jinja").write_text(NO_TOOLS)
    set_chat_template(tokenizer, str(tmp_path / "t.jinja"))
    assert tokenizer.chat_template == NO_TOOLS
    with pytest.raises(FileNotFoundError):
        set_chat_template(tokenizer, str(tmp_path / "missing.jinja"))


# ---- built-in tools and settings --------------------------------------------------------------------------------
def test_calculator():
    assert calculator("12 * (3 + 4)") == "84"
    assert calculator("12 / 4") == "3" and calculator("7 / 2") == "3.5" and calculator("-2 ** 3") == "-8"
    for bad, why in (("2 ** 1000", "exponent"), ("__import__('os')", "only numbers"), ("1 +", "not an arithmetic"),
                     ("1" * 300, "longer than")):
        with pytest.raises(ValueError, match=why):
            calculator(bad)


def test_run_python_runs_in_the_sandbox():
    assert run_python("print(6 * 7)").strip() == "42"
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        run_python("1 / 0")


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_tool_calling_iterations"):
        GRPOConfig(max_tool_calling_iterations=-1)
    with pytest.raises(ValueError, match="tool_timeout"):
        GRPOConfig(tool_timeout=0)
    assert GRPOConfig(max_tool_calling_iterations=0).max_tool_calling_iterations == 0


def test_a_recipe_names_its_tools(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: grpo:tiny\ndataset: grpo:length\nreward_funcs: [length]\n"
                      "tools: [calculator, tests.nowhere:tool]\n")
    with pytest.raises(ValueError, match="cannot import tool 'tests.nowhere:tool'"):
        build_run(load_recipe(str(recipe), {}))
    recipe.write_text("model: grpo:tiny\ndataset: grpo:length\nreward_funcs: [length]\ntools: [calculator]\n")
    assert build_run(load_recipe(str(recipe), {}))["tools"] == [calculator]
    recipe.write_text("model: grpo:tiny\ndataset: grpo:length\nreward_funcs: [length]\ntools: [abacus]\n")
    with pytest.raises(ValueError, match="unknown tool 'abacus'"):
        build_run(load_recipe(str(recipe), {}))
