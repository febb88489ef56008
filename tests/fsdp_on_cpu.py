"""`python tests/fsdp_on_cpu.py train CONFIG ...` under `accelerate launch --config_file configs/accelerate/fsdp.yaml`:
grpo with accelerate's FSDP2 on CPU processes (gloo), for the tests.

accelerate switches FSDP on only for GPU process types and reports CPU processes as MULTI_CPU, whatever the
config says. This launcher turns the accelerator's state to FSDP right after it is created, with the plugin
built from the FSDP_* variables that `accelerate launch` set from the config file; from there on the
trainer and accelerate run their ordinary FSDP2 code (fully_shard, DTensor parameters, sharded optimizer).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpo.trainer  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402

make_accelerator = grpo.trainer.make_accelerator


def make_fsdp_accelerator(train_cfg):
    accelerator = make_accelerator(train_cfg)
    for state in (PartialState(), AcceleratorState()):  # both keep the distributed type
        state.distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = FullyShardedDataParallelPlugin()
    assert accelerator.is_fsdp2, "FSDP_VERSION=2 expected from configs/accelerate/fsdp.yaml"
    return accelerator


grpo.trainer.make_accelerator = make_fsdp_accelerator

if __name__ == "__main__":
    from grpo.cli import main

    sys.exit(main())
