"""Placement backends: how models sit on processes and devices, and how they are stepped. One is chosen at
start from the engine accelerate was launched with; the training loop only sees the `Backend` interface."""

from __future__ import annotations

from grpo.backend.accelerator import make_accelerator
from grpo.backend.base import Backend, Models
from grpo.backend.cpu import install_cpu_kernels
from grpo.backend.deepspeed import DeepSpeedBackend, is_deepspeed
from grpo.backend.fsdp import FSDPBackend, is_sharded

__all__ = ["Backend", "Models", "load_inference_model", "load_inference_mtp", "make_backend"]


def make_backend(cfg) -> Backend:
    """The backend for this launch (one process, DDP, FSDP2 or DeepSpeed), with its accelerator."""
    accelerator = make_accelerator(cfg.train)
    if is_sharded(accelerator):
        return FSDPBackend(accelerator, cfg)
    if is_deepspeed(accelerator):
        return DeepSpeedBackend(accelerator, cfg)
    return Backend(accelerator, cfg)


def load_inference_model(model_cfg, train_cfg, device):
    """A frozen causal LM for sampling only (`grpo eval`, `grpo generate`), on `device`, with the CPU kernels
    installed on a CPU (train.onednn_linear)."""
    from grpo.modeling.loading import load_model

    model = load_model(model_cfg, device, trainable=False)
    if model.device.type == "cpu" and train_cfg.onednn_linear:
        install_cpu_kernels(model)
    return model


def load_inference_mtp(cfg, model_cfg, model):
    """The MTP module to draft `model`'s tokens with when cfg.rollout.speculative is mtp (saved beside the model,
    grpo.modeling.mtp), with the CPU kernels as the model has them; None otherwise."""
    if cfg.rollout.speculative != "mtp":
        return None
    from grpo.modeling.mtp import MTPError, load_mtp

    mtp = load_mtp(model_cfg.name_or_path, model)
    if mtp is None:
        raise MTPError(f"rollout.speculative=mtp: {model_cfg.name_or_path} has no MTP module (mtp.safetensors); train "
                       "one with `grpo sft ... model.mtp={}` (configs/pipelines/mtp_quickstart.yaml), or set "
                       "rollout.speculative=none")
    if model.device.type == "cpu" and cfg.train.onednn_linear:
        install_cpu_kernels(mtp)
    return mtp
