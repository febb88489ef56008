"""`python tests/cpu_launch.py train CONFIG ...` under `accelerate launch --config_file configs/accelerate/<fsdp,
zero2>.yaml`: grpo with accelerate's FSDP2 or DeepSpeed engine on CPU processes (gloo), for the tests.

accelerate switches these engines on only for GPU processes: on a CPU it reports FSDP runs as MULTI_CPU, and
for DeepSpeed (whose CPU accelerator does start, over gloo) it records one process of rank 0 in every
process. This launcher corrects the accelerator's state right after it is created (the distributed type and
FSDP plugin from the FSDP_* variables `accelerate launch` set from the config file; the process count and
rank from torch.distributed); from there on the trainer, accelerate and the engines run their ordinary code.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpo.backend  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402

make_accelerator = grpo.backend.make_accelerator


def make_cpu_engine_accelerator(train_cfg):
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        import torch.distributed as dist

        precision = {"fp32": "no"}.get(train_cfg.mixed_precision, train_cfg.mixed_precision)
        accelerator = Accelerator(mixed_precision=precision, cpu=False)  # cpu=True would drop DeepSpeed
        for state in (PartialState(), AcceleratorState()):  # both keep the counts
            state.num_processes, state.process_index = dist.get_world_size(), dist.get_rank()
            state.local_process_index = int(os.environ["LOCAL_RANK"])
        assert accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.num_processes > 1
        return accelerator
    accelerator = make_accelerator(train_cfg)
    for state in (PartialState(), AcceleratorState()):  # both keep the distributed type
        state.distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = FullyShardedDataParallelPlugin()
    assert accelerator.is_fsdp2, "FSDP_VERSION=2 expected from configs/accelerate/fsdp.yaml"
    return accelerator


grpo.backend.make_accelerator = make_cpu_engine_accelerator

if __name__ == "__main__":
    from grpo.commands.cli import main

    sys.exit(main())
