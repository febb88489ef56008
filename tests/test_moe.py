"""DeepSeek-V3 (MLA + DeepSeekMoE) under GRPO, and routing metrics on hand-made decisions."""

import json
import math
import sys

import pytest
import torch

from grpo.commands.cli import main
from grpo.modeling.logprobs import rollout_logprobs
from grpo.hooks.moe import RouterProbe, routing_metrics
from grpo.config import RolloutConfig
from grpo.rollout import generate

from conftest import ROOT, make_tokenizer

sys.path.insert(0, str(ROOT / "scripts"))
from make_tiny_deepseek_v3 import tiny_deepseek_v3  # noqa: E402


def test_routing_metrics_by_hand():
    m = routing_metrics(torch.tensor([[0, 1], [0, 2]]), torch.zeros(2, 4), 4)
    assert [m[f"load/{e}"] for e in range(4)] == [0.5, 0.25, 0.25, 0.0]
    assert m["load_imbalance"] == pytest.approx(2.0) and m["max_load"] == 0.5
    assert m["router_entropy"] == pytest.approx(math.log(4))  # equal logits: uniform router
    peaked = routing_metrics(torch.tensor([[3, 1]]), torch.tensor([[0.0, 0.0, 0.0, 50.0]]), 4)
    assert peaked["router_entropy"] == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    tok = make_tokenizer()
    model = tiny_deepseek_v3(len(tok), tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
    model.generation_config.eos_token_id = tok.eos_token_id
    folder = tmp_path_factory.mktemp("tiny-v3")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model.eval(), tok


def test_shared_prompt_is_exact_for_mla_attention(tiny_v3):
    _, model, tok = tiny_v3
    tok.padding_side = "left"
    torch.manual_seed(0)
    r = generate(model, tok, ["What is 1 + 2?", "Hi"], 3, RolloutConfig(max_completion_length=6))
    shared = rollout_logprobs(model, r, slice(0, 6), 3, share_prompt=True)
    plain = rollout_logprobs(model, r, slice(0, 6), 3, share_prompt=False)
    torch.testing.assert_close(shared * r.completion_mask, plain * r.completion_mask, atol=1e-5, rtol=0)


def test_probe_sees_every_moe_layer(tiny_v3):
    _, model, tok = tiny_v3
    probe = RouterProbe(model)
    assert len(probe.routers) == 2  # layers 1 and 2; layer 0 is dense
    with probe.recording():
        model(input_ids=torch.randint(2, 90, (2, 5)))
    m = probe.metrics()
    assert set(m) >= {"moe/load_imbalance", "moe/router_entropy", "moe/layer0/load_imbalance", "moe/layer1/max_load"}
    assert sum(m[f"moe/layer0/load/{e}"] for e in range(8)) == pytest.approx(1.0)
    assert 1.0 <= m["moe/load_imbalance"] <= 8.0 and 0 < m["moe/router_entropy"] <= math.log(8) + 1e-6


def train_tiny_v3(folder, length_rule, tmp_path, *overrides) -> list[dict]:
    """Two GRPO steps of configs/deepseek_v3_tiny.yaml on the tiny model; returns metrics.jsonl's records."""
    assert main(["train", str(ROOT / "configs/deepseek_v3_tiny.yaml"), f"model.name_or_path={folder}",
                 f"data.path={ROOT / 'data/arithmetic/train.jsonl'}", "data.max_samples=32",
                 f"rewards=[{{fn: '{length_rule}:length_reward'}}]", "train.max_steps=2", "logging.wandb=disabled",
                 "scoring.workers=0", f"train.output_dir={tmp_path / 'run'}", *overrides]) == 0
    return [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]


def test_deepseek_v3_trains_with_grpo(tiny_v3, length_rule, tmp_path):
    folder = tiny_v3[0]
    records = train_tiny_v3(folder, length_rule, tmp_path)
    assert all("moe/load_imbalance" in r and r["moe/load_imbalance"] >= 1.0 for r in records)
    from safetensors.torch import load_file

    before, after = load_file(folder / "model.safetensors"), load_file(tmp_path / "run/final/model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("experts" in k for k in changed) and any("kv_a_proj" in k for k in changed)


def test_routing_drift_by_hand():
    from grpo.hooks.moe import routing_drift

    decoded = torch.tensor([[[3, 1], [1, 2], [-1, -1]]])
    trained = torch.tensor([[[1, 3], [2, 4], [0, 1]]])
    assert routing_drift(decoded, trained, torch.tensor([[1, 1, 1]])) == 0.5  # the third token was never decoded
    assert routing_drift(decoded, trained, torch.tensor([[1, 0, 0]])) == 0.0


def test_routing_drift_is_logged_and_small_in_fp32(tiny_v3, length_rule, tmp_path):
    records = train_tiny_v3(tiny_v3[0], length_rule, tmp_path, "train.mixed_precision=fp32")
    drift = [r["moe/routing_drift"] for r in records]
    assert drift and all(d == 0.0 for d in drift), drift  # decode (KV cache) and full pass choose the same experts


def test_selection_bias_update_by_hand_and_toward_uniform_load(tiny_v3):
    from grpo.hooks.moe import update_selection_bias

    _, model, _ = tiny_v3
    router = model.model.layers[1].mlp.gate
    saved = router.e_score_correction_bias.clone()
    try:
        router.e_score_correction_bias.zero_()
        update_selection_bias(router, torch.tensor([0.5, 0.3, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0]), 0.01)
        assert router.e_score_correction_bias.tolist() == pytest.approx([-0.01, -0.01] + [0.01] * 6)
        # constructed imbalance: the router's weights favour expert 0 for every token
        router.e_score_correction_bias.zero_()
        weight = router.weight.data.clone()
        router.weight.data[0] += 0.5
        hidden = torch.randn(256, router.weight.shape[1])

        def imbalance():
            with torch.no_grad():
                _, _, indices = router(hidden)
            return routing_metrics(indices, torch.zeros(1, 8), 8)["load_imbalance"], indices

        start, _ = imbalance()
        for _ in range(30):
            _, indices = imbalance()
            load = torch.bincount(indices.reshape(-1), minlength=8).float()
            update_selection_bias(router, load / load.sum(), 0.02)
        end, _ = imbalance()
        assert start > 1.5 and end < start * 0.7, (start, end)
    finally:
        router.weight.data.copy_(weight)
        router.e_score_correction_bias.copy_(saved)


def test_bias_balancing_runs_in_training(tiny_v3, length_rule, tmp_path):
    train_tiny_v3(tiny_v3[0], length_rule, tmp_path, "moe.bias_update_speed=0.001")
    from safetensors.torch import load_file

    after = load_file(tmp_path / "run/final/model.safetensors")
    bias = after["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.abs().max().item() == pytest.approx(0.002, abs=1e-6)  # two steps of 0.001


def test_routing_replay_trains_through_the_recorded_experts(tiny_v3):
    from grpo.hooks.moe import replay_routes

    _, model, tok = tiny_v3
    tok.padding_side = "left"
    torch.manual_seed(0)
    r = generate(model, tok, ["What is 1 + 2?", "Hi"], 3, RolloutConfig(max_completion_length=6))
    N, T = r.completion_ids.shape
    names = list(RouterProbe(model).routers)
    generator = torch.Generator().manual_seed(0)
    # routes unlike anything the router would choose: two distinct random experts per token, token (0, 0) unrecorded
    routes = {n: torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(N * T)]).reshape(N, T, 2)
              for n in names}
    for n in names:
        routes[n][0, 0] = -1
    probe = RouterProbe(model)
    with probe.recording(), replay_routes(model, routes, slice(0, N), T):
        replayed = rollout_logprobs(model, r, slice(0, N), 3)
    own = RouterProbe(model)
    with own.recording():
        plain = rollout_logprobs(model, r, slice(0, N), 3)
    for n in names:
        chosen = probe.calls()[n][1][0].reshape(N, T - 1, 2).sort(dim=-1).values
        expected = routes[n][:, :T - 1].sort(dim=-1).values
        assert torch.equal(chosen[0, 1:], expected[0, 1:]) and torch.equal(chosen[1:], expected[1:])
        router_choice = own.calls()[n][1][0].reshape(N, T - 1, 2).sort(dim=-1).values
        assert torch.equal(chosen[0, 0], router_choice[0, 0])  # the unrecorded token keeps the router's choice
    assert not torch.allclose(replayed * r.completion_mask, plain * r.completion_mask)
    assert all("forward" not in vars(m) for m in probe.routers.values())  # routers restored


def test_routing_replay_runs_in_training(tiny_v3, length_rule, tmp_path, monkeypatch):
    import grpo.hooks.moe
    from safetensors.torch import load_file

    real, given = grpo.hooks.moe.replay_routes, []

    def spy(model, routes, rows, completion_length):
        given.append(routes is not None)
        return real(model, routes, rows, completion_length)

    monkeypatch.setattr(grpo.hooks.moe, "replay_routes", spy)
    records = train_tiny_v3(tiny_v3[0], length_rule, tmp_path, "moe.routing_replay=true")
    assert given and all(given), "a training micro-batch ran without the routes recorded while decoding"
    assert all(r["grad_norm"] > 0 and r["skipped_update"] == 0.0 for r in records)
    before, after = load_file(tiny_v3[0] / "model.safetensors"), load_file(tmp_path / "run/final/model.safetensors")
    changed = [k for k in after if k in before and not torch.equal(before[k], after[k])]
    assert any(".experts." in k for k in changed), "replayed routes trained no expert"
