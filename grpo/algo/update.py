"""The update: one optimizer step on a TrainBatch, gradients accumulated over micro-batches.

Each micro-batch's loss is normalised by the whole batch's completion and token counts (grpo.algo.loss),
so the summed gradient equals that of one pass over the whole batch. How the backward pass, the gradient
sync and the optimizer step run is the backend's business (grpo.backend).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch

from grpo.algo.kl import KLPenalty
from grpo.algo.loss import policy_loss
from grpo.hooks.base import StepHook
from grpo.modeling.logprobs import rollout_logprobs


def update(models, batch, cfg, backend, hooks: StepHook) -> dict[str, float]:
    """One optimizer step on all N completions of `batch`; returns the loss, grad_norm, skipped_update and
    the token-weighted loss metrics."""
    num_tokens = backend.sum(batch.loss_mask.sum().float()) / backend.num_processes
    with hooks.update(models.policy):
        metrics = accumulate_gradients(models.policy, batch, cfg, autocast=backend.autocast,
                                       backward=backend.backward, no_sync=backend.accumulating,
                                       num_tokens=num_tokens, hooks=hooks)
    metrics["grad_norm"], skipped = backend.step(cfg.optim.max_grad_norm, math.isfinite(metrics["loss"]))
    metrics["skipped_update"] = float(skipped)
    metrics.update(hooks.after_step(skipped))
    return metrics


def accumulate_gradients(policy, batch, cfg, *, autocast=contextlib.nullcontext, backward=torch.Tensor.backward,
                         no_sync=contextlib.nullcontext, num_tokens: float | None = None,
                         hooks: StepHook = StepHook()) -> dict[str, float]:
    """Backpropagate the loss of this process's N completions of `batch` (a TrainBatch), micro-batch by
    micro-batch, into .grad.

    Under data parallelism (gradients averaged over W processes), `num_tokens` is the global token count / W,
    so `dapo` normalises by the global batch; `bnpo` uses this process's tokens. `no_sync` defers the gradient
    all-reduce to the last micro-batch. Returns the loss and token-weighted metrics.
    """
    a, mb, kl = cfg.algorithm, cfg.train.micro_batch_size, KLPenalty.from_config(cfg.algorithm)
    local_tokens = batch.loss_mask.sum().item()
    totals: dict[str, float] = defaultdict(float)
    starts = range(0, batch.advantages.shape[0], mb)
    for start in starts:
        rows = slice(start, start + mb)
        mask, entropy = batch.loss_mask[rows], []
        with no_sync() if start != starts[-1] else contextlib.nullcontext():  # forward and backward unsynced
            with autocast(), hooks.micro_batch(policy, batch, rows):
                logprobs = rollout_logprobs(policy, batch, rows, batch.group_size, cfg.rollout.temperature,
                                            share_prompt=cfg.train.share_prompt, entropy=entropy)
            loss, metrics = policy_loss(
                logprobs, logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs[rows],
                batch.advantages[rows], mask,
                ref_logprobs=None if batch.ref_logprobs is None else batch.ref_logprobs[rows],
                beta=kl.loss_beta, epsilon_low=a.epsilon, epsilon_high=a.epsilon_high, loss_type=a.loss_type,
                max_completion_length=cfg.rollout.max_completion_length, kl_estimator=a.kl_estimator,
                importance_level=a.importance_level, num_sequences=batch.advantages.shape[0],
                num_tokens=local_tokens if num_tokens is None else num_tokens, local_tokens=local_tokens,
                rollout_logprobs=None if batch.rollout_logprobs is None else batch.rollout_logprobs[rows],
                rollout_correction=a.rollout_correction, rollout_correction_cap=a.rollout_correction_cap,
                entropies=None if batch.entropies is None else batch.entropies[rows],
                entropy_threshold=batch.entropy_threshold, off_policy_mask_threshold=a.off_policy_mask_threshold,
                kl_is_correction=a.kl_is_correction)
            backward(loss)
        share = mask.sum().item() / max(local_tokens, 1)  # token-weighted average of the micro-batch metrics
        totals["loss"] += loss.item()
        totals["entropy"] += (entropy[0] * mask).sum().item() / max(local_tokens, 1)
        for k, v in metrics.items():  # maxima stay maxima
            totals[k] = max(totals.get(k, v), v) if k.endswith("_max") else totals[k] + v * share
    return dict(totals)
