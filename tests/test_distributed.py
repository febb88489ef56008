"""Two CPU processes (gloo) against one: the same global batch and seed give the same weights, with DDP
(torchrun), FSDP2 and DeepSpeed ZeRO-2/3 (accelerate launch with configs/accelerate/fsdp.yaml, zero2.yaml or
zero3.yaml, through tests/cpu_launch.py)."""

import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import grpo.modeling.logprobs
from grpo.trainer import train
from grpo.config import load_config

from conftest import ROOT


def args_for(tiny_model_dir, rules, out, loss_type, steps=3):
    return [str(ROOT / "configs/quickstart.yaml"), f"model.name_or_path={tiny_model_dir}",
            f"data.path={ROOT / 'data/arithmetic/train.jsonl'}", "data.max_samples=64", "eval.path=null",
            f"rewards=[{{fn: '{rules}:length_reward'}}]", "rollout.num_generations=4",
            "rollout.max_completion_length=8", "train.prompts_per_step=4", "train.micro_batch_size=4",
            f"train.max_steps={steps}", "train.save_every=1", "optim.lr=1e-2", "logging.wandb=disabled",
            "train.mixed_precision=fp32", "scoring.workers=0", "algorithm.beta=0.04",
            f"algorithm.loss_type={loss_type}", f"train.output_dir={out}"]


def torchrun(args, extra=()):
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
                 "-m", "grpo", "train", *args, *extra])


def accelerate(config, args, extra=()):
    """`accelerate launch --config_file configs/accelerate/<config>.yaml` of grpo on two CPU processes."""
    return _run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
                 str(ROOT / f"configs/accelerate/{config}.yaml"), "--main_process_port", _free_port(),
                 str(ROOT / "tests/cpu_launch.py"), "train", *args, *extra])


def _free_port() -> str:
    """A port no one listens on now, so a launch never meets the previous launch's lingering socket."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def assert_same_final_weights(a_dir, b_dir, folder="final"):
    a, b = load_file(a_dir / folder / "model.safetensors"), load_file(b_dir / folder / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def rules(length_rule):
    return length_rule


VARIANTS = ["algorithm.epsilon_high=5.0", "algorithm.baseline=rloo", "algorithm.scale_rewards=centred_batch",
            "algorithm.top_entropy_quantile=0.5", "algorithm.off_policy_mask_threshold=0.0",
            "algorithm.kl_is_correction=true", "algorithm.num_iterations=2"]


TOOLS = ["tools=[calculator, {fn: python, kwargs: {timeout: 2}}]", "rollout.tool_workers=1", "rollout.max_turns=2",
         "data.max_prompt_length=2000"]


@pytest.mark.parametrize("loss_type,extra", [("grpo", []), ("dapo", []), ("cispo", VARIANTS), ("grpo", TOOLS)],
                         ids=["grpo", "dapo", "cispo-and-variants", "tools"])
def test_two_processes_match_one(tiny_model_dir, rules, tmp_path, loss_type, extra):
    """cispo-and-variants: the entropy quantile and the centred-batch std are taken over both processes' batch.
    tools: each process runs its own tool workers; the tools/* counts are summed over processes."""
    one = args_for(tiny_model_dir, rules, tmp_path / "one", loss_type) + extra
    train(load_config(one[0], one[1:]))
    printed = torchrun(args_for(tiny_model_dir, rules, tmp_path / "two", loss_type) + extra)
    assert "x 2 processes" in printed
    a, b = load_file(tmp_path / "one/final/model.safetensors"), load_file(tmp_path / "two/final/model.safetensors")
    changed = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(a[k], changed[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_two_process_run_resumes_from_its_checkpoint(tiny_model_dir, rules, tmp_path):
    one = args_for(tiny_model_dir, rules, tmp_path / "one", "grpo")
    train(load_config(one[0], one[1:]))
    torchrun(args_for(tiny_model_dir, rules, tmp_path / "two", "grpo", steps=2))
    torchrun(args_for(tiny_model_dir, rules, tmp_path / "two", "grpo", steps=3), ["--resume"])
    a, b = load_file(tmp_path / "one/final/model.safetensors"), load_file(tmp_path / "two/final/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("iterations", [1, 2])
def test_fsdp_processes_match_one(tiny_model_dir, rules, tmp_path, iterations):
    """Sharded policy and reference (beta > 0), generation on gathered weights, checkpoints gathered to rank 0;
    with 2 iterations per step, pi_old is captured through the sharded policy too."""
    mu = [f"algorithm.num_iterations={iterations}"]
    one = args_for(tiny_model_dir, rules, tmp_path / "one", "grpo") + mu
    train(load_config(one[0], one[1:]))
    printed = accelerate("fsdp", args_for(tiny_model_dir, rules, tmp_path / "two", "grpo") + mu)
    assert "x 2 processes" in printed
    assert_same_final_weights(tmp_path / "one", tmp_path / "two")
    # the config is frozen: FSDP runs without oneDNN packing, and config.yaml still says what the user set
    assert (tmp_path / "two/config.yaml").read_text() == (tmp_path / "one/config.yaml").read_text().replace(
        str(tmp_path / "one"), str(tmp_path / "two"))


def test_fsdp_run_resumes_from_its_checkpoint_sharded_or_not(tiny_model_dir, rules, tmp_path):
    """Checkpoints hold full weights and optimizer state: a 2-process FSDP run continues under FSDP, or on
    one process."""
    one = args_for(tiny_model_dir, rules, tmp_path / "one", "grpo")
    train(load_config(one[0], one[1:]))
    accelerate("fsdp", args_for(tiny_model_dir, rules, tmp_path / "two", "grpo", steps=2))
    shutil.copytree(tmp_path / "two", tmp_path / "three")
    accelerate("fsdp", args_for(tiny_model_dir, rules, tmp_path / "two", "grpo", steps=3), ["--resume"])
    assert_same_final_weights(tmp_path / "one", tmp_path / "two")
    resumed = args_for(tiny_model_dir, rules, tmp_path / "three", "grpo", steps=3)
    train(load_config(resumed[0], resumed[1:]), resume=True)
    assert_same_final_weights(tmp_path / "one", tmp_path / "three")
    # and the other way: a one-process checkpoint continues under FSDP
    (tmp_path / "four").mkdir()
    shutil.copytree(tmp_path / "one/checkpoint-2", tmp_path / "four/checkpoint-2")
    (tmp_path / "four/latest").write_text("checkpoint-2\n")
    accelerate("fsdp", args_for(tiny_model_dir, rules, tmp_path / "four", "grpo", steps=3), ["--resume"])
    assert_same_final_weights(tmp_path / "one", tmp_path / "four")


def test_deepspeed_zero2_processes_match_one_and_resume(tiny_model_dir, rules, tmp_path):
    """The engine steps once per step (the last micro-batch is the boundary, losses are not divided again);
    its partitioned optimizer state is saved in checkpoint-<step>/deepspeed and restored by --resume."""
    pytest.importorskip("deepspeed")  # an optional extra: pip install -e .[deepspeed]
    one = args_for(tiny_model_dir, rules, tmp_path / "one", "dapo")
    train(load_config(one[0], one[1:]))
    printed = accelerate("zero2", args_for(tiny_model_dir, rules, tmp_path / "two", "dapo"))
    assert "x 2 processes" in printed
    assert_same_final_weights(tmp_path / "one", tmp_path / "two")
    assert (tmp_path / "two/checkpoint-3/deepspeed").is_dir()
    accelerate("zero2", args_for(tiny_model_dir, rules, tmp_path / "three", "dapo", steps=2))
    accelerate("zero2", args_for(tiny_model_dir, rules, tmp_path / "three", "dapo", steps=3), ["--resume"])
    assert_same_final_weights(tmp_path / "one", tmp_path / "three")


def test_deepspeed_zero3_processes_match_one_and_resume(tiny_model_dir, rules, tmp_path, monkeypatch):
    """Partitioned weights: generation on a gathered plain copy, a partitioned reference engine, the plain
    logits head (the fused head reads the weight outside the head's forward, where ZeRO-3 has no weight).
    The one-process run takes the same plain head, so both sum in the same order."""
    pytest.importorskip("deepspeed")
    monkeypatch.setattr(grpo.modeling.logprobs, "PLAIN_HEAD_MODELS", frozenset())
    one = args_for(tiny_model_dir, rules, tmp_path / "one", "grpo")
    train(load_config(one[0], one[1:]))
    accelerate("zero3", args_for(tiny_model_dir, rules, tmp_path / "two", "grpo"))
    assert_same_final_weights(tmp_path / "one", tmp_path / "two")
    accelerate("zero3", args_for(tiny_model_dir, rules, tmp_path / "three", "grpo", steps=2))
    accelerate("zero3", args_for(tiny_model_dir, rules, tmp_path / "three", "grpo", steps=3), ["--resume"])
    assert_same_final_weights(tmp_path / "two", tmp_path / "three")


@pytest.mark.parametrize("launcher", ["ddp", "fsdp"])
def test_lora_processes_match_one(tiny_model_dir, rules, tmp_path, launcher):
    """LoRA adapters (the reference is the base model with them off) under DDP and FSDP2: the same adapters
    as one process, and a merged final model."""
    lora = ["model.lora={r: 4, alpha: 8}"]
    one = args_for(tiny_model_dir, rules, tmp_path / "one", "grpo") + lora
    train(load_config(one[0], one[1:]))
    two = args_for(tiny_model_dir, rules, tmp_path / "two", "grpo") + lora
    printed = torchrun(two) if launcher == "ddp" else accelerate("fsdp", two)
    assert "x 2 processes" in printed
    a = load_file(tmp_path / "one/final/adapter_model.safetensors")
    b = load_file(tmp_path / "two/final/adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    assert_same_final_weights(tmp_path / "one/final", tmp_path / "two/final", folder="merged")


def test_lora_under_deepspeed_is_refused_by_name():
    from grpo.backend.deepspeed import DeepSpeedBackend

    backend = DeepSpeedBackend.__new__(DeepSpeedBackend)
    backend.cfg = load_config(None, ["model.lora={}"])
    with pytest.raises(ValueError, match="model.lora: not supported under DeepSpeed"):
        backend._check_options()


def test_sharded_engines_refuse_whole_weight_options_by_name():
    from grpo.backend.base import refuse_whole_weight_options

    cfg = load_config(None, ["algorithm.beta=0.04", "algorithm.ref_reset_every=2", "moe.routing_replay=true"])
    with pytest.raises(ValueError, match=r"algorithm.ref_reset_every, moe.routing_replay: not supported under FSDP"):
        refuse_whole_weight_options(cfg, "FSDP")
    cfg = load_config(None, ["train.gradient_checkpointing=true"])
    with pytest.raises(ValueError, match=r"train.gradient_checkpointing: not supported under DeepSpeed"):
        refuse_whole_weight_options(cfg, "DeepSpeed")
    refuse_whole_weight_options(load_config(None, []), "DeepSpeed")  # defaults are fine
