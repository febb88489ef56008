"""The clipped GRPO policy loss with a KL penalty: a pure function of per-token log-probs, and the registry
of loss types (how per-token losses are aggregated into one number).

Shapes: N completions, T completion tokens (right-padded; `mask` marks real tokens, a final EOS included).
A new loss type is one function registered here with `@loss_type("name")`; the config accepts exactly the
registered names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Normalisers:
    """What a loss type may divide the summed per-token losses by. Counts are those of the whole accumulated
    batch (every micro-batch of the step), so micro-batch losses sum to the loss of the whole batch."""

    num_sequences: int  # N: this process's completions in the step
    local_tokens: float  # completion tokens of those N completions
    global_tokens: float  # completion tokens of the global batch / W processes (= local_tokens on one process)
    max_completion_length: int | None


Aggregation = Callable[[torch.Tensor, torch.Tensor, Normalisers], torch.Tensor]
Surrogate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def clipped_surrogate(logprobs, ratio, adv, epsilon_low: float, epsilon_high: float) -> torch.Tensor:
    """-min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A) per token   (PPO, GRPO)"""
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * adv, clipped * adv)


def cispo_surrogate(logprobs, ratio, adv, epsilon_low: float, epsilon_high: float) -> torch.Tensor:
    """-sg(min(ratio, 1 + epsilon_high)) * A * logprobs per token   (CISPO, MiniMax-M1): the importance weight
    is truncated and detached, so every token keeps its gradient -sg(w) * A * d logprobs. No lower bound."""
    return -(ratio.clamp(max=1 + epsilon_high).detach() * adv * logprobs)


@dataclass(frozen=True)
class LossType:
    aggregate: Aggregation  # token losses [N, T] -> the 0-dim loss
    surrogate: Surrogate = clipped_surrogate  # the policy term of each token
    needs_epsilon_high: bool = False  # refuse to run with epsilon_high unset


LOSS_TYPES: dict[str, LossType] = {}


def loss_type(name: str, surrogate: Surrogate = clipped_surrogate,
              needs_epsilon_high: bool = False) -> Callable[[Aggregation], Aggregation]:
    """Register fn(token_losses [N, T] (zero outside the mask), mask [N, T], Normalisers) -> 0-dim loss under
    `name`, with the per-token policy term `surrogate` (default: the clipped one). Names are never overwritten."""
    def register(fn: Aggregation) -> Aggregation:
        if name in LOSS_TYPES:
            raise ValueError(f"loss type {name!r} is already registered (registered: {', '.join(LOSS_TYPES)})")
        LOSS_TYPES[name] = LossType(fn, surrogate, needs_epsilon_high)
        return fn
    return register


@loss_type("grpo")
def _per_sequence_mean(token_losses, mask, n: Normalisers):
    """(1/N) sum_i (1/|o_i|) sum_t l_{i,t}   (DeepSeekMath)"""
    return (token_losses.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / n.num_sequences


@loss_type("bnpo")
def _local_token_mean(token_losses, mask, n: Normalisers):
    """sum_{i,t} l_{i,t} / sum_i |o_i|   (this process's tokens)"""
    return token_losses.sum() / max(float(n.local_tokens), 1.0)


@loss_type("dapo")
def _global_token_mean(token_losses, mask, n: Normalisers):
    """sum_{i,t} l_{i,t} / tokens of the global batch   (DAPO's token-level loss)"""
    return token_losses.sum() / max(float(n.global_tokens), 1.0)


loss_type("cispo", surrogate=cispo_surrogate, needs_epsilon_high=True)(_global_token_mean)  # aggregated like dapo


@loss_type("dr_grpo")
def _constant_normaliser(token_losses, mask, n: Normalisers):
    """sum_{i,t} l_{i,t} / (N * max_completion_length)   (Dr. GRPO: no length bias)"""
    if n.max_completion_length is None:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
    return token_losses.sum() / (n.num_sequences * n.max_completion_length)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman's estimators).

    With log r = log pi_ref - log pi_theta:
      k1 = -log r                 (unbiased, can be negative)
      k2 = (log r)^2 / 2          (biased, low variance)
      k3 = r - log r - 1          (unbiased, always >= 0; DeepSeekMath's choice)
    Example: logprobs -1, ref -2 -> log r = -1: k1 = 1, k2 = 0.5, k3 = e^-1 + 1 - 1 = 0.367879.
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.pow(2)
    if estimator == "k3":
        return torch.exp(log_r) - log_r - 1
    raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


ROLLOUT_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def rollout_correction_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                               correction: str = "none", cap: float = 2.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Weights for each token's policy loss that correct for the sampler (pi_rollout) differing from the
    trainer's pi_old on the same tokens, and the mismatch metrics. Nothing here carries gradient.

    old_logprobs, rollout_logprobs, mask: [N, T]. log rho_t = old_t - rollout_t; per completion,
    rho_seq = exp(mean over its tokens of log rho_t). With C = cap:
        none:              w = 1
        token_truncate:    w_t = min(rho_t, C)                         (truncated importance sampling)
        token_mask:        w_t = 1 if 1/C <= rho_t <= C else 0
        sequence_truncate: w_t = min(rho_seq, C) for every token of the completion
        sequence_mask:     w_t = 1 if 1/C <= rho_seq <= C else 0
    Metrics (masked means over tokens): rollout/mismatch_kl = mean(rollout_t - old_t) (a k1 estimate of
    KL(pi_rollout || pi_old) on the sampled tokens); rollout/is_ratio_mean and rollout/is_ratio_max of rho at
    the correction's level (token-level for none); rollout/masked_fraction of tokens given weight 0.
    Example: old [-1, -2], rollout [-1.5, -1], C 2: rho = [e^0.5, e^-1] = [1.6487, 0.3679]; token_truncate
    w = [1.6487, 0.3679]; token_mask w = [1, 0]; rho_seq = e^-0.25 = 0.7788; mismatch_kl = 0.25.
    Returns w [N, T] (zero outside the mask) and the metrics.
    """
    if correction not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout_correction must be one of {', '.join(ROLLOUT_CORRECTIONS)}, got {correction!r}")
    with torch.no_grad():
        mask = mask.to(old_logprobs.dtype)
        log_rho = (old_logprobs - rollout_logprobs) * mask  # [N, T]
        if correction.startswith("sequence"):
            log_rho = (log_rho.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)).expand_as(mask)
        rho = torch.exp(log_rho)
        if correction.endswith("truncate"):
            weights = rho.clamp(max=cap)
        elif correction.endswith("mask"):
            weights = ((rho >= 1 / cap) & (rho <= cap)).to(mask.dtype)
        else:
            weights = torch.ones_like(rho)
        weights = weights * mask
        real = mask.bool()
        metrics = {"rollout/mismatch_kl": _masked_mean(rollout_logprobs - old_logprobs, mask),
                   "rollout/is_ratio_mean": _masked_mean(rho, mask),
                   "rollout/is_ratio_max": rho[real].max().item() if real.any() else 1.0,
                   "rollout/masked_fraction": _masked_mean((weights == 0).to(mask.dtype), mask)}
    return weights, metrics


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    kl_estimator: str = "k3",
    importance_level: str = "token",
    num_sequences: int | None = None,
    num_tokens: float | None = None,
    local_tokens: float | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    rollout_correction: str = "none",
    rollout_correction_cap: float = 2.0,
    entropies: torch.Tensor | None = None,
    top_entropy_quantile: float = 0.0,
    entropy_threshold: float | None = None,
    off_policy_mask_threshold: float | None = None,
    kl_is_correction: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate minus a KL penalty, aggregated over tokens as `loss_type` says.

    logprobs, old_logprobs, ref_logprobs, mask: [N, T]; advantages: [N]. Per token t of completion i:
        ratio    = exp(logprobs - old_logprobs)                  (importance_level="token")
                   exp(mean_t(logprobs - old_logprobs)) per i     (importance_level="sequence", GSPO)
        l_{i,t}  = -min(ratio * A_i, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A_i) + beta * KL_{i,t}
    Aggregation: the registered LOSS_TYPES[loss_type], with |o_i| the tokens of completion i:
        grpo:    (1/N) sum_i (1/|o_i|) sum_t l_{i,t}          (DeepSeekMath)
        bnpo:    sum_{i,t} l_{i,t} / local_tokens             (this process's tokens, sum_i |o_i|)
        dapo:    sum_{i,t} l_{i,t} / num_tokens               (tokens of the whole accumulated, global batch / W)
        dr_grpo: sum_{i,t} l_{i,t} / (N * max_completion_length)
        cispo:   like dapo, with the policy term -sg(min(ratio, 1 + epsilon_high)) * A_i * logprobs (MiniMax-M1;
                 epsilon_high required)
    For gradient accumulation pass the whole batch's `num_sequences` (N), `num_tokens` and `local_tokens`
    (default: num_tokens, else this call's mask): the losses of the micro-batches then sum to the loss of the
    whole batch, for every loss_type.

    rollout_logprobs [N, T]: the sampler's log-probs of the same tokens. Each token's clipped surrogate is then
    multiplied by the weight `rollout_correction_weights(old_logprobs, rollout_logprobs, mask,
    rollout_correction, rollout_correction_cap)` gives (the KL term is not), and the rollout/* metrics are
    returned; rollout_correction "none" leaves the loss as it is.

    Masks of the policy term (the KL term is kept, the aggregation's denominators are unchanged):
    - top_entropy_quantile q > 0 with `entropies` [N, T] (the "80/20" high-entropy tokens): tokens whose
      entropy is below the threshold = `masked_quantile` of the unmasked tokens' entropies at q contribute 0.
      Pass `entropy_threshold` (computed once over the whole batch, every process) when this call sees a
      micro-batch; q = 0 changes nothing.
    - off_policy_mask_threshold delta (DeepSeek-V3.2): a completion with A_i < 0 and
      mean_t(old_logprobs - logprobs) > delta contributes 0. None disables.
    kl_is_correction (DeepSeek-V3.2): each token's KL estimate is multiplied by rho = exp(logprobs - old_logprobs),
      differentiated: with samples from pi_old, E[grad(rho * k3)] = grad KL(pi_theta || pi_ref), the KL the
      penalty means; without it (or with rho detached) E[grad k3] = grad KL(pi_ref || pi_theta), the other KL.
      On-policy rho = 1 but its gradient rho * grad logprobs is not 0, so this changes the update even there.

    Worked example (on-policy, beta 0, grpo): ratio = 1 everywhere, so the loss is -mean_i(A_i); with
    A = [1, -1, 2] and any mask with a token in each row, loss = -2/3.
    Returns the 0-dim loss and float metrics (clip ratios, mean KL when beta > 0).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    kind = LOSS_TYPES[loss_type]
    if kind.needs_epsilon_high and epsilon_high is None:
        raise ValueError(f"loss_type {loss_type!r} needs epsilon_high (its importance weight is truncated at "
                         f"1 + epsilon_high)")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logprobs.dtype)
    lengths = mask.sum(dim=1)  # [N]
    log_ratio = logprobs - old_logprobs  # [N, T]
    if importance_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(dim=1) / lengths.clamp(min=1)).unsqueeze(1)  # [N, 1]
    elif importance_level != "token":
        raise ValueError(f"importance_level must be 'token' or 'sequence', got {importance_level!r}")
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)  # [N, 1]
    per_token = kind.surrogate(logprobs, ratio, adv, epsilon_low, epsilon_high)  # [N, T] (or [N, 1])

    metrics: dict[str, float] = {}
    if rollout_logprobs is not None:
        weights, metrics = rollout_correction_weights(old_logprobs, rollout_logprobs, mask, rollout_correction,
                                                      rollout_correction_cap)
        if rollout_correction != "none":
            per_token = per_token * weights
    if top_entropy_quantile > 0 or entropy_threshold is not None:
        if entropies is None:
            raise ValueError("top_entropy_quantile needs the tokens' entropies")
        if entropy_threshold is None:
            entropy_threshold = masked_quantile(entropies, mask, top_entropy_quantile)
        high = (entropies >= entropy_threshold).to(mask.dtype)
        per_token = per_token * high
        metrics["entropy_kept_fraction"] = _masked_mean(high, mask)
    if off_policy_mask_threshold is not None:
        with torch.no_grad():
            drift = ((old_logprobs - logprobs.detach()) * mask).sum(dim=1) / lengths.clamp(min=1)  # [N]
            off_policy = (advantages.to(drift.device) < 0) & (drift > off_policy_mask_threshold)
        per_token = per_token * (~off_policy).to(mask.dtype).unsqueeze(1)
        metrics["off_policy_masked_fraction"] = off_policy.float().mean().item()
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs ref_logprobs")
        kl = kl_per_token(logprobs, ref_logprobs, kl_estimator)
        metrics["kl"] = _masked_mean(kl.detach(), mask)
        if kl_is_correction:
            kl = kl * torch.exp(logprobs - old_logprobs)
        per_token = per_token + beta * kl

    tokens = mask.sum().item() if num_tokens is None else num_tokens
    normalisers = Normalisers(num_sequences if num_sequences is not None else logprobs.shape[0],
                              tokens if local_tokens is None else local_tokens, tokens, max_completion_length)
    loss = kind.aggregate(per_token * mask, mask, normalisers)

    with torch.no_grad():
        r = ratio.expand_as(per_token)
        low = (r < 1 - epsilon_low) & (adv < 0)
        high = (r > 1 + epsilon_high) & (adv > 0)
        metrics["clip_ratio/low"] = _masked_mean(low.to(mask.dtype), mask)
        metrics["clip_ratio/high"] = _masked_mean(high.to(mask.dtype), mask)
        metrics["clip_ratio"] = metrics["clip_ratio/low"] + metrics["clip_ratio/high"]
    return loss, metrics


def masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> float:
    """The q-quantile of values[mask == 1], linearly interpolated as torch.quantile does (without its
    2^24-element limit): sorted v, position p = q * (n - 1), v[floor p] + (p - floor p) * (v[ceil p] - v[floor p]).
    Example: values [3, 1, 2, 10] with the last masked out, q 0.25 -> sorted [1, 2, 3], p 0.5 -> 1.5."""
    kept = values[mask.bool()].detach().float().sort().values
    if kept.numel() == 0:
        return 0.0
    p = q * (kept.numel() - 1)
    lo, hi = math.floor(p), math.ceil(p)
    return (kept[lo] + (p - lo) * (kept[hi] - kept[lo])).item()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return ((x * mask).sum() / mask.sum().clamp(min=1)).item()
