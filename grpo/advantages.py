"""Kept import path: the advantage functions live in grpo.algo.advantages."""

from grpo.algo.advantages import (group_advantages, informative_groups, overlong_penalty, sequence_kl,  # noqa: F401
                                  zero_std_fraction)
