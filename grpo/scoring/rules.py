"""The reward-rule registry: turns a configured `fn:` entry into a callable, or says exactly what is wrong.

A bare name is a built-in from `rewards.BUILTINS`; `path/to/file.py:func` and `package.module:func` load user
code. Keyword arguments are checked against the function's signature. Imports no torch, so scoring worker
processes start quickly.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import rewards


@dataclass(frozen=True)
class Rule:
    """A resolved reward rule."""

    label: str  # name in logs: reward/<label>
    weight: float
    fn: Callable  # kwargs bound; fn(completion, example) or, batched, fn(completions, examples)
    batched: bool
    canary: Optional[tuple]  # ((completion, example) scored higher, [(completion, example) scored lower, ...]) or None
    ref: str  # the configured `fn:` text


def canary_samples(rule: Rule) -> list[tuple[str, dict]]:
    """The rule's canary (completion, example) pairs: the correct one first, then every wrong one."""
    correct, wrongs = rule.canary
    return [correct, *wrongs]


def resolve_rule(spec) -> Rule:
    """The `Rule` for one RewardSpec. Raises ValueError saying what to fix."""
    fn = load_function(spec.fn)
    signature = inspect.signature(fn)
    try:
        signature.bind("completion", {}, **spec.kwargs)
    except TypeError as e:
        options = list(signature.parameters)[2:]
        raise ValueError(f"kwargs {spec.kwargs} do not fit {fn.__name__}{signature} ({e}); "
                         f"its options are {options or 'none'}") from None
    return Rule(label=spec.label, weight=spec.weight, fn=partial(fn, **spec.kwargs) if spec.kwargs else fn,
                batched=getattr(fn, "reward_batched", False), canary=getattr(fn, "reward_canary", None), ref=spec.fn)


def load_function(ref: str, builtins: dict[str, Callable] | None = None, kind: str = "rule") -> Callable:
    """The function `ref` names: a key of `builtins` (default: the built-in reward rules), `file.py:func` or
    `package.module:func`. Raises ValueError saying what is wrong (`kind` names what was asked for)."""
    builtins = rewards.BUILTINS if builtins is None else builtins
    if ":" not in ref:
        if ref in builtins:
            return builtins[ref]
        near = difflib.get_close_matches(ref, builtins, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"no built-in {kind} named {ref!r}.{hint} Built-ins: {', '.join(sorted(builtins))}; "
                         "user code is named file.py:func or package.module:func")
    where, _, name = ref.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"file {where} not found (paths are relative to the directory you run from)")
        module_name = f"grpo_user_rules_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        if module_name not in sys.modules:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except SyntaxError as e:
                raise ValueError(f"{where}:{e.lineno}: syntax error: {e.msg}\n    {(e.text or '').strip()}") from None
            except Exception as e:  # the file's own top-level code failed: say where, keep the cause
                line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                             if Path(f.filename).resolve() == path.resolve()), "?")
                raise ValueError(f"{where}:{line}: importing it raised {type(e).__name__}: {e}") from e
            sys.modules[module_name] = module
        module = sys.modules[module_name]
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"cannot import module {where!r}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        funcs = [n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")]
        raise ValueError(f"{where} has no function {name!r}; it defines {funcs}")
    return fn


def user_code_digest(ref: str) -> Optional[str]:
    """sha256 of the file behind a `file.py:func` rule, for the run log; None for other rules."""
    where = ref.rpartition(":")[0]
    if where.endswith(".py"):
        return hashlib.sha256(Path(where).read_bytes()).hexdigest()
    return None
