"""End-to-end: tiny random model, real generation, real optimisation, real checkpoints."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.commands.cli import main

from conftest import ROOT

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
                 "train.prompts_per_step=4",
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


def test_one_step_equals_plain_pytorch_grpo_on_the_same_rollouts(run_args, tiny_model_dir, monkeypatch):
    """A whole `grpo train` step as the trainer runs it (its sampler, backend, oneDNN layers, shared prompts,
    micro-batches, fused AdamW, clipping) against GRPO written out in plain PyTorch on the rollouts it sampled:
    A_i = (r_i - mean_g) / (std_g + 1e-4) (unbiased std of the group), loss = -1/N sum_i (1/|o_i|) sum_t A_i
    (on-policy, ratio 1, beta 0), log-probs from the model's logits / T, clip_grad_norm_, AdamW (per parameter)."""
    import grpo.algo.update
    import grpo.trainer

    seen = {}
    plain_update, plain_accumulate = grpo.trainer.update, grpo.algo.update.accumulate_gradients

    def recording_update(models, batch, cfg, backend, hooks):
        seen["batch"], seen["before"] = batch, {k: v.clone() for k, v in models.model.state_dict().items()}
        metrics = plain_update(models, batch, cfg, backend, hooks)
        seen["after"] = {k: v.clone() for k, v in models.model.state_dict().items()}
        return metrics

    def recording_accumulate(policy, *args, **kwargs):
        metrics = plain_accumulate(policy, *args, **kwargs)
        seen["grads"] = {n: p.grad.clone() for n, p in policy.named_parameters()}
        return metrics

    monkeypatch.setattr(grpo.trainer, "update", recording_update)
    monkeypatch.setattr(grpo.algo.update, "accumulate_gradients", recording_accumulate)
    tmp_path, args = run_args
    assert main(["train", str(ROOT / "configs/quickstart.yaml"), *args, "train.max_steps=1", "eval.path=null",
                 "train.prompts_per_step=4",
                 "optim.max_grad_norm=0.05", "optim.weight_decay=0.01"]) == 0
    batch, G, T = seen["batch"], 4, 1.0

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.load_state_dict(seen["before"])
    rewards = batch.rewards.view(-1, G)
    advantages = ((rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + 1e-4)).flatten()
    torch.testing.assert_close(batch.advantages, advantages)
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    attention = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    P, mask = batch.prompt_ids.shape[1], batch.completion_mask.float()
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits[:, P - 1:-1] / T
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logprobs - logprobs.detach())
    loss = -((ratio * advantages.unsqueeze(1) * mask).sum(dim=1) / mask.sum(dim=1)).mean()
    loss.backward()
    embedding = next(k for k in seen["grads"] if k.endswith("model.embed_tokens.weight"))
    prefix = embedding[:-len("model.embed_tokens.weight")]  # the trainer's policy wraps the causal LM
    assert len(seen["grads"]) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        torch.testing.assert_close(seen["grads"][prefix + name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    assert norm > 0.05  # the clipping is exercised
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, foreach=False)
    optimizer.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(seen["after"][name], value, atol=1e-5, rtol=0, msg=name)
    assert any(not torch.equal(seen["before"][k], seen["after"][k]) for k in seen["after"])
