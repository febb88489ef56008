"""Activation checkpointing (train.gradient_checkpointing): same log-probs and gradients, fewer saved tensors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ROOT, make_model

import grpo.modeling.logprobs
from grpo.modeling.checkpointing import checkpoint_layers
from grpo.modeling.logprobs import rollout_logprobs


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward while fn() runs (each storage counted once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_log_probs_and_gradients_are_bit_identical_and_saved_activations_smaller(mixed_rollouts, monkeypatch,
                                                                                   share_prompt, fused):
    model, r = mixed_rollouts
    if not fused:
        monkeypatch.setattr(grpo.modeling.logprobs, "PLAIN_HEAD_MODELS", frozenset())
    checkpointed = copy.deepcopy(model)
    assert checkpoint_layers(checkpointed) == 2
    results = []
    for m in (model, checkpointed):
        m.zero_grad(set_to_none=True)
        saved, lp = _saved_bytes(lambda: torch.cat([rollout_logprobs(m, r, slice(s, s + 8), 4, 0.8, share_prompt)
                                                    for s in (0, 8)]))
        (lp * r.completion_mask).sum().backward()
        results.append((lp.detach(), [p.grad.clone() for p in m.parameters()], saved))
    (lp_a, g_a, saved_a), (lp_b, g_b, saved_b) = results
    assert torch.equal(lp_a, lp_b)
    assert all(torch.equal(a, b) for a, b in zip(g_a, g_b))
    assert any(g.abs().sum() > 0 for g in g_b)
    assert saved_b < 0.6 * saved_a, (saved_a, saved_b)


def test_passes_without_gradient_run_the_layers_plainly(mixed_rollouts):
    model, r = mixed_rollouts
    checkpointed = copy.deepcopy(model)
    checkpoint_layers(checkpointed)
    with torch.no_grad():
        a = rollout_logprobs(model, r, slice(0, 16), 4, 1.0, True)
        b = rollout_logprobs(checkpointed, r, slice(0, 16), 4, 1.0, True)
    assert torch.equal(a, b)


def test_a_deep_copy_computes_with_its_own_weights():
    model = make_model(50, seed=0)
    checkpoint_layers(model)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p in copied.parameters():
            p.add_(0.5)
    ids = torch.randint(2, 50, (2, 5))
    with torch.enable_grad():
        assert not torch.equal(model(input_ids=ids).logits, copied(input_ids=ids).logits)


def test_sliding_window_models_are_refused_with_a_shared_prompt():
    model = make_model(50)
    model.config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="train.share_prompt=false"):
        checkpoint_layers(model, share_prompt=True)
    assert checkpoint_layers(model, share_prompt=False) == 2


def test_three_training_steps_give_the_same_weights_and_metrics(tiny_model_dir, length_rule, tmp_path):
    from safetensors.torch import load_file

    from grpo.config import load_config
    from grpo.trainer import train

    runs = []
    for flag in ("false", "true"):
        out = tmp_path / flag
        train(load_config(str(ROOT / "configs/quickstart.yaml"), [
            f"model.name_or_path={tiny_model_dir}", f"data.path={ROOT / 'data/arithmetic/train.jsonl'}",
            "data.max_samples=64", "eval.path=null", f"rewards=[{{fn: '{length_rule}:length_reward'}}]",
            "rollout.num_generations=4", "rollout.max_completion_length=8", "train.prompts_per_step=2",
            "train.micro_batch_size=4", "train.max_steps=3", "optim.lr=1e-2", "logging.wandb=disabled",
            "train.mixed_precision=fp32", "scoring.workers=0", "algorithm.beta=0.04",
            f"train.gradient_checkpointing={flag}", f"train.output_dir={out}"]))
        metrics = [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "startup/", "step_time"))}
                   for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append((load_file(out / "final" / "model.safetensors"), metrics))
    (a, metrics_a), (b, metrics_b) = runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_a == metrics_b and any(m.get("loss") for m in metrics_a)


def test_routing_replay_with_checkpointing_is_refused_by_name():
    from grpo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="moe.routing_replay: does not follow recomputed layers"):
        load_config(None, ["moe.routing_replay=true", "train.gradient_checkpointing=true"])
