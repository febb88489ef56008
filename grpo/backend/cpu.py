"""CPU speed-ups installed on a model once, where the backend prepares it; on a GPU none applies.

- oneDNN packed linear layers for every pass without gradient (grpo.backend.onednn);
- host memory reuse (grpo.backend.allocator), process-wide, set when the backend starts on a CPU.
The fused log-prob head (grpo.modeling.head) and the generation KV buffers (grpo.rollout.builtin) are not
here: they pay on any device.
"""

from __future__ import annotations

import torch

from grpo.backend import onednn


def install_cpu_kernels(model: torch.nn.Module) -> list[str]:
    """Install what applies to `model` (a causal LM with whole weights); returns the names installed."""
    return ["onednn_linear"] if onednn.install(model) else []


def release_packed_copies(model: torch.nn.Module) -> None:
    """Drop the packed copies of `model`'s weights: they changed in place, or are not needed for a while."""
    onednn.release(model)
