"""Linear layers through oneDNN with pre-packed weights, for the passes that need no gradient on a CPU.

y = x W^T + b is the same product either way; oneDNN computes it from a copy of W reordered once into its
blocked layout, which on CPUs runs decoding-sized products (a few dozen rows) about twice as fast as the
default kernel, whose cost there is dominated by re-reading W for every call. Only the order of the
floating-point sums differs, so outputs match the plain layer to rounding (tests/test_onednn.py).

Installed once on a CPU model (`install`, by the backend that prepares it): from then on every pass
without gradient (generation, the reference and pi_old log-probs, evaluation) runs packed, and a pass with
gradients calls the layer's own forward, so training is untouched. A packed copy lives until the weight
changes (the next no-gradient pass re-packs it) or a training pass uses the layer (which drops it, so it
does not sit in memory beside the activations and gradients).
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

from grpo.modeling.head import compute_dtype


def available(model: torch.nn.Module) -> bool:
    """oneDNN packing applies: a CPU model and a torch built with oneDNN (mkldnn)."""
    param = next(model.parameters(), None)
    return (param is not None and param.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@functools.cache
def packs(dtype: torch.dtype) -> bool:
    """This CPU has oneDNN kernels for packed weights in `dtype`: always fp32; bf16 needs AVX-512 (BW, VL,
    DQ) or AVX-NE-CONVERT, which many AVX2-only CPUs lack. Without them a bf16 layer keeps its own forward."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _packed(layer: torch.nn.Linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(packed weight, bias) for `layer` in `dtype`, re-packed only when the weight changed since the last
    call (an optimizer step or load_state_dict bumps the tensor's version counter)."""
    weight = layer.weight
    key = (weight._version, weight.data_ptr(), dtype)
    cached = getattr(layer, "_onednn_cache", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype))
            bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        cached = (key, packed, bias)
        layer._onednn_cache = cached
    return cached[1], cached[2]


class _Group:
    """The installed layers of one model, and whether any of them holds a packed copy now."""

    def __init__(self, layers: list[torch.nn.Linear]):
        self.layers, self.packed = layers, False

    def release(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("_onednn_cache", None)
        self.packed = False


def _forward(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(layer.weight, "cpu")
    group = layer.__dict__.get("_onednn_group")
    if torch.is_grad_enabled() or not packs(dtype):
        if group is not None and group.packed and torch.is_grad_enabled():
            group.release()  # a training pass: the copies go stale with its step and must not sit beside its tensors
        return torch.nn.Linear.forward(layer, x)
    packed, bias = _packed(layer, dtype)
    if group is not None:
        group.packed = True
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias, "none", [], "")


def _linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype in
            (torch.float32, torch.bfloat16)]


def install(model: torch.nn.Module) -> bool:
    """Every nn.Linear of `model` runs through oneDNN with packed weights whenever no gradient is recorded.
    Returns False (and changes nothing) where `available(model)` is not."""
    if not available(model):
        return False
    group = _Group(_linears(model))
    for layer in group.layers:
        layer.forward = types.MethodType(_forward, layer)
        layer._onednn_group = group
    return True


def release(model: torch.nn.Module) -> None:
    """Drop the packed copies of `model`'s layers (its weights changed, or will)."""
    for layer in _linears(model):
        layer.__dict__.pop("_onednn_cache", None)
        if "_onednn_group" in layer.__dict__:
            layer._onednn_group.packed = False


def uninstall(model: torch.nn.Module) -> None:
    """Undo `install`: the layers' own forward again, packed copies dropped."""
    for layer in _linears(model):
        for attribute in ("forward", "_onednn_cache", "_onednn_group"):
            layer.__dict__.pop(attribute, None)


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module):
    """`install` for the duration of the block (comparisons with the plain layers)."""
    installed = install(model)
    try:
        yield
    finally:
        if installed:
            uninstall(model)
