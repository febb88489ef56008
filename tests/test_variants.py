"""The policy-gradient variants: CISPO, the RLOO baseline, REINFORCE++-baseline scaling, high-entropy token
selection, off-policy sequence masking and the importance-corrected KL, against hand-computed values."""

import math

import pytest
import torch

from grpo.algo.advantages import group_advantages
from grpo.algo.batch import TrainBatch
from grpo.algo.loss import masked_quantile, policy_loss
from grpo.config import AlgorithmConfig, Config, ConfigError, RolloutConfig, TrainConfig, load_config

from conftest import ROOT, micro_batched_gradients

ONE = torch.ones(1, 1)


def test_cispo_worked_example():
    # logprob -1, old -1.5, A 2, epsilon_high 0.5: rho = e^0.5 = 1.6487 > 1.5, loss = -1.5 * 2 * (-1) = 3
    lp = torch.tensor([[-1.0]], requires_grad=True)
    loss, _ = policy_loss(lp, torch.tensor([[-1.5]]), torch.tensor([2.0]), ONE, loss_type="cispo", epsilon_high=0.5)
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(3.0) and grad.item() == pytest.approx(-3.0)
    # under the cap the weight is rho itself: old -1.2, rho = e^0.2, loss = e^0.2 * 2 = 2.442806
    lp = torch.tensor([[-1.0]], requires_grad=True)
    loss, _ = policy_loss(lp, torch.tensor([[-1.2]]), torch.tensor([2.0]), ONE, loss_type="cispo", epsilon_high=0.5)
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(2 * math.exp(0.2)) and grad.item() == pytest.approx(-2 * math.exp(0.2))


def test_cispo_keeps_the_gradient_that_clipping_drops():
    # rho = e^0.5 above 1 + epsilon with A > 0: the clipped surrogate gives no gradient, cispo does
    old, adv = torch.tensor([[-1.5]]), torch.tensor([1.0])
    grads = {}
    for loss_type in ("dapo", "cispo"):
        lp = torch.tensor([[-1.0]], requires_grad=True)
        loss, _ = policy_loss(lp, old, adv, ONE, loss_type=loss_type, epsilon_high=5.0 if loss_type == "cispo" else None)
        grads[loss_type] = torch.autograd.grad(loss, lp)[0].item()
    assert grads["dapo"] == 0.0 and grads["cispo"] == pytest.approx(-math.exp(0.5))


def test_cispo_on_policy_gradient_is_the_plain_policy_gradient():
    """rho = 1: d loss / d logprob_t = -A_i / (tokens in the batch), REINFORCE with a token mean."""
    torch.manual_seed(0)
    lp = torch.randn(4, 6, requires_grad=True)
    adv, mask = torch.randn(4), (torch.rand(4, 6) > 0.3).float()
    loss, _ = policy_loss(lp, lp.detach(), adv, mask, loss_type="cispo", epsilon_high=0.1)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, -adv.unsqueeze(1) * mask / mask.sum())


def test_cispo_needs_epsilon_high_in_the_function_and_the_config():
    with pytest.raises(ValueError, match="epsilon_high"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), ONE, loss_type="cispo")
    with pytest.raises(ConfigError, match="algorithm.epsilon_high"):
        load_config(None, ["algorithm.loss_type=cispo"])
    assert load_config(None, ["algorithm.loss_type=cispo", "algorithm.epsilon_high=5.0"]).algorithm.loss_type == "cispo"


def test_rloo_baseline_by_hand():
    r = torch.tensor([0.5, 1.0, 0.0, 2.0])
    # r_i - mean of the other three: 0.5 - 1, 1 - 2.5/3, 0 - 3.5/3, 2 - 1.5/3
    torch.testing.assert_close(group_advantages(r, 4, "none", baseline="rloo"),
                               torch.tensor([-0.5, 1 / 6, -7 / 6, 1.5]))
    std = math.sqrt(2.1875 / 3)  # the group's unbiased std, as GRPO divides by
    torch.testing.assert_close(group_advantages(r, 4, "group", baseline="rloo"),
                               torch.tensor([-0.5, 1 / 6, -7 / 6, 1.5]) / (std + 1e-4))
    assert torch.equal(group_advantages(r, 4), group_advantages(r, 4, baseline="mean"))
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(r, 4, baseline="median")


def test_centred_batch_scale_by_hand():
    # groups [1, 0] and [3, 3]: centred [0.5, -0.5, 0, 0], unbiased std sqrt(0.5 / 3) = 0.408248
    r = torch.tensor([1.0, 0.0, 3.0, 3.0])
    torch.testing.assert_close(group_advantages(r, 2, "centred_batch"),
                               torch.tensor([0.5, -0.5, 0, 0]) / (math.sqrt(0.5 / 3) + 1e-4))
    # the raw rewards' std (scale "batch") is another number
    assert not torch.allclose(group_advantages(r, 2, "centred_batch"), group_advantages(r, 2, "batch"))
    # with rloo: centred [1, -1, 0, 0], std sqrt(2 / 3)
    torch.testing.assert_close(group_advantages(r, 2, "centred_batch", baseline="rloo"),
                               torch.tensor([1.0, -1.0, 0, 0]) / (math.sqrt(2 / 3) + 1e-4))


def test_masked_quantile_matches_torch_quantile():
    assert masked_quantile(torch.tensor([3.0, 1.0, 2.0, 10.0]), torch.tensor([1, 1, 1, 0]), 0.25) == pytest.approx(1.5)
    torch.manual_seed(0)
    values, mask = torch.randn(7, 9), torch.rand(7, 9) > 0.4
    for q in (0.0, 0.2, 0.5, 0.8, 0.99):
        assert masked_quantile(values, mask, q) == pytest.approx(torch.quantile(values[mask], q).item(), abs=1e-6)


ENTROPIES = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 2.0]])
ENT_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_high_entropy_tokens_by_hand():
    # unmasked entropies sorted [0.1, 0.3, 0.5, 0.7, 0.9]: the median is 0.5, so tokens (0, 0) and (1, 0) drop;
    # on-policy, dapo: loss = -(1 * 2 + 2 * 1) / 5 = -0.8 (denominator still 5 tokens), not -(1 * 3 + 2 * 2) / 5
    lp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([1.0, 2.0])
    loss, metrics = policy_loss(lp, lp.detach(), adv, ENT_MASK, loss_type="dapo", entropies=ENTROPIES,
                                top_entropy_quantile=0.5)
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(-0.8) and metrics["entropy_kept_fraction"] == pytest.approx(0.6)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.2, -0.2], [0.0, -0.4, 0.0]]))
    plain, _ = policy_loss(lp, lp.detach(), adv, ENT_MASK, loss_type="dapo")
    assert plain.item() == pytest.approx(-1.4)
    # q = 0 removes nothing
    same, _ = policy_loss(lp, lp.detach(), adv, ENT_MASK, loss_type="dapo", entropies=ENTROPIES,
                          top_entropy_quantile=0.0)
    assert same.item() == plain.item()


def test_high_entropy_selection_keeps_the_kl_term():
    lp = torch.zeros(2, 3, requires_grad=True)
    ref, adv = torch.full((2, 3), -0.5), torch.tensor([1.0, 2.0])
    kw = dict(loss_type="dapo", ref_logprobs=ref)
    kl_part = {}
    for q in (0.0, 0.5):
        with_kl, _ = policy_loss(lp, lp.detach(), adv, ENT_MASK, beta=0.1, entropies=ENTROPIES,
                                 top_entropy_quantile=q, **kw)
        without, _ = policy_loss(lp, lp.detach(), adv, ENT_MASK, beta=0.0, entropies=ENTROPIES,
                                 top_entropy_quantile=q, **kw)
        kl_part[q] = with_kl.item() - without.item()
    k3 = math.exp(-0.5) + 0.5 - 1  # per token, all 5 kept: 0.1 * 5 * k3 / 5
    assert kl_part[0.5] == pytest.approx(kl_part[0.0]) and kl_part[0.5] == pytest.approx(0.1 * k3, abs=1e-6)


def test_off_policy_sequence_mask_by_hand():
    # one token each; log-ratio old - current = [0.5, 0.1, 0.5]; A = [-1, -1, 1]; delta 0.3 masks only row 0
    lp = torch.tensor([[-1.0], [-1.0], [-1.0]], requires_grad=True)
    old, adv, mask = torch.tensor([[-0.5], [-0.9], [-0.5]]), torch.tensor([-1.0, -1.0, 1.0]), torch.ones(3, 1)
    # clipped surrogate, epsilon 0.2: row 0: -min(-e^-0.5, -0.8) = 0.8; row 1: e^-0.1; row 2: -min(e^-0.5, 0.8)
    rows = [0.8, math.exp(-0.1), -math.exp(-0.5)]
    masked, metrics = policy_loss(lp, old, adv, mask, off_policy_mask_threshold=0.3)
    assert masked.item() == pytest.approx((0 + rows[1] + rows[2]) / 3)
    assert metrics["off_policy_masked_fraction"] == pytest.approx(1 / 3)
    (grad,) = torch.autograd.grad(masked, lp)
    assert grad[0, 0].item() == 0.0 and grad[1, 0].item() != 0.0
    for delta in (None, 0.6):  # disabled, or a threshold no completion exceeds: nothing removed
        loss, _ = policy_loss(lp, old, adv, mask, off_policy_mask_threshold=delta)
        assert loss.item() == pytest.approx(sum(rows) / 3)


def test_importance_corrected_kl_by_hand():
    # logprob -1, old -1.5, ref -2, k3: log r = -1, k3 = e^-1; rho = e^0.5; A = 0 leaves the KL term alone
    lp = torch.tensor([[-1.0]], requires_grad=True)
    kw = dict(ref_logprobs=torch.tensor([[-2.0]]), beta=1.0)
    loss, metrics = policy_loss(lp, torch.tensor([[-1.5]]), torch.zeros(1), ONE, kl_is_correction=True, **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(math.exp(-1) * math.exp(0.5))
    assert grad.item() == pytest.approx(math.exp(0.5))  # rho * (k3 + d k3) = rho * log(pi / pi_ref), rho differentiated
    assert metrics["kl"] == pytest.approx(math.exp(-1))  # the logged KL is the estimate itself
    plain, _ = policy_loss(lp, torch.tensor([[-1.5]]), torch.zeros(1), ONE, **kw)
    assert plain.item() == pytest.approx(math.exp(-1))


def test_every_option_micro_batched_sums_to_the_whole_batch():
    torch.manual_seed(0)
    N, T = 6, 5
    params = torch.randn(N, T, requires_grad=True)
    old, ref, ent = params.detach() + 0.3 * torch.randn(N, T), torch.randn(N, T), torch.rand(N, T)
    adv, mask = torch.randn(N), (torch.rand(N, T) > 0.3).float()
    threshold = masked_quantile(ent, mask, 0.6)
    kw = dict(beta=0.05, ref_logprobs=ref, loss_type="cispo", epsilon_high=0.5, off_policy_mask_threshold=0.05,
              kl_is_correction=True, entropy_threshold=threshold)
    full, _ = policy_loss(params, old, adv, mask, entropies=ent, **kw)
    assert full.item() != policy_loss(params, old, adv, mask)[0].item()
    (full_grad,) = torch.autograd.grad(full, params)
    total = 0.0
    for rows in [slice(0, 2), slice(2, 4), slice(4, 6)]:
        part, _ = policy_loss(params[rows], old[rows], adv[rows], mask[rows], entropies=ent[rows], num_sequences=N,
                              num_tokens=mask.sum().item(), **{**kw, "ref_logprobs": ref[rows]})
        total = total + part
    (acc_grad,) = torch.autograd.grad(total, params)
    assert total.item() == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(acc_grad, full_grad, atol=1e-6, rtol=0)


def test_model_gradients_with_every_option_equal_over_micro_batch_sizes(mixed_rollouts):
    """accumulate_gradients through the tiny Llama: one batch of 16 against micro-batches of 4 and 2."""
    model, r = mixed_rollouts
    torch.manual_seed(1)
    advantages = group_advantages(torch.rand(16), 4, "centred_batch", baseline="rloo")
    old = torch.randn(r.completion_ids.shape) * 0.1 - 3
    ref = torch.randn(r.completion_ids.shape) * 0.1 - 3
    entropies = torch.rand(r.completion_ids.shape)
    batch = TrainBatch(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, r.completion_mask,
                       advantages, torch.zeros(16), 4, old_logprobs=old, ref_logprobs=ref, entropies=entropies,
                       entropy_threshold=masked_quantile(entropies, r.completion_mask, 0.5))
    micro_batched_gradients(model, batch, lambda mb: Config(
        rollout=RolloutConfig(num_generations=4, max_completion_length=7, temperature=0.8),
        train=TrainConfig(prompts_per_step=4, micro_batch_size=mb),
        algorithm=AlgorithmConfig(loss_type="cispo", epsilon_high=5.0, beta=0.1, kl_is_correction=True,
                                  off_policy_mask_threshold=0.0, top_entropy_quantile=0.5)))


def test_a_run_with_every_option_logs_what_each_removed(tiny_model_dir, length_rule, tmp_path):
    import json

    from grpo.commands.cli import main

    out = tmp_path / "run"
    assert main(["train", str(ROOT / "configs/cispo.yaml"), f"model.name_or_path={tiny_model_dir}",
                 f"data.path={ROOT / 'data/arithmetic/train.jsonl'}", "data.max_samples=16", "eval.path=null",
                 f"rewards=[{{fn: '{length_rule}:length_reward'}}]", "rollout.num_generations=4",
                 "rollout.max_completion_length=8", "train.prompts_per_step=2", "train.micro_batch_size=4",
                 "train.max_steps=2", "algorithm.baseline=rloo", "algorithm.top_entropy_quantile=0.5",
                 "algorithm.off_policy_mask_threshold=0.0", "algorithm.kl_is_correction=true", "algorithm.beta=0.04",
                 "algorithm.num_iterations=2", "train.mixed_precision=fp32", "logging.wandb=disabled",
                 "scoring.workers=0", f"train.output_dir={out}"]) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in steps:
        assert 0.4 <= r["entropy_kept_fraction"] <= 0.6 and r["entropy_threshold"] > 0
        assert 0 <= r["off_policy_masked_fraction"] <= 1 and math.isfinite(r["loss"]) and r["grad_norm"] > 0
