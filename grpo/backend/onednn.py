"""Linear layers through oneDNN with pre-packed weights, for the passes that need no gradient on a CPU.

y = x W^T + b is the same product either way; oneDNN computes it from a copy of W reordered once into its
blocked layout, which on CPUs runs decoding-sized products (a few dozen rows) about twice as fast as the
default kernel, whose cost there is dominated by re-reading W for every call. Only the order of the
floating-point sums differs, so outputs match the plain layer to rounding (tests/test_onednn.py).

Used around generation and the no-gradient log-prob passes (reference model, pi_old). With gradients on,
a patched layer calls its own forward, so training is untouched.
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


def _forward(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(layer.weight, "cpu")
    if torch.is_grad_enabled() or not packs(dtype):
        return torch.nn.Linear.forward(layer, x)
    packed, bias = _packed(layer, dtype)
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias, "none", [], "")


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, enabled: bool = True, keep: bool = False):
    """Within the block, every nn.Linear of `model` runs through oneDNN with packed weights when no
    gradient is being recorded (a no-op when `enabled` is False or `available(model)` is not).

    keep=True leaves the packed copies on the layers after the block, for a model whose weights rarely
    change (the frozen reference); otherwise they are dropped (they cost one more copy of the weights).
    """
    if not enabled or not available(model):
        yield
        return
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype in
              (torch.float32, torch.bfloat16)]
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
            if not keep and hasattr(layer, "_onednn_cache"):
                del layer._onednn_cache
