"""Features that join the training step at named points (grpo.hooks.base): mixture-of-experts routing, the MTP
module kept in step with the policy."""

from __future__ import annotations

from grpo.hooks.base import Hooks, StepHook
from grpo.hooks.moe import MoEHook, RouterProbe

__all__ = ["Hooks", "StepHook", "make_hooks"]


def make_hooks(model, cfg, backend, mtp: StepHook | None = None) -> Hooks:
    """The hooks that apply to `model` (the causal LM) under `cfg`; `mtp`: model.mtp's hook (grpo.hooks.mtp)."""
    hooks: list[StepHook] = []
    if RouterProbe(model).routers:
        hooks.append(MoEHook(cfg, backend))
    if mtp is not None:
        hooks.append(mtp)
    return Hooks(hooks)
