"""The rollout engine interface: what the training loop asks of whatever samples completions.

An engine turns prompts into `Rollouts` (token ids, masks, texts) under `Sampling` parameters, and is told
when the policy's weights changed (`sync_weights`). The built-in engine (grpo.rollout.builtin) decodes with
the policy itself; an engine with its own copy of the weights (vLLM, a server) loads them in sync_weights.
Engines know nothing of rewards, losses or how the policy is placed on processes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Sampling:
    """How to sample: `n` completions per prompt, at most `max_completion_length` tokens each."""

    n: int
    max_completion_length: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    seeds: tuple[int, ...] | None = None  # one per completion (len(prompts) * n): each its own random stream
    logprobs: bool = False  # also return each sampled token's log-prob (Rollouts.logprobs)

    @classmethod
    def from_config(cls, rollout_cfg, n: int, greedy: bool = False, seeds=None, logprobs: bool = False) -> "Sampling":
        return cls(n=n, max_completion_length=rollout_cfg.max_completion_length, temperature=rollout_cfg.temperature,
                   top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k, greedy=greedy,
                   seeds=None if seeds is None else tuple(seeds), logprobs=logprobs)


@dataclass
class Rollouts:
    """N = B * G completions, ordered group by group (the G completions of prompt 0 first)."""

    prompt_ids: torch.Tensor  # [N, P] left-padded prompt tokens, each prompt repeated G times
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T] right-padded completion tokens
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the first EOS
    truncated: torch.Tensor  # [N] bool: no EOS within max_completion_length
    texts: list[str]  # N decoded completions, special tokens removed
    prompts: list[str]  # N prompt texts (each repeated G times)
    decode_rows: list | None = None  # per decoding forward t: the rows [n_t] whose completion token t it fed
    routes: dict | None = None  # mixture-of-experts: router name -> experts chosen while decoding [N, T, k], -1 unfed
    logprobs: torch.Tensor | None = None  # [N, T] the sampler's log-probs of the completion tokens, when it reports them
    # multi-turn rollouts with tools (grpo.rollout.multiturn):
    sampled_mask: torch.Tensor | None = None  # [N, T] 1 on tokens the model sampled (None: all of the completion)
    transcripts: list[str] | None = None  # N whole completions, tool results included (texts: the model's own)
    tool_counts: dict[str, float] | None = None  # sums behind the tools/* metrics, over the whole batch
    draft_counts: dict[str, int] | None = None  # speculative rollouts: drafted, accepted, forwards, tokens

    def select(self, rows: torch.Tensor) -> "Rollouts":
        """The rollouts at `rows` (a [K] index tensor), in that order (tool counts stay the batch's)."""
        idx = rows.tolist()
        return Rollouts(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
                        self.completion_mask[rows], self.truncated[rows], [self.texts[i] for i in idx],
                        [self.prompts[i] for i in idx], logprobs=None if self.logprobs is None else self.logprobs[rows],
                        sampled_mask=None if self.sampled_mask is None else self.sampled_mask[rows],
                        transcripts=None if self.transcripts is None else [self.transcripts[i] for i in idx],
                        tool_counts=self.tool_counts, draft_counts=self.draft_counts)

    @property
    def model_tokens(self) -> torch.Tensor:
        """[N, T] 1 on the completion's tokens that the model sampled (all of them without tools)."""
        return self.completion_mask if self.sampled_mask is None else self.completion_mask * self.sampled_mask

    def shown(self, i: int) -> str:
        """Completion i as logs show it: with its tool results when it has them."""
        return self.texts[i] if self.transcripts is None else self.transcripts[i]


def concat_rollouts(parts: list[Rollouts], pad_token_id: int) -> Rollouts:
    """One Rollouts from several: prompts re-padded on the left, completions on the right. A single part is
    returned as it is (with what the engine and hooks attached: decode rows, routes, log-probs)."""
    if len(parts) == 1:
        return parts[0]
    P = max(r.prompt_ids.shape[1] for r in parts)
    T = max(r.completion_ids.shape[1] for r in parts)

    def pad(x: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
        extra = x.new_full((x.shape[0], width - x.shape[1]), value)
        return torch.cat([extra, x] if left else [x, extra], dim=1)

    return Rollouts(
        prompt_ids=torch.cat([pad(r.prompt_ids, P, pad_token_id, True) for r in parts]),
        prompt_mask=torch.cat([pad(r.prompt_mask, P, 0, True) for r in parts]),
        completion_ids=torch.cat([pad(r.completion_ids, T, pad_token_id, False) for r in parts]),
        completion_mask=torch.cat([pad(r.completion_mask, T, 0, False) for r in parts]),
        truncated=torch.cat([r.truncated for r in parts]),
        texts=[t for r in parts for t in r.texts],
        prompts=[p for r in parts for p in r.prompts],
        logprobs=(torch.cat([pad(r.logprobs, T, 0, False) for r in parts])
                  if all(r.logprobs is not None for r in parts) else None),
        sampled_mask=(torch.cat([pad(r.sampled_mask, T, 0, False) for r in parts])
                      if all(r.sampled_mask is not None for r in parts) else None),
        transcripts=[t for r in parts for t in r.transcripts] if all(r.transcripts for r in parts) else None,
        tool_counts=({k: sum(r.tool_counts.get(k, 0.0) for r in parts) for r in parts for k in r.tool_counts}
                     if all(r.tool_counts is not None for r in parts) else None),
        draft_counts=({k: sum(r.draft_counts[k] for r in parts) for k in parts[0].draft_counts}
                      if all(r.draft_counts is not None for r in parts) else None),
    )


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
    no_eos = torch.full_like(is_eos[:, 0], T, dtype=torch.long)
    first_eos = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1), no_eos)
    positions = torch.arange(T, device=completion_ids.device).unsqueeze(0)
    mask = (positions <= first_eos.unsqueeze(1)).long()
    return mask, ~is_eos.any(dim=1)


class RolloutEngine(Protocol):
    startup_seconds: float  # how long the engine took to start (0 for one that samples with the policy itself)

    def generate(self, prompts: list[str], sampling: Sampling) -> Rollouts:
        """len(prompts) * sampling.n completions, ordered prompt by prompt."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """From now on sample from `model` (the causal LM with whole weights) as it is now."""

    def close(self) -> None:
        """Free what the engine holds (processes, memory); called once at the end of a run."""


def completion_seed(seed: int, step: int, round_: int, index: int) -> int:
    """The random stream of completion `index` of the global batch in rollout round `round_` of `step`: the
    same whatever the number of processes."""
    digest = hashlib.blake2b(f"{seed}/{step}/{round_}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
