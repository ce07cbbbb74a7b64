"""Running tools: a toolbox of named functions, each call started at once and answered within `tool_timeout`.

A tool is a plain function, sync or async, described to the model by its signature and docstring (transformers'
`get_json_schema`, the description chat templates render). Calls run concurrently: a synchronous one in a daemon
thread of its own, an async one on the shared background event loop, so a slow tool holds up neither the other
calls nor the rows still decoding. Faults are data: a tool that raises, does not return within the timeout, is
unknown, or was called with a malformed call, answers with its error (TRL's `{"error": ...}`) and counts as a
failure. Python cannot kill a thread, so a synchronous call past its timeout is abandoned and may run on until it
returns or the process exits; a coroutine is cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grpo.background_loop import background_loop
from grpo.rollout.tool_calls import MalformedCall, ToolCall


@dataclass(frozen=True)
class ToolResult:
    name: str
    content: str  # what the tool message carries: str(return value), or the error
    failed: bool

    def message(self) -> dict[str, Any]:
        return {"role": "tool", "name": self.name, "content": self.content}


def error_result(name: str, error: str) -> ToolResult:
    return ToolResult(name, str({"error": error}), failed=True)


def tool_name(tool: Callable[..., Any]) -> str:
    return tool.__name__


def check_tools(tools: list[Any], where: str = "tools") -> None:
    """Every tool is a callable that `get_json_schema` can describe, and no two share a name: errors that name
    the tool and the fix, before anything expensive starts."""
    from transformers.utils import get_json_schema

    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not callable(tool) or not hasattr(tool, "__name__"):
            raise TypeError(f"{where}[{i}] is a {type(tool).__name__}; a tool is a function (sync or async) with "
                            "type hints and a docstring.")
        try:
            get_json_schema(tool)
        except Exception as e:  # transformers' DocstringParsingException / TypeHintParsingException
            raise ValueError(
                f"tool '{tool_name(tool)}' cannot be described to the model: {e}. A tool needs a type hint on every "
                "argument and a Google-style docstring with an Args: section describing each of them."
            ) from e
        if tool_name(tool) in seen:
            raise ValueError(f"two tools are named '{tool_name(tool)}'; the model calls tools by name, so each name "
                             "must be unique.")
        seen.add(tool_name(tool))


class PendingResult:
    """A call under way; `result` waits for it until `timeout` seconds after it started."""

    def __init__(self, name: str, timeout: float, future: concurrent.futures.Future | None = None,
                 ready: ToolResult | None = None):
        self.name, self.timeout, self.future, self.ready = name, timeout, future, ready
        self.started = time.monotonic()

    def result(self) -> ToolResult:
        if self.ready is not None:
            return self.ready
        left = max(0.0, self.started + self.timeout - time.monotonic())
        try:
            value = self.future.result(timeout=left)
        except concurrent.futures.TimeoutError:
            self.future.cancel()  # cancels a coroutine; a thread runs on, abandoned
            return error_result(self.name, f"tool '{self.name}' did not return within tool_timeout={self.timeout:g} s")
        except Exception as e:
            return error_result(self.name, str(e))
        return ToolResult(self.name, str(value), failed=False)


class Toolbox:
    """The tools one completion may call, by name."""

    def __init__(self, tools: list[Callable[..., Any]], timeout: float):
        self.tools = {tool_name(tool): tool for tool in tools}
        self.timeout = timeout

    @property
    def schemas(self) -> list[Callable[..., Any]]:
        """What the chat template's `tools=` takes (it describes callables itself)."""
        return list(self.tools.values())

    def start(self, call: ToolCall | MalformedCall) -> PendingResult:
        if isinstance(call, MalformedCall):
            return PendingResult(call.name, self.timeout, ready=error_result(call.name, f"invalid tool call: "
                                                                                        f"{call.error}"))
        tool = self.tools.get(call.name)
        if tool is None:
            return PendingResult(call.name, self.timeout, ready=error_result(
                call.name, f"Tool {call.name} not found. The tools are: {', '.join(self.tools) or 'none'}."))
        if _is_async(tool):
            future = asyncio.run_coroutine_threadsafe(_call_async(tool, call.arguments, self.timeout),
                                                      background_loop())
        else:
            future = _call_in_thread(tool, call.arguments)
        return PendingResult(call.name, self.timeout, future)


async def _call_async(tool: Callable[..., Any], arguments: dict[str, Any], timeout: float) -> Any:
    return await asyncio.wait_for(tool(**arguments), timeout)


def _call_in_thread(tool: Callable[..., Any], arguments: dict[str, Any]) -> concurrent.futures.Future:
    """A daemon thread per call (a pool's threads are joined at exit, so a hung tool would hang the exit)."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_running_or_notify_cancel()  # running: a timed-out wait cannot cancel it under the thread

    def run() -> None:
        try:
            future.set_result(tool(**arguments))
        except Exception as e:
            future.set_exception(e)

    threading.Thread(target=run, daemon=True, name=f"grpo-tool-{tool_name(tool)}").start()
    return future


def _is_async(tool: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(tool) or inspect.iscoroutinefunction(type(tool).__call__)


@dataclass
class ToolCounts:
    """Calls and failures of a round, in total and per tool, as sums that add up over processes."""

    tool_names: list[str]
    calls: int = 0
    failures: int = 0
    per_tool: dict[str, list[int]] = field(default_factory=dict)  # name -> [calls, failures]

    def record(self, result: ToolResult) -> None:
        self.calls += 1
        self.failures += int(result.failed)
        if result.name in self.tool_names:  # unknown names count in the totals only (a malformed call: its name's)
            counts = self.per_tool.setdefault(result.name, [0, 0])
            counts[0] += 1
            counts[1] += int(result.failed)

    def sums(self) -> dict[str, float]:
        """Flat and in a fixed order (every tool, called or not), so processes can add them with one reduce."""
        sums = {"calls": float(self.calls), "failures": float(self.failures)}
        for name in self.tool_names:
            calls, failures = self.per_tool.get(name, [0, 0])
            sums[f"{name}/calls"], sums[f"{name}/failures"] = float(calls), float(failures)
        return sums
