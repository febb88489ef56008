"""The policy and reference models placed on the processes by the engine accelerate was launched with (one
process, DDP, FSDP2, DeepSpeed ZeRO-2/3), and what the trainer asks of them whatever the engine: whole
weights for generation, full states for a checkpoint, a checkpoint restored. The engines' own differences
live in grpo.backend.fsdp (FSDP2) and grpo.backend.deepspeed (DeepSpeed).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from grpo.backend import deepspeed as zero
from grpo.io.checkpoint import without_tied_copies
from grpo.modeling.logprobs import LogprobModel
from grpo.modeling.loading import load_model
from grpo.backend.accelerator import make_optimizer, make_scheduler
from grpo.backend.fsdp import (check_supported, full_parameters, is_sharded, load_model_state, load_optimizer_state,
                           model_state, optimizer_state, settle_root, shard_reference)


@dataclasses.dataclass
class Models:
    accelerator: Accelerator
    policy: torch.nn.Module  # the prepared LogprobModel (DDP-, FSDP- or DeepSpeed-wrapped): training passes
    model: torch.nn.Module  # the causal LM inside it
    reference: torch.nn.Module | None  # frozen; a LogprobModel or causal LM ready for no-gradient passes
    optimizer: torch.optim.Optimizer
    scheduler: object
    sharded: bool = False  # FSDP2
    deepspeed: bool = False
    zero3: bool = False

    @contextlib.contextmanager
    def gathered(self):
        """The causal LM with whole weights, for generation and evaluation. Collective when sharded."""
        if self.zero3:
            with zero.gathered_copy(self.model, self.accelerator.device) as plain:
                yield plain
        else:
            with full_parameters(self.policy, self.accelerator):
                yield self.model

    def whole_weights(self) -> dict | None:
        """Full weights without tied copies on the main process (None elsewhere) when the policy is sharded
        or partitioned; None when model.state_dict() already holds them. Collective."""
        if self.sharded:
            return model_state(self.policy, self.accelerator)
        if not self.zero3:
            return None
        with self.gathered() as whole:
            if not self.accelerator.is_main_process:
                return None
            state = without_tied_copies(whole, whole.state_dict())
            return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def checkpoint_states(self, out: Path, step: int) -> dict:
        """save_checkpoint's engine-dependent arguments (model_state, optimizer_state, move_in). Collective."""
        states = {"model_state": self.whole_weights(), "optimizer_state": None, "move_in": None}
        if self.sharded:
            states["optimizer_state"] = optimizer_state(self.policy, self.optimizer, self.accelerator)
        if self.deepspeed:  # every process writes its optimizer partition, then the checkpoint takes the folder
            staging = out / f"checkpoint-{step}.{zero.ENGINE_DIR}.tmp"
            if self.accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            zero.save_engine_state(self.policy, staging)
            self.accelerator.wait_for_everyone()
            states.update(optimizer_state={}, move_in={zero.ENGINE_DIR: staging})
        return states

    def restore_hooks(self, checkpoint: Path) -> dict:
        """load_checkpoint's engine-dependent arguments (load_model, load_optimizer)."""
        if self.sharded:
            return {"load_model": lambda weights: load_model_state(self.policy, weights),
                    "load_optimizer": lambda state: load_optimizer_state(self.policy, self.optimizer, state)}
        if self.deepspeed:
            hooks = {"load_optimizer": lambda _: zero.load_engine_state(self.policy, checkpoint / zero.ENGINE_DIR)}
            if self.zero3:  # partitioned weights come back with the engine's state
                hooks["load_model"] = lambda weights: None
            return hooks
        return {}


def prepare_models(cfg, accelerator: Accelerator, micro_batches: int):
    """Load the policy (and the reference when algorithm.beta > 0), build the optimizer and schedule, and
    hand them to the launched engine. Returns (Models, cfg); cfg loses train.onednn_linear where weights
    are sharded (oneDNN packing needs whole weights)."""
    sharded, deepspeed = is_sharded(accelerator), zero.is_deepspeed(accelerator)
    zero3 = zero.stage(accelerator) == 3
    check_supported(accelerator)
    if sharded or deepspeed:
        _refuse_whole_weight_options(cfg, "FSDP" if sharded else "DeepSpeed")
    if deepspeed:
        zero.configure(accelerator, cfg, micro_batches)
    if sharded or zero3:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, onednn_linear=False))
    policy = load_model(cfg.model, accelerator.device)
    reference = None
    if cfg.algorithm.beta > 0:  # under ZeRO-3 the policy is partitioned as it loads: the reference loads anew
        reference = (load_model(cfg.model, accelerator.device, trainable=False) if zero3 else
                     copy.deepcopy(policy)).requires_grad_(False)
    optimizer = make_optimizer(policy.parameters(), cfg.optim, accelerator.device)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps * cfg.algorithm.num_iterations)
    # one module call per micro-batch, so DDP sees one forward per backward
    policy_module, optimizer, scheduler = accelerator.prepare(LogprobModel(policy), optimizer, scheduler)
    if sharded:
        settle_root(policy_module, accelerator.device)
        if reference is not None:
            reference = shard_reference(LogprobModel(reference), accelerator)
    if zero3 and reference is not None:
        reference = zero.reference_engine(LogprobModel(reference), accelerator)
    model = accelerator.unwrap_model(policy_module).model
    return Models(accelerator, policy_module, model, reference, optimizer, scheduler, sharded, deepspeed, zero3), cfg


def _refuse_whole_weight_options(cfg, engine: str) -> None:
    """Options that update or read whole weights outside the training pass; refused under sharded engines."""
    set_ = [name for name, value in (("algorithm.ref_reset_every", cfg.algorithm.ref_reset_every),
                                     ("moe.bias_update_speed", cfg.moe.bias_update_speed),
                                     ("moe.routing_replay", cfg.moe.routing_replay)) if value]
    if set_:
        raise ValueError(f"{', '.join(set_)}: not supported under {engine} yet; set to 0/false or use DDP "
                         "(configs/accelerate/ddp.yaml)")
