"""Features that join the training step at named points (grpo.hooks.base): mixture-of-experts routing."""

from __future__ import annotations

from grpo.hooks.base import Hooks, StepHook
from grpo.hooks.moe import MoEHook, RouterProbe

__all__ = ["Hooks", "StepHook", "make_hooks"]


def make_hooks(model, cfg, backend) -> Hooks:
    """The hooks that apply to `model` (the causal LM) under `cfg`."""
    hooks: list[StepHook] = []
    if RouterProbe(model).routers:
        hooks.append(MoEHook(cfg, backend))
    return Hooks(hooks)
