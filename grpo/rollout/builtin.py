"""The built-in rollout engine: generation with the policy itself, in this process.

Samples G completions per prompt with a KV-cached decoding loop over any transformers causal LM:
- each distinct prompt is prefilled once and its cache is repeated for its G completions;
- keys and values go into buffers sized for the whole generation, not re-concatenated at every step;
- finished rows leave the batch (their cache rows are dropped) once a quarter of the rows are done, and
  decoding stops when all have finished;
- sampling draws one uniform number per row and inverts the CDF of softmax(logits / temperature),
  after optional top-k / top-p filtering; greedy decoding takes the argmax.
Returns token ids with masks; knows nothing of rewards or losses. Other engines implement the same
interface (grpo.rollout.base.RolloutEngine).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.cache_utils import DynamicLayer

from grpo.modeling.logprobs import cache_arg, position_ids_from_mask
from grpo.modeling.lora import merged_weights
from grpo.rollout.base import Rollouts, Sampling, completion_mask, eos_token_ids


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer that writes new keys and values into a buffer sized for the whole generation,
    instead of concatenating a longer copy at every decoding step (the default layer's cost grows with
    the sequence). Attention reads a view of the filled part."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self.length = keys.shape[-2]
        self._k = keys.new_empty(*keys.shape[:-2], capacity, keys.shape[-1])
        self._v = values.new_empty(*values.shape[:-2], capacity, values.shape[-1])
        self._k[..., :self.length, :], self._v[..., :self.length, :] = keys, values
        self._expose()

    def _expose(self) -> None:
        self.keys, self.values = self._k[..., :self.length, :], self._v[..., :self.length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[-2]:
            raise RuntimeError(f"KV buffer of {self._k.shape[-2]} positions cannot take position {end}")
        self._k[..., self.length:end, :], self._v[..., self.length:end, :] = key_states, value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._k, self._v = self._k.repeat_interleave(repeats, dim=0), self._v.repeat_interleave(repeats, dim=0)
        self._expose()


def preallocate(cache, capacity: int) -> None:
    """Turn a prefilled cache's plain layers into PreallocatedLayers of `capacity` positions (a cache with
    layers of other kinds, sliding-window ones say, is left as it is)."""
    if all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
        cache.layers = [PreallocatedLayer(layer.keys, layer.values, capacity) for layer in cache.layers]


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  greedy: bool = False, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """One token per row of logits [n, V], drawn from softmax(logits / temperature) -> [n].

    top_k > 0 keeps the k most likely tokens; top_p < 1 keeps the smallest set of most likely tokens whose
    probability reaches top_p (`token_probs`). Sampling inverts the CDF with one uniform draw per row
    (`draw`); greedy takes the argmax.
    """
    if greedy:
        return logits.argmax(dim=-1)
    return draw(token_probs(logits, temperature, top_p, top_k), generators)


def token_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """The distribution [n, V] sampling draws from: softmax(logits / temperature), then top-k (keep the k most
    likely) and top-p (keep the smallest most-likely set whose mass reaches top_p) zero the rest, unnormalised
    after filtering (`draw` normalises by the row's total)."""
    scaled = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(scaled, min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before this token already >= p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    return probs


def draw(probs: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """One index per row of the non-negative weights probs [n, V], with probability weight / row total: the
    CDF inverted at one uniform draw per row, from that row's generator when `generators` are given (so a
    row's sample does not depend on the other rows), else from torch's global RNG."""
    cdf = probs.cumsum(dim=-1)
    u = uniform(cdf.shape[0], cdf.device, generators).unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.shape[-1] - 1)


def sampled_logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[token] per row [n]: the log-prob the sampler reports (no top-k/top-p)."""
    scaled = logits.float() / temperature
    return scaled.gather(1, tokens.unsqueeze(1)).squeeze(1) - torch.logsumexp(scaled, dim=-1)


def uniform(n: int, device, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """[n] uniform numbers in [0, 1), row i from generators[i] when given."""
    if generators is None:
        return torch.rand(n, device=device)
    return torch.cat([torch.rand(1, generator=g, device=device) for g in generators])


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], num_generations: int, cfg, *, greedy: bool = False,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             seeds: list[int] | None = None, logprobs: bool = False) -> Rollouts:
    """Sample `num_generations` completions for each prompt under `cfg` (a RolloutConfig).

    greedy=True decodes deterministically (for evaluation). `autocast` makes the mixed-precision context
    to generate in (e.g. `accelerator.autocast`). `seeds`, one per completion, give each completion its own
    random stream, so what it samples does not depend on the batch it shares (nor on how many processes
    split the batch); without them torch's global RNG is used. logprobs=True also returns each sampled token's
    log-prob under softmax(logits / temperature) as decoding computed it (Rollouts.logprobs; the trainer
    compares it with its own pass over the same tokens).
    """
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    G, eos_ids = num_generations, eos_token_ids(tokenizer, model)
    eos = torch.tensor(eos_ids, device=device)
    pad = tokenizer.pad_token_id
    cache_kwarg = cache_arg(model)
    was_training = model.training
    model.eval()
    with autocast():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    position_ids=position_ids_from_mask(enc["attention_mask"]), use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or out.past_key_values
        preallocate(cache, enc["input_ids"].shape[1] + cfg.max_completion_length)
        cache.batch_repeat_interleave(G)
        logits = out.logits[:, -1].repeat_interleave(G, dim=0)  # [n, V] for the n rows still running
        attention = enc["attention_mask"].repeat_interleave(G, dim=0)  # [n, P + t]
        positions = attention.sum(dim=1, keepdim=True)  # [n, 1]
        N = attention.shape[0]
        tokens = torch.full((N, cfg.max_completion_length), pad, dtype=torch.long, device=device)
        active = torch.arange(N, device=device)  # rows of `tokens` still in the batch
        finished = torch.zeros(N, dtype=torch.bool, device=device)  # per batch row: has produced an EOS
        generators = None if seeds is None else [torch.Generator(device).manual_seed(s) for s in seeds]
        decode_rows = []
        sampled_logprobs = torch.zeros(N, cfg.max_completion_length, device=device) if logprobs else None
        for t in range(cfg.max_completion_length):
            next_tokens = sample_tokens(logits, cfg.temperature, cfg.top_p, cfg.top_k, greedy, generators)  # [n]
            next_tokens = next_tokens.masked_fill(finished, pad)  # rows already done only pad
            tokens[active, t] = next_tokens
            if sampled_logprobs is not None:
                sampled_logprobs[active, t] = sampled_logprob(logits, next_tokens, cfg.temperature)
            finished |= torch.isin(next_tokens, eos)
            if t == cfg.max_completion_length - 1 or finished.all():
                break
            if finished.sum() * 4 >= finished.numel():  # a quarter of the rows are done: drop them from the batch
                keep = (~finished).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                active, next_tokens, attention, positions = active[keep], next_tokens[keep], attention[keep], positions[keep]
                finished = finished[keep]
                generators = None if generators is None else [generators[i] for i in keep.tolist()]
            attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
            decode_rows.append(active)
            out = model(input_ids=next_tokens.unsqueeze(1), attention_mask=attention, position_ids=positions,
                        use_cache=True, **{cache_kwarg: cache})
            logits, positions = out.logits[:, -1], positions + 1
    model.train(was_training)

    return finish_rollouts(tokens, eos_ids, tokenizer, enc, prompts, G, sampled_logprobs, decode_rows=decode_rows)


def finish_rollouts(tokens: torch.Tensor, eos_ids: list[int], tokenizer, enc, prompts: list[str], G: int,
                    sampled_logprobs: torch.Tensor | None, **extra) -> Rollouts:
    """Rollouts from decoded tokens [N, max_completion_length]: masks up to the first EOS, columns past the
    longest completion dropped, texts decoded; `extra` fields (decode rows, draft counts) passed on."""
    mask, truncated = completion_mask(tokens, eos_ids)
    T = int(mask.sum(dim=1).max())
    tokens, mask = tokens[:, :T], mask[:, :T]
    texts = tokenizer.batch_decode(tokens.masked_fill(mask == 0, tokenizer.pad_token_id), skip_special_tokens=True)
    return Rollouts(
        prompt_ids=enc["input_ids"].repeat_interleave(G, dim=0),
        prompt_mask=enc["attention_mask"].repeat_interleave(G, dim=0),
        completion_ids=tokens,
        completion_mask=mask,
        truncated=truncated,
        texts=texts,
        prompts=[p for p in prompts for _ in range(G)],
        logprobs=None if sampled_logprobs is None else sampled_logprobs[:, :T] * mask,
        **extra,
    )


@dataclass
class ToolUse:
    """Multi-turn rollouts with tools (grpo.rollout.multiturn): who runs the calls, how they are written, how
    many turns a completion may take."""

    runner: object  # grpo.tools.runner.ToolRunner
    layout: str  # template | plain (grpo.tools.calls)
    max_turns: int

    @classmethod
    def from_config(cls, cfg, tokenizer) -> "ToolUse":
        from grpo.tools.calls import resolve_layout
        from grpo.tools.runner import ToolRunner

        r = cfg.rollout
        return cls(ToolRunner(cfg.tools, r.tool_workers, r.tool_timeout, r.max_tool_result_chars),
                   resolve_layout(r.tool_format, tokenizer), r.max_turns)


class BuiltinEngine:
    """The RolloutEngine that decodes with the policy itself (`generate`): sync_weights only points it at the
    model, which shares the policy's memory (or is the whole-weight copy a sharded backend gathered). With a
    `drafter` (grpo.rollout.speculative) it decodes speculatively, with the same distribution.
    A model with LoRA adapters decodes with them merged into its weights when `merge_adapters`
    (grpo.modeling.lora.merged_weights; the weights are restored exactly after each call)."""

    startup_seconds = 0.0

    def __init__(self, tokenizer, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 model=None, merge_adapters: bool = False, tools: ToolUse | None = None, drafter=None):
        self.tokenizer, self.autocast, self.model, self.merge_adapters = tokenizer, autocast, model, merge_adapters
        self.tools, self.drafter = tools, drafter

    def sync_weights(self, model) -> None:
        self.model = model

    def close(self) -> None:
        self.model = None
        if self.tools is not None:
            self.tools.runner.close()

    def generate(self, prompts: list[str], sampling: Sampling) -> Rollouts:
        if self.model is None:
            raise RuntimeError("BuiltinEngine.generate before sync_weights: the engine has no model yet")
        seeds = None if sampling.seeds is None else list(sampling.seeds)
        with merged_weights(self.model) if self.merge_adapters else contextlib.nullcontext():
            if self.tools is not None:
                from grpo.rollout.multiturn import generate_with_tools

                return generate_with_tools(self.model, self.tokenizer, prompts, sampling.n, sampling, self.tools.runner,
                                           self.tools.layout, self.tools.max_turns, greedy=sampling.greedy,
                                           autocast=self.autocast, seeds=seeds, logprobs=sampling.logprobs)
            if self.drafter is not None:
                from grpo.rollout.speculative import generate_speculative

                return generate_speculative(self.model, self.drafter, self.tokenizer, prompts, sampling.n, sampling,
                                            greedy=sampling.greedy, autocast=self.autocast, seeds=seeds,
                                            logprobs=sampling.logprobs)
            return generate(self.model, self.tokenizer, prompts, sampling.n, sampling, greedy=sampling.greedy,
                            autocast=self.autocast, seeds=seeds, logprobs=sampling.logprobs)
