"""The backend: how the policy and reference models are placed on the processes and stepped.

`Backend` is one process or DDP (accelerate's plain engines); grpo.backend.fsdp and grpo.backend.deepspeed
subclass it for FSDP2 and DeepSpeed ZeRO-2/3. One is chosen at start (grpo.backend.make_backend) and the
training loop asks it, whatever the engine, for:
- placement: `prepare` loads the models and optimizer and hands them to the engine; on a CPU with whole
  weights it installs the CPU kernels (grpo.backend.cpu) on them, once;
- generation weights: `whole_model()` yields the causal LM with whole weights (collective when sharded);
- stepping: `backward`, `accumulating()` (a micro-batch that is not the last of the step) and `step`
  (clip, optimizer and schedule step, a non-finite update skipped);
- collectives: `gather`, `mean`, `sum`, `any` (plain values on one process);
- checkpoints: `whole_weights`, `checkpoint_states`, `restore_hooks`.
It knows nothing of rewards, advantages or losses.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from pathlib import Path

import torch
from accelerate import Accelerator

from grpo.backend.accelerator import make_optimizer, make_scheduler
from grpo.backend.allocator import keep_freed_memory
from grpo.backend.cpu import install_cpu_kernels, release_packed_copies
from grpo.modeling import lora
from grpo.modeling.checkpointing import checkpoint_layers
from grpo.modeling.loading import load_model
from grpo.modeling.logprobs import LogprobModel, causal_lm


@dataclasses.dataclass
class Models:
    policy: torch.nn.Module  # the prepared LogprobModel (DDP-, FSDP- or DeepSpeed-wrapped): training passes
    model: torch.nn.Module  # the causal LM inside it
    reference: torch.nn.Module | None  # frozen; a LogprobModel or causal LM ready for no-gradient passes
    optimizer: torch.optim.Optimizer
    scheduler: object


class Backend:
    """One process, or data parallelism (DDP) over several: every process holds whole weights."""

    name = "single process / DDP"
    whole_weights_on_every_process = True  # False: sharded or partitioned (no CPU kernels, no weight copies)
    whole_weight_options = True  # ref_reset_every, MoE bias updates and routing replay work here
    fused_head = True  # log-probs through grpo.modeling.head (False where the head's weight is partitioned)

    def __init__(self, accelerator: Accelerator, cfg):
        self.accelerator, self.cfg = accelerator, cfg
        self.device = accelerator.device
        self.num_processes, self.rank = accelerator.num_processes, accelerator.process_index
        self.is_main_process = accelerator.is_main_process
        self.autocast = accelerator.autocast
        self.models: Models | None = None
        if self.device.type == "cpu" and cfg.train.reuse_host_memory:
            keep_freed_memory()

    # placement

    def prepare(self, micro_batches: int) -> Models:
        """Load the policy (and the reference when algorithm.beta > 0), build the optimizer and schedule, and
        hand them to the engine. micro_batches: per process and step."""
        cfg = self.cfg
        self._check_options()
        self._configure(micro_batches)
        policy = load_model(cfg.model, self.device)
        if cfg.train.gradient_checkpointing:
            checkpoint_layers(policy, cfg.train.share_prompt)
        adapters = lora.has_adapters(policy)  # LoRA: the reference is the policy with its adapters off
        reference = self._load_reference(policy) if cfg.algorithm.beta > 0 and not adapters else None
        optimizer = make_optimizer([p for p in policy.parameters() if p.requires_grad], cfg.optim, self.device)
        scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps * cfg.algorithm.num_iterations)
        # one module call per micro-batch, so DDP sees one forward per backward
        policy_module, optimizer, scheduler = self.accelerator.prepare(LogprobModel(policy, self.fused_head),
                                                                       optimizer, scheduler)
        reference = self._place_reference(policy_module, reference)
        model = self.accelerator.unwrap_model(policy_module).model
        if self.device.type == "cpu" and self.whole_weights_on_every_process and cfg.train.onednn_linear:
            for module in (model, reference):
                if module is not None:
                    install_cpu_kernels(causal_lm(module))
        if adapters and cfg.algorithm.beta > 0:
            reference = lora.BaseModelLogprobs(policy_module, model)
        self.models = Models(policy_module, model, reference, optimizer, scheduler)
        return self.models

    def _check_options(self) -> None:
        if not self.whole_weight_options:
            refuse_whole_weight_options(self.cfg, self.name)

    def _configure(self, micro_batches: int) -> None:
        """Tell the engine the step's shape before prepare() (DeepSpeed)."""

    def _load_reference(self, policy: torch.nn.Module) -> torch.nn.Module:
        return copy.deepcopy(policy).requires_grad_(False)

    def _place_reference(self, policy_module, reference):
        return reference

    @contextlib.contextmanager
    def whole_model(self):
        """The causal LM with whole weights, for generation and evaluation. Collective when sharded."""
        try:
            yield self.models.model
        finally:
            release_packed_copies(self.models.model)  # not kept beside the passes that follow

    # stepping

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def accumulating(self):
        """Context for a micro-batch that is not the last of its step: gradients accumulate, nothing syncs."""
        return self.accelerator.no_sync(self.models.policy)

    def step(self, max_grad_norm: float, loss_finite: bool) -> tuple[float, bool]:
        """Clip the gradient norm (max_grad_norm <= 0: no clipping), step the optimizer and the schedule, zero
        the gradients. A NaN or inf loss or gradient never reaches the weights. Returns (grad_norm, skipped)."""
        m, accelerator = self.models, self.accelerator
        max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(m.policy.parameters(), max_norm)  # DeepSpeed: its step's norm
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if accelerator.scaler is not None:  # fp16: the scaler skips a non-finite step itself and must see every step
            scale = accelerator.scaler.get_scale()
            m.optimizer.step()  # unscaled by clip_grad_norm_ above; skipped on inf/NaN, then the scale is updated
            skipped = accelerator.scaler.get_scale() < scale  # it backs off exactly when it skipped (a fused AdamW
            # skips inside its kernel, which accelerate's step_was_skipped does not see)
        else:
            skipped = not (loss_finite and math.isfinite(grad_norm))
            if not skipped:
                m.optimizer.step()
        if not skipped:
            m.scheduler.step()
        release_packed_copies(m.model)  # a fused optimizer step leaves the version counters as they were
        m.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    # collectives

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """values [n] of every process, concatenated in rank order, on the CPU."""
        if self.num_processes == 1:
            return values.cpu()
        return self.accelerator.gather(values.to(self.device)).cpu()

    def mean(self, value: float) -> float:
        if self.num_processes == 1:
            return value
        return self.accelerator.reduce(torch.tensor(float(value), device=self.device), "mean").item()

    def mean_tensor(self, value: torch.Tensor) -> torch.Tensor:
        """The element-wise mean over processes of a tensor of the same shape on every process."""
        if self.num_processes == 1:
            return value
        return self.accelerator.reduce(value.to(self.device), "mean")

    def sum_tensor(self, value: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over processes of a tensor of the same shape on every process, on the CPU."""
        if self.num_processes == 1:
            return value
        return self.accelerator.reduce(value.to(self.device), "sum").cpu()

    def sum(self, value: torch.Tensor) -> float:
        """The sum over processes of a 0-dim tensor, as a float."""
        if self.num_processes == 1:
            return value.item()
        return self.accelerator.reduce(value.to(self.device), "sum").item()

    def any(self, flag: bool) -> bool:
        if self.num_processes == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor(float(flag), device=self.device), "sum").item())

    def print(self, *args) -> None:
        """print on the main process only."""
        self.accelerator.print(*args)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    # checkpoints

    def whole_weights(self) -> dict | None:
        """Full weights without tied copies on the main process (None elsewhere) when the policy is sharded
        or partitioned; None when model.state_dict() already holds them. Collective."""
        return None

    def checkpoint_states(self, out: Path, step: int) -> dict:
        """save_checkpoint's engine-dependent arguments (model_state, optimizer_state, move_in). Collective."""
        return {"model_state": self.whole_weights(), "optimizer_state": None, "move_in": None}

    def restore_hooks(self, checkpoint: Path) -> dict:
        """load_checkpoint's engine-dependent arguments (load_model, load_optimizer)."""
        return {}


def refuse_whole_weight_options(cfg, engine: str) -> None:
    """Options that update or read whole weights outside the training pass; refused where the engine owns
    or partitions them."""
    set_ = [name for name, value in (("algorithm.ref_reset_every", cfg.algorithm.ref_reset_every),
                                     ("moe.bias_update_speed", cfg.moe.bias_update_speed),
                                     ("moe.routing_replay", cfg.moe.routing_replay),
                                     ("train.gradient_checkpointing", cfg.train.gradient_checkpointing)) if value]
    if set_:
        raise ValueError(f"{', '.join(set_)}: not supported under {engine} yet; set to 0/false or use DDP "
                         "(configs/accelerate/ddp.yaml)")
