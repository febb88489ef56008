"""Hooks: named points of the training step where a feature that is not GRPO itself joins in, so the loop
has one call at each point instead of a branch per feature. Every method of `StepHook` does nothing by
default; `Hooks` calls each installed hook in turn.

    rollout(model)               context around generation (model: the causal LM with whole weights)
    after_rollout(model, r)      after one round of rollouts; may attach data to them; returns metrics
    micro_batch(policy, b, rows) context around one micro-batch's training forward
    update(policy)               context around one update's gradient passes
    after_step(skipped)          after the optimizer step (skipped: the update did not reach the weights);
                                 returns metrics
"""

from __future__ import annotations

import contextlib


class StepHook:
    def rollout(self, model):
        return contextlib.nullcontext()

    def after_rollout(self, model, rollouts) -> dict[str, float]:
        return {}

    def micro_batch(self, policy, batch, rows: slice):
        return contextlib.nullcontext()

    def update(self, policy):
        return contextlib.nullcontext()

    def after_step(self, skipped: bool) -> dict[str, float]:
        return {}


class Hooks(StepHook):
    """The installed hooks, called in order at each point."""

    def __init__(self, hooks: list[StepHook]):
        self.hooks = hooks

    def _all(self, method: str, *args) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for hook in self.hooks:
            stack.enter_context(getattr(hook, method)(*args))
        return stack

    def rollout(self, model):
        return self._all("rollout", model)

    def micro_batch(self, policy, batch, rows: slice):
        return self._all("micro_batch", policy, batch, rows)

    def update(self, policy):
        return self._all("update", policy)

    def after_rollout(self, model, rollouts) -> dict[str, float]:
        return {k: v for hook in self.hooks for k, v in hook.after_rollout(model, rollouts).items()}

    def after_step(self, skipped: bool) -> dict[str, float]:
        return {k: v for hook in self.hooks for k, v in hook.after_step(skipped).items()}
