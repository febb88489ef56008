"""The training batch: what the update consumes, built from one step's rollouts and scores.

make_batch runs, in order: reward shaping (DAPO's overlong penalty, or truncated completions left out of
the loss), the no-gradient log-prob passes (pi_old when needed, with its token entropies and their batch
quantile when top_entropy_quantile > 0; pi_ref when beta > 0), the KL-in-reward
penalty when configured (grpo.algo.kl decides), and group-relative advantages over the global batch.
Shapes: N = B * G completions of this process, T completion tokens, P prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo.algo.advantages import group_advantages, overlong_penalty, zero_std_fraction
from grpo.algo.kl import KLPenalty
from grpo.algo.loss import masked_quantile
from grpo.modeling.logprobs import rollout_logprobs


@dataclass
class TrainBatch:
    """This process's N completions, group by group (the G completions of one prompt together)."""

    prompt_ids: torch.Tensor  # [N, P] left-padded prompt tokens
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T] right-padded completion tokens
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the first EOS (what the model attends to)
    loss_mask: torch.Tensor  # [N, T] the tokens the loss counts (truncated rows zeroed when masked)
    advantages: torch.Tensor  # [N] on the device
    rewards: torch.Tensor  # [N] shaped rewards on the CPU (what the advantages were computed from)
    group_size: int  # G
    old_logprobs: torch.Tensor | None = None  # [N, T] pi_old: num_iterations > 1 or the KL in the reward
    ref_logprobs: torch.Tensor | None = None  # [N, T] pi_ref: beta > 0
    rollout_logprobs: torch.Tensor | None = None  # [N, T] the sampler's, when the rollout engine reports them
    routes: dict | None = None  # mixture-of-experts: experts chosen while decoding (grpo.hooks.moe)
    entropies: torch.Tensor | None = None  # [N, T] pi_old's token entropies: top_entropy_quantile > 0
    entropy_threshold: float | None = None  # their quantile over the whole batch, every process


def shape_rewards(rewards: torch.Tensor, rollouts, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [N] after the overlong penalty, and the completion mask [N, T] the loss uses (truncated rows
    masked), as algorithm.truncated_completions says."""
    a, loss_mask = cfg.algorithm, rollouts.model_tokens  # tool results are context, never trained on
    if a.truncated_completions == "penalize":
        lengths = rollouts.completion_mask.sum(dim=1).cpu()
        rewards = rewards + overlong_penalty(lengths, cfg.rollout.max_completion_length, a.overlong_buffer,
                                             a.overlong_penalty)
    elif a.truncated_completions == "mask":
        loss_mask = loss_mask * (~rollouts.truncated).unsqueeze(1).long()
    return rewards, loss_mask


def no_grad_logprobs(model, rollouts, cfg, autocast, entropy: list | None = None) -> torch.Tensor:
    """Log-probs [N, T] of the rollouts under `model` without gradients, micro-batch by micro-batch. A list
    passed as `entropy` receives the token entropies [N, T]."""
    mb, G = cfg.train.micro_batch_size, cfg.rollout.num_generations
    parts = [] if entropy is not None else None
    with torch.no_grad(), autocast():
        logprobs = torch.cat([rollout_logprobs(model, rollouts, slice(start, start + mb), G, cfg.rollout.temperature,
                                               share_prompt=cfg.train.share_prompt, entropy=parts)
                              for start in range(0, rollouts.completion_ids.shape[0], mb)])
    if entropy is not None:
        entropy.append(torch.cat(parts).float())
    return logprobs


def batch_entropy_threshold(entropies: torch.Tensor, loss_mask: torch.Tensor, q: float, backend,
                            max_length: int) -> float:
    """masked_quantile at q of the entropies of every process's unmasked tokens (rows padded to max_length
    so that every process gathers the same shape)."""
    pad = max_length - entropies.shape[1]
    values = torch.nn.functional.pad(entropies.float(), (0, pad)).flatten()
    mask = torch.nn.functional.pad(loss_mask.float(), (0, pad)).flatten()
    return masked_quantile(backend.gather(values), backend.gather(mask), q)


def make_batch(rollouts, scores, models, cfg, backend) -> tuple[TrainBatch, dict[str, float]]:
    """The TrainBatch of this process's rollouts, and the metrics of its rewards over all processes
    (reward_shaped, reward_std, frac_zero_std_groups; kl when the KL penalty is in the reward)."""
    G, kl = cfg.rollout.num_generations, KLPenalty.from_config(cfg.algorithm)
    a = cfg.algorithm
    rewards, loss_mask = shape_rewards(scores.total, rollouts, cfg)
    entropy = [] if a.top_entropy_quantile > 0 else None  # pi_old's, in the same pass as its log-probs
    old, needs_old = None, kl.needs_old_logprobs(a.num_iterations)
    if needs_old or entropy is not None:
        old = no_grad_logprobs(models.policy, rollouts, cfg, backend.autocast, entropy)
        old = old if needs_old else None
    ref = None if models.reference is None else no_grad_logprobs(models.reference, rollouts, cfg, backend.autocast)
    metrics = {}
    if kl.in_reward:
        completion_kl = kl.completion_kl(old, ref, loss_mask)
        rewards = rewards - kl.beta * completion_kl
        totals = backend.mean_tensor(torch.stack([completion_kl.sum().float(), rollouts.completion_mask.sum().float()]))
        metrics["kl"] = (totals[0] / totals[1].clamp(min=1)).item()  # per token, over all processes
    all_rewards = backend.gather(rewards)  # every process's groups, in rank order
    n = rewards.shape[0]
    own = slice(backend.rank * n, (backend.rank + 1) * n)
    advantages = group_advantages(all_rewards, G, a.scale_rewards, baseline=a.baseline)[own].to(backend.device)
    metrics.update({"reward_shaped": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
                    "frac_zero_std_groups": zero_std_fraction(all_rewards, G)})
    batch = TrainBatch(rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids, rollouts.completion_mask,
                       loss_mask, advantages, rewards, G, old, ref, rollouts.logprobs, rollouts.routes)
    if entropy is not None:
        batch.entropies = entropy[0].to(backend.device)
        batch.entropy_threshold = batch_entropy_threshold(entropy[0], loss_mask, a.top_entropy_quantile, backend,
                                                          cfg.rollout.max_completion_length)
        metrics["entropy_threshold"] = batch.entropy_threshold
    return batch, metrics
