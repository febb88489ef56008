"""Per-token log-probabilities of completions under a model, as the loss needs them.

Knows how to run a causal LM over prompt + completion with left-padded prompts; knows nothing of rewards.
"""

from __future__ import annotations

import copy
import inspect

import torch
from transformers.cache_utils import DynamicLayer

from grpo.modeling.head import head_logprobs

# Causal LMs whose logits are exactly lm_head(last hidden state), with no bias, scaling or soft-capping:
# for these the log-probs come from the hidden states through the fused head (grpo.modeling.head). Other models
# take the plain path (full logits, then log-softmax), which gives the same numbers more slowly.
PLAIN_HEAD_MODELS = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM", "Olmo2ForCausalLM", "DeepseekV3ForCausalLM",
})


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses: [0, 0, 1, 2] for mask [0, 1, 1, 1]."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   entropy: list | None = None) -> torch.Tensor:
    """log softmax(logits / temperature)[target] for each position: logits [N, T, V], targets [N, T] -> [N, T].

    Computed row by row in float32 so no second [N, T, V] tensor is held beside the logits. When a list is
    passed as `entropy`, the entropy [N, T] of each position's distribution, -sum_v p_v log p_v, is appended
    to it (without gradient).
    """
    rows, entropies = [], []
    for row_logits, row_targets in zip(logits, targets):  # row_logits [T, V]
        scaled = row_logits.float() / temperature
        normaliser = torch.logsumexp(scaled, dim=-1)  # [T]
        rows.append(scaled.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1) - normaliser)
        if entropy is not None:
            with torch.no_grad():
                entropies.append(normaliser - (torch.softmax(scaled, dim=-1) * scaled).sum(dim=-1))
    if entropy is not None:
        entropy.append(torch.stack(entropies))
    return torch.stack(rows)


def split_head(model):
    """(decoder, output embedding weight) when `model`'s logits are lm_head(decoder(...)) and the fused head
    applies; None otherwise."""
    if type(model).__name__ not in PLAIN_HEAD_MODELS:
        return None
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        return None
    return model.get_decoder(), head.weight


def cache_arg(module) -> str:
    """The name `module.forward` takes a KV cache under: `cache` (transformers 5) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int,
                        temperature: float = 1.0, entropy: list | None = None, fused_head: bool = True) -> torch.Tensor:
    """Log-probs [N, T] of the last T = completion_length tokens of input_ids [N, P + T].

    Left-padded prompts get positions from the attention mask, so a padded row scores as it would alone.
    Only the logits that predict completion tokens are computed (logits_to_keep = T + 1); with the fused
    head, only those of tokens inside the attention mask (others are 0). fused_head=False always takes the
    plain path (a backend whose head weight is partitioned, whole only inside the head's own forward).
    """
    split = split_head(model) if fused_head else None
    if split is not None:
        decoder, weight = split
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        T = completion_length
        return head_logprobs(hidden[:, -T - 1:-1], weight, input_ids[:, -T:], attention_mask[:, -T:], temperature,
                             entropy)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                logits_to_keep=completion_length + 1, use_cache=False)
    logits = out.logits[:, :-1]  # [N, T, V]: position t predicts completion token t
    return token_logprobs(logits, input_ids[:, -completion_length:], temperature, entropy)


def shared_prefix_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                           completion_mask: torch.Tensor, prompt_index: torch.Tensor,
                           temperature: float = 1.0, entropy: list | None = None,
                           fused_head: bool = True) -> torch.Tensor:
    """Log-probs [n, T] of completions that share prompts, running each prompt through the model once.

    prompt_ids, prompt_mask: [U, P] left-padded distinct prompts; completion_ids, completion_mask: [n, T];
    prompt_index: [n] which prompt each completion continues. The prompt pass fills a KV cache that is
    indexed out to the n completions, and the completions attend to it; gradients flow back through the
    cache into the prompt pass. Equal to `completion_logprobs` on the concatenated rows, with U * P instead
    of n * P prompt tokens in the forward and backward passes. With the fused head (`split_head`), positions
    outside completion_mask are 0; fused_head as in `completion_logprobs`.
    """
    split = split_head(model) if fused_head else None
    if split is not None:
        return _shared_prefix_head_logprobs(*split, model.get_input_embeddings(), prompt_ids, prompt_mask,
                                            completion_ids, completion_mask, prompt_index, temperature, entropy)
    cache_kwarg = cache_arg(model)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                use_cache=True, logits_to_keep=1)
    first_logits = out.logits[:, -1].index_select(0, prompt_index).unsqueeze(1)  # [n, 1, V]: predicts token 0
    T = completion_ids.shape[1]
    if T == 1:
        return token_logprobs(first_logits, completion_ids, temperature, entropy)
    cache = completion_cache(getattr(out, "cache", None) or out.past_key_values, prompt_index)
    prompt_lengths = prompt_mask.sum(dim=1)[prompt_index]  # [n]
    positions = prompt_lengths.unsqueeze(1) + torch.arange(T - 1, device=completion_ids.device)  # [n, T - 1]
    rest = model(input_ids=completion_ids[:, :-1],
                 attention_mask=torch.cat([prompt_mask[prompt_index], completion_mask[:, :-1]], dim=1),
                 position_ids=positions, use_cache=True, **{cache_kwarg: cache})
    logits = torch.cat([first_logits, rest.logits], dim=1)  # [n, T, V]
    return token_logprobs(logits, completion_ids, temperature, entropy)


class FixedPrefixLayer(DynamicLayer):
    """A KV-cache layer holding a fixed prefix (prompt keys and values): `update` returns prefix + new keys
    without storing the new ones, so a layer run twice on the same input (activation checkpointing recomputes
    it in the backward) attends to the same keys both times."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def completion_cache(cache, index: torch.Tensor):
    """The cache the completion pass attends to, from the prompt pass's `cache`: row i of every layer is the
    prompt row index[i] (a prompt's KV repeated to its completions), in FixedPrefixLayers of a new cache
    object. The prompt cache's layers are emptied, so recomputing the prompt pass (activation checkpointing)
    starts from an empty cache as the first pass did; values are unchanged either way.

    Rows are repeated by index_select: transformers' batch_select_indices indexes (`keys[index]`), whose
    backward (index_put_ with accumulate) adds rows in parallel with atomics on a multi-threaded CPU, so a
    prompt feeding several completions got a gradient that changed in its last bits from run to run;
    index_select's backward (index_add_) adds in a fixed order. A cache with layers of other kinds (sliding
    window) is repeated in place and reused: its plain layers by index_select, the others by their own
    batch_select_indices."""
    layers = getattr(cache, "layers", None) or [cache]
    if any(type(layer) is not DynamicLayer or getattr(layer, "keys", None) is None for layer in layers):
        for layer in layers:
            _repeat_rows_in_place(layer, index)
        return cache
    fixed = []
    for layer in layers:
        prefix = FixedPrefixLayer()
        prefix.lazy_initialization(layer.keys, layer.values)
        prefix.keys, prefix.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        layer.keys, layer.values = layer.keys[..., :0, :], layer.values[..., :0, :]
        fixed.append(prefix)
    out = copy.copy(cache)
    out.layers = fixed
    return out


def _repeat_rows_in_place(layer, index: torch.Tensor) -> None:
    plain = type(layer).batch_select_indices is DynamicLayer.batch_select_indices
    if plain and getattr(layer, "keys", None) is not None and layer.get_seq_length() > 0:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
    else:
        layer.batch_select_indices(index)


def _shared_prefix_head_logprobs(decoder, weight, embed, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                 prompt_index, temperature, entropy):
    """`shared_prefix_logprobs` through the decoder and the fused head. The prompt and completion tokens are
    embedded in one call, so the embedding's gradient (a dense [V, H] tensor) is built once, not twice."""
    n, T = completion_ids.shape
    U, P = prompt_ids.shape
    embeds = embed(torch.cat([prompt_ids.reshape(-1), completion_ids[:, :-1].reshape(-1)]))
    out = decoder(inputs_embeds=embeds[:U * P].view(U, P, -1), attention_mask=prompt_mask,
                  position_ids=position_ids_from_mask(prompt_mask), use_cache=True)
    hidden = out.last_hidden_state[:, -1].index_select(0, prompt_index).unsqueeze(1)  # [n, 1, H]: predicts token 0
    if T > 1:
        cache = completion_cache(getattr(out, "cache", None) or out.past_key_values, prompt_index)
        positions = prompt_mask.sum(dim=1)[prompt_index].unsqueeze(1) + torch.arange(T - 1, device=prompt_ids.device)
        rest = decoder(inputs_embeds=embeds[U * P:].view(n, T - 1, -1),
                       attention_mask=torch.cat([prompt_mask[prompt_index], completion_mask[:, :-1]], dim=1),
                       position_ids=positions, use_cache=True, **{cache_arg(decoder): cache})
        hidden = torch.cat([hidden, rest.last_hidden_state], dim=1)  # [n, T, H]
    return head_logprobs(hidden, weight, completion_ids, completion_mask, temperature, entropy)


class LogprobModel(torch.nn.Module):
    """A causal LM seen as a function from (prompts, completions) to per-token log-probs: one module call
    per micro-batch, so torch DDP (one forward per backward) can wrap it even when the prompt and the
    completions run as two passes of the LM. fused_head: as in `completion_logprobs`, decided by the backend."""

    def __init__(self, model, fused_head: bool = True):
        super().__init__()
        self.model, self.fused_head = model, fused_head

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask, prompt_index=None,
                temperature: float = 1.0, with_entropy: bool = False):
        """Returns (log-probs [n, T], entropy [n, T] or None); prompt_index None: prompts are per row."""
        entropy = [] if with_entropy else None
        if prompt_index is not None:
            logprobs = shared_prefix_logprobs(self.model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                              prompt_index, temperature, entropy, self.fused_head)
        else:
            logprobs = completion_logprobs(self.model, torch.cat([prompt_ids, completion_ids], dim=1),
                                           torch.cat([prompt_mask, completion_mask], dim=1),
                                           completion_ids.shape[1], temperature, entropy, self.fused_head)
        return logprobs, (entropy[0] if with_entropy else None)


def causal_lm(policy):
    """The causal LM inside a (DDP-wrapped) LogprobModel, or `policy` itself."""
    module = getattr(policy, "module", policy)
    return module.model if isinstance(module, LogprobModel) else module


def rollout_logprobs(model, rollouts, rows: slice, group_size: int, temperature: float = 1.0,
                     share_prompt: bool = True, entropy: list | None = None) -> torch.Tensor:
    """Log-probs [n, T] of completions rollouts[rows], n = rows.stop - rows.start.

    `model` is a causal LM or a (possibly DDP-wrapped) LogprobModel. share_prompt runs each group's prompt
    once (`shared_prefix_logprobs`); otherwise every row carries its prompt. Either way, prompt columns that
    are padding in every selected row are dropped first; the result is the same as without the trimming
    (padding is masked and positions come from the mask). A list passed as `entropy` receives the entropy.
    """
    module = model if isinstance(getattr(model, "module", model), LogprobModel) else LogprobModel(model)
    rows = slice(rows.start, min(rows.stop, rollouts.completion_ids.shape[0]))
    completion_ids, completion_mask = rollouts.completion_ids[rows], rollouts.completion_mask[rows]
    if share_prompt:
        first = rows.start // group_size
        prompt_rows = torch.arange(first, (rows.stop - 1) // group_size + 1) * group_size
        prompt_ids, prompt_mask = _trim_left(rollouts.prompt_ids[prompt_rows], rollouts.prompt_mask[prompt_rows])
        index = (torch.arange(rows.start, rows.stop) // group_size - first).to(prompt_ids.device)
    else:
        prompt_ids, prompt_mask = _trim_left(rollouts.prompt_ids[rows], rollouts.prompt_mask[rows])
        index = None
    logprobs, ent = module(prompt_ids, prompt_mask, completion_ids, completion_mask, index, temperature,
                           entropy is not None)
    if entropy is not None:
        entropy.append(ent)
    return logprobs


def _trim_left(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    start = int(mask.any(dim=0).long().argmax())  # first column with a real token in some row
    return ids[:, start:], mask[:, start:]
