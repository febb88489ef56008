"""The built-in tools: `calculator` (exact arithmetic, no eval) and `python` (the sandbox).

A tool is a function of keyword arguments (what the model's call names) returning the text the model reads;
its docstring's Args section describes the arguments to the model (transformers' get_json_schema format).
Options a config sets (`kwargs:`) are bound before the model sees the tool and are not part of its schema.
"""

from __future__ import annotations

import ast
import operator
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from grpo.tools.sandbox import run_python

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_SYMBOLS = {"×": "*", "÷": "/", "^": "**", "−": "-"}
MAX_EXPRESSION = 500
MAX_EXPONENT = 1000
MAX_DIGITS = 2000


class ToolError(ValueError):
    """A tool's refusal, shown to the model as the call's result (and counted in tools/<name>/errors)."""


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _value(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(Decimal(str(node.value)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            if right.denominator != 1 or abs(right) > MAX_EXPONENT:
                raise ToolError(f"exponents must be whole numbers up to {MAX_EXPONENT}")
            if left == 0 and right < 0:
                raise ToolError("division by zero")
            return left ** int(right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ToolError("division by zero")
        result = _OPERATORS[type(node.op)](left, right)
        result = Fraction(result)
        if len(str(result.numerator)) > MAX_DIGITS:
            raise ToolError(f"the result has more than {MAX_DIGITS} digits")
        return result
    raise ToolError(f"unsupported: {ast.unparse(node) if hasattr(ast, 'unparse') else type(node).__name__} "
                    "(numbers, + - * / // % ** and parentheses only)")


def format_number(value: Fraction) -> str:
    """An integer as itself; a fraction with a finite decimal expansion as that decimal; any other as p/q."""
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d == 1:
        text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{value.numerator}/{value.denominator}"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: The expression to evaluate, with numbers, + - * / // % ** and parentheses, e.g. "123 * 45 + 6".
    """
    if not isinstance(expression, str):
        raise ToolError(f"expression must be a string, not {type(expression).__name__}")
    text = expression.strip()
    for symbol, replacement in _SYMBOLS.items():
        text = text.replace(symbol, replacement)
    if len(text) > MAX_EXPRESSION:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression!r} as arithmetic") from None
    try:
        return format_number(_value(tree))
    except (InvalidOperation, OverflowError):
        raise ToolError(f"cannot evaluate {expression!r}") from None


def python(code: str, timeout: float = 5.0, memory_mb: int = 512, max_output: int = 2000) -> str:
    """Run Python code and return what it prints. Each call is a fresh program: no state is kept between calls.

    Args:
        code: The Python program to run; print what you want to see.
    """
    if not isinstance(code, str):
        raise ToolError(f"code must be a string, not {type(code).__name__}")
    result = run_python(code, timeout=timeout, memory_mb=memory_mb, max_output=max_output)
    if result.timed_out:
        raise ToolError(f"the program did not finish within {timeout:g} s and was stopped"
                        + (f"; it printed:\n{result.stdout}" if result.stdout else ""))
    if result.returncode != 0:
        raise ToolError((result.stdout + result.stderr).strip() or f"exit code {result.returncode}")
    return result.stdout


BUILTIN_TOOLS = {"calculator": calculator, "python": python}
