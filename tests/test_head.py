"""The fused head (grpo.modeling.head): hand-computed values, and equality with the plain logits -> log-softmax path."""

import math

import pytest
import torch

import grpo.modeling.logprobs
from grpo.modeling.head import HeadLogprobs, head_logprobs
from grpo.modeling.logprobs import rollout_logprobs


def test_two_token_vocabulary_by_hand():
    # h = [1], W = [[0], [ln 3]]: logits [0, ln 3], p = [1/4, 3/4]
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [math.log(3)]], requires_grad=True)
    logp, entropy = HeadLogprobs.apply(hidden, weight, torch.tensor([1]), 1.0)
    assert logp.item() == pytest.approx(math.log(3 / 4))
    assert entropy.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    logp.sum().backward()
    # dlogp/dz = onehot(1) - p = [-1/4, 1/4]; dh = sum_v dz_v W_v; dW = dz^T h
    assert hidden.grad.item() == pytest.approx(0.25 * math.log(3))
    torch.testing.assert_close(weight.grad, torch.tensor([[-0.25], [0.25]]))


def test_temperature_divides_the_logits_by_hand():
    # logits [0, ln 3] / 0.5 = [0, ln 9]: p = [1/10, 9/10]; dlogp/dh = (onehot - p) W / tau
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [math.log(3)]])
    logp, _ = HeadLogprobs.apply(hidden, weight, torch.tensor([0]), 0.5)
    assert logp.item() == pytest.approx(math.log(0.1))
    logp.sum().backward()
    assert hidden.grad.item() == pytest.approx(-0.9 * math.log(3) / 0.5)


def plain(hidden, weight, targets, temperature):
    logits = (hidden @ weight.t()).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_equals_log_softmax_with_gradients(temperature):
    torch.manual_seed(0)
    M, H, V = 150, 16, 300  # more rows than one chunk
    hidden, weight = torch.randn(M, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    targets, upstream = torch.randint(V, (M,)), torch.randn(M)
    results = []
    for fn in (lambda *a: HeadLogprobs.apply(*a), plain):
        hidden.grad = weight.grad = None
        logp, entropy = fn(hidden, weight, targets, temperature)
        (logp * upstream).sum().backward()
        results.append((logp.detach(), entropy.detach(), hidden.grad.clone(), weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_matches_the_plain_head_under_autocast():
    torch.manual_seed(0)
    hidden, weight = torch.randn(40, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
    targets = torch.randint(100, (40,))
    results = []
    for fn in (lambda *a: HeadLogprobs.apply(*a), plain):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, _ = fn(hidden, weight, targets, 1.0)
        logp.sum().backward()
        results.append((logp.detach(), hidden.grad.clone(), weight.grad.clone()))
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_masked_positions_are_zero_and_backward_runs_once():
    hidden, weight = torch.randn(2, 3, 4, requires_grad=True), torch.randn(5, 4)
    entropy = []
    out = head_logprobs(hidden, weight, torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [1, 0, 0]]),
                        entropy=entropy)
    assert out[0, 2] == 0 and out[1, 1:].eq(0).all() and entropy[0][1, 1:].eq(0).all()
    assert out[0, :2].lt(0).all()
    out.sum().backward(retain_graph=True)
    assert hidden.grad[1, 1:].eq(0).all()
    with pytest.raises(RuntimeError, match="backward runs once"):
        out.sum().backward()


@pytest.mark.parametrize("share_prompt", [True, False])
def test_model_log_probs_and_gradients_equal_the_full_logits_path(mixed_rollouts, monkeypatch, share_prompt):
    model, r = mixed_rollouts
    assert r.completion_mask.sum(dim=1).unique().numel() > 1  # completions of different lengths
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(grpo.modeling.logprobs, "PLAIN_HEAD_MODELS", frozenset())
        assert (grpo.modeling.logprobs.split_head(model) is not None) == fused
        model.zero_grad()
        entropy = []
        lp = torch.cat([rollout_logprobs(model, r, slice(s, s + 6), 4, 0.8, share_prompt, entropy)
                        for s in range(0, 16, 6)])
        (lp * r.completion_mask).sum().backward()
        ent = torch.cat(entropy)
        results.append((lp.detach() * r.completion_mask, ent * r.completion_mask,
                        [p.grad.clone() for p in model.parameters()]))
    (lp_f, ent_f, g_f), (lp_p, ent_p, g_p) = results
    torch.testing.assert_close(lp_f, lp_p, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_f, ent_p, atol=1e-5, rtol=0)
    for a, b in zip(g_f, g_p):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_log_probs_and_gradients_do_not_depend_on_computing_the_entropy():
    torch.manual_seed(0)
    hidden, weight = torch.randn(70, 8, requires_grad=True), torch.randn(50, 8)
    targets = torch.randint(50, (70,))
    results = []
    for with_entropy in (True, False):
        hidden.grad = None
        logp, entropy = HeadLogprobs.apply(hidden, weight, targets, 0.8, with_entropy)
        logp.sum().backward()
        results.append((logp.detach(), hidden.grad.clone(), entropy.numel()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert (results[0][2], results[1][2]) == (70, 0)


@pytest.mark.parametrize("fused", [True, False])
def test_shared_prompt_gradients_repeat_exactly_on_several_threads(monkeypatch, fused):
    # One long prompt feeds 4 completions: the prompt's KV cache and last hidden state are repeated to the 4
    # rows. Backward through advanced indexing (index_put_ with accumulate) adds with atomics across threads
    # on CPU once the tensor is large, so the prompt's gradient changed from run to run; index_select does not.
    from conftest import make_model

    from grpo.modeling.logprobs import shared_prefix_logprobs

    model = make_model(100, seed=3)
    model.config.max_position_embeddings = 1024
    if not fused:
        monkeypatch.setattr(grpo.modeling.logprobs, "PLAIN_HEAD_MODELS", frozenset())
    torch.manual_seed(0)
    prompt = torch.randint(2, 100, (1, 700))  # 4 rows x 2 KV heads x 700 x 8 > 32768 elements (one parallel grain)
    completions = torch.randint(2, 100, (4, 6))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(6):
            model.zero_grad(set_to_none=True)
            lp = shared_prefix_logprobs(model, prompt, torch.ones_like(prompt), completions,
                                        torch.ones_like(completions), torch.zeros(4, dtype=torch.long),
                                        fused_head=fused)
            lp.sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for g in grads[1:] for a, b in zip(grads[0], g))


def test_a_cache_with_sliding_window_layers_is_repeated_in_place_by_index_select():
    # Such a cache is not turned into fixed-prefix layers; its layers still repeat their rows with index_select
    # (a fixed summation order in the backward), not with transformers' indexing.
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    from grpo.modeling.logprobs import completion_cache

    torch.manual_seed(0)
    cache = DynamicCache()
    cache.layers = [DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=64)]
    originals = []
    for i, layer in enumerate(cache.layers):
        keys, values = torch.randn(2, 2, 5, 4, requires_grad=True), torch.randn(2, 2, 5, 4, requires_grad=True)
        layer.update(keys * 1.0, values * 1.0)
        originals.append((keys, values))
    index = torch.tensor([0, 0, 1])
    assert completion_cache(cache, index) is cache
    for layer, (keys, values) in zip(cache.layers, originals):
        assert torch.equal(layer.keys, keys[index]) and torch.equal(layer.values, values[index])
        assert type(layer.keys.grad_fn).__name__ == "IndexSelectBackward0"
