"""Multi-turn rollouts with tools, token in, token out, in the built-in engine.

Each completion is one token sequence built by appending, turn after turn, the tokens the model sampled and
the tokens of its tool results (the result text tokenized on its own); the sequence is never re-tokenized
from text. The loop, for all B * G rows at once:
1. decode: every row still generating samples its next token; a row stops at an EOS (done), at the end of a
   tool call (`</tool_call>`: waiting), or when its completion reaches max_completion_length (done, truncated).
   Rows that stopped feed masked slots (attention 0, no position) while the others go on, so the KV cache of
   every row stays valid;
2. when no row is generating, the waiting rows' calls run (grpo.tools.runner: in parallel, outside this
   process, failures as text), each row's result tokens are fed in one forward pass that extends its cache
   (right-aligned, padding masked), and those rows generate again. A call in a row's `max_turns`-th turn is
   not run: the completion ends there.
Positions come from the real tokens only, so the masked slots change nothing: the log-probs the loop reports
equal those of one forward pass over the final sequence (tests/test_tools.py).
Returned masks: completion_mask 1 on every real token (what the model attends to); sampled_mask 1 on the tokens
the model sampled (what the loss counts; tool results are context). `texts` are the model's own tokens,
decoded (what reward rules score: a tool result cannot state an answer for the model); `transcripts` are the
whole completions, tool results included (what completions.jsonl shows).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from transformers.cache_utils import DynamicLayer

from grpo.modeling.logprobs import cache_arg, position_ids_from_mask
from grpo.rollout.base import Rollouts, eos_token_ids
from grpo.rollout.builtin import PreallocatedLayer, sample_tokens
from grpo.tools.calls import CALL_END, ends_with_call, parse_calls, result_text

GENERATING, WAITING, DONE = 0, 1, 2


class GrowingLayer(PreallocatedLayer):
    """A preallocated KV-cache layer that doubles its buffer when full (masked slots of rows that wait for
    their tools take room beyond the completion length)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[-2]:
            capacity = max(end, 2 * self._k.shape[-2])
            k = self._k.new_empty(*self._k.shape[:-2], capacity, self._k.shape[-1])
            v = self._v.new_empty(*self._v.shape[:-2], capacity, self._v.shape[-1])
            k[..., :self.length, :], v[..., :self.length, :] = self._k[..., :self.length, :], self._v[..., :self.length, :]
            self._k, self._v = k, v
        return super().update(key_states, value_states, *args, **kwargs)


def call_closers(tokenizer) -> torch.Tensor:
    """[V] bool: tokens whose text contains the last character of `</tool_call>` (only after one of them can a
    turn end in a call, so the turn's text is decoded only then)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([t is not None and CALL_END[-1] in t for t in tokens])


def generate_with_tools(model, tokenizer, prompts: list[str], num_generations: int, cfg, runner, layout: str,
                        max_turns: int, *, greedy: bool = False,
                        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                        seeds: list[int] | None = None, logprobs: bool = False) -> Rollouts:
    """`num_generations` multi-turn completions per prompt under `cfg` (Sampling or RolloutConfig fields), calling
    tools through `runner` (grpo.tools.runner.ToolRunner) in `layout` (grpo.tools.calls). Rollouts.tool_counts
    holds the sums the tools/* metrics are made of."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    G, eos_ids, pad = num_generations, eos_token_ids(tokenizer, model), tokenizer.pad_token_id
    L = cfg.max_completion_length
    closers = call_closers(tokenizer).to(device)
    eos = torch.tensor(eos_ids, device=device)
    cache_kwarg = cache_arg(model)
    N = enc["input_ids"].shape[0] * G
    tokens: list[list[int]] = [[] for _ in range(N)]
    sampled: list[list[int]] = [[] for _ in range(N)]
    lps: list[list[float]] = [[] for _ in range(N)]
    turn_start, turns = [0] * N, [1] * N
    turn_text: dict[int, str] = {}  # a waiting row's turn, decoded when its call ended
    status, truncated = [GENERATING] * N, [False] * N
    generators = None if seeds is None else [torch.Generator(device).manual_seed(s) for s in seeds]
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    position_ids=position_ids_from_mask(enc["attention_mask"]), use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or out.past_key_values
        if all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
            cache.layers = [GrowingLayer(layer.keys, layer.values, enc["input_ids"].shape[1] + L)
                            for layer in cache.layers]
        cache.batch_repeat_interleave(G)
        logits = out.logits[:, -1].repeat_interleave(G, dim=0)  # [n, V], one per row still in the batch
        attention = enc["attention_mask"].repeat_interleave(G, dim=0)
        positions = attention.sum(dim=1, keepdim=True)
        active = list(range(N))  # batch row -> completion row
        while active:
            # 1. decode until no row in the batch is generating
            while True:
                going = [b for b, i in enumerate(active) if status[i] == GENERATING]
                if not going:
                    break
                rows = torch.tensor(going, device=device)
                gens = None if generators is None else [generators[active[b]] for b in going]
                chosen = sample_tokens(logits[rows], cfg.temperature, cfg.top_p, cfg.top_k, greedy, gens)
                if logprobs:
                    scaled = logits[rows].float() / cfg.temperature
                    chosen_lp = (scaled.gather(1, chosen.unsqueeze(1)).squeeze(1) - torch.logsumexp(scaled, -1)).tolist()
                ends, closes = torch.isin(chosen, eos).tolist(), closers[chosen].tolist()
                for k, (b, token) in enumerate(zip(going, chosen.tolist())):
                    i = active[b]
                    tokens[i].append(token)
                    sampled[i].append(1)
                    lps[i].append(chosen_lp[k] if logprobs else 0.0)
                    if ends[k]:
                        status[i] = DONE
                    elif closes[k] and ends_with_call(text := tokenizer.decode(tokens[i][turn_start[i]:])):
                        status[i] = WAITING if turns[i] < max_turns else DONE
                        turn_text[i] = text
                    elif len(tokens[i]) >= L:
                        status[i], truncated[i] = DONE, True
                if all(status[active[b]] == DONE for b in going):
                    break  # nothing sampled now needs to be in the cache
                feed = torch.full((len(active),), pad, dtype=torch.long, device=device)
                feed[rows] = chosen  # a waiting row's last token too: its result follows it
                column = torch.zeros(len(active), 1, dtype=attention.dtype, device=device)
                column[rows] = 1
                attention = torch.cat([attention, column], dim=1)
                out = model(input_ids=feed.unsqueeze(1), attention_mask=attention, position_ids=positions,
                            use_cache=True, **{cache_kwarg: cache})
                logits = out.logits[:, -1]
                positions = positions + column
            # 2. run the waiting rows' calls; feed their results; drop finished rows
            waiting = [b for b, i in enumerate(active) if status[i] == WAITING]
            if not waiting:
                break
            calls = [parse_calls(turn_text[active[b]]) for b in waiting]
            flat = runner.run([c for row_calls in calls for c in row_calls])
            results, start = [], 0
            for row_calls in calls:
                results.append(flat[start:start + len(row_calls)])
                start += len(row_calls)
            feeds = {}
            for b, row_results in zip(waiting, results):
                i = active[b]
                ids = tokenizer(result_text(row_results, layout, tokenizer), add_special_tokens=False)["input_ids"]
                room = L - len(tokens[i])
                if len(ids) >= room:  # no room left to answer after the result
                    ids, status[i], truncated[i] = ids[:room], DONE, True
                else:
                    status[i], turns[i] = GENERATING, turns[i] + 1
                tokens[i] += ids
                sampled[i] += [0] * len(ids)
                lps[i] += [0.0] * len(ids)
                turn_start[i] = len(tokens[i])
                feeds[b] = ids
            keep = [b for b, i in enumerate(active) if status[i] == GENERATING]
            if not keep:
                break
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            attention, positions = attention[index], positions[index]
            active = [active[b] for b in keep]
            width = max(len(feeds[b]) for b in keep)
            chunk = torch.full((len(keep), width), pad, dtype=torch.long, device=device)
            chunk_mask = torch.zeros(len(keep), width, dtype=attention.dtype, device=device)
            for r, b in enumerate(keep):  # right-aligned: every row's last column is its last result token
                n = len(feeds[b])
                chunk[r, width - n:] = torch.tensor(feeds[b], device=device)
                chunk_mask[r, width - n:] = 1
            attention = torch.cat([attention, chunk_mask], dim=1)
            chunk_positions = positions + (chunk_mask.cumsum(dim=1) - 1).clamp(min=0)
            out = model(input_ids=chunk, attention_mask=attention, position_ids=chunk_positions, use_cache=True,
                        logits_to_keep=1, **{cache_kwarg: cache})
            logits = out.logits[:, -1]
            positions = positions + chunk_mask.sum(dim=1, keepdim=True)
    model.train(was_training)
    return _assemble(enc, G, tokens, sampled, lps, truncated, turns, runner, tokenizer, prompts, logprobs, pad,
                     device)


def _assemble(enc, G, tokens, sampled, lps, truncated, turns, runner, tokenizer, prompts, logprobs, pad, device):
    N, T = len(tokens), max(1, max(len(t) for t in tokens))
    ids = torch.full((N, T), pad, dtype=torch.long, device=device)
    mask = torch.zeros(N, T, dtype=torch.long, device=device)
    sampled_mask = torch.zeros(N, T, dtype=torch.long, device=device)
    lp = torch.zeros(N, T, device=device)
    for i in range(N):
        n = len(tokens[i])
        ids[i, :n] = torch.tensor(tokens[i], dtype=torch.long, device=device)
        mask[i, :n] = 1
        sampled_mask[i, :n] = torch.tensor(sampled[i], dtype=torch.long, device=device)
        lp[i, :n] = torch.tensor(lps[i], device=device)
    own = [tokenizer.decode([t for t, s in zip(tokens[i], sampled[i]) if s], skip_special_tokens=True)
           for i in range(N)]
    whole = tokenizer.batch_decode(ids.masked_fill(mask == 0, pad), skip_special_tokens=True)
    result_tokens = int((mask - sampled_mask).sum())
    counts = {f"tools/{k}": float(v) for k, v in runner.take_counts().items()}
    counts.update({"tools/_turns": float(sum(turns)), "tools/_result_tokens": float(result_tokens),
                   "tools/_tokens": float(mask.sum()), "tools/_completions": float(N)})
    return Rollouts(prompt_ids=enc["input_ids"].repeat_interleave(G, dim=0),
                    prompt_mask=enc["attention_mask"].repeat_interleave(G, dim=0),
                    completion_ids=ids, completion_mask=mask,
                    truncated=torch.tensor(truncated, device=device), texts=own,
                    prompts=[p for p in prompts for _ in range(G)],
                    logprobs=lp * sampled_mask if logprobs else None,
                    sampled_mask=sampled_mask, transcripts=whole, tool_counts=counts)
