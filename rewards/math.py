"""Answer-correctness rules: the value a completion states, checked against the gold answer; exact arithmetic
for Countdown equations.

`accuracy` grades the value the completion *states*, never an expression it leaves for someone else to
evaluate: restating the question ("38 + 94 =") or writing `<answer>535 + 5</answer>` earns nothing, because a
checker that evaluates expressions would pay the model for copying the question (docs/rewards.md, "Reward
hacking"). Where the answer is read from, first match wins:

1. the last `<answer>...</answer>` block (inside it, a `\\boxed{}` if there is one);
2. the last `\\boxed{...}`;
3. otherwise the whole completion, whose last number is the stated value.

In a block (1, 2) an equation states its right-hand side (`x = 5` states 5, `38 + 94 =` states nothing);
a block whose value still holds arithmetic between numbers (`535 + 5`, `\\frac{1}{2} + 1`, `1080/2`) states no
value. A plain number is compared exactly (fractions, no rounding); a LaTeX value (`\\frac{1}{2}`,
`2\\sqrt{3}`, `\\{1, 2\\}`) is compared with math-verify. Numbers keep thousands separators only in groups of
three (`1,200` is 1200; `3,4` is 3 then 4; `(1, 2)` stays a pair).
"""

from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from fractions import Fraction

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from rewards.base import rule

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUM = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"  # thousands separators only in groups of three
# A stated number: \frac{a}{b}, or a number (a minus sign only where it cannot be an operator) with an
# optional /b.
_VALUE = re.compile(rf"\\[dt]?frac\{{\s*(-?{_NUM})\s*\}}\{{\s*(-?{_NUM})\s*\}}"
                    rf"|(?<![\w.])(-?{_NUM})(?:\s*/\s*({_NUM}))?(?!\d)")
_OPERAND = rf"(?:\\[dt]?frac\{{[^{{}}]*\}}\{{[^{{}}]*\}}|(?<![\w^_.\\]){_NUM}(?![\w^]))"
_ARITHMETIC = re.compile(rf"{_OPERAND}\s*(?:[-+*×÷·]|\\times|\\cdot|\\div)\s*-?{_OPERAND}"
                         r"|\\(?:int|sum|prod|lim)(?![a-zA-Z])")
_PLAIN_NUMBER = re.compile(rf"^\s*\\?\$?\s*(-?{_NUM})\s*(?:\\?%)?\s*\.?\s*$")
_LATEX_ESCAPES = re.compile(r"\\[$%,!;]")


def gold_text(answer: str) -> str:
    """The final answer of a gold solution: the part after GSM8K's `####` marker, else the whole text."""
    return answer.split("####")[-1].strip()


def answer_region(completion: str) -> str:
    """Where the model's final answer is: inside the last <answer>...</answer>, else the whole completion."""
    tagged = _ANSWER_TAG.findall(completion)
    return tagged[-1] if tagged else completion


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces matched), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def stated_answer(completion: str) -> tuple[str, bool]:
    """(text holding the final answer, whether it came from an <answer> block or \\boxed{})."""
    tagged = _ANSWER_TAG.findall(completion)
    if tagged:
        return last_boxed(tagged[-1]) or tagged[-1], True
    boxed = last_boxed(completion)
    return (boxed, True) if boxed is not None else (completion, False)


def _number(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def _values(text: str) -> list[Fraction | None]:
    """Every number stated in `text`, in order, as exact fractions; None for a division left undone (a
    fraction whose value is a whole number, such as `1080/2`, or a zero denominator)."""
    values = []
    for match in _VALUE.finditer(text):
        frac_num, frac_den, number, denominator = match.groups()
        top, bottom = (frac_num, frac_den) if frac_num is not None else (number, denominator)
        if bottom is None:
            values.append(_number(top))
            continue
        top, bottom = _number(top), _number(bottom)
        undone = bottom == 0 or (bottom != 1 and (top / bottom).denominator == 1)
        values.append(None if undone else top / bottom)
    return values


def last_value(text: str) -> Fraction | None:
    """The last number stated in `text` as an exact fraction; None when there is none, or when the last one
    is a division that the text left undone (`1080/2`)."""
    values = _values(text)
    return values[-1] if values else None


def is_unevaluated(text: str) -> bool:
    """True when `text` holds arithmetic between numbers (`535 + 5`, `2 \\times 3`, `\\frac{1}{2} + 1`), a
    division whose result is a whole number (`1080/2`, `\\frac{1080}{2}`), or an integral, sum, product or
    limit left to be worked out."""
    return bool(_ARITHMETIC.search(text)) or None in _values(text)


def _latex(text: str) -> str:
    return text if "$" in text else f"${text}$"


def _parse(text: str) -> list:
    """math-verify's parse of a LaTeX value; its errors raise, and its timeout (a BaseException, which
    would pass every `except Exception`) becomes a TimeoutError, so the scorer counts the sample as an error."""
    try:
        return parse(_latex(text), raise_on_error=True)
    except TimeoutException:
        raise TimeoutError(f"math-verify timed out parsing {text[:200]!r}") from None


def _equal(gold: list, predicted: list) -> bool:
    try:
        return bool(predicted) and verify(gold, predicted, raise_on_error=True)
    except TimeoutException:
        raise TimeoutError(f"math-verify timed out comparing {predicted[-1:]!r} with {gold[-1:]!r}") from None


def _as_number(text: str) -> Fraction | None:
    match = _PLAIN_NUMBER.match(text)
    return _number(match.group(1)) if match else None


@rule(correct=("so the answer is 42.", {"answer": "42"}),
      wrong=[("so the answer is 41.", {"answer": "42"}),
             ("What is 38 + 4? 38 + 4 =", {"answer": "42"}),  # restating the question
             ("<answer>38 + 4</answer>", {"answer": "42"})])  # the expression, left unevaluated
def accuracy(completion: str, example: dict) -> float | None:
    """1.0 when the value the completion states equals the gold answer, else 0.0 (module docstring: where the
    value is read from, and why unevaluated arithmetic states none).

    Gold answers may be GSM8K-style (`... #### 18`), with commas, `$` and trailing `.0`; a gold answer that is
    not a plain number is parsed by math-verify. None when the gold answer cannot be parsed. math-verify's own
    errors and timeouts propagate (the scorer counts them in reward/accuracy/errors, never as a wrong answer).
    """
    gold_str = gold_text(str(example["answer"]))
    gold_number = _as_number(gold_str)
    gold = None
    if gold_number is None:
        gold = _parse(gold_str)
        if not gold:
            return None
    text, in_block = stated_answer(completion)
    if in_block:
        text = text.rsplit("=", 1)[-1]
        if not text.strip() or (is_unevaluated(text) and not is_unevaluated(gold_str)):
            return 0.0
        if gold is not None or "\\" in _LATEX_ESCAPES.sub("", text) or "{" in text:  # compared mathematically
            return 1.0 if _equal(gold if gold is not None else _parse(gold_str), _parse(text)) else 0.0
    value = last_value(text)
    if value is None:
        return 0.0
    if gold_number is not None:
        return 1.0 if value == gold_number else 0.0
    return 1.0 if _equal(gold, _parse(str(value))) else 0.0


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


# numbers of bounded length: a 5000-digit "number" is no working step, and int() of it would raise
_STEP_LINE = re.compile(r"^\s*(\d{1,18})\s*([-+*])\s*(\d{1,18})\s*=\s*(-?\d{1,40})\s*$", re.MULTILINE)
_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@rule(correct=("<think>\n12 + 30 = 42\n</think>", {}), wrong=("<think>\n12 + 30 = 52\n</think>", {}))
def true_steps(completion: str, example: dict) -> tuple[float, dict] | None:
    """The share of working lines `a op b = c` (integers; op one of + - *) that are true equations, read inside
    the <think> block when there is one, else in the whole completion; None when there are no such lines.
    Sub-metric `lines`: how many working lines there are.

    Worked example: "<think>\\n47 + 38 = 85\\n85 + 19 = 114\\n</think>" -> (0.5, {"lines": 2}).
    A monitor more than a reward: with weight 0 it shows whether a model's working gets better or only its
    answers (true steps are easy to write without solving anything, so do not pay for them alone).
    """
    think = _THINK.search(completion)
    lines = _STEP_LINE.findall(think.group(1) if think else completion)
    if not lines:
        return None
    right = sum(_APPLY[op](int(a), int(b)) == int(c) for a, op, b, c in lines)
    return right / len(lines), {"lines": float(len(lines))}
