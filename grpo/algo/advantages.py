"""Group-relative advantages: each completion's reward measured against the other completions of its prompt.

Pure tensor functions; rewards arrive flat, ordered group by group (the G completions of prompt 0, then of
prompt 1, ...), with N = B * G entries.
"""

from __future__ import annotations

import torch

from grpo.algo.loss import kl_per_token


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
                     baseline: str = "mean") -> torch.Tensor:
    """A_i = (r_i - b_i) / (s + eps), one value per completion.

    rewards: [N] float, N = B * G, ordered group by group. group_size: G.
    baseline b_i: "mean" is the mean of the completion's group (GRPO); "rloo" the mean of the other G - 1
           rewards of its group (RLOO, leave-one-out): r_i - b_i = G / (G - 1) * (r_i - mean).
    scale s: "group" the unbiased (ddof 1) std of the completion's group's rewards (DeepSeekMath GRPO);
           "batch" the unbiased std of all N rewards; "centred_batch" the unbiased std of all N centred values
           r_i - b_i (REINFORCE++-baseline); "none" only centres (Dr. GRPO).
    A group whose rewards are all equal gives A = 0 for all its members (nothing to learn from it).

    Example, one group of 4: rewards [0.5, 1, 0, 2], mean 0.875, std sqrt(2.1875 / 3) = 0.853913,
    A = [-0.375, 0.125, -0.875, 1.125] / 0.854013 = [-0.439104, 0.146368, -1.024575, 1.317311].
    With baseline "rloo" and scale "none": r_i - (3.5 - r_i) / 3 = [-0.5, 0.166667, -1.166667, 1.5].
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be a flat tensor whose length is a multiple of group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)  # [B, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]
    if baseline == "rloo":
        if group_size < 2:
            raise ValueError("baseline 'rloo' needs at least 2 completions per group")
        centred = centred * (group_size / (group_size - 1))
    elif baseline != "mean":
        raise ValueError(f"baseline must be 'mean' or 'rloo', got {baseline!r}")
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.float().std() + eps)
    elif scale == "centred_batch":
        centred = centred / (centred.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch', 'centred_batch' or 'none', got {scale!r}")
    return centred.reshape(-1)  # [N]


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (they carry no learning signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(dim=1).values == grouped.min(dim=1).values).float().mean().item()


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, a reward term per completion: lengths [N] -> [N], values <= 0.

    0 for L <= max_length - buffer; -penalty * (L - (max_length - buffer)) / buffer inside the buffer; so
    -penalty at L = max_length. With buffer 0, only completions of max_length tokens get -penalty.
    Example: max_length 10, buffer 4, lengths [6, 8, 10] -> [0, -0.5, -1].
    """
    if buffer == 0:
        return torch.where(lengths >= max_length, -penalty, 0.0).float()
    start = max_length - buffer
    return (-penalty * (lengths.float() - start).clamp(min=0) / buffer).clamp(min=-penalty)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """KL(pi || pi_ref) of each completion, the sum of per-token estimates over its tokens: [N, T] -> [N].

    Used to put the KL penalty in the reward (r_i - beta * KL_i) instead of the loss.
    """
    return (kl_per_token(logprobs, ref_logprobs, estimator) * mask).sum(dim=1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Indices of the groups whose rewards are not all equal (DAPO dynamic sampling keeps these): [N] -> [K]."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(dim=1).values != grouped.min(dim=1).values).nonzero().squeeze(1)
