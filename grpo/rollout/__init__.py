"""Rollout engines: prompts in, sampled completions (Rollouts) out."""

from grpo.rollout.base import (Rollouts, RolloutEngine, Sampling, completion_mask, completion_seed,  # noqa: F401
                               concat_rollouts, eos_token_ids)
from grpo.rollout.builtin import BuiltinEngine, ToolUse, generate, sample_tokens  # noqa: F401


def make_engine(cfg, model, tokenizer, autocast, mtp=None) -> RolloutEngine:
    """The engine cfg.rollout.engine names, sampling from `model` (a causal LM with whole weights); `mtp`: an
    MTP module to draft with (rollout.speculative=mtp)."""
    if cfg.rollout.engine == "builtin":
        from grpo.rollout.speculative import MTPDrafter

        lora = cfg.model.lora
        return BuiltinEngine(tokenizer, autocast, model, merge_adapters=lora is not None and lora.merged_generation,
                             tools=ToolUse.from_config(cfg, tokenizer) if cfg.tools else None,
                             drafter=None if mtp is None else MTPDrafter(mtp))
    from grpo.rollout.vllm import VLLMEngine

    from grpo.backend.accelerator import resolved_precision

    return VLLMEngine(model, tokenizer, cfg.rollout, cfg.data.max_prompt_length, cfg.train.seed,
                      resolved_precision(cfg.train))
