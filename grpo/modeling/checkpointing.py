"""Activation checkpointing (`train.gradient_checkpointing`): each decoder layer of the training forward keeps
only its inputs, and the backward runs the layer again to get the activations it needs.

Memory: the activations of one micro-batch are held for one layer at a time instead of for all L layers
(plus each layer's input, [rows, tokens, hidden]); compute: one more forward of the decoder layers per
backward. Values: the recomputed forward is the same operations on the same inputs, so losses and gradients
equal those of the stored activations (tests/test_checkpointing.py compares them bit for bit). Passes without
gradient (generation, reference and pi_old log-probs, evaluation) run the layers as they are.

torch's non-reentrant checkpoint is used (any mix of inputs that need gradients, keyword arguments, DDP);
the shared-prompt pass gives the completions a cache that recomputing does not change
(grpo.modeling.logprobs.completion_cache).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder's layer stack of a transformers causal LM (`model.get_decoder().layers`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} has no decoder layer list "
                         "(model.get_decoder().layers); set train.gradient_checkpointing=false for this model")
    return layers


def checkpoint_layers(model, share_prompt: bool = True) -> int:
    """Make every decoder layer of `model` recompute its activations in the backward; returns how many.

    share_prompt: the training forward runs prompts once with a KV cache (train.share_prompt); a model with
    sliding-window or other non-full-attention layers keeps a cache that recomputation would change, so it
    is refused there."""
    config = getattr(model, "config", None)
    kinds = set(getattr(config, "layer_types", None) or []) - {"full_attention"}
    if share_prompt and (kinds or getattr(config, "use_sliding_window", False)):
        raise ValueError(f"train.gradient_checkpointing with train.share_prompt=true: {type(model).__name__} has "
                         f"{sorted(kinds) or ['sliding_attention']} layers, whose KV cache a recomputed layer "
                         "would change; set train.share_prompt=false (or train.gradient_checkpointing=false)")
    layers = decoder_layers(model)
    for layer in layers:
        if not isinstance(layer.forward, functools.partial):
            # a partial over the layer itself, so copy.deepcopy(model) gives copies that run their own weights
            layer.forward = functools.partial(_checkpointed_forward, layer, type(layer).forward)
    return len(layers)


def _checkpointed_forward(layer, forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(layer, *args, **kwargs)
    return checkpoint(forward, layer, *args, use_reentrant=False, **kwargs)
