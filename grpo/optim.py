"""The accelerator (device, processes, precision), the optimizer and the learning-rate schedule, built from a
config the same way by every command."""

from __future__ import annotations

import dataclasses

import torch
from accelerate import Accelerator
from transformers import get_scheduler

_SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def make_accelerator(train_cfg) -> Accelerator:
    """train.mixed_precision as accelerate spells it; CPU processes (gloo) whenever there is no GPU."""
    precision = {"fp32": "no"}.get(train_cfg.mixed_precision, train_cfg.mixed_precision)
    return Accelerator(mixed_precision=precision, cpu=train_cfg.cpu or not torch.cuda.is_available())


def make_optimizer(params, optim_cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel on CPU and CUDA (5x faster on this CPU than the per-tensor loop)."""
    return torch.optim.AdamW(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                             betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2), fused=device.type in ("cpu", "cuda"))


def make_scheduler(optimizer, optim_cfg, total_updates: int):
    """Linear warm-up over optim.warmup_steps, then optim.scheduler (constant, linear or cosine decay)."""
    return get_scheduler(_SCHEDULERS[optim_cfg.scheduler], optimizer, num_warmup_steps=optim_cfg.warmup_steps,
                         num_training_steps=max(total_updates, 1))


def model_config_for(model_cfg, checkpoint: str | None):
    """`model_cfg` pointed at a saved model folder (checkpoint-<step>, final) when one is given."""
    return dataclasses.replace(model_cfg, name_or_path=checkpoint, gguf_file=None) if checkpoint else model_cfg
