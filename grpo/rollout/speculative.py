"""Speculative rollouts: a drafter proposes the token after the next one, the policy verifies it.

Per decoding step and row, with x_t the newest token (sampled, not yet fed to the policy):
1. the drafter gives q(. | x_<=t), the distribution of x_{t+1}, and a draft d ~ q is drawn;
2. one policy forward over [x_t, d] gives p(. | x_<=t) and p(. | x_<=t, d);
3. d is accepted with probability min(1, p(d) / q(d)); then x_{t+1} = d and x_{t+2} ~ p(. | x_<=t, d) (two
   tokens for one forward). Rejected, x_{t+1} ~ (p - q)+ / sum (p - q)+ (one token; d's cache column is masked).
Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) makes x_{t+1}'s law exactly p for any q:
P(x = y) = q(y) min(1, p(y)/q(y)) + (1 - sum_z min(q(z), p(z))) (p(y) - q(y))+ / sum_z (p(z) - q(z))+ = p(y).
p and q are the distributions sampling draws from (temperature, top-k, top-p applied, grpo.rollout.builtin.
token_probs). Greedy decoding accepts d when it is the policy's argmax, so it writes what plain greedy writes.

Both KV caches grow by two columns per step; a rejected draft's column stays in the policy's cache under
attention mask 0, and positions are passed explicitly, so the policy attends to exactly the accepted tokens.
The drafter (`MTPDrafter`: DeepSeek-V3's MTP module, grpo.modeling.mtp) keeps its own cache the same way.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Protocol

import torch

from transformers.cache_utils import DynamicCache

from grpo.modeling.logprobs import cache_arg, position_ids_from_mask, split_head
from grpo.rollout.base import Rollouts, eos_token_ids
from grpo.rollout.builtin import draw, finish_rollouts, preallocate, sampled_logprob, token_probs, uniform


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[n] bool: draft d_i is accepted when u_i q_i(d_i) <= p_i(d_i), i.e. with probability min(1, p/q).

    p, q [n, V] (each row summing to 1), drafts [n] drawn from q, u [n] uniform in [0, 1).
    Example: p(d) = 0.2, q(d) = 0.5: accepted for u <= 0.4."""
    p_d, q_d = p.gather(1, drafts.unsqueeze(1)).squeeze(1), q.gather(1, drafts.unsqueeze(1)).squeeze(1)
    return u * q_d <= p_d


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(p - q)+ / sum (p - q)+ per row [n, V]: where x_{t+1} is drawn after a rejection. A row where p <= q
    everywhere (p == q: nothing is ever rejected) gets p itself.
    Example: p = [0.5, 0.5, 0], q = [0.8, 0.1, 0.1] -> [0, 1, 0]."""
    r = (p - q).clamp(min=0)
    total = r.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=1e-30), p)


class Drafter(Protocol):
    """Proposes the distribution of the token after the newest one, from its own state of each row."""

    def prefill(self, lm, hidden: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeats: int,
                capacity: int) -> None:
        """Take in the prompts: the policy's hidden states [U, P, H] of prompt_ids [U, P]; then repeat every row
        `repeats` times (the G completions of a prompt). capacity: positions the cache will need."""

    def propose(self, lm, hidden: torch.Tensor, ids: torch.Tensor, first_real: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """Logits [n, V] of x_{t+1}, after appending two positions per row: ids [n, 2] = (x_{t-1}, x_t) with
        the policy's hidden states [n, 2, H] of the tokens before each (h_{t-2}, h_{t-1}); first_real [n] bool:
        the first column is new (False: the row advanced one token, the first column is a masked filler);
        positions [n, 2] of ids."""

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows."""


class MTPDrafter:
    """Drafts with an MTP module (grpo.modeling.mtp): q(x_{t+1}) = softmax(W_head g_t) from (h_{t-1}, x_t)."""

    def __init__(self, mtp):
        self.mtp, self.cache, self.mask = mtp, None, None

    def prefill(self, lm, hidden, prompt_ids, prompt_mask, repeats, capacity):
        pair_mask = prompt_mask[:, :-1] * prompt_mask[:, 1:]  # position i pairs h_i with x_{i+1}
        self.cache = DynamicCache()
        self.mtp(lm, hidden[:, :-1], prompt_ids[:, 1:], pair_mask, position_ids_from_mask(prompt_mask)[:, 1:],
                 cache=self.cache)
        preallocate(self.cache, capacity)
        self.cache.batch_repeat_interleave(repeats)
        self.mask = pair_mask.repeat_interleave(repeats, dim=0)

    def propose(self, lm, hidden, ids, first_real, positions):
        self.mask = torch.cat([self.mask, torch.stack([first_real.long(), torch.ones_like(self.mask[:, 0])], 1)], 1)
        g = self.mtp(lm, hidden, ids, self.mask, positions, cache=self.cache)
        return torch.nn.functional.linear(g[:, -1], lm.get_output_embeddings().weight)

    def select(self, rows):
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]


@torch.no_grad()
def generate_speculative(model, drafter: Drafter, tokenizer, prompts: list[str], num_generations: int, cfg, *,
                         greedy: bool = False,
                         autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                         seeds: list[int] | None = None, logprobs: bool = False) -> Rollouts:
    """`grpo.rollout.builtin.generate` with drafts (same arguments and result); Rollouts.draft_counts holds
    the drafts proposed and accepted, the policy's forward passes per row and the tokens they produced."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    G, eos_ids, pad, max_len = num_generations, eos_token_ids(tokenizer, model), tokenizer.pad_token_id, \
        cfg.max_completion_length
    eos = torch.tensor(eos_ids, device=device)
    decoder, head = split_head(model)
    kwarg = cache_arg(decoder)
    probs = lambda logits: token_probs(logits, cfg.temperature, cfg.top_p, cfg.top_k)  # noqa: E731
    pick = (lambda logits, gens: logits.argmax(dim=-1)) if greedy else (lambda logits, gens: draw(probs(logits), gens))
    was_training = model.training
    model.eval()
    with autocast():
        prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
        out = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                      use_cache=True)
        P = prompt_ids.shape[1]
        cache = getattr(out, "cache", None) or out.past_key_values
        preallocate(cache, P + 2 * max_len + 2)
        cache.batch_repeat_interleave(G)
        drafter.prefill(model, out.last_hidden_state, prompt_ids, prompt_mask, G, P + 2 * max_len + 2)
        last_hidden = out.last_hidden_state[:, -1].repeat_interleave(G, dim=0)  # [n, H]
        N = last_hidden.shape[0]
        attention = prompt_mask.repeat_interleave(G, dim=0)
        positions = attention.sum(dim=1)  # [n]: position of the newest token x_t
        generators = None if seeds is None else [torch.Generator(device).manual_seed(s) for s in seeds]
        first_logits = torch.nn.functional.linear(last_hidden, head)
        newest = pick(first_logits, generators)  # [n] x_t, not yet fed to the policy
        tokens = torch.full((N, max_len), pad, dtype=torch.long, device=device)
        sampled_logprobs = torch.zeros(N, max_len, device=device) if logprobs else None
        active = torch.arange(N, device=device)
        length = torch.ones(N, dtype=torch.long, device=device)  # completion tokens written per row
        tokens[:, 0] = newest
        if sampled_logprobs is not None:
            sampled_logprobs[:, 0] = sampled_logprob(first_logits, newest, cfg.temperature)
        finished = torch.isin(newest, eos) | (length >= max_len)
        mtp_hidden = torch.stack([last_hidden, last_hidden], dim=1)  # [n, 2, H]: (h_{t-2}, h_{t-1})
        mtp_ids = torch.stack([newest, newest], dim=1)  # (x_{t-1}, x_t); the first column a filler here
        first_real = torch.zeros(N, dtype=torch.bool, device=device)
        counts = {"drafted": 0, "accepted": 0, "forwards": N, "tokens": N}
        while not finished.all():
            if finished.sum() * 4 >= finished.numel():  # a quarter of the rows are done: drop them from the batch
                keep = (~finished).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                drafter.select(keep)
                active, attention, positions, newest, length = (active[keep], attention[keep], positions[keep],
                                                                newest[keep], length[keep])
                mtp_hidden, mtp_ids, first_real, finished = mtp_hidden[keep], mtp_ids[keep], first_real[keep], \
                    finished[keep]
                generators = None if generators is None else [generators[i] for i in keep.tolist()]
            pair_positions = torch.stack([positions - 1, positions], dim=1)
            draft_logits = drafter.propose(model, mtp_hidden, mtp_ids, first_real, pair_positions)
            q = None if greedy else probs(draft_logits)
            drafts = draft_logits.argmax(dim=-1) if greedy else draw(q, generators)
            attention = torch.cat([attention, attention.new_ones(attention.shape[0], 2)], dim=1)
            out = decoder(input_ids=torch.stack([newest, drafts], dim=1), attention_mask=attention,
                          position_ids=torch.stack([positions, positions + 1], dim=1), use_cache=True, **{kwarg: cache})
            hidden = out.last_hidden_state  # [n, 2, H]
            logits = torch.nn.functional.linear(hidden, head)  # [n, 2, V]
            if greedy:
                target = logits[:, 0].argmax(dim=-1)
                accepted = drafts == target
                first = target
            else:
                p = probs(logits[:, 0])
                p, q = p / p.sum(dim=-1, keepdim=True), q / q.sum(dim=-1, keepdim=True)
                accepted = accept_drafts(p, q, drafts, uniform(p.shape[0], device, generators))
                first = torch.where(accepted, drafts, draw(residual(p, q), generators))
            bonus = pick(logits[:, 1], generators)
            running = ~finished
            counts["drafted"] += int(running.sum())
            counts["accepted"] += int((accepted & running).sum())
            counts["forwards"] += int(running.sum())
            # the first token, then the bonus where the draft was accepted and the row goes on
            _write(tokens, sampled_logprobs, active, length, first, logits[:, 0], running, cfg.temperature)
            counts["tokens"] += int(running.sum())
            length = length + running.long()
            finished = finished | torch.isin(first, eos) | (length >= max_len)
            two = accepted & ~finished
            _write(tokens, sampled_logprobs, active, length, bonus, logits[:, 1], two, cfg.temperature)
            counts["tokens"] += int(two.sum())
            length = length + two.long()
            finished = finished | (two & torch.isin(bonus, eos)) | (length >= max_len)
            attention[:, -1] = accepted.long()  # a rejected draft's column is never attended to
            mtp_hidden = torch.where(accepted[:, None, None], hidden, hidden[:, :1].expand_as(hidden))
            mtp_ids = torch.where(accepted[:, None], torch.stack([drafts, bonus], 1), torch.stack([first, first], 1))
            newest = torch.where(accepted, bonus, first)
            positions = positions + 1 + accepted.long()
            first_real = accepted
    model.train(was_training)

    return finish_rollouts(tokens, eos_ids, tokenizer, enc, prompts, G, sampled_logprobs, draft_counts=counts)


def _write(tokens, sampled_logprobs, active, length, new, logits, where, temperature) -> None:
    """tokens[active[i], length[i]] = new[i] for the rows `where` is True (and their log-probs)."""
    rows = where.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    tokens[active[rows], length[rows]] = new[rows]
    if sampled_logprobs is not None:
        sampled_logprobs[active[rows], length[rows]] = sampled_logprob(logits[rows], new[rows], temperature)
