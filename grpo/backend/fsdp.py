"""Fully sharded data parallelism (torch FSDP2, switched on by an accelerate config): what the trainer does
differently when each process holds only a shard of every parameter.

- Generation runs one small forward pass per token. Gathering every layer for every token would cost an
  all-gather per layer per token, and processes whose completions end at different steps would wait on each
  other. `full_parameters` gathers each sharded module once for the whole generation (the full policy then
  lives on every process, as under DDP) and reshards afterwards.
- The frozen reference model is sharded like the policy (`shard_reference`): 1/W of its weights per
  process, one layer gathered at a time during its forward pass.
- Checkpoints hold full weights and optimizer state (`model_state`, `optimizer_state`), gathered to the
  main process, so `final/` and checkpoints load with from_pretrained and a run resumes on any number of
  processes; `load_model_state` / `load_optimizer_state` shard them again.
FSDP1 is refused with a pointer to fsdp_version: 2.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from grpo.backend.base import Backend
from grpo.io.checkpoint import without_tied_copies
from grpo.modeling.logprobs import LogprobModel


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check_supported(accelerator: Accelerator) -> None:
    """Refuse FSDP1, naming the setting to change."""
    if is_sharded(accelerator) and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ValueError("FSDP1 is not supported: set fsdp_config.fsdp_version: 2 in the accelerate config "
                         "(configs/accelerate/fsdp.yaml)")


def shard_reference(module: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """The reference model sharded as accelerate shards the policy (no optimizer)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, module).eval()


def settle_root(module: torch.nn.Module, device: torch.device) -> None:
    """Run one token through the prepared LogprobModel `module` without gradient, on every process.

    FSDP2 makes the first sharded module that runs a forward pass the root of its hierarchy. Generation
    calls the causal LM inside the LogprobModel directly, so without this its first decoder layer would
    become the root and the LogprobModel's own parameters (embeddings, head) would never be gathered.
    """
    token = torch.ones(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        module(token, token, token, token)


def _fsdp_modules(module: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_parameters(module: torch.nn.Module, accelerator: Accelerator):
    """Within the block every sharded submodule of `module` (the prepared policy) holds its full
    parameters and keeps them across forward passes; resharded on exit. A no-op without FSDP."""
    if not is_sharded(accelerator):
        yield
        return
    inner = [m for m in _fsdp_modules(module) if m is not module]  # the root never reshards after forward
    reshard_after_forward = accelerator.state.fsdp_plugin.reshard_after_forward
    for m in inner:
        m.set_reshard_after_forward(False, recurse=False)
    for m in [module, *inner]:
        m.unshard()
    try:
        yield
    finally:
        for m in [module, *inner]:
            m.reshard()
        for m in inner:
            m.set_reshard_after_forward(reshard_after_forward, recurse=False)


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def model_state(module: torch.nn.Module, accelerator: Accelerator, prefix: str = "model.") -> dict | None:
    """Full state dict of the causal LM inside `module` (a prepared LogprobModel), on the CPU of the main
    process (None elsewhere), without the copies of tied weights (as save_pretrained writes them).
    Collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module, options=_options(cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    return without_tied_copies(module.model, {k.removeprefix(prefix): v for k, v in state.items()})


def optimizer_state(module: torch.nn.Module, optimizer, accelerator: Accelerator) -> dict | None:
    """Full optimizer state (keyed by parameter name) on the main process's CPU; collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(module, getattr(optimizer, "optimizer", optimizer),
                                     options=_options(cpu_offload=True))
    return state if accelerator.is_main_process else None


def load_model_state(module: torch.nn.Module, weights: dict, prefix: str = "model.") -> None:
    """Shard full `weights` of the causal LM into `module`; every process passes the full weights."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, {prefix + k: v for k, v in weights.items()}, options=_options(strict=False))


def load_optimizer_state(module: torch.nn.Module, optimizer, state: dict) -> None:
    """Shard a full optimizer state into `optimizer`. A state saved by an unsharded run names parameters by
    their position in module.parameters(); those positions are turned into parameter names first."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = [name for name, _ in module.named_parameters()]
    if any(isinstance(k, int) for k in state["state"]):
        state = {"state": {names[k]: v for k, v in state["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(module, getattr(optimizer, "optimizer", optimizer), state, options=_options())


class FSDPBackend(Backend):
    """FSDP2: each process holds a shard of every parameter (and of the reference's)."""

    name = "FSDP"
    whole_weights_on_every_process = whole_weight_options = False

    def _check_options(self) -> None:
        check_supported(self.accelerator)
        super()._check_options()

    def _place_reference(self, policy_module, reference):
        settle_root(policy_module, self.device)
        return None if reference is None else shard_reference(LogprobModel(reference), self.accelerator)

    @contextlib.contextmanager
    def whole_model(self):
        with full_parameters(self.models.policy, self.accelerator):
            yield self.models.model

    def whole_weights(self) -> dict | None:
        return model_state(self.models.policy, self.accelerator)

    def checkpoint_states(self, out, step: int) -> dict:
        states = super().checkpoint_states(out, step)
        states["optimizer_state"] = optimizer_state(self.models.policy, self.models.optimizer, self.accelerator)
        return states

    def restore_hooks(self, checkpoint) -> dict:
        policy, optimizer = self.models.policy, self.models.optimizer
        return {"load_model": lambda weights: load_model_state(policy, weights),
                "load_optimizer": lambda state: load_optimizer_state(policy, optimizer, state)}
