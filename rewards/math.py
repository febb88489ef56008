"""Answer-correctness rules: math-verify for math answers, exact arithmetic for Countdown equations."""

from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from fractions import Fraction

from math_verify import parse, verify

from rewards.base import rule

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def gold_text(answer: str) -> str:
    """The final answer of a gold solution: the part after GSM8K's `####` marker, else the whole text."""
    return answer.split("####")[-1].strip().replace(",", "")


def answer_region(completion: str) -> str:
    """Where the model's final answer is: inside the last <answer>...</answer>, else the whole completion."""
    tagged = _ANSWER_TAG.findall(completion)
    return tagged[-1] if tagged else completion


@rule(correct=("so the answer is 42.", {"answer": "42"}), wrong=("so the answer is 41.", {"answer": "42"}))
def accuracy(completion: str, example: dict) -> float | None:
    """1.0 when the completion's final answer equals the gold answer (math-verify), else 0.0.

    The answer is read from the last <answer> tag if there is one, else from the completion, where
    math-verify takes the last number or \\boxed{} expression. Gold answers may be GSM8K-style (`... #### 18`);
    commas, $ signs and trailing .0 are handled. None when the gold answer cannot be parsed.
    """
    gold = parse(gold_text(str(example["answer"])))
    if not gold:
        return None
    predicted = parse(answer_region(completion).replace(",", ""))
    return 1.0 if predicted and verify(gold, predicted) else 0.0


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        return _OPS[type(node.op)](left, right)
    raise ValueError("only integers, + - * / and parentheses are allowed")


@rule(correct=("<answer>(3 + 5) * 2</answer>", {"nums": [2, 3, 5], "target": 16}),
      wrong=("<answer>3 + 5 + 2</answer>", {"nums": [2, 3, 5], "target": 16}))
def countdown(completion: str, example: dict) -> float:
    """1.0 when the answer is an equation that uses each of example["nums"] exactly once and equals
    example["target"], else 0.0 (Countdown, as in TinyZero). Evaluated exactly with fractions, never eval().
    """
    text = answer_region(completion).split("=")[0].strip()
    if not text or len(text) > 200:
        return 0.0
    try:
        used: list[int] = []
        value = _evaluate(ast.parse(text, mode="eval"), used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return 0.0
    if Counter(used) != Counter(int(n) for n in example["nums"]):
        return 0.0
    return 1.0 if value == Fraction(example["target"]) else 0.0
