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
ZeRO stage 3 is refused: its parameters exist only inside each module's forward pass, which the fused
generation and log-prob passes do not respect yet; FSDP (configs/accelerate/fsdp.yaml) shards parameters.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType

ENGINE_DIR, TAG = "deepspeed", "state"


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure(accelerator: Accelerator, cfg, micro_batches: int) -> None:
    """Fill the DeepSpeed config with the step's shape; refuse what is not supported. Before prepare()."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise ValueError("DeepSpeed ZeRO stage 3 is not supported yet; use ZeRO-2 (configs/accelerate/zero2.yaml) "
                         "or, to shard the parameters too, FSDP (configs/accelerate/fsdp.yaml)")
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError("the DeepSpeed config must not set `optimizer` or `scheduler`: grpo builds them from the "
                         "`optim` section")
    if cfg.algorithm.ref_reset_every or cfg.moe.bias_update_speed:
        raise ValueError("algorithm.ref_reset_every and moe.bias_update_speed are not supported under DeepSpeed "
                         "yet; set them to 0 or use DDP (configs/accelerate/ddp.yaml)")
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = micro_batches
    ds["gradient_clipping"] = cfg.optim.max_grad_norm
    ds.pop("train_batch_size", None)  # derived by accelerate from the three above
    accelerator.gradient_accumulation_steps = micro_batches


def backward(accelerator: Accelerator):
    """accelerator.backward without the engine's division by the accumulation steps."""
    return lambda loss: accelerator.backward(loss, scale_wrt_gas=False)


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
