"""CUDA training paths (skipped without a GPU; `scripts/gpu_check.sh` runs them): bf16 and fp16 steps, an fp16
overflow that the gradient scaler skips, resume with the CUDA RNG state restored, and MTP-drafted rollouts."""

import json

import pytest
import torch
from safetensors.torch import load_file

import grpo.algo.update
from grpo.config import load_config
from grpo.trainer import train

from conftest import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def args(tiny_model_dir, length_rule):
    return [f"model.name_or_path={tiny_model_dir}", f"data.path={ROOT / 'data/arithmetic/train.jsonl'}",
            "data.max_samples=64", "eval.path=null", f"rewards=[{{fn: '{length_rule}:length_reward'}}]",
            "rollout.num_generations=4", "rollout.max_completion_length=8", "train.prompts_per_step=2",
            "train.micro_batch_size=4", "optim.lr=1e-2", "logging.wandb=disabled", "scoring.workers=0",
            "algorithm.beta=0.04", "scoring.probe_rows=0"]


def run(args, out, *overrides):
    return train(load_config(ROOT / "configs/quickstart.yaml", [*args, f"train.output_dir={out}", *overrides]))


def steps(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_cuda_steps_change_the_weights(args, tmp_path, tiny_model_dir, precision):
    run(args, tmp_path, "train.max_steps=2", f"train.mixed_precision={precision}")
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "final/model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in before), "a parameter tensor did not change"
    assert [r["skipped_update"] for r in steps(tmp_path)] == [0.0, 0.0]


def test_fp16_overflow_is_skipped_by_the_scaler_and_training_goes_on(args, tmp_path, monkeypatch, tiny_model_dir):
    """Step 1's loss is scaled to inf: the scaler skips that update and lowers its scale; step 2 trains (before
    the fix, accelerate's scaler was never updated on a skipped step and step 2 raised in unscale_())."""
    real, calls = grpo.algo.update.policy_loss, []

    def overflowing(*a, **k):
        loss, metrics = real(*a, **k)
        calls.append(1)
        return (loss * 1e38 * 1e38 if len(calls) == 1 else loss), metrics

    monkeypatch.setattr(grpo.algo.update, "policy_loss", overflowing)
    run(args, tmp_path, "train.max_steps=3", "train.mixed_precision=fp16", "train.micro_batch_size=8",
        "train.save_every=1")
    assert [r["skipped_update"] for r in steps(tmp_path)] == [1.0, 0.0, 0.0]
    start = load_file(tiny_model_dir / "model.safetensors")
    after = [load_file(tmp_path / f"checkpoint-{n}/model.safetensors") for n in (1, 2)]
    keys = start.keys() & after[0].keys()
    assert len(keys) >= 20
    assert all(torch.equal(start[k], after[0][k].to(start[k].dtype)) for k in keys), "the overflow reached the weights"
    assert not all(torch.equal(start[k], after[1][k].to(start[k].dtype)) for k in keys), "step 2 did not train"


def test_resume_on_cuda_repeats_the_run(args, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(args, full, "train.max_steps=3", "train.mixed_precision=bf16")
    run(args, resumed, "train.max_steps=2", "train.mixed_precision=bf16", "train.save_every=1")
    train(load_config(ROOT / "configs/quickstart.yaml", [*args, f"train.output_dir={resumed}", "train.max_steps=3",
                                                          "train.mixed_precision=bf16", "train.save_every=1"]),
          resume=True)
    a, b = load_file(full / "final/model.safetensors"), load_file(resumed / "final/model.safetensors")
    for k in a:  # the same samples and updates; only non-deterministic CUDA reductions may differ
        torch.testing.assert_close(a[k], b[k], atol=1e-3, rtol=1e-3)
    assert [r["reward"] for r in steps(full)] == [r["reward"] for r in steps(resumed)]


def test_mtp_drafted_rollouts_on_cuda_write_what_plain_greedy_decoding_writes(args, tmp_path):
    """model.mtp with rollout.speculative=mtp trains on CUDA (the module kept in step), and greedy decoding with
    its drafts equals greedy decoding without them there too."""
    from conftest import make_model, make_tokenizer
    from grpo.config import RolloutConfig
    from grpo.modeling.mtp import MTPModule
    from grpo.rollout.builtin import generate
    from grpo.rollout.speculative import MTPDrafter, generate_speculative

    run(args, tmp_path, "train.max_steps=2", "train.mixed_precision=bf16", "model.mtp={}", "rollout.speculative=mtp")
    records = steps(tmp_path)
    assert all("mtp/loss" in r and "rollout/mtp_acceptance" in r for r in records)
    tok = make_tokenizer()
    tok.padding_side = "left"
    lm = make_model(len(tok), seed=3).cuda()
    mtp = MTPModule.for_model(lm)
    cfg = RolloutConfig(max_completion_length=16)
    prompts = ["What is 1 + 2?", "Hi"]
    plain = generate(lm, tok, prompts, 2, cfg, greedy=True)
    drafted = generate_speculative(lm, MTPDrafter(mtp), tok, prompts, 2, cfg, greedy=True)
    assert torch.equal(plain.completion_ids, drafted.completion_ids)
