"""The optimizer: AdamW fused into one kernel (grpo.backend.accelerator.make_optimizer) takes the steps the plain
per-parameter AdamW takes."""

from __future__ import annotations

import pytest
import torch

from grpo.backend.accelerator import make_optimizer
from grpo.config import OptimConfig


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_adamw_steps_equal_the_plain_loop(weight_decay):
    cfg = OptimConfig(lr=1e-2, weight_decay=weight_decay, adam_beta1=0.9, adam_beta2=0.99)
    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(5)]
    fused = [p.clone().requires_grad_() for p in start]
    plain = [p.clone().requires_grad_() for p in start]
    ours = make_optimizer(fused, cfg, torch.device("cpu"))
    assert ours.defaults["fused"]
    reference = torch.optim.AdamW(plain, lr=1e-2, weight_decay=weight_decay, betas=(0.9, 0.99), foreach=False)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in start]
        for params, optimizer in ((fused, ours), (plain, reference)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b, s in zip(fused, plain, start):
        assert not torch.equal(a, s)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
