"""DeepSpeed ZeRO (switched on by an accelerate config): what the trainer does differently when DeepSpeed's
engine owns the backward pass, the optimizer step and the optimizer state.

- The engine is told the step's shape (`configure`): micro-batches of train.micro_batch_size completions,
  as many per process as one step has (its gradient accumulation steps), clipping at optim.max_grad_norm.
- Each micro-batch's loss is already normalised for the whole batch, so the engine's own division by the
  accumulation steps is turned off (`backward`), and only the last micro-batch of a step is a boundary
  (`deferred_step`): there the engine reduces gradients across processes, clips, steps the optimizer and
  the learning-rate schedule, and zeroes the gradients.
- ZeRO partitions the optimizer state across processes, so checkpoints keep it in DeepSpeed's own files
  (`save_engine_state` / `load_engine_state`, under checkpoint-<step>/deepspeed/); the weights are written
  as model.safetensors as always. A DeepSpeed checkpoint resumes with the same number of processes.
- ZeRO-3 also partitions the weights: a parameter exists whole only inside its own module's forward pass.
  Generation, which runs one small forward per token and ends at a different step on each process, and
  checkpoint writing use `gathered_copy`: a plain copy of the policy whose memory exists only inside the
  block, filled module by module from the partitions (one module gathered at a time). The reference model
  is a ZeRO-3 engine of its own (`reference_engine`), gathered layer by layer during its forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import weakref
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from grpo.backend.base import Backend
from grpo.io.checkpoint import without_tied_copies
from grpo.modeling.loading import load_model
from grpo.modeling.logprobs import LogprobModel

ENGINE_DIR, TAG = "deepspeed", "state"
_PLAIN_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # causal LM -> its meta-device plain copy


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def stage(accelerator: Accelerator) -> int:
    """The ZeRO stage of a DeepSpeed run (0 without DeepSpeed)."""
    if not is_deepspeed(accelerator):
        return 0
    return accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)


def configure(accelerator: Accelerator, cfg, micro_batches: int) -> None:
    """Fill the DeepSpeed config with the step's shape; refuse an optimizer or schedule in it. Before prepare()."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError("the DeepSpeed config must not set `optimizer` or `scheduler`: grpo builds them from the "
                         "`optim` section")
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = micro_batches
    ds["gradient_clipping"] = cfg.optim.max_grad_norm
    ds.pop("train_batch_size", None)  # derived by accelerate from the three above
    accelerator.gradient_accumulation_steps = micro_batches


@contextlib.contextmanager
def deferred_step(accelerator: Accelerator):
    """A micro-batch that is not the last of its step: the engine accumulates and does not step."""
    accelerator.sync_gradients = False
    try:
        yield
    finally:
        accelerator.sync_gradients = True


def save_engine_state(engine, folder: Path) -> None:
    """The engine's partitioned optimizer state (every process writes its part); collective."""
    engine.save_checkpoint(str(folder), tag=TAG, save_latest=False)


def load_engine_state(engine, folder: Path) -> None:
    """Restore weights and optimizer partitions from `folder` (written by save_engine_state)."""
    path, _ = engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"{folder}: no DeepSpeed state to resume from (was this checkpoint written by a "
                                "DeepSpeed run with the same number of processes?)")


def reference_engine(module: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """The frozen reference partitioned as ZeRO-3 partitions the policy (no optimizer)."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()  # the engine's eval() returns None
    return engine


@contextlib.contextmanager
def gathered_copy(model: torch.nn.Module, device: torch.device):
    """Yields a plain (unpartitioned) copy of the ZeRO-3 partitioned causal LM `model` with its current
    weights; its memory is freed on exit. Collective: every process enters it, and each module's
    parameters are gathered in turn (one module at a time beside the copy)."""
    import deepspeed

    plain = _PLAIN_COPIES.get(model)
    if plain is None:
        with torch.device("meta"):
            plain = type(model)(copy.deepcopy(model.config))
        plain.generation_config = copy.deepcopy(model.generation_config)
        plain.requires_grad_(False).eval()
        _PLAIN_COPIES[model] = plain
    plain.to_empty(device=device)
    sources = dict(model.named_modules())
    with torch.no_grad():
        for name, target in plain.named_modules():
            source = sources[name]
            params = list(source.parameters(recurse=False))
            with deepspeed.zero.GatheredParameters(params):
                for (_, value), (_, slot) in zip(source.named_parameters(recurse=False),
                                                  target.named_parameters(recurse=False)):
                    slot.copy_(value)
            for (_, value), (_, slot) in zip(source.named_buffers(recurse=False), target.named_buffers(recurse=False)):
                slot.copy_(value)
    try:
        yield plain
    finally:
        plain.to("meta")


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO-2 (optimizer state and gradients partitioned) or ZeRO-3 (weights partitioned too): the
    engine owns the backward pass, the optimizer step and the optimizer state."""

    name = "DeepSpeed"
    whole_weight_options = False

    def __init__(self, accelerator: Accelerator, cfg):
        super().__init__(accelerator, cfg)
        self.zero3 = stage(accelerator) == 3
        self.whole_weights_on_every_process = self.fused_head = not self.zero3

    def _check_options(self) -> None:
        if self.cfg.model.lora is not None:
            raise ValueError("model.lora: not supported under DeepSpeed yet; train LoRA adapters with DDP or FSDP2 "
                             "(configs/accelerate/ddp.yaml, fsdp.yaml), or set model.lora=null")
        super()._check_options()

    def _configure(self, micro_batches: int) -> None:
        configure(self.accelerator, self.cfg, micro_batches)

    def _load_reference(self, policy):
        if not self.zero3:
            return super()._load_reference(policy)
        # the policy was partitioned as it loaded: the reference loads anew
        return load_model(self.cfg.model, self.device, trainable=False).requires_grad_(False)

    def _place_reference(self, policy_module, reference):
        if reference is None or not self.zero3:
            return reference
        return reference_engine(LogprobModel(reference, fused_head=False), self.accelerator)

    @contextlib.contextmanager
    def whole_model(self):
        if not self.zero3:
            with super().whole_model() as model:
                yield model
            return
        with gathered_copy(self.models.model, self.device) as plain:
            yield plain

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss, scale_wrt_gas=False)  # each micro-batch's loss is already normalised

    def accumulating(self):
        return deferred_step(self.accelerator)  # the engine steps inside the last micro-batch's backward

    def whole_weights(self) -> dict | None:
        if not self.zero3:
            return None
        with self.whole_model() as whole:
            if not self.is_main_process:
                return None
            state = without_tied_copies(whole, whole.state_dict())
            return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def checkpoint_states(self, out: Path, step: int) -> dict:
        """Every process writes its optimizer partition, then the checkpoint takes the folder."""
        states = super().checkpoint_states(out, step)
        staging = out / f"checkpoint-{step}.{ENGINE_DIR}.tmp"
        if self.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        self.barrier()
        save_engine_state(self.models.policy, staging)
        self.barrier()
        states.update(optimizer_state={}, move_in={ENGINE_DIR: staging})
        return states

    def restore_hooks(self, checkpoint: Path) -> dict:
        policy = self.models.policy
        hooks = {"load_optimizer": lambda _: load_engine_state(policy, checkpoint / ENGINE_DIR)}
        if self.zero3:  # partitioned weights come back with the engine's state
            hooks["load_model"] = lambda weights: None
        return hooks
