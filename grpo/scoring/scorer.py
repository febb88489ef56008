"""Scoring: apply the configured reward rules to completions and form the weighted total.

Owns fault isolation. A rule that raises on a sample, or runs past `scoring.timeout`, gives None for that
sample; the sample is counted in reward/<rule>/errors and the rule's first traceback is printed once. If a rule
fails on more than `scoring.max_error_fraction` of its samples over the last `scoring.error_window` steps,
the run stops with `RewardRuleError` and that traceback. A return value that is not a finite number, None, or
(number, {sub-metrics}) is an error naming the rule. At start-up each rule that declares canary samples
must score its correct sample above its wrong one. Rules run in worker processes (`grpo.scoring.pool`), or
in this process when `scoring.workers` is 0. Resolution of rules lives in `grpo.scoring.rules`; the rules in `rewards/`.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from grpo.scoring.pool import WorkerPool, run_task
from grpo.scoring.rules import Rule, canary_samples, resolve_rule


class RewardRuleError(RuntimeError):
    """A reward rule that is broken: failing too often, returning the wrong thing, or failing its canary."""


@dataclass
class Scores:
    """Rewards of N completions."""

    total: torch.Tensor  # [N] weighted sum over rules; a None counts as 0
    per_rule: dict[str, list[Optional[float]]]  # rule label -> N values (None: not applicable or failed)
    errors: dict[str, int]  # rule label -> samples on which the rule failed
    sub_metrics: dict[str, list[float]] = field(default_factory=dict)  # "rule/name" -> values returned beside rewards

    def select(self, rows: torch.Tensor) -> "Scores":
        """The scores at `rows` (a [K] index tensor), in that order; error counts stay those of the batch."""
        idx = rows.tolist()
        return Scores(self.total[rows], {k: [v[i] for i in idx] for k, v in self.per_rule.items()},
                      dict(self.errors), dict(self.sub_metrics))

    @staticmethod
    def concat(parts: list["Scores"]) -> "Scores":
        return Scores(torch.cat([p.total for p in parts]),
                      {k: [v for p in parts for v in p.per_rule[k]] for k in parts[0].per_rule},
                      {k: sum(p.errors[k] for p in parts) for k in parts[0].errors},
                      {k: [v for p in parts for v in p.sub_metrics.get(k, [])] for k in parts[0].sub_metrics})

    def metrics(self) -> dict[str, float]:
        out = {"reward": self.total.mean().item() if self.total.numel() else float("nan")}
        for label, values in self.per_rule.items():
            valid = [v for v in values if v is not None]
            out[f"reward/{label}"] = sum(valid) / len(valid) if valid else float("nan")
            out[f"reward/{label}/errors"] = float(self.errors[label])
            out[f"reward/{label}/none"] = float(len(values) - len(valid) - self.errors[label])  # did not apply
        for key, values in self.sub_metrics.items():
            out[f"reward/{key}"] = sum(values) / len(values) if values else float("nan")
        return out


class Scorer:
    """Scores completions with the configured rules; `close()` stops its worker processes."""

    def __init__(self, specs, cfg):
        self.rules: list[Rule] = [resolve_rule(s) for s in specs]
        self.cfg = cfg
        self.pool = WorkerPool(specs, cfg.workers, cfg.timeout) if cfg.workers > 0 else None
        self._first_traceback: dict[str, str] = {}
        self._history: deque = deque(maxlen=cfg.error_window)  # per step: {label: (errors, samples)}

    def __call__(self, completions: list[str], examples: list[dict], num_tokens: list[int] | None = None,
                 training: bool = True) -> Scores:
        """Score completion i against examples[i]; num_tokens[i], when given, reaches rules as
        example["completion_tokens"]. Only training batches (training=True) count towards the error window
        that stops a run; evaluation, generation and the hack probe report their errors without it."""
        if num_tokens is not None:
            examples = [{**e, "completion_tokens": n} for e, n in zip(examples, num_tokens)]
        outcomes = self._run(self.rules, completions, examples)
        total = torch.zeros(len(completions), dtype=torch.float32)
        per_rule, errors, sub_metrics = {}, {}, {}
        for rule, rule_outcomes in zip(self.rules, outcomes):
            values, failed = [], 0
            for kind, payload in rule_outcomes:
                if kind == "error":
                    failed += 1
                    if rule.label not in self._first_traceback:
                        self._first_traceback[rule.label] = payload
                        print(f"reward rule {rule.label!r} failed; the sample scores None and is counted in "
                              f"reward/{rule.label}/errors. First traceback:\n{payload}", file=sys.stderr)
                    values.append(None)
                    continue
                value, extra = _check_value(rule.label, payload)
                values.append(value)
                for name, number in extra.items():
                    sub_metrics.setdefault(f"{rule.label}/{name}", []).append(float(number))
            per_rule[rule.label], errors[rule.label] = values, failed
            total += rule.weight * torch.tensor([0.0 if v is None else v for v in values], dtype=torch.float32)
        if training:
            self._check_error_rate(errors, len(completions))
        return Scores(total=total, per_rule=per_rule, errors=errors, sub_metrics=sub_metrics)

    def check_canaries(self) -> None:
        """Each rule with canary samples must score its correct sample above every one of its wrong ones."""
        for rule in self.rules:
            if rule.canary is None:
                continue
            samples = canary_samples(rule)
            (good, _), wrongs = samples[0], samples[1:]
            outcomes = self._run([rule], [c for c, _ in samples], [e for _, e in samples])[0]
            scored = [_check_value(rule.label, p)[0] if kind == "ok" else None for kind, p in outcomes]
            for (bad, _), (kind, payload), value in zip(wrongs, outcomes[1:], scored[1:]):
                if scored[0] is None or value is None or scored[0] <= value:
                    good_detail = outcomes[0][1] if outcomes[0][0] == "error" else scored[0]
                    raise RewardRuleError(
                        f"reward rule {rule.label!r} ({rule.ref}) failed its canary: it should score {good!r} above "
                        f"{bad!r} but gave {good_detail!r} and {payload if kind == 'error' else value!r}. "
                        "Check the rule and its kwargs.")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _run(self, rules: list[Rule], completions: list[str], examples: list[dict]) -> list[list]:
        """Outcomes per rule, per completion: in worker processes, one task per sample (per batch for
        batched rules), or here when there is no pool."""
        if self.pool is None:
            return [_unbatch(rule, run_task(rule, completions, examples), len(completions)) for rule in rules]
        tasks, owners = [], []
        for k, rule in enumerate(rules):
            index = self.rules.index(rule)
            chunks = [(completions, examples)] if rule.batched else [([c], [e]) for c, e in zip(completions, examples)]
            tasks += [(index, cs, es) for cs, es in chunks]
            owners += [k] * len(chunks)
        per_rule: list[list] = [[] for _ in rules]
        for owner, outcome in zip(owners, self.pool.run(tasks)):
            per_rule[owner] += outcome
        return [_unbatch(rule, outcomes, len(completions)) for rule, outcomes in zip(rules, per_rule)]

    def _check_error_rate(self, errors: dict[str, int], samples: int) -> None:
        self._history.append({label: (n, samples) for label, n in errors.items()})
        for label in errors:
            failed = sum(step[label][0] for step in self._history)
            seen = sum(step[label][1] for step in self._history)
            if seen and failed / seen > self.cfg.max_error_fraction:
                raise RewardRuleError(
                    f"reward rule {label!r} failed on {failed} of {seen} samples over the last {len(self._history)} "
                    f"steps, more than scoring.max_error_fraction={self.cfg.max_error_fraction}. "
                    f"First traceback:\n{self._first_traceback.get(label, '')}")


def _unbatch(rule: Rule, outcomes: list, n: int) -> list:
    """Per-completion outcomes; a batched rule's single list of values is split and its length checked."""
    if not rule.batched or len(outcomes) != 1 or outcomes[0][0] != "ok":
        return outcomes
    values = outcomes[0][1]
    if len(values) != n:
        raise RewardRuleError(f"batched reward rule {rule.label!r} returned {len(values)} values for {n} completions; "
                              "it must return one value (or None) per completion")
    return [("ok", v) for v in values]


def _check_value(label: str, value) -> tuple[Optional[float], dict]:
    extra = {}
    if isinstance(value, tuple):
        if len(value) != 2 or not isinstance(value[1], dict):
            raise RewardRuleError(f"reward rule {label!r} returned a tuple {value!r}; a rule returns a float, None, "
                                  "or (float, {name: number}) with sub-metrics")
        value, extra = value
    if value is None:
        return None, extra
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RewardRuleError(f"reward rule {label!r} returned {value!r} ({type(value).__name__}); "
                              "a rule must return a float or None")
    if not math.isfinite(value):
        raise RewardRuleError(f"reward rule {label!r} returned {value}; a rule must return a finite float or None")
    return float(value), extra
