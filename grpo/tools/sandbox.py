"""Run untrusted Python (a model's code) in a subprocess with limits: the `python` tool and the `code_tests` rule.

Each run gets:
- a fresh temporary directory as its working directory, deleted afterwards;
- a wall-clock limit (the whole process group is killed past it) and a CPU-time limit (RLIMIT_CPU, by default
  one second above the wall-clock limit, so a single-threaded program meets the wall clock first); both count
  as running past its time (`timed_out`);
- a memory limit (RLIMIT_AS) and a size limit on every file it writes (RLIMIT_FSIZE), which also caps its
  output: stdout and stderr go to files in its directory and are read back truncated to `max_output` bytes;
- no network: a network namespace of its own (`unshare -rn`, where unprivileged user namespaces are allowed), and
  in every case an audit hook (PEP 578) installed before the code runs, which refuses sockets, new processes,
  ctypes, and writes, renames and deletions outside its directory. The hook cannot be removed from Python code.
This is isolation for the honest mistakes of a model under training (an infinite loop, a huge print, a stray
`rm`), not a security boundary against an adversary: run untrusted workloads inside a container as well.
Imports no torch.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Runs first in the sandboxed interpreter: limits, then the audit hook, then the program (argv[1]).
_PRELUDE = r"""
import os, resource, sys
for limit, value in ((resource.RLIMIT_AS, int(sys.argv[2])), (resource.RLIMIT_FSIZE, int(sys.argv[4]))):
    resource.setrlimit(limit, (value, value))
# SIGXCPU at the soft limit (reported as a timeout), SIGKILL a second later if the program ignores it
resource.setrlimit(resource.RLIMIT_CPU, (int(sys.argv[3]), int(sys.argv[3]) + 1))

def install(home=os.path.realpath(os.getcwd())):
    blocked = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
               "os.forkpty", "pty.", "ctypes.", "os.kill", "os.killpg", "signal.pthread_kill", "sys.addaudithook")
    writes = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
              "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep

    def inside(path):
        real = realpath(fsdecode(path))
        return real == home or real.startswith(home + sep)

    def hook(event, args):
        if event.startswith(blocked):
            raise PermissionError(f"the sandbox does not allow {event}")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & write_flags
            if writing and isinstance(path, (str, bytes)) and not inside(path):
                raise PermissionError(f"the sandbox allows writing only inside its directory, not {path}")
        elif event in writes:
            for path in args[:2]:
                if isinstance(path, (str, bytes)) and not inside(path):
                    raise PermissionError(f"the sandbox does not allow {event} outside its directory ({path})")

    sys.addaudithook(hook)

program = compile(open(sys.argv[1]).read(), "main.py", "exec")
sys.argv = ["main.py"]
install()
del install, resource, os
try:
    exec(program, {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit:
    raise
except BaseException as error:  # the program's own frames only: the sandbox's are noise to whoever reads it
    import traceback
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == "main.py"]
    sys.stderr.write("Traceback (most recent call last):\n" + "".join(traceback.format_list(frames))
                     + "".join(traceback.format_exception_only(type(error), error)))
    sys.stderr.flush()
    sys.exit(1)
"""


@dataclass(frozen=True)
class SandboxResult:
    stdout: str  # truncated to max_output bytes (with a note saying so)
    stderr: str
    returncode: int | None  # None when it was killed for running past its time
    timed_out: bool  # past the wall-clock limit or the CPU-time limit

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """True when `unshare -rn` (a user and network namespace, no root needed) works on this machine."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        return subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_python(code: str, *, stdin: str = "", timeout: float = 5.0, memory_mb: int = 512, max_output: int = 4096,
               files: dict[str, str] | None = None, cpu_seconds: int | None = None) -> SandboxResult:
    """Run `code` as a Python program in the sandbox (see the module docstring); `files` are written into its
    directory first (name -> text). `cpu_seconds` (default: the wall-clock limit rounded up, plus one) caps its
    CPU time. Never raises for anything the program does."""
    if cpu_seconds is None:
        cpu_seconds = int(timeout + 0.999) + 1
    with tempfile.TemporaryDirectory(prefix="grpo-sandbox-") as tmp:
        home = Path(tmp)
        (home / "main.py").write_text(code)
        (home / "prelude.py").write_text(_PRELUDE)
        for name, text in (files or {}).items():
            (home / name).write_text(text)
        limit_bytes = max(max_output, 1 << 16)  # files the program writes may be larger than what is read back
        command = [sys.executable, "-I", "-S", "-B", str(home / "prelude.py"), str(home / "main.py"),
                   str(memory_mb << 20), str(max(1, cpu_seconds)), str(limit_bytes)]
        if network_namespace_available():
            command = [shutil.which("unshare"), "-rn", *command]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "PYTHONIOENCODING": "utf-8",
               "OMP_NUM_THREADS": "1"}
        with open(home / ".stdout", "wb") as out, open(home / ".stderr", "wb") as err:
            process = subprocess.Popen(command, cwd=tmp, stdin=subprocess.PIPE, stdout=out, stderr=err, env=env,
                                       start_new_session=True)
            timed_out = False
            try:
                process.communicate(stdin.encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            timed_out = timed_out or process.returncode == -signal.SIGXCPU  # past its CPU time
        return SandboxResult(_read(home / ".stdout", max_output), _read(home / ".stderr", max_output),
                             None if timed_out else process.returncode, timed_out)


def _read(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + f"\n[output truncated at {limit} bytes]" if len(data) > limit else text


_MARK = "__grpo_sandbox_values__"
_HARNESS = f"""
import json, sys
_expressions = json.loads(sys.stdin.readline())  # read before the solution runs
_dumps = json.dumps
_namespace = {{"__name__": "solution"}}
exec(compile(open("solution.py").read(), "solution.py", "exec"), _namespace)
_values = []
for _expression in _expressions:
    try:
        _values.append(["ok", _dumps(eval(_expression, _namespace))])
    except BaseException as _error:
        _values.append(["error", type(_error).__name__ + ": " + str(_error)[:200]])
print("\\n{_MARK}" + _dumps(_values))
"""


def evaluate_expressions(code: str, expressions: list[str], *, timeout: float = 5.0,
                         memory_mb: int = 512) -> list[tuple[str, str]]:
    """Run `code` (as module `solution`) in one sandboxed process, then evaluate each expression (such as
    `add(2, 3)`) in its namespace; per expression ("ok", the value as JSON) or ("error", why). The values are
    compared by the caller, outside the sandbox, so a program cannot fake a comparison (an object whose == is
    always true does not serialise). A program that fails or does not finish gives every expression an error."""
    result = run_python(_HARNESS, stdin=json.dumps(expressions) + "\n", timeout=timeout, memory_mb=memory_mb,
                        max_output=1 << 20, files={"solution.py": code})
    marker = result.stdout.rfind(_MARK)
    if result.timed_out or marker < 0:
        why = (f"timed out after {timeout:g} s" if result.timed_out
               else (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1])
        return [("error", why)] * len(expressions)
    values = json.loads(result.stdout[marker + len(_MARK):].splitlines()[0])
    return [tuple(v) for v in values]


def run_io_case(code: str, stdin: str, expected: str, *, timeout: float = 5.0, memory_mb: int = 512) -> bool:
    """Whether `code`, given `stdin`, prints `expected` (compared line by line, trailing spaces and trailing
    empty lines ignored) and exits with 0 within `timeout` seconds."""
    result = run_python(code, stdin=stdin, timeout=timeout, memory_mb=memory_mb, max_output=1 << 20)

    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.rstrip().splitlines()]

    return result.ok and lines(result.stdout) == lines(expected)
