"""Rollout engines: prompts in, sampled completions (Rollouts) out."""

from grpo.rollout.base import (Rollouts, RolloutEngine, Sampling, completion_mask, completion_seed,  # noqa: F401
                               concat_rollouts, eos_token_ids)
from grpo.rollout.builtin import BuiltinEngine, generate, sample_tokens  # noqa: F401
