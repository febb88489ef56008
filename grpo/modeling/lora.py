"""LoRA adapters (`model.lora`) through peft, injected into the causal LM in place.

The model keeps its own class and module names (peft's `inject_adapter_in_model`, not a PeftModel wrapper),
so the fused log-prob head, the CPU kernels, the backends and the rollout engines see the model they know:
each targeted linear layer becomes base_layer (frozen) + lora_A, lora_B (trained), and the layer computes
W x + (alpha / r) * B A x. Everything else is frozen.
- The base model is the same modules with the adapters switched off (`adapters_disabled`): the reference
  model of the KL penalty costs no second copy of the weights.
- Saved adapters are peft's format (adapter_config.json, adapter_model.safetensors with peft's key names),
  loadable with `peft.PeftModel.from_pretrained(base, folder)`; `merged_state_dict` gives the base model's
  state dict with B A folded into W, what a model without peft (or vLLM) loads.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the injected model's tensors
ADAPTER = "default"


def add_adapters(model, lora_cfg, base_name: str):
    """Inject LoRA adapters as `lora_cfg` (grpo.config.LoraConfig) says into `model`, in place; only the
    adapters are trainable. `base_name` is recorded in the adapter config (peft's base_model_name_or_path)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=0.0, bias="none",
                        target_modules=lora_cfg.target_modules, base_model_name_or_path=base_name,
                        task_type="CAUSAL_LM")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    train_only_adapters(model)
    return model


def train_only_adapters(model) -> None:
    """Adapter weights trainable, every other weight frozen."""
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def _lora_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def has_adapters(model) -> bool:
    return bool(getattr(model, "peft_config", None)) and bool(_lora_layers(model))


@contextlib.contextmanager
def adapters_disabled(model):
    """Inside: `model` computes as its base model (every adapter skipped). Only the layers' switch is flipped
    (peft's `disable_adapters` flag): peft's enable_adapters() would also flip requires_grad, which a sharded
    (FSDP2) policy does not see on the parameters it computes with."""
    layers = _lora_layers(model)
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer in layers:
            layer._disable_adapters = False


@contextlib.contextmanager
def merged_weights(model):
    """Inside: each adapted layer's W holds W + (alpha / r) * B A (as `merged_state_dict` computes it) and its
    adapter is switched off, so `model` computes the adapted function with plain linear layers (what decoding
    runs fastest: no two extra small matmuls per layer per token). On exit every W is restored bit for bit from
    a copy of the adapted layers' weights, held only inside the block. A no-op without adapters."""
    layers = [m for m in _lora_layers(model) if not getattr(m, "merged", False)]
    saved = []
    with torch.no_grad():
        for layer in layers:
            weight = layer.get_base_layer().weight
            saved.append(weight.detach().clone())
            weight.copy_(_merged(layer, weight, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight))
            layer._disable_adapters = True
    try:
        yield model
    finally:
        with torch.no_grad():
            for layer, original in zip(layers, saved):
                layer.get_base_layer().weight.copy_(original)
                layer._disable_adapters = False


def adapter_state_dict(model, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter weights under peft's saved names (base_model.model.<module>.lora_A.weight, ...)."""
    from peft import get_peft_model_state_dict

    weights = get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER)
    return {_PEFT_PREFIX + k: v for k, v in weights.items()}


def load_adapter_state_dict(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Load adapter weights saved by `save_adapter` (or peft) into `model`'s adapters, exactly."""
    from peft import set_peft_model_state_dict

    stripped = {k.removeprefix(_PEFT_PREFIX): v for k, v in state.items()}
    result = set_peft_model_state_dict(model, stripped, adapter_name=ADAPTER)
    unexpected = sorted(getattr(result, "unexpected_keys", []) or [])
    missing = sorted(k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k)
    if unexpected or missing:
        raise ValueError(f"{source}: the adapter does not fit the configured model.lora: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def save_adapter(folder: Path, model, state: dict[str, torch.Tensor] | None = None) -> None:
    """adapter_config.json and adapter_model.safetensors in `folder` (peft's layout). `state`: the model's
    full state dict when `model` holds a shard of it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config[ADAPTER].save_pretrained(str(folder))
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model, state).items()},
              folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def load_adapter(model, folder: Path) -> None:
    """Inject the adapters saved in `folder` (their own r, alpha and target modules) into `model` and load
    their weights."""
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file

    inject_adapter_in_model(LoraConfig.from_pretrained(str(folder)), model, adapter_name=ADAPTER)
    load_adapter_state_dict(model, load_file(folder / ADAPTER_WEIGHTS), str(folder / ADAPTER_WEIGHTS))


def model_keys(adapter_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Saved adapter weights under the names of the injected model's state dict
    (base_model.model.X.lora_A.weight -> X.lora_A.default.weight), for loaders that take model state dicts."""
    out = {}
    for key, value in adapter_state.items():
        key = key.removeprefix(_PEFT_PREFIX)
        head, _, leaf = key.rpartition(".")
        out[f"{head}.{ADAPTER}.{leaf}" if leaf == "weight" else f"{key}.{ADAPTER}"] = value
    return out


def is_adapter_folder(folder) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_base_name(folder) -> str:
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""


def merged_state_dict(model, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`model`'s weights as its base architecture names them, each adapted layer's W replaced by
    W + (alpha / r) * B A; a model without adapters gives its state dict as it is. `state`: the full
    state dict when `model` holds a shard of it (taken as the source of every tensor)."""
    state = model.state_dict() if state is None else state
    if not has_adapters(model):
        return state
    merged = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
    layers = set(_lora_layers(model))
    with torch.no_grad():
        for name, module in model.named_modules():
            if module not in layers or getattr(module, "merged", False):
                continue
            merged[f"{name}.weight"] = _merged(module, merged[f"{name}.weight"], state[f"{name}.lora_A.{ADAPTER}.weight"],
                                               state[f"{name}.lora_B.{ADAPTER}.weight"])
    return merged


def _merged(layer, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """W + (alpha / r) * B A for one adapted `layer` (computed in fp32, returned in W's dtype)."""
    delta = lora_b.float() @ lora_a.float()
    delta = delta.T if getattr(layer, "fan_in_fan_out", False) else delta
    return (weight.float() + delta * layer.scaling[ADAPTER]).to(weight.dtype)


class BaseModelLogprobs:
    """The reference model of a LoRA run: the prepared policy log-prob module (DDP- or FSDP-wrapped), called
    with the adapters of its causal LM `model` switched off. Passed where a LogprobModel goes
    (grpo.modeling.logprobs.rollout_logprobs calls it as one): no second copy of the weights exists."""

    def __init__(self, policy, model):
        self.policy, self.model = policy, model
        self.module = getattr(policy, "module", policy)  # the LogprobModel inside

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.policy(*args, **kwargs)
