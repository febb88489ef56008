"""Held-out evaluation: greedy pass@1 of the policy on prompts it is not trained on, and pass@k on request.
Besides the numbers it keeps the first few greedy completions, so a reader sees what the model writes.
Used during training and by `grpo eval` (grpo.commands.evaluate); samples through a rollout engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo.rollout.base import Sampling
from grpo.tools.runner import total_calls

SAMPLES = 2  # greedy completions kept for printing


@dataclass
class Evaluation:
    metrics: dict[str, float]
    samples: list[dict]  # the first SAMPLES prompts: {"question", "answer", "completion", "score"}


def format_samples(columns: dict[str, list[dict]]) -> str:
    """Sample completions as indented lines, one column per label ("before", "after", ...) over the same prompts."""
    lines = []
    for i, first in enumerate(next(iter(columns.values()))):
        lines.append(f"  {first['question']!r} (gold {first['answer']})")
        width = max(len(label) for label in columns)
        for label, samples in columns.items():
            lines.append(f"    {label:<{width}}  {samples[i]['completion']!r} -> {samples[i]['score']}")
    return "\n".join(lines)


def evaluate(engine, examples: list[dict], scorer, rollout_cfg, eval_cfg) -> Evaluation:
    """Greedy completions for `examples` from the rollout engine `engine` (synced to the model to evaluate),
    scored by the configured rules.

    Metrics: eval/accuracy (mean of the rule named eval_cfg.reward over greedy completions; a sample the rule
    failed on counts as not correct and in eval/errors, one the rule does not apply to (None) is left out),
    eval/errors, eval/reward (mean weighted total), eval/reward/<rule> (mean of each configured rule over the
    samples it returned a number for: format compliance under a `format` rule), eval/completion_length, with tools
    eval/tool_calls_per_completion (calls the model made, valid or not, per greedy completion), and with
    eval_cfg.pass_k = k > 0,
    eval/pass@k: the fraction of prompts for which at least one of k sampled completions (rollout
    temperature) scores > 0 on that rule.
    """
    totals, key_rule, lengths, passed, samples, errors = [], [], [], [], [], 0
    per_rule: dict[str, list[float]] = {}
    tool_calls = None  # with tools: calls the greedy completions made
    k = eval_cfg.pass_k
    for start in range(0, len(examples), eval_cfg.batch_size):
        batch = examples[start:start + eval_cfg.batch_size]
        prompts = [e["prompt"] for e in batch]
        rollouts = engine.generate(prompts, Sampling.from_config(rollout_cfg, 1, greedy=True))
        scores = scorer(rollouts.texts, batch, rollouts.model_tokens.sum(dim=1).tolist(), training=False)
        errors += scores.errors[eval_cfg.reward]
        totals.append(scores.total)
        key_rule += scores.per_rule[eval_cfg.reward]
        for label, values in scores.per_rule.items():
            per_rule.setdefault(label, []).extend(v for v in values if v is not None)
        samples += [{"question": e.get("question", e["prompt"]), "answer": e["answer"], "completion": rollouts.shown(i),
                     "score": value} for i, (e, value) in
                    enumerate(zip(batch, scores.per_rule[eval_cfg.reward]))][:SAMPLES - len(samples)]
        lengths.append(rollouts.completion_mask.sum(dim=1).float())
        if rollouts.tool_counts is not None:
            tool_calls = (tool_calls or 0) + total_calls(rollouts.tool_counts)
        if k > 0:
            sampled = engine.generate(prompts, Sampling.from_config(rollout_cfg, k))
            values = scorer(sampled.texts, [e for e in batch for _ in range(k)],
                            training=False).per_rule[eval_cfg.reward]
            passed += [any((v or 0) > 0 for v in values[i * k:(i + 1) * k]) for i in range(len(batch))]
    scored = [v for v in key_rule if v is not None]
    graded = len(scored) + errors  # a sample the rule failed on counts as not correct
    metrics = {
        "eval/accuracy": sum(scored) / graded if graded else float("nan"),
        "eval/errors": float(errors),
        "eval/reward": torch.cat(totals).mean().item(),
        "eval/completion_length": torch.cat(lengths).mean().item(),
        **{f"eval/reward/{label}": sum(values) / len(values) for label, values in per_rule.items() if values},
    }
    if tool_calls is not None:
        metrics["eval/tool_calls_per_completion"] = tool_calls / len(examples)
    if k > 0:
        metrics[f"eval/pass@{k}"] = sum(passed) / len(passed)
    return Evaluation(metrics, samples)
