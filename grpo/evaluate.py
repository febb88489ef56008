"""Held-out evaluation: greedy pass@1 of the policy on prompts it is not trained on."""

from __future__ import annotations

import contextlib

import torch

from grpo.rollout import generate


def evaluate(model, tokenizer, examples: list[dict], scorer, rollout_cfg, eval_cfg, autocast=contextlib.nullcontext) -> dict[str, float]:
    """Greedy completions for `examples`, scored by the configured rules.

    Returns eval/accuracy (mean of the rule named eval_cfg.reward, None scores left out), eval/reward
    (mean weighted total) and eval/completion_length.
    """
    totals, key_rule, lengths = [], [], []
    for start in range(0, len(examples), eval_cfg.batch_size):
        batch = examples[start:start + eval_cfg.batch_size]
        rollouts = generate(model, tokenizer, [e["prompt"] for e in batch], 1, rollout_cfg, greedy=True, autocast=autocast)
        scores = scorer(rollouts.texts, batch, rollouts.completion_mask.sum(dim=1).tolist())
        totals.append(scores.total)
        key_rule += scores.per_rule[eval_cfg.reward]
        lengths.append(rollouts.completion_mask.sum(dim=1).float())
    scored = [v for v in key_rule if v is not None]
    return {
        "eval/accuracy": sum(scored) / len(scored) if scored else float("nan"),
        "eval/reward": torch.cat(totals).mean().item(),
        "eval/completion_length": torch.cat(lengths).mean().item(),
    }
