"""Scoring: resolve configured reward rules and apply them to completions.

Owns the rule registry (`rewards.BUILTINS` plus user code named `file.py:func` or `module:func`), checking of
rule kwargs against signatures, and fault isolation: a rule that raises on a sample gives None for that
sample, is counted in `errors`, and its first traceback is printed once. A rule that returns something other
than a finite number or None is an error naming the rule. The rules themselves live in `rewards/`.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

import rewards


@dataclass
class Scores:
    """Rewards of N completions."""

    total: torch.Tensor  # [N] weighted sum over rules; a None counts as 0
    per_rule: dict[str, list[Optional[float]]]  # rule label -> N values (None: not applicable or failed)
    errors: dict[str, int]  # rule label -> samples on which the rule raised

    def select(self, rows: torch.Tensor) -> "Scores":
        """The scores at `rows` (a [K] index tensor), in that order; error counts stay those of the batch."""
        idx = rows.tolist()
        return Scores(self.total[rows], {k: [v[i] for i in idx] for k, v in self.per_rule.items()}, dict(self.errors))

    @staticmethod
    def concat(parts: list["Scores"]) -> "Scores":
        return Scores(torch.cat([p.total for p in parts]),
                      {k: [v for p in parts for v in p.per_rule[k]] for k in parts[0].per_rule},
                      {k: sum(p.errors[k] for p in parts) for k in parts[0].errors})

    def metrics(self) -> dict[str, float]:
        out = {"reward": self.total.mean().item()}
        for label, values in self.per_rule.items():
            valid = [v for v in values if v is not None]
            out[f"reward/{label}"] = sum(valid) / len(valid) if valid else float("nan")
            out[f"reward/{label}/errors"] = float(self.errors[label])
        return out


def resolve_rule(spec) -> Callable[[str, dict], Optional[float]]:
    """The callable for one `RewardSpec`, with its kwargs bound. Raises ValueError saying what to fix."""
    fn = _load_function(spec.fn)
    try:
        inspect.signature(fn).bind("completion", {}, **spec.kwargs)
    except TypeError as e:
        params = [p for p in inspect.signature(fn).parameters][2:]
        raise ValueError(f"kwargs {spec.kwargs} do not fit {fn.__name__}{inspect.signature(fn)} ({e}); "
                         f"its options are {params or 'none'}") from None
    return partial(fn, **spec.kwargs) if spec.kwargs else fn


def _load_function(ref: str) -> Callable:
    if ":" not in ref:
        if ref in rewards.BUILTINS:
            return rewards.BUILTINS[ref]
        near = difflib.get_close_matches(ref, rewards.BUILTINS, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"no built-in rule named {ref!r}.{hint} Built-ins: {', '.join(sorted(rewards.BUILTINS))}; "
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
            spec.loader.exec_module(module)
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


class Scorer:
    """Applies the configured rules to completions and forms the weighted total."""

    def __init__(self, specs):
        self.specs = list(specs)
        self.rules = [resolve_rule(s) for s in self.specs]
        self._reported: set[str] = set()

    def __call__(self, completions: list[str], examples: list[dict]) -> Scores:
        """Score completion i against examples[i]; both lists have N entries."""
        n = len(completions)
        total = torch.zeros(n, dtype=torch.float32)
        per_rule, errors = {}, {}
        for spec, rule in zip(self.specs, self.rules):
            values, failed = [], 0
            for text, example in zip(completions, examples):
                try:
                    value = rule(text, example)
                except Exception:  # one bad sample must not end the run: it is counted and logged below
                    failed += 1
                    self._report(spec.label, traceback.format_exc())
                    value = None
                values.append(_check_value(spec.label, value))
            per_rule[spec.label], errors[spec.label] = values, failed
            total += spec.weight * torch.tensor([0.0 if v is None else v for v in values])
        return Scores(total=total, per_rule=per_rule, errors=errors)

    def _report(self, label: str, tb: str) -> None:
        if label not in self._reported:
            self._reported.add(label)
            print(f"reward rule {label!r} raised; the sample scores None and is counted in "
                  f"reward/{label}/errors. First traceback:\n{tb}", file=sys.stderr)


def _check_value(label: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"reward rule {label!r} returned {value!r} ({type(value).__name__}); "
                        "a rule must return a float or None")
    if not math.isfinite(value):
        raise ValueError(f"reward rule {label!r} returned {value}; a rule must return a finite float or None")
    return float(value)
