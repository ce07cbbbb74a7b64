"""Built-in tools for `GRPOTrainer(tools=[...])` and a recipe's `tools:` list: a calculator, and Python run in the
sandbox of `grpo.rewards.sandbox`.

A tool is a plain function: its name, type hints and docstring are what the chat template shows the model, its
return value (as a string) is the tool message, and an exception it raises reaches the model as the error (and
counts in tools/failure_frequency). See docs/tools.md.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from grpo.rewards.sandbox import SandboxLimits, run_sandboxed

_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}
MAX_EXPONENT = 100  # 9 ** 10 ** 10 would hold the tool (and the trainer's thread) for minutes
MAX_EXPRESSION_CHARS = 200


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return its value.

    Args:
        expression: An arithmetic expression with numbers, + - * / // % ** and parentheses, e.g. "12 * (3 + 4)".
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from e
    value = _evaluate(tree.body)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)  # 12 / 4 is 3, as a person writes it
    return str(value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"the exponent {right} is larger than {MAX_EXPONENT}")
        return _OPERATORS[type(node.op)](left, right)
    raise ValueError(f"only numbers, + - * / // % ** and parentheses are allowed, not {ast.unparse(node)!r}")


PYTHON_TOOL_LIMITS = SandboxLimits(wall_time_s=5.0, cpu_time_s=3, memory_bytes=512 << 20)


def run_python(code: str) -> str:
    """Run a Python program in a sandbox and return what it prints.

    Args:
        code: The program. Print what you want to see; there is no network and no file outside its own folder.
    """
    result = run_sandboxed(code, PYTHON_TOOL_LIMITS)
    if result.reason != "ok":  # the sandbox's verdict (timeout, memory, blocked, error...) is the error the model sees
        raise RuntimeError(f"{result.reason}{': ' + result.detail if result.detail else ''}\n{result.stderr}".strip())
    return result.stdout


BUILTIN_TOOLS: dict[str, Callable[..., Any]] = {"calculator": calculator, "run_python": run_python}
