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


def test_two_processes_each_with_its_engine(tmp_path, length_rule):
    """torchrun, 2 CPU processes: each starts its own engine; the engines shut down before the process group."""
    from test_distributed import torchrun

    out = tmp_path / "run"
    printed = torchrun(train_args(tiny_folder(tmp_path), length_rule, out, micro_batch_size=4))
    assert "x 2 processes" in printed and (out / "final/model.safetensors").is_file()
