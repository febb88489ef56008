"""The GRPO training loop: rollout -> score -> advantages -> update -> log -> checkpoint.

Algorithm (DeepSeekMath's GRPO, as configured in the `algorithm` section):
- Each step draws B prompts and samples G completions for each (N = B * G) from the current policy.
- Rewards are a weighted sum of rule scores; advantages are rewards normalised within each group
  (unbiased std, eps 1e-4); groups with equal rewards get advantage 0 and contribute no policy gradient.
- The loss is the clipped surrogate per token plus beta * KL(pi_theta || pi_ref) (k3 estimator by default)
  to a frozen copy of the initial policy, averaged per completion and then over completions (loss_type=grpo).
  beta = 0 creates no reference model.
- Log-probs use logits divided by the sampling temperature, so the trained distribution is the sampled one.
- pi_old: with num_iterations = 1 it is the detached current policy (ratio 1, no extra forward pass); with
  more, log-probs are captured once before the updates.
- One optimizer step per iteration over the N completions, accumulated over micro-batches whose losses sum
  exactly to the loss of the whole batch.
Every phase is timed and logged as time/<phase>.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from grpo.backend.allocator import keep_freed_memory
from grpo.algo.advantages import (group_advantages, informative_groups, overlong_penalty, sequence_kl,
                             zero_std_fraction)
from grpo.io.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_model
from grpo.config import Config, check_resume, to_yaml
from grpo.data import PromptSampler, load_examples
from grpo.backend.base import prepare_models
from grpo.evaluate import evaluate, format_samples
from grpo.modeling.logprobs import LogprobModel, rollout_logprobs
from grpo.algo.loss import policy_loss
from grpo.modeling.loading import load_tokenizer
from grpo.hooks.moe import RouterProbe, decode_routes, replay_routes, routing_drift, update_selection_bias
from grpo.backend.onednn import packed_linears
from grpo.backend.accelerator import make_accelerator, resolved_precision
from grpo.scoring.probe import probe_report
from grpo.rollout.builtin import Rollouts, concat_rollouts, generate
from grpo.scoring.rules import user_code_digest
from grpo.scoring.scorer import Scorer, Scores
from grpo.backend import deepspeed as zero
from grpo.io.tracking import NullTracker, Tracker, truncate_metrics


class PhaseTimer:
    """Wall time of each named phase of a step, for time/<phase> metrics."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


def train(cfg: Config, resume: bool | str | Path = False) -> dict[str, float]:
    """Run GRPO as `cfg` says; returns the final metrics (eval before/after when eval is configured).

    resume=True continues from the latest checkpoint in train.output_dir; a path continues from that one.
    """
    out = Path(cfg.train.output_dir)
    checkpoint = None
    if resume:
        checkpoint = latest_checkpoint(out) if resume is True else Path(resume)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: {out} has no checkpoint yet (set train.save_every to write them)")
        for change in check_resume(yaml.safe_load((checkpoint / "config.yaml").read_text()), cfg, str(checkpoint)):
            print(f"resume: {change}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    set_seed(cfg.train.seed)
    accelerator = make_accelerator(cfg.train)
    if accelerator.device.type == "cpu" and cfg.train.reuse_host_memory:
        keep_freed_memory()
    tokenizer = load_tokenizer(cfg.model)
    train_examples, dropped = load_examples(cfg.data.path, cfg.data.split, cfg.data.max_samples, cfg.data, tokenizer)
    eval_examples = []
    if cfg.eval.path is not None:
        eval_examples, _ = load_examples(cfg.eval.path, cfg.eval.split, cfg.eval.num_prompts, cfg.data, tokenizer)
    scorer = Scorer(cfg.rewards, cfg.scoring)
    try:
        if cfg.scoring.canary:
            scorer.check_canaries()
        if cfg.scoring.probe_rows and accelerator.is_main_process:
            print(probe_report(scorer, train_examples[:cfg.scoring.probe_rows], tokenizer, cfg.data.path)[0])
        return _train_loop(cfg, out, accelerator, tokenizer, train_examples, dropped, eval_examples, scorer, checkpoint)
    finally:
        scorer.close()


def _train_loop(cfg: Config, out: Path, accelerator: Accelerator, tokenizer, train_examples, dropped: dict,
                eval_examples, scorer: Scorer, checkpoint: Path | None) -> dict[str, float]:
    """Load the models, then step: rollout -> score -> advantages -> update -> log -> checkpoint."""
    B, G, N = cfg.train.prompts_per_step, cfg.rollout.num_generations, cfg.completions_per_step
    W = accelerator.num_processes
    if B % W or (B // W * G) % cfg.train.micro_batch_size:
        raise ValueError(f"train.prompts_per_step={B} must split into {W} processes of whole micro-batches "
                         f"({B // W} prompts x {G} completions each, micro_batch_size {cfg.train.micro_batch_size}); "
                         f"use a multiple of {W} prompts per step")
    if W > 1 and cfg.algorithm.dynamic_sampling:
        raise ValueError("algorithm.dynamic_sampling runs on one process only for now; launch one process")
    models, cfg = prepare_models(cfg, accelerator, micro_batches=B // W * G // cfg.train.micro_batch_size)
    policy_module, model, reference = models.policy, models.model, models.reference
    optimizer, scheduler, gathered = models.optimizer, models.scheduler, models.gathered
    sampler = PromptSampler(train_examples, cfg.train.seed, cfg.data.shuffle)
    resettable_reference = reference if cfg.algorithm.ref_reset_every else None
    start_step = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, resettable_reference,
                                **models.restore_hooks(checkpoint))
        sampler.load_state_dict(state["data"])
        start_step = state["step"]
        accelerator.print(f"resumed from {checkpoint} at step {start_step}")
    if accelerator.is_main_process:
        for log_file in ("metrics.jsonl", "completions.jsonl"):  # a fresh run starts its logs anew
            truncate_metrics(out / log_file, start_step)
    tracker = Tracker(cfg, out, cfg.train.max_steps, start_step + 1) if accelerator.is_main_process else NullTracker()

    accelerator.print(f"device {accelerator.device} x {W} processes, mixed precision {resolved_precision(cfg.train)}"
                      f"{' (auto)' if cfg.train.mixed_precision == 'auto' else ''}; "
                      f"{len(train_examples)} training prompts ({dropped['too_long']} over-long and "
                      f"{dropped['incomplete']} incomplete rows dropped), {len(eval_examples)} eval prompts")
    accelerator.print(f"per step: {B} prompts x {G} completions = {N} completions, up to "
                      f"{N * cfg.rollout.max_completion_length} new tokens, {N // W // cfg.train.micro_batch_size} "
                      f"micro-batches of {cfg.train.micro_batch_size} per process; {cfg.train.max_steps} steps")
    for spec in cfg.rewards:
        if (digest := user_code_digest(spec.fn)) is not None:
            accelerator.print(f"reward {spec.label}: user code {spec.fn} sha256 {digest}")

    results: dict[str, float] = {}
    samples = {}  # greedy eval completions before and after training, printed at the end
    if eval_examples and start_step == 0:
        with gathered() as whole:
            results["eval/accuracy_before"], samples["before"] = _evaluate(whole, tokenizer, eval_examples, scorer,
                                                                           cfg, accelerator, tracker, 0)

    def save(step: int) -> None:
        states = models.checkpoint_states(out, step)  # collective when sharded or under DeepSpeed
        if accelerator.is_main_process:
            weights = states["model_state"]
            if not all(torch.isfinite(p).all() for p in (model.parameters() if weights is None else weights.values())):
                raise RuntimeError(f"step {step}: parameters are not finite; no checkpoint written")
            save_checkpoint(out, step, model, tokenizer, optimizer, scheduler, sampler.state_dict(), to_yaml(cfg),
                            resettable_reference, cfg.train.keep_last_n, **states)
        accelerator.wait_for_everyone()

    nonfinite_in_a_row, step, training_seconds = 0, start_step, 0.0
    stop = StopRequest()
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        timer, started = PhaseTimer(), time.perf_counter()
        with gathered() as whole:
            rollouts, scores, sampling_metrics = _rollout_and_score(whole, tokenizer, sampler, scorer, cfg,
                                                                    accelerator, timer, step)
        if scores.total.numel() == 0:  # dynamic sampling found no group with differing rewards: nothing to learn
            tracker.log({**sampling_metrics, **timer.metrics(), "step_time": time.perf_counter() - started}, step)
            continue
        rewards, loss_mask = _shape_rewards(scores.total, rollouts, cfg)
        with timer("reference"):
            needs_old = cfg.algorithm.num_iterations > 1 or cfg.algorithm.kl_penalty == "reward"
            old_logprobs = _logprobs(policy_module, rollouts, cfg, accelerator) if needs_old else None
            ref_logprobs = None if reference is None else _logprobs(reference, rollouts, cfg, accelerator, frozen=True)
        if cfg.algorithm.kl_penalty == "reward":
            seq_kl = sequence_kl(old_logprobs, ref_logprobs, loss_mask, cfg.algorithm.kl_estimator)
            rewards = rewards - cfg.algorithm.beta * seq_kl.cpu()
        all_rewards = _gather(accelerator, rewards)  # every process's groups, in rank order
        n = rewards.shape[0]
        rank_rows = slice(accelerator.process_index * n, (accelerator.process_index + 1) * n)
        advantages = group_advantages(all_rewards, G, cfg.algorithm.scale_rewards)[rank_rows].to(accelerator.device)
        with timer("update"):
            update_metrics = [_update(policy_module, optimizer, scheduler, rollouts, loss_mask, advantages,
                                      old_logprobs, ref_logprobs, cfg, accelerator)
                              for _ in range(cfg.algorithm.num_iterations)]
        if cfg.algorithm.ref_reset_every and step % cfg.algorithm.ref_reset_every == 0:
            reference.load_state_dict(model.state_dict())

        lengths = _gather(accelerator, rollouts.completion_mask.sum(dim=1).float())
        metrics = {
            **_gather_scores(accelerator, scores).metrics(),
            **{k: _mean_over_processes(accelerator, v) for k, v in update_metrics[-1].items()},
            **sampling_metrics,
            "reward_shaped": all_rewards.mean().item(),
            "reward_std": all_rewards.std().item(),
            "frac_zero_std_groups": zero_std_fraction(all_rewards, G),
            "completion_length": lengths.mean().item(),
            "truncated_ratio": _gather(accelerator, rollouts.truncated.float()).mean().item(),
            "lr": scheduler.get_last_lr()[0],
            **timer.metrics(),
            "step_time": time.perf_counter() - started,
        }
        if cfg.algorithm.kl_penalty == "reward":
            metrics["kl"] = (_gather(accelerator, seq_kl.cpu()).sum() / lengths.sum().clamp(min=1)).item()
        tracker.log(metrics, step)
        if cfg.logging.completions_every and step % cfg.logging.completions_every == 0:
            tracker.log_completions(step, _group_sample(rollouts, scores, rewards, advantages, G))
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if any(m["skipped_update"] for m in update_metrics) else 0
        if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            dump = _dump_rollouts(out / f"nonfinite-step-{step}.jsonl", rollouts, scores, rewards)
            raise RuntimeError(f"step {step}: the loss or gradient was not finite for {nonfinite_in_a_row} steps in a "
                               f"row (train.max_nonfinite_steps); this step's rollouts are in {dump}")
        if _any_process(accelerator, stop.requested is not None):  # all processes stop after the same step
            save(step)
            stop.restore()
            tracker.finish()
            accelerator.print(f"stopped after step {step} ({stop.requested or 'another process'}); checkpoint saved. "
                              f"Continue with:\n    grpo train CONFIG --resume   (output_dir {out})")
            return results
        if cfg.train.save_every and step % cfg.train.save_every == 0:
            save(step)
        if cfg.eval.every and eval_examples and step % cfg.eval.every == 0 and step != cfg.train.max_steps:
            with gathered() as whole:
                _evaluate(whole, tokenizer, eval_examples, scorer, cfg, accelerator, tracker, step)
        results.update({k: v for k, v in metrics.items() if not k.startswith("time/")})
        training_seconds += metrics["step_time"]
        if cfg.train.time_limit and _any_process(accelerator, training_seconds >= cfg.train.time_limit):
            accelerator.print(f"train.time_limit: {training_seconds:.0f} s of steps after step {step}; finishing")
            break

    stop.restore()
    if eval_examples:
        with gathered() as whole:
            results["eval/accuracy_after"], samples["after"] = _evaluate(whole, tokenizer, eval_examples, scorer,
                                                                         cfg, accelerator, tracker, step)
        before = results.get("eval/accuracy_before")
        accelerator.print(f"held-out accuracy ({len(eval_examples)} prompts, greedy): "
                          + (f"before {before:.3f}, " if before is not None else "")
                          + f"after {results['eval/accuracy_after']:.3f}\n" + format_samples(samples))
        if accelerator.is_main_process:
            (out / "eval_samples.json").write_text(json.dumps(samples, indent=1))
    weights = models.whole_weights()  # collective when sharded
    if accelerator.is_main_process:
        save_model(out / "final", model, tokenizer, weights)
        print(f"final model saved to {out / 'final'}")
    accelerator.wait_for_everyone()
    tracker.finish()
    return results


def _rollout_and_score(model, tokenizer, sampler: PromptSampler, scorer: Scorer, cfg: Config, accelerator: Accelerator,
                       timer: PhaseTimer, step: int) -> tuple[Rollouts, Scores, dict[str, float]]:
    """B groups of G scored completions. With dynamic sampling, groups whose rewards are all equal are
    dropped and more prompts drawn, for at most max_sampling_rounds rounds; the step then trains on the
    groups it has.

    Every process draws the same prompts and keeps its own contiguous share. Each completion samples from
    its own random stream, seeded by (seed, step, round, its index in the global batch), so the batch is the
    same whatever the number of processes."""
    B, G = cfg.train.prompts_per_step, cfg.rollout.num_generations
    W, rank = accelerator.num_processes, accelerator.process_index
    kept_rollouts, kept_scores, drawn, dropped = [], [], 0, 0
    for round_ in range(cfg.algorithm.max_sampling_rounds if cfg.algorithm.dynamic_sampling else 1):
        needed = B - sum(s.total.shape[0] for s in kept_scores) // G
        drawn += needed
        share = needed // W
        batch = sampler.next_batch(needed)[rank * share:(rank + 1) * share]
        first = rank * share * G
        seeds = [_completion_seed(cfg.train.seed, step, round_, first + i) for i in range(share * G)]
        probe = RouterProbe(model)  # mixture-of-experts: the experts chosen while decoding
        with timer("rollout"), probe.recording():
            rollouts = generate(model, tokenizer, [e["prompt"] for e in batch], G, cfg.rollout,
                                autocast=accelerator.autocast, seeds=seeds, onednn_linear=cfg.train.onednn_linear)
        with timer("rewards"):
            scores = scorer(rollouts.texts, [e for e in batch for _ in range(G)],
                            rollouts.completion_mask.sum(dim=1).tolist())
        if cfg.algorithm.dynamic_sampling:
            groups = informative_groups(scores.total, G)
            dropped += needed - groups.numel()
            rows = (groups.unsqueeze(1) * G + torch.arange(G)).reshape(-1)
            rollouts, scores = rollouts.select(rows.to(rollouts.prompt_ids.device)), scores.select(rows)
        kept_rollouts.append(rollouts)
        kept_scores.append(scores)
        if sum(s.total.shape[0] for s in kept_scores) // G == B:
            break
    metrics = {}
    if cfg.algorithm.dynamic_sampling:
        metrics = {"sampling/groups_drawn": float(drawn), "sampling/groups_dropped": float(dropped),
                   "sampling/groups_trained": float(drawn - dropped)}
    elif probe.routers:
        N, T = rollouts.completion_ids.shape
        rollouts.routes = {name: decode_routes(calls, rollouts.decode_rows, N, T, calls[0][0].shape[-1])
                           for name, calls in probe.calls().items()}
        with timer("routing_drift"):
            metrics["moe/routing_drift"] = _routing_drift(model, rollouts, cfg, accelerator)
    return concat_rollouts(kept_rollouts, tokenizer.pad_token_id), Scores.concat(kept_scores), metrics


def _routing_drift(model, rollouts: Rollouts, cfg: Config, accelerator: Accelerator) -> float:
    """Fraction of completion tokens whose experts differ between decoding and a teacher-forced pass of the
    same policy through the training path (shared prompt, one batch), averaged over MoE layers."""
    N, T = rollouts.completion_ids.shape
    if T < 2:
        return float("nan")
    training = RouterProbe(model)
    with torch.no_grad(), accelerator.autocast(), training.recording():
        rollout_logprobs(model, rollouts, slice(0, N), cfg.rollout.num_generations, cfg.rollout.temperature)
    drifts = []
    for name, calls in training.calls().items():
        k = calls[1][0].shape[-1]  # call 0 ran the prompts, call 1 the completions
        trained = calls[1][0].reshape(N, T - 1, k).cpu()
        decoded = rollouts.routes[name][:, :T - 1]
        drifts.append(routing_drift(decoded, trained, rollouts.completion_mask[:, :T - 1].cpu()))
    return sum(drifts) / len(drifts)


def _completion_seed(seed: int, step: int, round_: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{step}/{round_}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _gather(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    """values [n] of every process, concatenated in rank order, on the CPU."""
    if accelerator.num_processes == 1:
        return values.cpu()
    return accelerator.gather(values.to(accelerator.device)).cpu()


def _mean_over_processes(accelerator: Accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(torch.tensor(float(value), device=accelerator.device), "mean").item()


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum").item())


def _gather_scores(accelerator: Accelerator, scores: Scores) -> Scores:
    """The scores of every process (sub-metrics stay this process's)."""
    if accelerator.num_processes == 1:
        return scores
    nan = float("nan")
    per_rule = {k: [None if math.isnan(v) else v
                    for v in _gather(accelerator, torch.tensor([nan if v is None else v for v in values])).tolist()]
                for k, values in scores.per_rule.items()}
    errors = {k: int(accelerator.reduce(torch.tensor(n, device=accelerator.device), "sum").item())
              for k, n in scores.errors.items()}  # integers summed: a mean times W can lose one to rounding
    return Scores(_gather(accelerator, scores.total), per_rule, errors, scores.sub_metrics)


def _shape_rewards(rewards: torch.Tensor, rollouts: Rollouts, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards after the overlong penalty, and the completion mask the loss uses (truncated rows masked)."""
    a, loss_mask = cfg.algorithm, rollouts.completion_mask
    if a.truncated_completions == "penalize":
        lengths = rollouts.completion_mask.sum(dim=1).cpu()
        rewards = rewards + overlong_penalty(lengths, cfg.rollout.max_completion_length, a.overlong_buffer,
                                             a.overlong_penalty)
    elif a.truncated_completions == "mask":
        loss_mask = loss_mask * (~rollouts.truncated).unsqueeze(1).long()
    return rewards, loss_mask


def _logprobs(model, rollouts: Rollouts, cfg: Config, accelerator: Accelerator, frozen: bool = False) -> torch.Tensor:
    """Log-probs [N, T] of the rollouts under `model`, without gradients, micro-batch by micro-batch.
    frozen: the weights rarely change (the reference), so oneDNN's packed copies are kept between steps."""
    mb = cfg.train.micro_batch_size
    packed = packed_linears(_causal_lm(model), cfg.train.onednn_linear, keep=frozen)
    with torch.no_grad(), accelerator.autocast(), packed:
        return torch.cat([_micro_batch_logprobs(model, rollouts, slice(start, start + mb), cfg)
                          for start in range(0, rollouts.completion_ids.shape[0], mb)])


def _causal_lm(policy):
    """The causal LM inside a (DDP-wrapped) LogprobModel, or `policy` itself."""
    module = getattr(policy, "module", policy)
    return module.model if isinstance(module, LogprobModel) else module


def _micro_batch_logprobs(model, rollouts: Rollouts, rows: slice, cfg: Config, entropy: list | None = None):
    return rollout_logprobs(model, rollouts, rows, cfg.rollout.num_generations, cfg.rollout.temperature,
                            share_prompt=cfg.train.share_prompt, entropy=entropy)


def _update(policy, optimizer, scheduler, rollouts: Rollouts, loss_mask, advantages, old_logprobs, ref_logprobs,
            cfg: Config, accelerator: Accelerator) -> dict[str, float]:
    """One optimizer step on all N completions."""
    global_tokens = loss_mask.sum().item() * accelerator.num_processes
    if accelerator.num_processes > 1:
        global_tokens = accelerator.reduce(loss_mask.sum().float(), "sum").item()
    probe = RouterProbe(accelerator.unwrap_model(policy))  # mixture-of-experts routing; no routers, no metrics
    if zero.is_deepspeed(accelerator):  # the engine steps inside the last micro-batch's backward
        backward, no_sync = zero.backward(accelerator), lambda: zero.deferred_step(accelerator)
    else:
        backward, no_sync = accelerator.backward, lambda: accelerator.no_sync(policy)
    with probe.recording():
        metrics = accumulate_gradients(policy, rollouts, loss_mask, advantages, old_logprobs, ref_logprobs, cfg,
                                       accelerator.autocast, backward, no_sync=no_sync,
                                       num_tokens=global_tokens / accelerator.num_processes)
    metrics.update(probe.metrics())
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
    grad_norm = accelerator.clip_grad_norm_(policy.parameters(), max_norm)  # DeepSpeed: the norm its step clipped
    metrics["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    if accelerator.scaler is not None:  # fp16: the scaler skips a non-finite step itself and must see every step
        scale = accelerator.scaler.get_scale()
        optimizer.step()  # unscaled by clip_grad_norm_ above; skipped on inf/NaN, then the scale is updated
        skipped = accelerator.scaler.get_scale() < scale  # it backs off exactly when it skipped (a fused AdamW
        # skips inside its kernel, which accelerate's step_was_skipped does not see)
    else:
        skipped = not finite
        if finite:  # a NaN or inf loss or gradient never reaches the weights
            optimizer.step()
    metrics["skipped_update"] = float(skipped)
    if not skipped:
        scheduler.step()
        if cfg.moe.bias_update_speed:
            for name, load in probe.loads().items():
                if accelerator.num_processes > 1:
                    load = accelerator.reduce(load.to(accelerator.device), "mean")
                update_selection_bias(probe.routers[name], load, cfg.moe.bias_update_speed)
    optimizer.zero_grad(set_to_none=True)
    return metrics


def accumulate_gradients(policy, rollouts: Rollouts, loss_mask, advantages, old_logprobs, ref_logprobs, cfg: Config,
                         autocast=contextlib.nullcontext, backward=torch.Tensor.backward,
                         no_sync=contextlib.nullcontext, num_tokens: float | None = None) -> dict[str, float]:
    """Backpropagate the loss of this process's N completions, micro-batch by micro-batch, into .grad.

    Each micro-batch's loss is normalised by the whole batch's completion and token counts, so the summed
    gradient equals that of one pass over the whole batch. Under data parallelism (gradients averaged over
    W processes), `num_tokens` is the global token count / W, so `dapo` normalises by the global batch;
    `bnpo` always uses this process's tokens. `no_sync` defers the gradient all-reduce to the last
    micro-batch. Returns the loss and token-weighted metrics.
    """
    a, mb = cfg.algorithm, cfg.train.micro_batch_size
    local_tokens = loss_mask.sum().item()
    num_tokens = local_tokens if num_tokens is None or a.loss_type == "bnpo" else num_tokens
    totals: dict[str, float] = defaultdict(float)
    starts = range(0, advantages.shape[0], mb)
    for start in starts:
        rows = slice(start, start + mb)
        mask, entropy = loss_mask[rows], []
        replay = replay_routes(_causal_lm(policy), rollouts.routes if cfg.moe.routing_replay else None, rows,
                               rollouts.completion_ids.shape[1])
        with autocast(), replay, (no_sync() if start != starts[-1] else contextlib.nullcontext()):
            logprobs = _micro_batch_logprobs(policy, rollouts, rows, cfg, entropy)
        loss, metrics = policy_loss(
            logprobs, logprobs.detach() if old_logprobs is None else old_logprobs[rows], advantages[rows], mask,
            ref_logprobs=None if ref_logprobs is None or a.kl_penalty == "reward" else ref_logprobs[rows],
            beta=a.beta if a.kl_penalty == "loss" else 0.0, epsilon_low=a.epsilon, epsilon_high=a.epsilon_high,
            loss_type=a.loss_type, max_completion_length=cfg.rollout.max_completion_length,
            kl_estimator=a.kl_estimator, importance_level=a.importance_level,
            num_sequences=advantages.shape[0], num_tokens=num_tokens)
        with no_sync() if start != starts[-1] else contextlib.nullcontext():
            backward(loss)
        share = mask.sum().item() / max(local_tokens, 1)  # token-weighted average of the micro-batch metrics
        totals["loss"] += loss.item()
        totals["entropy"] += (entropy[0] * mask).sum().item() / max(local_tokens, 1)
        for k, v in metrics.items():
            totals[k] += v * share
    return dict(totals)


def _group_sample(rollouts: Rollouts, scores: Scores, rewards, advantages, G: int) -> list[dict]:
    """The first group of the step, one record per completion, for completions.jsonl."""
    lengths = rollouts.completion_mask.sum(dim=1).tolist()
    return [{"prompt": rollouts.prompts[0], "completion": rollouts.texts[i], "length": lengths[i],
             "reward": rewards[i].item(), "advantage": advantages[i].item(),
             "rewards": {k: v[i] for k, v in scores.per_rule.items()}}
            for i in range(min(G, len(rollouts.texts)))]


def _dump_rollouts(path: Path, rollouts: Rollouts, scores: Scores, rewards: torch.Tensor) -> Path:
    with open(path, "w") as f:
        for i, text in enumerate(rollouts.texts):
            record = {"completion": text, "reward": rewards[i].item(), "truncated": bool(rollouts.truncated[i]),
                      **{f"reward/{k}": v[i] for k, v in scores.per_rule.items()}}
            f.write(json.dumps(record) + "\n")
    return path


class StopRequest:
    """Turns SIGTERM and the first Ctrl-C into a request to stop after the current step (a second Ctrl-C
    interrupts at once)."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing this step, then saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _evaluate(model, tokenizer, examples, scorer, cfg: Config, accelerator: Accelerator, tracker,
              step: int) -> tuple[float, list[dict]]:
    """eval/accuracy and the sample completions; every eval metric is logged at `step`."""
    evaluation = evaluate(model, tokenizer, examples, scorer, cfg.rollout, cfg.eval, autocast=accelerator.autocast,
                          onednn_linear=cfg.train.onednn_linear)
    tracker.log(evaluation.metrics, step)
    return evaluation.metrics["eval/accuracy"], evaluation.samples
