"""Rollout: the only place that generates. A faster backend (vLLM, say) replaces this module alone.

Samples G completions per prompt with transformers' `generate` and returns them as token ids with masks.
Knows nothing of rewards or losses.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import GenerationConfig


@dataclass
class Rollouts:
    """N = B * G completions, ordered group by group (the G completions of prompt 0 first)."""

    prompt_ids: torch.Tensor  # [N, P] left-padded prompt tokens, each prompt repeated G times
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T] right-padded completion tokens
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the first EOS
    truncated: torch.Tensor  # [N] bool: no EOS within max_completion_length
    texts: list[str]  # N decoded completions, special tokens removed

    @property
    def input_ids(self) -> torch.Tensor:  # [N, P + T]
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # [N, P + T]
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [N, T] that keeps tokens up to and including the first EOS, and the truncated flags [N].

    Built from positions, not from pad ids, so a real EOS stays in the mask even when pad == eos.
    Example: ids [[5, 2, 2], [5, 6, 7]] with eos 2 -> mask [[1, 1, 0], [1, 1, 1]], truncated [False, True].
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    T = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    positions = torch.arange(T, device=completion_ids.device).unsqueeze(0)
    mask = (positions <= first_eos.unsqueeze(1)).long()
    return mask, ~is_eos.any(dim=1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], num_generations: int, cfg, *, greedy: bool = False,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Rollouts:
    """Sample `num_generations` completions for each prompt under `cfg` (a RolloutConfig).

    greedy=True decodes deterministically (for evaluation). `autocast` makes the mixed-precision context
    to generate in (e.g. `accelerator.autocast`). Generation stops as soon as every sequence
    has produced an EOS.
    """
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_ids = enc["input_ids"].repeat_interleave(num_generations, dim=0)  # [N, P]
    prompt_mask = enc["attention_mask"].repeat_interleave(num_generations, dim=0)  # [N, P]
    eos_ids = eos_token_ids(tokenizer, model)
    gen_cfg = GenerationConfig(
        max_new_tokens=cfg.max_completion_length,
        do_sample=not greedy,
        temperature=cfg.temperature if not greedy else None,
        top_p=cfg.top_p if not greedy else None,
        top_k=(cfg.top_k or None) if not greedy else None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    with autocast():
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_cfg)
    model.train(was_training)
    P = prompt_ids.shape[1]
    completion_ids = out[:, P:]
    mask, truncated = completion_mask(completion_ids, eos_ids)
    texts = tokenizer.batch_decode(completion_ids * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
    return Rollouts(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=mask,
        truncated=truncated,
        texts=texts,
    )
