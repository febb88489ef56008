"""Per-token log-probabilities of completions under a model, as the loss needs them.

Knows how to run a causal LM over prompt + completion with left-padded prompts; knows nothing of rewards.
"""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses: [0, 0, 1, 2] for mask [0, 1, 1, 1]."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[target] for each position: logits [N, T, V], targets [N, T] -> [N, T].

    Computed row by row in float32 so no second [N, T, V] tensor is held beside the logits.
    """
    rows = []
    for row_logits, row_targets in zip(logits, targets):  # row_logits [T, V]
        scaled = row_logits.float() / temperature
        picked = scaled.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(scaled, dim=-1))
    return torch.stack(rows)


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int,
                        temperature: float = 1.0) -> torch.Tensor:
    """Log-probs [N, T] of the last T = completion_length tokens of input_ids [N, P + T].

    Left-padded prompts get positions from the attention mask, so a padded row scores as it would alone.
    Only the logits that predict completion tokens are computed (logits_to_keep = T + 1).
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                logits_to_keep=completion_length + 1, use_cache=False)
    logits = out.logits[:, :-1]  # [N, T, V]: position t predicts completion token t
    return token_logprobs(logits, input_ids[:, -completion_length:], temperature)
