"""One update's loss and gradients against TRL's GRPOTrainer on the same rollouts.

The same tiny model, the same sampled completions (different lengths, left-padded prompts of different widths),
the same advantages, pi_old (perturbed so that some ratios are clipped) and pi_ref: this trainer's
accumulate_gradients and TRL's GRPOTrainer._compute_loss give the same loss and the same gradient for every
parameter, for each loss aggregation both implement, with and without the KL term (k3, and k3 times the
differentiated importance ratio: TRL's use_bias_correction_kl, this trainer's kl_is_correction) and with
asymmetric clipping. Both run in fp32 (TRL's bf16 default off). The rest of a step (group-scaled advantages,
AdamW, gradient clipping) is checked against plain PyTorch by scripts/step_check.py (tests/test_train.py);
sampling is tested in test_rollout.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from grpo.algo.batch import TrainBatch
from grpo.algo.update import accumulate_gradients
from grpo.config import AlgorithmConfig, Config, RolloutConfig, TrainConfig
from grpo.modeling.logprobs import rollout_logprobs

trl = pytest.importorskip("trl")  # in the dev extra; skipped only where it is not installed


def trl_trainer(model, tokenizer, tmp_path, loss_type, beta, epsilon_high, kl_is_correction):
    from datasets import Dataset

    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          temperature=0.8, max_completion_length=7, loss_type=loss_type, beta=beta, epsilon=0.2,
                          epsilon_high=epsilon_high, use_bias_correction_kl=kl_is_correction, use_cpu=True,
                          bf16=False, report_to="none", model_init_kwargs={"dtype": "float32"})
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[lambda completions, **kwargs: [0.0] * len(completions)],
                              args=args, train_dataset=Dataset.from_list([{"prompt": "x"}] * 4),
                              processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; one window of one micro-batch
    return trainer


@pytest.mark.parametrize("loss_type,beta,epsilon_high,kl_is_correction", [
    ("grpo", 0.0, None, False), ("grpo", 0.04, None, False), ("grpo", 0.04, None, True),
    ("bnpo", 0.04, 0.28, True), ("dr_grpo", 0.0, 0.28, False), ("dapo", 0.04, 0.28, False)])
def test_loss_and_gradients_equal_trl(mixed_rollouts, tmp_path, loss_type, beta, epsilon_high, kl_is_correction):
    from conftest import make_tokenizer

    model, r = mixed_rollouts
    assert r.completion_mask.sum(dim=1).unique().numel() > 1 and (r.prompt_mask == 0).any()
    N = r.completion_ids.shape[0]
    with torch.no_grad():
        current = rollout_logprobs(model, r, slice(0, N), 4, 0.8)
    generator = torch.Generator().manual_seed(0)
    old = (current + 0.3 * torch.randn(current.shape, generator=generator)) * r.completion_mask
    ref = (current + 0.5 * torch.randn(current.shape, generator=generator)) * r.completion_mask
    advantages = torch.randn(N, generator=generator)

    ours = copy.deepcopy(model).train()
    batch = TrainBatch(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, r.completion_mask,
                       advantages, torch.zeros(N), 4, old_logprobs=old, ref_logprobs=ref if beta else None)
    cfg = Config(rollout=RolloutConfig(num_generations=4, max_completion_length=7, temperature=0.8),
                 train=TrainConfig(prompts_per_step=4, micro_batch_size=N),
                 algorithm=AlgorithmConfig(loss_type=loss_type, beta=beta, kl_estimator="k3", epsilon=0.2,
                                           epsilon_high=epsilon_high, num_iterations=2,
                                           kl_is_correction=kl_is_correction))
    our_loss = accumulate_gradients(ours, batch, cfg)["loss"]

    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    model.save_pretrained(tmp_path / "model")  # TRL loads its reference model from a path when beta > 0
    trainer = trl_trainer(str(tmp_path / "model"), tokenizer, tmp_path, loss_type, beta, epsilon_high,
                          kl_is_correction)
    trainer.model.train()
    inputs = {"prompt_ids": r.prompt_ids, "prompt_mask": r.prompt_mask, "completion_ids": r.completion_ids,
              "completion_mask": r.completion_mask, "advantages": advantages, "old_per_token_logps": old,
              "num_items_in_batch": r.completion_mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = ref
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()

    assert our_loss == pytest.approx(trl_loss.item(), abs=1e-5)
    clipped = ((current - old).exp() - 1).abs().gt(0.2) & r.completion_mask.bool()
    assert clipped.any() and not clipped.all()  # the clipped branch is exercised
    grads = dict(trainer.model.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, grads[name].grad, atol=2e-5, rtol=1e-4, msg=name)
