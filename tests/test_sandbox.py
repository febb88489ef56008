"""The Python sandbox (grpo.tools.sandbox) and the code-execution reward (rewards/code.py)."""

import pytest

from grpo.tools.sandbox import evaluate_expressions, network_namespace_available, run_io_case, run_python
from rewards.code import code_block, code_tests, parse_assertion

ADD = "```python\ndef add(a, b):\n    return a + b\n```"


def test_a_program_runs_and_its_output_comes_back():
    result = run_python("import sys\nprint(input() * 2)\nprint('err', file=sys.stderr)", stdin="ab\n")
    assert result.ok and result.stdout == "abab\n" and result.stderr == "err\n"


def test_the_sandbox_cannot_open_a_socket():
    result = run_python("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
                        "s.connect(('127.0.0.1', 9))")
    assert not result.ok and "PermissionError: the sandbox does not allow socket" in result.stderr


def test_the_network_namespace_has_no_route_out():
    if not network_namespace_available():
        pytest.skip("unprivileged user namespaces are not allowed here; the audit hook alone refuses sockets")
    # below the audit hook: the namespace has no interface up, whatever Python code does
    result = run_python("print(open('/proc/self/net/dev').read())")  # this process's network namespace
    interfaces = [line.split(":")[0].strip() for line in result.stdout.splitlines() if ":" in line]
    assert result.ok and interfaces == ["lo"]


def test_the_sandbox_cannot_write_outside_its_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')", f"import os\nos.mkdir({str(tmp_path / 'd')!r})",
                 f"import os\nos.rename('main.py', {str(target)!r})", "import subprocess\nsubprocess.run(['true'])",
                 "import ctypes\nctypes.CDLL(None)"):
        result = run_python(code)
        assert not result.ok and "PermissionError" in result.stderr, code
    assert not target.exists() and not (tmp_path / "d").exists()
    inside = run_python("open('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read())")
    assert inside.ok and inside.stdout == "kept\n"  # its own directory is writable


def test_a_program_that_does_not_finish_is_killed():
    result = run_python("while True:\n    pass", timeout=1.0)
    assert result.timed_out and result.returncode is None and not result.ok
    result = run_python("while True:\n    pass", timeout=60.0, cpu_seconds=1)  # the CPU-time limit comes first
    assert result.timed_out and result.returncode is None and not result.ok


def test_output_is_truncated_and_memory_is_limited():
    result = run_python("print('x' * 10_000_000)", max_output=1000)
    assert len(result.stdout) < 1100 and "[output truncated at 1000 bytes]" in result.stdout
    result = run_python("x = bytearray(3 << 30)", memory_mb=256)
    assert not result.ok and "MemoryError" in result.stderr


def test_expressions_are_evaluated_after_the_program_and_returned_as_json():
    assert evaluate_expressions("def add(a, b):\n    return a + b", ["add(2, 3)", "add('a', 'b')", "add(1)"]) == [
        ("ok", "5"), ("ok", '"ab"'), ("error", "TypeError: add() missing 1 required positional argument: 'b'")]
    always_equal = "class A:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return A()"
    assert evaluate_expressions(always_equal, ["add(2, 3)"])[0][0] == "error"  # does not serialise
    assert evaluate_expressions("x = (", ["add(2, 3)"]) == [("error", "SyntaxError: '(' was never closed")]


def test_io_cases_compare_printed_output():
    program = "a, b = map(int, input().split())\nprint(a + b)"
    assert run_io_case(program, "2 3\n", "5\n") and run_io_case(program, "2 3", "5  \n\n")
    assert not run_io_case(program, "2 3\n", "6\n") and not run_io_case("while True: pass", "", "", timeout=1.0)


def test_code_tests_scores_the_fraction_of_tests_passed():
    tests = {"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]}
    assert code_tests(ADD, tests) == pytest.approx(2 / 3)
    assert code_tests("no code here", tests) == 0.0
    assert code_tests("```python\nwhile True:\n    pass\n```", tests, timeout=1.0) == 0.0
    assert code_tests("```\ndef add(a, b):\n    return a + b\n```", {"tests": ["assert add(1, 2) == 3"]}) == 1.0
    assert code_tests("```python\ndef add(a, b):\n    return (a, b)\n```", {"tests": ["assert add(1, 2) == (1, 2)"]}) == 1.0
    assert code_tests("```python\ndef f():\n    return True\n```", {"tests": ["assert f() == 1"]}) == 0.0  # bool is not 1
    cases = {"test_cases": [{"input": "2 3\n", "output": "5\n"}, {"input": "1 1\n", "output": "3\n"}]}
    assert code_tests("```python\nprint(sum(map(int, input().split())))\n```", cases) == 0.5


def test_code_tests_names_what_is_wrong_with_a_row():
    with pytest.raises(ValueError, match="neither"):
        code_tests(ADD, {"answer": "5"})
    with pytest.raises(ValueError, match="assert CALL == EXPECTED"):
        code_tests(ADD, {"tests": ["assert add(2, 3) > 4"]})
    with pytest.raises(ValueError, match="literal"):
        code_tests(ADD, {"tests": ["assert add(2, 3) == five"]})
    assert parse_assertion("assert add(2, 3) == [1, 'a']") == ("add(2, 3)", [1, "a"])
    assert code_block("text\n```python\nfirst\n```\nmore\n```py\nsecond\n```") == "second\n"
