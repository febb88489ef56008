"""Token log-probabilities straight from the last hidden states and the output embedding.

For hidden states h [M, H], output embedding W [V, H], targets y [M] and temperature tau:

    z = h W^T / tau                       logits [M, V]
    logp_i = z_{i, y_i} - logsumexp_v z_{i, v}
    entropy_i = logsumexp_v z_{i, v} - sum_v p_{i, v} z_{i, v},   p = softmax(z)

and, for an upstream gradient g [M] on logp,

    dL/dz = g (onehot(y) - p) / tau,   dL/dh = (dL/dz) W,   dL/dW = (dL/dz)^T h.

One autograd node does all of it: the logits are computed once, turned into p in place (no second
[M, V] tensor for log-softmax, none for the gathered targets' gradient, none for the entropy), and the
backward turns p into dL/dz in place. The plain path (lm_head, log_softmax, gather) builds four such
tensors per micro-batch and their gradients. Results equal it to rounding (tests/test_head.py).
"""

from __future__ import annotations

import torch

ROWS_PER_CHUNK = 64  # rows of [M, V] handled at once by the element-wise work (64 x 49152 fp32 = 12.6 MB)


def compute_dtype(weight: torch.Tensor, device_type: str) -> torch.dtype:
    """The dtype a linear layer with this weight computes in (what F.linear does under autocast): the
    autocast dtype when autocast is on for `device_type` and the weight is fp32, else the weight's."""
    if torch.is_autocast_enabled(device_type) and weight.dtype == torch.float32:
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class HeadLogprobs(torch.autograd.Function):
    """(logp [M], entropy [M]) of targets [M] under softmax(hidden [M, H] @ weight[V, H]^T / temperature);
    the entropy carries no gradient, and with_entropy=False leaves it empty (the passes that never log it)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                with_entropy: bool = True):
        dtype = compute_dtype(weight, hidden.device.type)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            probs = (h @ w.t()).float()  # z, becoming p chunk by chunk
        if temperature != 1.0:
            probs.div_(temperature)
        keep_probs = any(ctx.needs_input_grad[:2])  # only a backward needs p
        logp = torch.empty(probs.shape[0], device=probs.device)
        entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        for start in range(0, probs.shape[0], ROWS_PER_CHUNK):
            z = probs[start:start + ROWS_PER_CHUNK]
            z.sub_(z.amax(dim=-1, keepdim=True))  # shift by the row max: z <= 0
            target = z.gather(1, targets[start:start + ROWS_PER_CHUNK].unsqueeze(1)).squeeze(1)
            exp = z.exp()
            total = exp.sum(dim=-1)
            log_total = total.log()
            logp[start:start + z.shape[0]] = target - log_total
            if with_entropy:
                entropy[start:start + z.shape[0]] = log_total - (exp * z).sum(dim=-1) / total
            if keep_probs:
                z.copy_(exp.div_(total.unsqueeze(1)))
        if keep_probs:
            ctx.save_for_backward(h, w, targets, probs)
        ctx.temperature, ctx.dtypes, ctx.spent = temperature, (hidden.dtype, weight.dtype), False
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, grad_entropy: torch.Tensor):
        if ctx.spent:
            raise RuntimeError("HeadLogprobs reuses its saved probabilities for the gradient; backward runs once")
        ctx.spent = True
        h, w, targets, probs = ctx.saved_tensors
        grad_z = probs.mul_(-grad_logp.unsqueeze(1))  # -g p, in place
        grad_z[torch.arange(targets.shape[0], device=targets.device), targets] += grad_logp  # + g onehot(y)
        if ctx.temperature != 1.0:
            grad_z.div_(ctx.temperature)
        grad_z = grad_z.to(h.dtype)
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_z @ w).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_z.t() @ h).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, None, None, None


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                  temperature: float = 1.0, entropy: list | None = None) -> torch.Tensor:
    """Log-probs [n, T] of targets [n, T] from hidden states [n, T, H] and the output embedding [V, H].

    Only positions where mask [n, T] is 1 are computed; the others are 0 (log-probs and entropy). A list
    passed as `entropy` receives the entropy [n, T] (no gradient).
    """
    keep = mask.bool()
    logp, ent = HeadLogprobs.apply(hidden[keep], weight, targets[keep], temperature, entropy is not None)
    out = torch.zeros(targets.shape, dtype=logp.dtype, device=logp.device).masked_scatter(keep, logp)
    if entropy is not None:
        entropy.append(torch.zeros(targets.shape, dtype=ent.dtype, device=ent.device).masked_scatter(keep, ent))
    return out
