"""Algorithm options: hand-computed values for the pure functions and exactness of the training passes."""

import math

import pytest
import torch

from grpo.algo.advantages import group_advantages, informative_groups, overlong_penalty, sequence_kl
from grpo.config import Config, RolloutConfig, TrainConfig, AlgorithmConfig
from grpo.modeling.logprobs import rollout_logprobs, token_logprobs
from grpo.algo.batch import TrainBatch

from conftest import micro_batched_gradients


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([6, 8, 10, 3])
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4), torch.tensor([0.0, -0.5, -1.0, 0.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, penalty=0.5), torch.tensor([0.0, -0.25, -0.5, 0.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 10, 0), torch.tensor([0.0, 0.0, -1.0, 0.0]))


def test_sequence_kl_sums_token_estimates_over_the_mask():
    lp = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-2.0, -1.0, -5.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert sequence_kl(lp, ref, mask, "k1").item() == pytest.approx(1.0)  # k1 = lp - ref: 1 + 0
    assert sequence_kl(lp, ref, mask, "k3").item() == pytest.approx(math.exp(-1))


def test_informative_groups():
    assert informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2).tolist() == [1]


def test_entropy_of_known_distributions():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, -1e9, -1e9, -1e9]]])
    entropy = []
    token_logprobs(logits, torch.tensor([[1, 0]]), 1.0, entropy)
    torch.testing.assert_close(entropy[0], torch.tensor([[math.log(4), 0.0]]))


def test_shared_prompt_equals_unshared_logprobs_and_gradients(mixed_rollouts):
    model, r = mixed_rollouts
    results = []
    for share in (True, False):
        model.zero_grad()
        lp = torch.cat([rollout_logprobs(model, r, slice(s, s + 3), 4, 0.8, share_prompt=share) for s in range(0, 16, 3)])
        (lp * r.completion_mask).sum().backward()
        results.append((lp.detach(), [p.grad.clone() for p in model.parameters()]))
    (shared, g_shared), (plain, g_plain) = results
    torch.testing.assert_close(shared * r.completion_mask, plain * r.completion_mask, atol=1e-5, rtol=0)
    for a, b in zip(g_shared, g_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_micro_batched_gradients_equal_one_big_batch(mixed_rollouts, loss_type):
    model, r = mixed_rollouts
    torch.manual_seed(1)
    advantages = group_advantages(torch.rand(16), 4)
    ref = torch.randn(r.completion_ids.shape) * 0.1 - 3
    batch = TrainBatch(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, r.completion_mask,
                       advantages, torch.zeros(16), 4, ref_logprobs=ref)
    micro_batched_gradients(model, batch, lambda mb: Config(
        rollout=RolloutConfig(num_generations=4, max_completion_length=7, temperature=0.8),
        train=TrainConfig(prompts_per_step=4, micro_batch_size=mb),
        algorithm=AlgorithmConfig(loss_type=loss_type, beta=0.1)))


def test_truncated_completions_options():
    from grpo.algo.batch import shape_rewards
    from grpo.rollout import Rollouts

    r = Rollouts(prompt_ids=torch.zeros(3, 1, dtype=torch.long), prompt_mask=torch.ones(3, 1, dtype=torch.long),
                 completion_ids=torch.zeros(3, 4, dtype=torch.long),
                 completion_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]),
                 truncated=torch.tensor([True, False, False]), texts=["", "", ""], prompts=["p"] * 3)
    rewards = torch.tensor([1.0, 1.0, 1.0])

    def shaped(**algorithm):
        return shape_rewards(rewards, r, Config(rollout=RolloutConfig(max_completion_length=4),
                                                 algorithm=AlgorithmConfig(**algorithm)))

    kept_rewards, kept_mask = shaped(truncated_completions="keep")
    assert torch.equal(kept_rewards, rewards) and torch.equal(kept_mask, r.completion_mask)
    _, masked = shaped(truncated_completions="mask")
    assert masked.tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    penalised, mask = shaped(truncated_completions="penalize", overlong_buffer=2)  # lengths 4, 2, 3
    torch.testing.assert_close(penalised, torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(mask, r.completion_mask)
