"""Code-execution reward: run the completion's code against the row's tests in the sandbox
(grpo.tools.sandbox); the reward is the fraction of tests passed.

The code is the last fenced block of the completion (```python ... ``` or ``` ... ```); a completion without
one scores 0. A dataset row holds its tests under one of two keys:

- `tests`: assertions of the form `assert CALL == EXPECTED`, e.g. `["assert add(2, 3) == 5"]`, where
  EXPECTED is a Python literal. The program and every CALL run in one sandboxed process; each CALL's value comes
  back as JSON and is compared with EXPECTED here, outside the sandbox (so an object whose == is always true,
  or a program that rewrites `assert`, passes nothing).
- `test_cases`: standard input and expected standard output, e.g. `[{"input": "2 3\n", "output": "5\n"}]`;
  each case is its own sandboxed run, compared line by line (trailing spaces and empty lines ignored).

A program that does not finish within `timeout` seconds fails the tests it was running. Samples are scored in
parallel by the reward workers (scoring.workers), each in its own sandbox; give scoring.timeout room for a
sample's whole test run (about `timeout` seconds per case for `test_cases`).
"""

from __future__ import annotations

import ast
import json
import math
import re

from grpo.tools.sandbox import evaluate_expressions, run_io_case
from rewards.base import rule

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


def code_block(completion: str) -> str | None:
    """The last fenced code block's body, or None."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else None


def parse_assertion(test: str) -> tuple[str, object]:
    """`assert CALL == EXPECTED` -> (CALL's source, EXPECTED as a value). Raises ValueError otherwise."""
    try:
        node = ast.parse(test.strip()).body
    except SyntaxError as e:
        raise ValueError(f"test {test!r} is not valid Python ({e.msg})") from None
    if (len(node) != 1 or not isinstance(node[0], ast.Assert) or not isinstance(node[0].test, ast.Compare)
            or len(node[0].test.ops) != 1 or not isinstance(node[0].test.ops[0], ast.Eq)):
        raise ValueError(f"test {test!r} must be `assert CALL == EXPECTED`")
    compare = node[0].test
    try:
        expected = ast.literal_eval(compare.comparators[0])
    except ValueError:
        raise ValueError(f"test {test!r}: EXPECTED must be a Python literal (a number, string, list, dict, ...)") from None
    return ast.unparse(compare.left), expected


def _same(value, expected) -> bool:
    """JSON value against a literal (tuples compare as lists; floats within 1e-9 relative)."""
    expected = json.loads(json.dumps(expected))
    if isinstance(value, bool) or isinstance(expected, bool):
        return type(value) is type(expected) and value == expected
    if isinstance(value, (int, float)) and isinstance(expected, (int, float)):
        return math.isclose(value, expected, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(value, list) and isinstance(expected, list):
        return len(value) == len(expected) and all(_same(v, e) for v, e in zip(value, expected))
    if isinstance(value, dict) and isinstance(expected, dict):
        return value.keys() == expected.keys() and all(_same(value[k], expected[k]) for k in value)
    return type(value) is type(expected) and value == expected


@rule(correct=("```python\ndef add(a, b):\n    return a + b\n```", {"tests": ["assert add(2, 3) == 5"]}),
      wrong=[("```python\ndef add(a, b):\n    return a - b\n```", {"tests": ["assert add(2, 3) == 5"]}),
             ("```python\nclass A:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n"
              "    return A()\n```", {"tests": ["assert add(2, 3) == 5"]}),
             ("add(2, 3) == 5", {"tests": ["assert add(2, 3) == 5"]})])
def code_tests(completion: str, example: dict, timeout: float = 5.0, memory_mb: int = 512) -> float:
    """Fraction of the row's `tests` (or `test_cases`) that the completion's last code block passes."""
    if "tests" in example and example["tests"]:
        checks = [parse_assertion(t) for t in example["tests"]]
        code = code_block(completion)
        if code is None:
            return 0.0
        outcomes = evaluate_expressions(code, [call for call, _ in checks], timeout=timeout, memory_mb=memory_mb)
        passed = sum(kind == "ok" and _same(json.loads(value), expected)
                     for (kind, value), (_, expected) in zip(outcomes, checks))
        return passed / len(checks)
    if "test_cases" in example and example["test_cases"]:
        cases = example["test_cases"]
        if not all(isinstance(c, dict) and "input" in c and "output" in c for c in cases):
            raise ValueError("test_cases must be a list of {\"input\": ..., \"output\": ...}")
        code = code_block(completion)
        if code is None:
            return 0.0
        return sum(run_io_case(code, c["input"], c["output"], timeout=timeout, memory_mb=memory_mb)
                   for c in cases) / len(cases)
    raise ValueError("code_tests needs the row's tests: a non-empty `tests` list (assert CALL == EXPECTED) or "
                     "`test_cases` list ({input, output}); this row has neither")
