"""End-to-end: tiny random model, real generation, real optimisation, real checkpoints."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.commands.cli import main

from conftest import ROOT, load_script

@pytest.fixture
def run_args(tiny_model_dir, length_rule, tmp_path):
    rules = length_rule
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


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def final_weights(out):
    return AutoModelForCausalLM.from_pretrained(out / "final").state_dict()


def test_dynamic_sampling_drops_equal_groups_within_its_bound(run_args, tiny_model_dir, tmp_path):
    tmp_path, args = run_args
    (tmp_path / "const.py").write_text("def const(completion, example):\n    return 1.0\n")
    assert main(["train", str(ROOT / "configs/quickstart.yaml"), *args, "eval.path=null", "train.save_every=0",
                 f"rewards=[{{fn: '{tmp_path / 'const.py'}:const'}}]", "algorithm.dynamic_sampling=true",
                 "algorithm.max_sampling_rounds=3"]) == 0
    records = read_metrics(tmp_path / "run/metrics.jsonl")
    # every group is uninformative: 2 prompts drawn in each of 3 rounds, all dropped, nothing trained
    assert [(r["sampling/groups_drawn"], r["sampling/groups_dropped"], r["sampling/groups_trained"])
            for r in records] == [(6.0, 6.0, 0.0)] * 2
    assert all("loss" not in r for r in records)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = final_weights(tmp_path / "run")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dynamic_sampling_keeps_informative_groups(run_args):
    tmp_path, args = run_args
    assert main(["train", str(ROOT / "configs/quickstart.yaml"), *args, "eval.path=null", "train.save_every=0",
                 "algorithm.dynamic_sampling=true"]) == 0
    for r in read_metrics(tmp_path / "run/metrics.jsonl"):
        assert r["sampling/groups_trained"] == 2.0 and r["frac_zero_std_groups"] == 0.0


def test_masked_truncations_leave_parameters_unchanged(run_args, tiny_model_dir):
    tmp_path, args = run_args
    # with 2 new tokens nearly every completion is truncated; masking them leaves nothing to train on
    assert main(["train", str(ROOT / "configs/quickstart.yaml"), *args, "eval.path=null", "train.save_every=0",
                 "rollout.max_completion_length=2", "algorithm.truncated_completions=mask", "train.max_steps=1"]) == 0
    records = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [r["truncated_ratio"] for r in records] == [1.0]  # seeded: no completion ended within 2 tokens
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = final_weights(tmp_path / "run")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(r["loss"] == 0.0 for r in records)


def test_kl_in_reward_with_reference_reset(run_args):
    tmp_path, args = run_args
    assert main(["train", str(ROOT / "configs/quickstart.yaml"), *args, "eval.path=null", "train.save_every=0",
                 "train.max_steps=3", "algorithm.beta=0.1", "algorithm.kl_penalty=reward",
                 "algorithm.kl_estimator=k1", "algorithm.ref_reset_every=2"]) == 0
    kl = [r["kl"] for r in read_metrics(tmp_path / "run/metrics.jsonl")]
    # step 1: policy == reference; step 2: one update apart; step 3: the reference was reset after step 2
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and abs(kl[1]) > 1e-6 and kl[2] == pytest.approx(0.0, abs=1e-6)


def test_sequence_level_importance_and_overlong_penalty_run(run_args):
    tmp_path, args = run_args
    assert main(["train", str(ROOT / "configs/quickstart.yaml"), *args, "eval.path=null", "train.save_every=0",
                 "algorithm.importance_level=sequence", "algorithm.num_iterations=2",
                 "algorithm.truncated_completions=penalize", "algorithm.overlong_buffer=4"]) == 0
    for r in read_metrics(tmp_path / "run/metrics.jsonl"):
        assert r["entropy"] > 0
    # by hand: max_completion_length 8, buffer 4, penalty 1 -> -(L - 4) / 4 for L > 4, on top of the rules' total
    for group in read_metrics(tmp_path / "run/completions.jsonl"):
        for c in group["completions"]:
            raw = sum(v * w for v, w in zip(c["rewards"].values(), [1.0, 0.5]) if v is not None)
            assert c["reward"] == pytest.approx(raw - max(0, c["length"] - 4) / 4, abs=1e-6)


def test_time_limit_ends_the_run_like_max_steps(run_args, capsys):
    """train.time_limit: after the step that passes it, the run evaluates and saves its final model."""
    tmp_path, args = run_args
    assert main(["train", str(ROOT / "configs/quickstart.yaml"), *args, "train.max_steps=50",
                 "train.time_limit=0.001", "train.save_every=0"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1]
    assert [r["step"] for r in records if "eval/accuracy" in r] == [0, 1]
    assert re.search(r"train.time_limit: \d+ s of steps after step 1; finishing", capsys.readouterr().out)
    assert (tmp_path / "run/final/config.json").is_file()


def test_runs_with_different_precisions_in_one_process(run_args):
    """A pipeline runs stages in one process; accelerate would refuse a second precision there."""
    tmp_path, args = run_args
    for precision in ["fp32", "bf16", "fp32"]:
        assert main(["train", str(ROOT / "configs/quickstart.yaml"), *args, "train.max_steps=1", "eval.path=null",
                     "train.save_every=0", f"train.mixed_precision={precision}",
                     f"train.output_dir={tmp_path / precision}"]) == 0


def test_hooks_are_called_at_their_points_of_each_step(run_args, monkeypatch):
    """A StepHook installed by make_hooks sees each step as: rollout, after_rollout, then per update the
    update context around one micro_batch context per micro-batch, then after_step; its metrics are logged.
    The loop itself names no hook."""
    import contextlib

    import grpo.startup
    from grpo.hooks import Hooks, StepHook

    calls = []

    class Recording(StepHook):
        @contextlib.contextmanager
        def rollout(self, model):
            calls.append("rollout")
            yield

        def after_rollout(self, model, rollouts):
            calls.append(f"after_rollout {len(rollouts.texts)}")
            return {"hook/rollouts": float(len(rollouts.texts))}

        @contextlib.contextmanager
        def update(self, policy):
            calls.append("update")
            yield

        @contextlib.contextmanager
        def micro_batch(self, policy, batch, rows):
            calls.append(f"micro_batch {rows.start}")
            yield

        def after_step(self, skipped):
            calls.append("after_step")
            return {"hook/skipped": float(skipped)}

    monkeypatch.setattr(grpo.startup, "make_hooks", lambda model, cfg, backend, mtp=None: Hooks([Recording()]))
    tmp_path, args = run_args
    assert main(["train", str(ROOT / "configs/quickstart.yaml"), *args, "eval.path=null", "train.micro_batch_size=4",
                 "algorithm.num_iterations=2"]) == 0
    one_step = ["rollout", "after_rollout 8", "update", "micro_batch 0", "micro_batch 4", "after_step",
                "update", "micro_batch 0", "micro_batch 4", "after_step"]
    assert calls == one_step * 2
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [(r["hook/rollouts"], r["hook/skipped"]) for r in records if "loss" in r] == [(8.0, 0.0)] * 2


def test_builtin_engine_log_probs_agree_so_rollout_correction_is_a_no_op(run_args):
    """The built-in engine reports each sampled token's log-prob from decoding; the trainer's pass over the same
    tokens agrees, so every ratio is 1 (to rounding), token_mask keeps every token and trains to the same weights."""
    from safetensors.torch import load_file

    tmp_path, args = run_args
    finals = {}
    for correction in ("none", "token_mask"):
        out = tmp_path / correction
        assert main(["train", str(ROOT / "configs/quickstart.yaml"), *args, "eval.path=null", f"train.output_dir={out}",
                     f"algorithm.rollout_correction={correction}", "algorithm.rollout_correction_cap=1.001"]) == 0
        finals[correction] = load_file(out / "final/model.safetensors")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        for r in records:
            assert abs(r["rollout/mismatch_kl"]) < 1e-5 and r["rollout/is_ratio_max"] < 1.001, r
            assert r["rollout/masked_fraction"] == 0.0
    assert all(torch.equal(finals["none"][k], finals["token_mask"][k]) for k in finals["none"])


def test_one_step_equals_plain_pytorch_grpo_on_the_same_rollouts(run_args):
    """scripts/step_check.py: a whole `grpo train` step as the trainer runs it (its sampler, backend, oneDNN
    layers, shared prompts, micro-batches, fused AdamW, clipping, weight decay) against GRPO written out in plain
    PyTorch on the rollouts it sampled (the formulas are in the script's docstring)."""
    step_check = load_script("step_check")
    tmp_path, args = run_args
    seen, cfg = step_check.record_one_step(str(ROOT / "configs/quickstart.yaml"), [
        *args, "train.prompts_per_step=4", "optim.max_grad_norm=0.05", "optim.weight_decay=0.01"])
    assert seen["batch"].advantages.abs().sum() > 0 and cfg.train.micro_batch_size < 16  # 4 micro-batches
    result = step_check.compare(seen, cfg)
    assert result["advantages"] < 1e-6
    assert result["grad_norm"] > 0.05  # the clipping is exercised
    assert max(relative for relative, _ in result["grads"].values()) < 1e-5
    assert result["optimizer"] < 8  # the trainer's own gradients: clipping and AdamW are plain PyTorch's, to rounding
    # end to end, gradient rounding on elements near 0 can flip AdamW's first step: at most 2 lr apart
    assert max(result["weights"].values()) < 2 * cfg.optim.lr
    assert any(not torch.equal(seen["before"][k], seen["after"][k]) for k in seen["after"])
