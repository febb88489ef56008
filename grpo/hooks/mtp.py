"""The MTP module during GRPO: kept in step with the policy, so its drafts do not go stale.

In each training micro-batch the policy's decoder output (its hidden states over prompt and completion) is
recorded as the forward pass makes it; the MTP module (grpo.modeling.mtp) then takes its cross-entropy on
the sampled completion tokens, with the policy's hidden states, embedding and head detached, and after the
policy's optimizer step its own AdamW (lr model.mtp.lr, or optim.lr) takes a step on the mean over the
step's completion tokens:

    L_mtp = -(1 / M) sum over completion tokens x_{i+2} of log p_mtp(x_{i+2} | h_i, x_{i+1})

So the policy's update is exactly what it is without the module (its gradients, clipping and optimizer never
see the module's). Any model.mtp.weight > 0 trains the module (alone under its own AdamW, the loss's scale
does not matter); 0 freezes it. Metrics: mtp/loss, mtp/grad_norm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from grpo.hooks.base import StepHook
from grpo.modeling.logprobs import causal_lm
from grpo.modeling.mtp import MTPModule, load_mtp, mtp_loss_sum


class MTPHook(StepHook):
    def __init__(self, module: MTPModule, cfg, device):
        from grpo.backend.accelerator import make_optimizer

        self.module, self.share_prompt = module, cfg.train.share_prompt
        self.max_grad_norm = cfg.optim.max_grad_norm
        self.optimizer = None
        if cfg.model.mtp.weight > 0:
            optim = dataclasses.replace(cfg.optim, lr=cfg.model.mtp.lr or cfg.optim.lr)
            self.optimizer = make_optimizer(list(module.parameters()), optim, device)
        else:
            module.requires_grad_(False)
        self.loss_sum, self.count = 0.0, 0

    @contextlib.contextmanager
    def micro_batch(self, policy, batch, rows: slice):
        if self.optimizer is None:
            yield
            return
        lm = causal_lm(policy)
        captured = []
        handle = lm.get_decoder().register_forward_hook(
            lambda module, args, out: captured.append(out.last_hidden_state.detach()))
        try:
            yield
        finally:
            handle.remove()
        sequence = self._sequences(batch, rows, captured)
        if sequence is None:
            return
        hidden, ids, mask, targets = sequence
        loss, count = mtp_loss_sum(self.module, lm, hidden, ids, mask, targets, detach_shared=True)
        loss.backward()
        self.loss_sum, self.count = self.loss_sum + loss.item(), self.count + count

    def _sequences(self, batch, rows: slice, captured: list[torch.Tensor]):
        """(hidden [n, L - 1, H], ids [n, L], attention mask [n, L], target mask [n, L]) of prompt + completion,
        the prompt trimmed as the forward pass trimmed it; None when the pass gave no completion states."""
        rows = slice(rows.start, min(rows.stop, batch.completion_ids.shape[0]))
        completion_ids, completion_mask = batch.completion_ids[rows], batch.completion_mask[rows]
        if self.share_prompt:  # the prompt pass [U, P, H], then the completion pass [n, T - 1, H]
            if len(captured) != 2:
                return None
            prompts, rest = captured
            index = torch.arange(rows.start, rows.stop, device=prompts.device) // batch.group_size
            hidden = torch.cat([prompts.index_select(0, index - index[0]), rest], dim=1)
        else:  # whole rows [n, P + T, H]
            hidden = captured[0][:, :-1]
        P = hidden.shape[1] + 1 - completion_ids.shape[1]
        ids = torch.cat([batch.prompt_ids[rows][:, -P:], completion_ids], dim=1)
        mask = torch.cat([batch.prompt_mask[rows][:, -P:], completion_mask], dim=1)
        return hidden, ids, mask, torch.cat([torch.zeros_like(mask[:, :P]), completion_mask], dim=1)

    def after_step(self, skipped: bool) -> dict[str, float]:
        if self.optimizer is None or self.count == 0:
            return {}
        params = list(self.module.parameters())
        for p in params:
            if p.grad is not None:
                p.grad.div_(self.count)  # the mean over the step's tokens
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf")).item()
        if math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"mtp/loss": self.loss_sum / self.count, "mtp/grad_norm": norm}
        self.loss_sum, self.count = 0.0, 0
        return metrics

    def state_dict(self) -> dict:
        return {"optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def load(self, checkpoint, state: dict, lm) -> None:
        """Resume: the module's weights from the checkpoint folder, its optimizer from `state`."""
        saved = load_mtp(checkpoint, lm)
        if saved is None:
            raise FileNotFoundError(f"{checkpoint} has no MTP module (mtp.safetensors), which model.mtp needs to resume")
        self.module.load_state_dict(saved.state_dict())
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
