"""Group sampling for a step: draw prompts, have the rollout engine sample G completions each, score them.

With algorithm.dynamic_sampling (DAPO), groups whose rewards are all equal are dropped and more prompts are
drawn, up to algorithm.max_sampling_rounds rounds, until the batch has B informative groups.
"""

from __future__ import annotations

import math

import torch

from grpo.algo.advantages import informative_groups
from grpo.rollout.base import Sampling, completion_seed, concat_rollouts
from grpo.scoring.scorer import Scores
from grpo.tools.runner import total_calls


def collect(engine, model, sampler, scorer, hooks, backend, cfg, step: int, timer):
    """(Rollouts, Scores, metrics) of this process's share of the step's B * G completions.

    Each process generates and scores its share of the prompts; each completion samples from its own random
    stream, seeded by (seed, step, round, its index in the global batch), so the batch is the same whatever
    the number of processes. `model` is the causal LM the engine samples from (for the hooks)."""
    B, G = cfg.train.prompts_per_step, cfg.rollout.num_generations
    W, rank, dynamic = backend.num_processes, backend.rank, cfg.algorithm.dynamic_sampling
    kept_rollouts, kept_scores, drawn, dropped, metrics = [], [], 0, 0, {}
    for round_ in range(cfg.algorithm.max_sampling_rounds if dynamic else 1):
        needed = B - sum(s.total.shape[0] for s in kept_scores) // G
        drawn += needed
        share = needed // W
        batch = sampler.next_batch(needed)[rank * share:(rank + 1) * share]
        first = rank * share * G
        seeds = [completion_seed(cfg.train.seed, step, round_, first + i) for i in range(share * G)]
        with timer("rollout"), hooks.rollout(model):
            sampling = Sampling.from_config(cfg.rollout, G, seeds=seeds, logprobs=True)
            rollouts = engine.generate([e["prompt"] for e in batch], sampling)
        with timer("rewards"):
            scores = scorer(rollouts.texts, [e for e in batch for _ in range(G)],
                            rollouts.model_tokens.sum(dim=1).tolist())
        if dynamic:
            groups = informative_groups(scores.total, G)
            dropped += needed - groups.numel()
            rows = (groups.unsqueeze(1) * G + torch.arange(G)).reshape(-1)
            rollouts, scores = rollouts.select(rows.to(rollouts.prompt_ids.device)), scores.select(rows)
        kept_rollouts.append(rollouts)
        kept_scores.append(scores)
        if sum(s.total.shape[0] for s in kept_scores) // G == B:
            break
    if dynamic:
        metrics = {"sampling/groups_drawn": float(drawn), "sampling/groups_dropped": float(dropped),
                   "sampling/groups_trained": float(drawn - dropped)}
    else:  # one round: the hooks may read it whole (mixture-of-experts routes)
        metrics = hooks.after_rollout(model, rollouts)
    return concat_rollouts(kept_rollouts, engine.tokenizer.pad_token_id), Scores.concat(kept_scores), metrics


def rollout_metrics(rollouts, scores: Scores, backend) -> dict[str, float]:
    """Reward, per-rule and length metrics over every process's completions."""
    lengths = backend.gather(rollouts.completion_mask.sum(dim=1).float())
    return {**gather_scores(scores, backend).metrics(), "completion_length": lengths.mean().item(),
            "truncated_ratio": backend.gather(rollouts.truncated.float()).mean().item(),
            **tool_metrics(rollouts.tool_counts, backend), **draft_metrics(rollouts.draft_counts)}


def draft_metrics(counts: dict[str, int] | None) -> dict[str, float]:
    """rollout/mtp_acceptance (accepted drafts / drafts) and rollout/tokens_per_forward (completion tokens /
    the policy's forward passes per row, the prompt's included), for speculative rollouts."""
    if counts is None:
        return {}
    return {"rollout/mtp_acceptance": counts["accepted"] / max(counts["drafted"], 1),
            "rollout/tokens_per_forward": counts["tokens"] / max(counts["forwards"], 1)}


def tool_metrics(counts: dict[str, float] | None, backend) -> dict[str, float]:
    """tools/calls_per_completion, tools/turns (mean turns per completion), tools/result_tokens_fraction (tool
    result tokens / completion tokens) and tools/<name>/calls, tools/<name>/errors, summed over processes.
    Collective when `counts` is given (every process has tools or none has)."""
    if counts is None:
        return {}
    keys = sorted(counts)
    total = dict(zip(keys, backend.sum_tensor(torch.tensor([counts[k] for k in keys])).tolist()))
    out = {k: v for k, v in total.items() if not k.startswith("tools/_")}
    out.update({"tools/calls_per_completion": total_calls(total) / max(total["tools/_completions"], 1.0),
                "tools/turns": total["tools/_turns"] / max(total["tools/_completions"], 1.0),
                "tools/result_tokens_fraction": total["tools/_result_tokens"] / max(total["tools/_tokens"], 1.0)})
    return out


def gather_scores(scores: Scores, backend) -> Scores:
    """The scores of every process (sub-metrics stay this process's)."""
    if backend.num_processes == 1:
        return scores
    nan = float("nan")
    per_rule = {k: [None if math.isnan(v) else v
                    for v in backend.gather(torch.tensor([nan if v is None else v for v in values])).tolist()]
                for k, values in scores.per_rule.items()}
    errors = {k: int(backend.sum(torch.tensor(n))) for k, n in scores.errors.items()}  # integers summed exactly
    return Scores(backend.gather(scores.total), per_rule, errors, scores.sub_metrics)
