"""The vLLM rollout engine (rollout.engine: vllm), for real on this machine's CPU with the tiny random Llama.
Skipped where vLLM is not installed (the `vllm` extra; `make test-vllm` builds that environment)."""

import json

import pytest
import torch

from grpo.config import RolloutConfig
from grpo.modeling.logprobs import rollout_logprobs
from grpo.rollout import Sampling

from conftest import ROOT, make_model, make_tokenizer

vllm_engine = pytest.importorskip("grpo.rollout.vllm")
pytest.importorskip("vllm")

PROMPTS = ["What is 1 + 2?", "Hi", "A longer prompt than the others"]


@pytest.fixture(scope="module")
def engine_and_model(tmp_path_factory):
    """One engine for the module: start-up is the slow part."""
    tok = make_tokenizer()
    tok.padding_side = "left"
    model = make_model(len(tok), seed=3, hidden_size=128, heads=2)  # head_dim 64
    model.generation_config.eos_token_id = tok.eos_token_id
    cfg = RolloutConfig(max_completion_length=12, temperature=1.0, vllm_kv_cache_gib=0.25)
    return vllm_engine.VLLMEngine(model, tok, cfg, max_prompt_length=64, seed=0), model, tok, cfg


def trainer_logprobs(model, rollouts, G):
    with torch.no_grad():
        return rollout_logprobs(model, rollouts, slice(0, rollouts.completion_ids.shape[0]), G, 1.0)


def test_samples_groups_with_masks_texts_and_log_probs(engine_and_model):
    engine, model, tok, cfg = engine_and_model
    r = engine.generate(PROMPTS, Sampling.from_config(cfg, 4, logprobs=True))
    assert r.completion_ids.shape[0] == 12 and r.prompts == [p for p in PROMPTS for _ in range(4)]
    assert r.completion_mask.sum(dim=1).min() >= 1 and r.logprobs.shape == r.completion_ids.shape
    assert r.texts == tok.batch_decode(r.completion_ids.masked_fill(r.completion_mask == 0, tok.pad_token_id),
                                       skip_special_tokens=True)
    ours = trainer_logprobs(model, r, 4)
    diff = ((ours - r.logprobs).abs() * r.completion_mask).sum() / r.completion_mask.sum()
    assert diff < 1e-3, f"mean |log-prob difference| {diff:.2e} (fp32)"


def test_weight_push_changes_what_the_engine_samples_from(engine_and_model):
    engine, model, tok, cfg = engine_and_model
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    engine.sync_weights(model)
    assert engine.push_seconds
    r = engine.generate(PROMPTS, Sampling.from_config(cfg, 2, logprobs=True))
    ours = trainer_logprobs(model, r, 2)
    diff = ((ours - r.logprobs).abs() * r.completion_mask).sum() / r.completion_mask.sum()
    assert diff < 1e-3, f"after the push the engine does not sample from the pushed weights ({diff:.2e})"


def test_bf16_engine_agrees_with_the_bf16_trainer_after_a_push():
    """A bf16 engine (train.mixed_precision=bf16) against the trainer's bf16-autocast pass over the same tokens,
    right after pushing changed fp32 weights: mean |log-prob difference| <= 0.02."""
    tok = make_tokenizer()
    tok.padding_side = "left"
    model = make_model(len(tok), seed=5, hidden_size=128, heads=2)
    model.generation_config.eos_token_id = tok.eos_token_id
    cfg = RolloutConfig(max_completion_length=12, temperature=1.0, vllm_kv_cache_gib=0.25)
    engine = vllm_engine.VLLMEngine(model, tok, cfg, max_prompt_length=64, seed=0, precision="bf16")
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        engine.sync_weights(model)
        r = engine.generate(PROMPTS, Sampling.from_config(cfg, 4, logprobs=True))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = trainer_logprobs(model, r, 4).float()
        with torch.no_grad():
            exact = trainer_logprobs(model, r, 4)
    finally:
        engine.close()
    n = r.completion_mask.sum()
    diff = ((ours - r.logprobs).abs() * r.completion_mask).sum() / n
    fp32_diff = ((exact - r.logprobs).abs() * r.completion_mask).sum() / n
    print(f"bf16 engine vs bf16 trainer: mean |diff| {diff:.4f}; vs the fp32 trainer {fp32_diff:.4f}")
    assert diff <= 0.02, f"mean |log-prob difference| {diff:.4f} in bf16"


def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tok = make_tokenizer()
    model = make_model(len(tok), seed=4, hidden_size=128, heads=2)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def train_args(folder, length_rule, out, micro_batch_size=8):
    return [str(ROOT / "configs/quickstart.yaml"), f"model.name_or_path={folder}",
            f"data.path={ROOT / 'data/arithmetic/train.jsonl'}", "data.max_samples=32", "eval.path=null",
            f"rewards=[{{fn: '{length_rule}:length_reward'}}]", "rollout.num_generations=4",
            "rollout.max_completion_length=8", "rollout.engine=vllm", "rollout.vllm_kv_cache_gib=0.25",
            "train.prompts_per_step=2", f"train.micro_batch_size={micro_batch_size}", "train.max_steps=2",
            "optim.lr=1e-2", "train.mixed_precision=fp32", "logging.wandb=disabled", "scoring.workers=0",
            f"train.output_dir={out}"]


def test_training_with_the_vllm_engine(tmp_path, length_rule):
    """Two GRPO steps sampling with vLLM: weights pushed before each step, sampler and trainer agree."""
    from grpo.commands.cli import main

    out = tmp_path / "run"
    assert main(["train", *train_args(tiny_folder(tmp_path), length_rule, out)]) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 2 and all(r["time/weight_sync"] > 0 for r in steps)
    assert all(abs(r["rollout/mismatch_kl"]) < 1e-3 and r["grad_norm"] > 0 for r in steps), steps


def test_several_iterations_dynamic_sampling_correction_and_evaluation(tmp_path, length_rule):
    """num_iterations 2 (pi_old captured before the updates), DAPO's dynamic sampling, token_truncate
    correction and held-out evaluation, all sampling through the one engine."""
    from grpo.commands.cli import main

    out = tmp_path / "run"
    args = [*train_args(tiny_folder(tmp_path), length_rule, out), "algorithm.num_iterations=2",
            "algorithm.dynamic_sampling=true", "algorithm.rollout_correction=token_truncate",
            f"eval.path={ROOT / 'data/arithmetic/test.jsonl'}", "eval.num_prompts=4", "eval.batch_size=4", "eval.reward=length_reward"]
    assert main(["train", *args]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all(r["sampling/groups_trained"] == 2.0 for r in steps), steps
    assert all(abs(r["rollout/mismatch_kl"]) < 1e-3 and r["rollout/masked_fraction"] == 0.0 for r in steps)
    assert [r["step"] for r in records if "eval/accuracy" in r] == [0, 2]


def test_generate_and_eval_commands_sample_through_the_engine(tmp_path):
    from grpo.commands.cli import main

    folder = tiny_folder(tmp_path)
    rules = tmp_path / "rules.py"
    rules.write_text("def short(completion, example):\n    return 1.0 if len(completion) < 40 else 0.0\n")
    common = [str(ROOT / "configs/quickstart.yaml"), f"model.name_or_path={folder}", "rollout.engine=vllm",
              "rollout.vllm_kv_cache_gib=0.25", "rollout.max_completion_length=8", "scoring.workers=0",
              "train.mixed_precision=fp32", "logging.wandb=disabled"]
    assert main(["generate", *common, f"data.path={ROOT / 'data/arithmetic/test.jsonl'}", "data.max_samples=4",
                 f"rewards=[{{fn: '{rules}:short'}}]", "eval.path=null", "generate.num_samples=4",
                 "generate.keep=threshold", "generate.threshold=0.0", f"train.output_dir={tmp_path / 'gen'}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gen/generated.jsonl").read_text().splitlines()]
    assert len(rows) > 0 and all(set(r) >= {"prompt", "completion", "reward"} for r in rows)
    assert main(["eval", *common, f"eval.path={ROOT / 'data/arithmetic/test.jsonl'}", "eval.num_prompts=4",
                 f"train.output_dir={tmp_path / 'eval'}"]) == 0


def test_two_processes_each_with_its_engine(tmp_path, length_rule):
    """torchrun, 2 CPU processes: each starts its own engine; the engines shut down before the process group."""
    from test_distributed import torchrun

    out = tmp_path / "run"
    printed = torchrun(train_args(tiny_folder(tmp_path), length_rule, out, micro_batch_size=4))
    assert "x 2 processes" in printed and (out / "final/model.safetensors").is_file()
