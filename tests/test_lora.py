"""LoRA (model.lora): the reference is the base model, only adapters train, checkpoints hold the adapters and
resume exactly, final/ holds the adapters and a merged model that loads without peft."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from grpo.commands.cli import main
from grpo.config import ConfigError, LoraConfig, ModelConfig, load_config
from grpo.modeling import lora
from grpo.modeling.loading import load_model

from conftest import ROOT


def lora_args(tiny_model_dir, rules, out, steps=3, extra=()):
    return [str(ROOT / "configs/quickstart.yaml"), f"model.name_or_path={tiny_model_dir}", "model.lora={r: 4, alpha: 8}",
            f"data.path={ROOT / 'data/arithmetic/train.jsonl'}", "data.max_samples=32", "eval.path=null",
            f"rewards=[{{fn: '{rules}:length_reward'}}]", "rollout.num_generations=4",
            "rollout.max_completion_length=8", "train.prompts_per_step=2", "train.micro_batch_size=4",
            f"train.max_steps={steps}", "train.save_every=1", "optim.lr=5e-2", "algorithm.beta=0.04",
            "logging.wandb=disabled", "train.mixed_precision=fp32", "scoring.workers=0", f"train.output_dir={out}",
            *extra]


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, length_rule, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    assert main(["train", *lora_args(tiny_model_dir, length_rule, out)]) == 0
    return out


def adapted(tiny_model_dir, seed=0):
    """The tiny model with r=4 adapters whose B is random (so they change the output)."""
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(r=4, alpha=8)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_adapters_disabled_compute_the_base_model(tiny_model_dir):
    model = adapted(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[5, 9, 12, 3, 7]])
    with torch.no_grad():
        assert (model(ids).logits - base(ids).logits).abs().max() > 1e-3  # the adapters do something
        with lora.adapters_disabled(model):
            torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-6, rtol=0)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())  # restored after


def test_merged_weights_compute_the_adapted_model_and_restore_every_weight_exactly(tiny_model_dir):
    model = adapted(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 9, 12, 3, 7, 1]])
    with torch.no_grad():
        expected = model(ids).logits
        with lora.merged_weights(model):
            assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # W holds W + s B A
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit for bit
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)  # adapters on again


def test_the_builtin_engine_samples_the_same_with_merged_or_adapted_weights(tiny_model_dir):
    from transformers import AutoTokenizer

    from grpo.config import RolloutConfig
    from grpo.rollout import BuiltinEngine, Sampling

    model, tokenizer = adapted(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    sampling = Sampling.from_config(RolloutConfig(num_generations=4, max_completion_length=12), 4, seeds=range(8),
                                    logprobs=True)
    runs = [BuiltinEngine(tokenizer, model=model, merge_adapters=merge).generate(["12+30=", "7+5="], sampling)
            for merge in (False, True)]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, atol=1e-5, rtol=0)


def test_reference_log_probs_are_the_base_models(tiny_model_dir, mixed_rollouts):
    """The backend's reference for a LoRA run (no second copy of the weights) against a separately loaded base."""
    from grpo.algo.batch import no_grad_logprobs
    from grpo.backend import make_backend

    _, r = mixed_rollouts
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.lora={r: 4}", "algorithm.beta=0.04",
                             "rollout.num_generations=4", "train.prompts_per_step=4", "train.micro_batch_size=4",
                             "rollout.temperature=0.8", "train.mixed_precision=fp32"])
    backend = make_backend(cfg)
    models = backend.prepare(micro_batches=4)
    with torch.no_grad():
        for name, p in models.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert isinstance(models.reference, lora.BaseModelLogprobs)
    assert sum(p.numel() for p in models.optimizer.param_groups[0]["params"]) == \
        sum(p.numel() for n, p in models.model.named_parameters() if "lora_" in n)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ref = no_grad_logprobs(models.reference, r, cfg, backend.autocast)
    expected = no_grad_logprobs(base, r, cfg, backend.autocast)
    policy = no_grad_logprobs(models.policy, r, cfg, backend.autocast)
    mask = r.completion_mask.bool()
    torch.testing.assert_close(ref[mask], expected[mask], atol=1e-6, rtol=0)
    assert (policy[mask] - expected[mask]).abs().max() > 1e-3


def test_a_run_changes_only_the_adapters_and_saves_adapters_and_a_merged_model(lora_run, tiny_model_dir):
    final = lora_run / "final"
    assert lora.is_adapter_folder(final) and not (final / "model.safetensors").exists()
    assert json.loads((final / lora.ADAPTER_CONFIG).read_text())["r"] == 4
    adapter = load_file(final / lora.ADAPTER_WEIGHTS)
    assert adapter and all(k.startswith("base_model.model.") and "lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained
    base = load_file(tiny_model_dir / "model.safetensors")
    merged = load_file(final / "merged/model.safetensors")
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed)  # linear layers only; embeddings, norms kept
    step_one = load_file(lora_run / "checkpoint-1" / lora.ADAPTER_WEIGHTS)
    assert step_one.keys() == adapter.keys() and not all(torch.equal(step_one[k], adapter[k]) for k in adapter)


def test_merged_model_equals_the_adapted_model(lora_run, tiny_model_dir):
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "final/merged").eval()  # no peft involved
    with_adapters = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), trainable=False)
    lora.load_adapter(with_adapters, lora_run / "final")
    ids = torch.tensor([[5, 9, 12, 3, 7, 1, 4]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapters(ids).logits, atol=1e-5, rtol=0)
    # merged_state_dict computed in memory is the same
    for k, v in lora.merged_state_dict(with_adapters).items():
        if k in merged.state_dict():
            torch.testing.assert_close(v, merged.state_dict()[k], atol=1e-6, rtol=0)


def test_resume_from_a_lora_checkpoint_is_bit_identical(lora_run, tiny_model_dir, length_rule, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *lora_args(tiny_model_dir, length_rule, out, steps=1)]) == 0
    assert main(["train", *lora_args(tiny_model_dir, length_rule, out, steps=3), "--resume"]) == 0
    a, b = load_file(out / "final" / lora.ADAPTER_WEIGHTS), load_file(lora_run / "final" / lora.ADAPTER_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_takes_a_lora_checkpoint_or_final(lora_run, tiny_model_dir, length_rule, capsys):
    args = [str(ROOT / "configs/quickstart.yaml"), f"model.name_or_path={tiny_model_dir}", "model.lora={r: 4, alpha: 8}",
            f"eval.path={ROOT / 'data/arithmetic/test.jsonl'}", "eval.num_prompts=4", "eval.batch_size=4",
            f"rewards=[{{fn: '{length_rule}:length_reward'}}]", "eval.reward=length_reward",
            "rollout.max_completion_length=8", "train.mixed_precision=fp32", "scoring.workers=0",
            "logging.wandb=disabled"]
    scores = []
    for folder in (lora_run / "checkpoint-3", lora_run / "final"):
        capsys.readouterr()
        assert main(["eval", *args, "--checkpoint", str(folder)]) == 0
        scores.append(capsys.readouterr().out)
    assert scores[0] == scores[1]  # the adapters on the base, and the merged model: the same greedy completions


def test_sft_takes_model_lora(tiny_model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} + 1 =", "answer": str(i + 1), "response": str(i + 1)}) + "\n"
                            for i in range(8)))
    assert main(["sft", str(ROOT / "configs/quickstart.yaml"), f"model.name_or_path={tiny_model_dir}",
                 "model.lora={r: 4}", f"data.path={data}", "eval.path=null", "train.max_steps=2",
                 "train.micro_batch_size=4", "sft.batch_size=4", "optim.lr=1e-2", "train.mixed_precision=fp32",
                 "logging.wandb=disabled", f"train.output_dir={tmp_path / 'sft'}"]) == 0
    final = tmp_path / "sft/final"
    assert lora.is_adapter_folder(final) and (final / "merged/model.safetensors").is_file()
    base = load_file(tiny_model_dir / "model.safetensors")
    merged = load_file(final / "merged/model.safetensors")
    assert torch.equal(base["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    assert any(not torch.equal(base[k], merged[k]) for k in base if k.endswith("proj.weight"))


def test_lora_settings_are_checked():
    with pytest.raises(ConfigError, match="model.lora.dropout"):
        load_config(None, ["model.lora={dropout: 0.1}"])
    with pytest.raises(ConfigError, match="model.lora.rank: unknown key; did you mean 'model.lora.r'"):
        load_config(None, ["model.lora.rank=8"])
    with pytest.raises(ConfigError, match="ref_reset_every"):
        load_config(None, ["model.lora={}", "algorithm.ref_reset_every=5"])
    assert load_config(None, ["model.lora={}"]).model.lora == LoraConfig()
