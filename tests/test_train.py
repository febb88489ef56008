"""End-to-end: tiny random model, real generation, real optimisation, real checkpoints."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.cli import main

from conftest import ROOT

RULES = '''
def length_reward(completion, example):
    """Varies from sample to sample, so every group has signal even for a random model."""
    return len(completion) / 10
'''


@pytest.fixture
def run_args(tiny_model_dir, tmp_path):
    rules = tmp_path / "rules.py"
    rules.write_text(RULES)
    return tmp_path, [
        f"model.name_or_path={tiny_model_dir}",
        f"data.path={ROOT / 'data/arithmetic/train.jsonl'}", "data.max_samples=64",
        f"eval.path={ROOT / 'data/arithmetic/test.jsonl'}", "eval.num_prompts=8", "eval.batch_size=4",
        f"rewards=[{{fn: accuracy}}, {{fn: '{rules}:length_reward', weight: 0.5, name: length}}]",
        "rollout.num_generations=4", "rollout.max_completion_length=8",
        "train.prompts_per_step=2", "train.micro_batch_size=4", "train.max_steps=2", "train.save_every=2",
        f"train.output_dir={tmp_path / 'run'}", "optim.lr=1e-2", "logging.wandb=disabled", "train.mixed_precision=fp32",
    ]


def test_two_step_run_changes_parameters_and_writes_outputs(run_args, tiny_model_dir, capsys):
    tmp_path, args = run_args
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert main(["train", str(ROOT / "configs/quickstart.yaml"), *args, "algorithm.beta=0.04"]) == 0
    out = tmp_path / "run"
    printed = capsys.readouterr().out
    assert "per step: 2 prompts x 4 completions = 8 completions" in printed
    assert "held-out accuracy (8 prompts, greedy): before" in printed

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ["reward", "reward/accuracy", "reward/length", "reward/length/errors", "loss", "kl",
                "completion_length", "clip_ratio", "step_time", "time/rollout", "time/update", "grad_norm"]:
        assert key in steps[0], key
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy equals the reference before step 1
    assert steps[1]["kl"] > 0
    assert [r["step"] for r in records if "eval/accuracy" in r] == [0, 2]

    assert "algorithm:\n  beta: 0.04" in (out / "config.yaml").read_text()
    for folder in [out / "checkpoint-2", out / "final"]:
        model = AutoModelForCausalLM.from_pretrained(folder)
        AutoTokenizer.from_pretrained(folder)
        changed = [not torch.equal(a, b) for a, b in zip(before.parameters(), model.parameters())]
        assert all(changed), f"{sum(changed)} of {len(changed)} parameter tensors changed"
    assert (out / "checkpoint-2" / "trainer_state.pt").is_file()


def test_several_iterations_and_token_level_loss(run_args):
    tmp_path, args = run_args
    assert main(["train", str(ROOT / "configs/quickstart.yaml"), *args, "algorithm.num_iterations=2",
                 "algorithm.loss_type=dapo", "algorithm.epsilon_high=0.28", "eval.path=null", "train.save_every=0"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["time/reference"] > 0 for r in records)
    assert (tmp_path / "run/final/model.safetensors").is_file()
