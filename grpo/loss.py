"""Kept import path: the policy loss lives in grpo.algo.loss."""

from grpo.algo.loss import LOSS_TYPES, kl_per_token, policy_loss  # noqa: F401
