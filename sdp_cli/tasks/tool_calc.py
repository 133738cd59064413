"""`tool_calc`: arithmetic with a calculator tool, in a documented tag.

SmolLM2's chat template has no tool-call syntax, so the model calls the tool with a tag:
`<calc>12 * (3 + 4)</calc>`. The environment evaluates the expression (numbers, + - * / // % **
and parentheses only, with bounded powers) and answers with a `tool` message holding the result
(or the error). A model turn without a call is the final answer, scored by the base task
(`task.base`, default reasoning-gym `basic_arithmetic`). After `task.max_tool_calls` calls the
next turn is scored whatever it holds. The reward is the base task's reward of the final answer
(0 when the episode ends before one).
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

from sdp_cli.tasks.base import Task
from sdp_cli.tasks.environment import ChatMessage, EnvStep

CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
INSTRUCTIONS = (
    "You have a calculator: write <calc>expression</calc> (for example <calc>12*(3+4)</calc>) "
    "and you will get the result. When you know the answer, reply with the final number only."
)
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 64
MAX_EXPRESSION = 200


class CalcError(ValueError):
    """The expression is not plain arithmetic, or cannot be evaluated."""


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text (an integer when it is one)."""
    if len(expression) > MAX_EXPRESSION:
        raise CalcError(f"longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip().replace("^", "**"), mode="eval")
    except SyntaxError:
        raise CalcError("not an arithmetic expression") from None
    value = _evaluate(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 6) if isinstance(value, float) else value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalcError(f"exponent above {MAX_EXPONENT}")
        try:
            return _BINARY[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError) as exc:
            raise CalcError(str(exc)) from None
    raise CalcError("only numbers, + - * / // % ** and parentheses")


class ToolCalcEnv:
    def __init__(self, base: Task, max_tool_calls: int) -> None:
        self.base = base
        self.max_tool_calls = max_tool_calls
        self.calls = 0
        self.instance: Mapping[str, Any] = {}

    def reset(self, instance: Mapping[str, Any]) -> list[ChatMessage]:
        self.instance = instance
        self.calls = 0
        return [{"role": "user", "content": f"{instance['question']}\n{INSTRUCTIONS}"}]

    def step(self, model_message: str) -> EnvStep:
        call = CALL.search(model_message)
        if call is None or self.calls >= self.max_tool_calls:
            reward = float(self.base.reward(model_message, self.instance))
            return EnvStep([], done=True, reward=reward)
        self.calls += 1
        try:
            result = calculate(call.group(1))
        except CalcError as exc:
            result = f"error: {exc}"
        return EnvStep([{"role": "tool", "content": result}], done=False, reward=0.0)
