"""One `grpo train` step checked against GRPO written out in plain PyTorch, on any model.

The trainer runs one step as it always does (its sampler, backend, oneDNN layers, shared prompts, micro-batches,
fused AdamW, gradient clipping); the step's rollouts, gradients and weights before and after are recorded. Then
plain PyTorch redoes the step on the same rollouts, from the weights before:

    A_i   = (r_i - mean_g) / (std_g + 1e-4)            (unbiased std of completion i's group g)
    logp  = log_softmax(logits / T)[o_{i,t}]           (Hugging Face forward, positions from the mask)
    loss  = -1/N sum_i (1/|o_i|) sum_t A_i * exp(logp - sg(logp))   (on-policy: ratio 1, beta 0)
    clip_grad_norm_(max_grad_norm); AdamW (torch's per-parameter loop)

and the script reports, per parameter, how far the trainer's gradient and new weights are from these, and how far
its new weights are from its own gradients put through plain clipping and AdamW (the optimizer alone).

    python scripts/step_check.py CONFIG [overrides ...]      # e.g. the R1 stage's config and model
    python scripts/step_check.py runs/numbers/r1_cpu/rl/stage_config.yaml train.output_dir=/tmp/step

The config's algorithm must be plain on-policy GRPO (loss_type grpo, beta 0, num_iterations 1, group scaling);
the run is one step (train.max_steps=1) without evaluation. tests/test_train.py runs it on a tiny model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def record_one_step(config: str, overrides: list[str]) -> tuple[dict, object]:
    """Run one trainer step; returns ({"batch", "before", "after", "grads"}, the run's Config)."""
    import grpo.algo.update
    import grpo.trainer
    from grpo.commands.cli import main
    from grpo.config import load_config

    seen = {}
    plain_update, plain_accumulate = grpo.trainer.update, grpo.algo.update.accumulate_gradients

    def recording_update(models, batch, cfg, backend, hooks):
        seen["batch"], seen["before"] = batch, {k: v.clone() for k, v in models.model.state_dict().items()}
        metrics = plain_update(models, batch, cfg, backend, hooks)
        seen["after"] = {k: v.clone() for k, v in models.model.state_dict().items()}
        return metrics

    def recording_accumulate(policy, *args, **kwargs):
        metrics = plain_accumulate(policy, *args, **kwargs)
        seen["grads"] = {n: p.grad.clone() for n, p in policy.named_parameters()}
        return metrics

    overrides = [*overrides, "train.max_steps=1", "eval.path=null", "logging.wandb=disabled"]
    cfg = load_config(config, overrides)
    a = cfg.algorithm
    if (a.loss_type, a.beta, a.num_iterations, a.scale_rewards, a.baseline) != ("grpo", 0.0, 1, "group", "mean"):
        sys.exit(f"{config}: step_check redoes plain on-policy GRPO (algorithm.loss_type grpo, beta 0, "
                 "num_iterations 1, scale_rewards group, baseline mean); set those")
    grpo.trainer.update, grpo.algo.update.accumulate_gradients = recording_update, recording_accumulate
    try:
        if main(["train", config, *overrides]) != 0:
            sys.exit("the trainer's step failed")
    finally:
        grpo.trainer.update, grpo.algo.update.accumulate_gradients = plain_update, plain_accumulate
    return seen, cfg


def plain_step(seen: dict, cfg) -> tuple[torch.nn.Module, dict, torch.Tensor]:
    """Redo the recorded step in plain PyTorch: (the model after it, its gradients before clipping, A)."""
    from transformers import AutoModelForCausalLM

    batch, G, T = seen["batch"], cfg.rollout.num_generations, cfg.rollout.temperature
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    model.load_state_dict(seen["before"])
    rewards = batch.rewards.view(-1, G)
    advantages = ((rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + 1e-4)).flatten()
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    attention = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    N, T_max, mask = ids.shape[0], batch.completion_ids.shape[1], batch.completion_mask.float()
    for rows in torch.arange(N).split(8):  # the loss is a sum over completions: 8 at a time bounds the memory
        logits = model(input_ids=ids[rows], attention_mask=attention[rows], position_ids=positions[rows],
                       logits_to_keep=T_max + 1).logits[:, :-1] / T
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(
            -1, batch.completion_ids[rows].unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(logprobs - logprobs.detach())
        loss = -((ratio * advantages[rows].unsqueeze(1) * mask[rows]).sum(dim=1) / mask[rows].sum(dim=1)).sum() / N
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    plain_optimizer_step(model, cfg)
    return model, grads, advantages


def plain_optimizer_step(model: torch.nn.Module, cfg) -> None:
    """clip_grad_norm_(max_grad_norm), then one step of torch's AdamW (its per-parameter loop) on model's grads."""
    o = cfg.optim
    if o.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
    torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay,
                      foreach=False).step()


def compare(seen: dict, cfg) -> dict:
    """{"advantages": max |A - A_plain|, "grads": {name: (relative error, max abs error)},
    "weights": {name: max abs difference after the step}, "grad_norm": the plain gradient's norm}."""
    model, grads, advantages = plain_step(seen, cfg)
    embedding = next(k for k in seen["grads"] if k.endswith("embed_tokens.weight"))
    prefix = embedding[:-len("model.embed_tokens.weight")]  # the trainer's policy wraps the causal LM
    if len(seen["grads"]) != len(grads):
        raise AssertionError(f"the trainer trains {len(seen['grads'])} parameters, plain PyTorch {len(grads)}")
    grad_errors = {n: (((seen["grads"][prefix + n] - g).norm() / g.norm()).item(),
                       (seen["grads"][prefix + n] - g).abs().max().item()) for n, g in grads.items()}
    return {"advantages": (seen["batch"].advantages.cpu() - advantages).abs().max().item(), "grads": grad_errors,
            "weights": {n: (seen["after"][n] - v).abs().max().item() for n, v in model.state_dict().items()},
            "optimizer": optimizer_step_error(seen, cfg, model, prefix),
            "grad_norm": torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()}


def optimizer_step_error(seen: dict, cfg, model: torch.nn.Module, prefix: str) -> float:
    """The trainer's own gradients through plain clipping and AdamW from the weights before: the largest difference
    from the trainer's weights after, in float32 roundings of the weight, |w - w_plain| / (eps * max(|w|, lr)).
    The end-to-end weights can differ by up to 2 lr where a gradient element is near 0 (AdamW's first step is
    lr * g / (|g| + eps), so rounding can flip its sign); this isolates the optimizer."""
    model.load_state_dict(seen["before"])
    for name, parameter in model.named_parameters():
        parameter.grad = seen["grads"][prefix + name].clone()
    plain_optimizer_step(model, cfg)
    eps = torch.finfo(torch.float32).eps  # one float32 rounding of a weight w is at most eps * |w|
    return max(((seen["after"][n] - v).abs() / (eps * v.abs().clamp(min=cfg.optim.lr))).max().item()
               for n, v in model.state_dict().items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    seen, cfg = record_one_step(args.config, args.overrides)
    result = compare(seen, cfg)
    worst = max(result["grads"].items(), key=lambda item: item[1][0])
    moved = max(result["weights"].items(), key=lambda item: item[1])
    print(f"model {cfg.model.name_or_path}, {seen['batch'].completion_ids.shape[0]} completions, "
          f"{int(seen['batch'].completion_mask.sum())} tokens, {len(result['grads'])} parameters, "
          f"precision {cfg.train.mixed_precision}, lr {cfg.optim.lr}")
    print(f"advantages: max |difference| {result['advantages']:.2e}")
    print(f"gradients: largest relative error ||g - g_plain|| / ||g_plain|| {worst[1][0]:.2e} ({worst[0]}); "
          f"largest absolute {max(e[1] for e in result['grads'].values()):.2e}; plain gradient norm "
          f"{result['grad_norm']:.3e}")
    print(f"weights after the step: largest |difference| {moved[1]:.2e} ({moved[0]}), lr {cfg.optim.lr}; "
          f"from the trainer's own gradients through plain AdamW: {result['optimizer']:.1f} float32 roundings")


if __name__ == "__main__":
    main()
