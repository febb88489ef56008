import math

import pytest
import torch

from grpo.algo.loss import kl_per_token, policy_loss

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_kl_estimators_on_known_inputs():
    lp, ref = torch.tensor([-1.0, -0.5]), torch.tensor([-2.0, -0.5])
    torch.testing.assert_close(kl_per_token(lp, ref, "k1"), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(kl_per_token(lp, ref, "k2"), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(kl_per_token(lp, ref, "k3"), torch.tensor([math.exp(-1), 0.0]))
    with pytest.raises(ValueError, match="k4"):
        kl_per_token(lp, ref, "k4")


def test_on_policy_loss_is_minus_mean_advantage_and_has_gradient():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]], requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    loss, metrics = policy_loss(logprobs, logprobs.detach(), adv, MASK)
    assert loss.item() == pytest.approx(0.5)  # -mean([1, -2])
    loss.backward()
    # d/dlogp of -A * exp(lp - sg(lp)) / |o| / N: row 0 -> -1/3/2, row 1 (one token) -> 2/1/2; masked -> 0
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [1.0, 0.0, 0.0]]))
    assert metrics["clip_ratio"] == 0.0


def test_clipping_by_hand():
    # one completion, two tokens, ratios e^0.5 = 1.6487 (clipped to 1.2) and e^-0.5 = 0.6065 (clipped to 0.8)
    lp, old = torch.tensor([[0.0, -1.0]]), torch.tensor([[-0.5, -0.5]])
    loss_pos, m_pos = policy_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 2))
    # A > 0: min(1.6487, 1.2) = 1.2 and min(0.6065, 0.8) = 0.6065 -> -(1.2 + 0.6065) / 2
    assert loss_pos.item() == pytest.approx(-(1.2 + math.exp(-0.5)) / 2, abs=1e-6)
    assert m_pos["clip_ratio/high"] == 0.5 and m_pos["clip_ratio/low"] == 0.0
    loss_neg, m_neg = policy_loss(lp, old, torch.tensor([-1.0]), torch.ones(1, 2))
    # A < 0: min(-1.6487, -1.2) = -1.6487 and min(-0.6065, -0.8) = -0.8 -> (1.6487 + 0.8) / 2
    assert loss_neg.item() == pytest.approx((math.exp(0.5) + 0.8) / 2, abs=1e-6)
    assert m_neg["clip_ratio/low"] == 0.5 and m_neg["clip_ratio/high"] == 0.0
    # clip-higher: epsilon_high 0.7 lets ratio 1.6487 through for A > 0
    loss_hi, _ = policy_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 2), epsilon_high=0.7)
    assert loss_hi.item() == pytest.approx(-(math.exp(0.5) + math.exp(-0.5)) / 2, abs=1e-6)


def test_kl_term_by_hand():
    lp = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-2.0, -1.0]])  # k3: e^-1 and 0
    loss, metrics = policy_loss(lp, lp, torch.tensor([0.0]), torch.ones(1, 2), ref_logprobs=ref, beta=0.1)
    assert loss.item() == pytest.approx(0.1 * math.exp(-1) / 2, abs=1e-7)
    assert metrics["kl"] == pytest.approx(math.exp(-1) / 2, abs=1e-7)


def test_loss_types_by_hand():
    # on-policy, so every per-token loss is -A_i: row 0 has 3 tokens of -1, row 1 one token of +2
    lp = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    expect = {"grpo": (-1 + 2) / 2, "bnpo": (-3 + 2) / 4, "dapo": (-3 + 2) / 10, "dr_grpo": (-3 + 2) / (2 * 5)}
    for loss_type, value in expect.items():
        loss, _ = policy_loss(lp, lp, adv, MASK, loss_type=loss_type, max_completion_length=5,
                              num_tokens=10 if loss_type == "dapo" else None)
        assert loss.item() == pytest.approx(value), loss_type


def test_sequence_level_importance_ratio():
    # GSPO: one ratio per completion, exp(mean log-ratio) = exp((0.5 - 0.5 + 0.3) / 3) = exp(0.1)
    lp = torch.tensor([[0.5, -0.5, 0.3]])
    loss, _ = policy_loss(lp, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3), importance_level="sequence")
    assert loss.item() == pytest.approx(-math.exp(0.1), abs=1e-6)


def test_all_masked_batch_gives_zero_loss_and_zero_gradient():
    lp = torch.randn(2, 3, requires_grad=True)
    for loss_type in ["grpo", "bnpo", "dapo", "dr_grpo"]:
        loss, _ = policy_loss(lp, lp.detach() - 0.1, torch.tensor([1.0, -1.0]), torch.zeros(2, 3),
                              loss_type=loss_type, max_completion_length=3)
        loss.backward()
        assert loss.item() == 0.0 and lp.grad.abs().sum().item() == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_micro_batches_sum_to_the_whole_batch(loss_type):
    torch.manual_seed(0)
    N, T = 6, 5
    params = torch.randn(N, T, requires_grad=True)
    old, ref = torch.randn(N, T), torch.randn(N, T)
    adv = torch.randn(N)
    mask = (torch.rand(N, T) > 0.3).float()
    kw = dict(beta=0.05, loss_type=loss_type, max_completion_length=T)

    full, _ = policy_loss(params, old, adv, mask, ref_logprobs=ref, **kw)
    (full_grad,) = torch.autograd.grad(full, params)
    total = 0.0
    for rows in [slice(0, 2), slice(2, 4), slice(4, 6)]:
        part, _ = policy_loss(params[rows], old[rows], adv[rows], mask[rows], ref_logprobs=ref[rows], **kw,
                              num_sequences=N, num_tokens=mask.sum().item())
        total = total + part
    (acc_grad,) = torch.autograd.grad(total, params)
    assert total.item() == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(acc_grad, full_grad, atol=1e-6, rtol=0)


def test_bnpo_divides_by_local_tokens_and_dapo_by_the_global_share():
    """Two processes: this one holds 4 tokens, the global batch 12 (6 per process). On-policy, so the summed
    per-token loss is -3 + 2 = -1: bnpo gives -1/4, dapo -1/6."""
    lp, adv = torch.zeros(2, 3), torch.tensor([1.0, -2.0])
    for loss_type, value in (("bnpo", -1 / 4), ("dapo", -1 / 6)):
        loss, _ = policy_loss(lp, lp, adv, MASK, loss_type=loss_type, num_tokens=6.0, local_tokens=4)
        assert loss.item() == pytest.approx(value), loss_type


def test_a_registered_loss_type_is_accepted_by_the_config_and_used(monkeypatch):
    from grpo.algo import loss as loss_module
    from grpo.config import ConfigError, load_config

    monkeypatch.setattr(loss_module, "LOSS_TYPES", dict(loss_module.LOSS_TYPES))
    with pytest.raises(ConfigError, match=r"algorithm.loss_type: 'sum' is not a registered loss type; use one of "
                                          r"grpo, bnpo, dapo, cispo, dr_grpo"):
        load_config(None, ["algorithm.loss_type=sum"])

    @loss_module.loss_type("sum")
    def _sum(token_losses, mask, normalisers):
        return token_losses.sum()

    assert load_config(None, ["algorithm.loss_type=sum"]).algorithm.loss_type == "sum"
    loss, _ = policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0, -2.0]), MASK, loss_type="sum")
    assert loss.item() == pytest.approx(-3 + 2)
    with pytest.raises(ValueError, match="loss type 'sum' is already registered"):
        loss_module.loss_type("sum")(_sum)


def test_kl_placement_is_decided_once():
    from grpo.algo.kl import KLPenalty
    from grpo.config import AlgorithmConfig

    in_loss = KLPenalty.from_config(AlgorithmConfig(beta=0.1))
    in_reward = KLPenalty.from_config(AlgorithmConfig(beta=0.1, kl_penalty="reward", kl_estimator="k1"))
    off = KLPenalty.from_config(AlgorithmConfig(beta=0.0))
    assert (in_loss.loss_beta, in_reward.loss_beta, off.loss_beta) == (0.1, 0.0, 0.0)
    assert (in_loss.in_reward, in_reward.in_reward, off.in_reward) == (False, True, False)
    assert [k.needs_old_logprobs(1) for k in (in_loss, in_reward, off)] == [False, True, False]
    assert in_loss.needs_old_logprobs(2)
    # by hand (k1): log-probs [-1, -1] under pi_old, [-2, -2] under pi_ref -> KL 1 per token, 2 per completion
    kl = in_reward.completion_kl(torch.full((1, 2), -1.0), torch.full((1, 2), -2.0), torch.ones(1, 2))
    assert kl.tolist() == [2.0]


@pytest.mark.parametrize("correction, expected_loss, masked", [
    ("none", -1.0, 0.0),
    ("token_truncate", -(math.exp(0.5) + math.exp(-1.0)) / 2, 0.0),
    ("token_mask", -0.5, 0.5),
    ("sequence_truncate", -math.exp(-0.25), 0.0),
    ("sequence_mask", -1.0, 0.0),
])
def test_rollout_correction_by_hand(correction, expected_loss, masked):
    """On-policy (ratio 1), A = 1, two tokens: the surrogate is -1 per token, so the grpo loss is -mean_t(w_t).
    old [-1, -2] against the sampler's [-1.5, -1]: rho_t = [e^0.5, e^-1] = [1.6487, 0.3679], cap 2 masks the
    second token (below 1/2); per completion rho = e^((0.5 - 1) / 2) = 0.7788, inside [1/2, 2]."""
    old, rollout = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    loss, metrics = policy_loss(old, old, torch.tensor([1.0]), torch.ones(1, 2), rollout_logprobs=rollout,
                                rollout_correction=correction, rollout_correction_cap=2.0)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert metrics["rollout/mismatch_kl"] == pytest.approx(0.25)
    assert metrics["rollout/masked_fraction"] == masked
    token_level = not correction.startswith("sequence")
    assert metrics["rollout/is_ratio_max"] == pytest.approx(math.exp(0.5) if token_level else math.exp(-0.25))


def test_rollout_correction_ignores_padding_and_is_a_no_op_when_the_sampler_agrees():
    torch.manual_seed(0)
    lp, adv = torch.randn(3, 4), torch.tensor([1.0, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    plain, _ = policy_loss(lp, lp - 0.1, adv, mask)
    noisy_padding = torch.where(mask.bool(), lp - 0.1, torch.full_like(lp, -50.0))  # garbage where masked
    for correction in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        loss, metrics = policy_loss(lp, lp - 0.1, adv, mask, rollout_logprobs=noisy_padding,
                                    rollout_correction=correction)
        assert loss.item() == pytest.approx(plain.item(), abs=1e-6), correction
        assert metrics["rollout/is_ratio_max"] == pytest.approx(1.0)
        assert metrics["rollout/masked_fraction"] == 0.0
