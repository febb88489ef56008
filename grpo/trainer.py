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

The loop only calls interfaces: the rollout engine (grpo.rollout) samples, the backend (grpo.backend)
places and steps the models, the algorithm (grpo.algo) builds the TrainBatch and updates, hooks
(grpo.hooks) join in at named points. docs/architecture.md draws the layers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml

from grpo.algo.batch import make_batch
from grpo.algo.sampling import collect, rollout_metrics
from grpo.algo.update import update
from grpo.config import Config, check_resume, to_yaml
from grpo.evaluate import evaluate, format_samples
from grpo.io.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_model
from grpo.io.signals import StopRequest
from grpo.io.tracking import NullTracker, PhaseTimer, Tracker, truncate_metrics
from grpo.modeling.mtp import save_mtp
from grpo.startup import Run, start_run


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
    (out / "config.yaml").write_text(to_yaml(cfg))  # the config is frozen: this is exactly what runs
    run = start_run(cfg)
    try:
        return _train_loop(cfg, out, run, checkpoint)
    finally:
        run.engine.close()
        run.scorer.close()


def _train_loop(cfg: Config, out: Path, run: Run, checkpoint: Path | None) -> dict[str, float]:
    """Step: rollout -> score -> advantages -> update -> log -> checkpoint."""
    backend, models, engine, hooks = run.backend, run.models, run.engine, run.hooks
    start_step = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, models.model, models.optimizer, models.scheduler, _resettable(run, cfg),
                                **backend.restore_hooks(checkpoint))
        if run.mtp is not None:
            run.mtp.load(checkpoint, state["extra"].get("mtp", {}), models.model)
        run.sampler.load_state_dict(state["data"])
        start_step = state["step"]
        backend.print(f"resumed from {checkpoint} at step {start_step}")
    if backend.is_main_process:
        for log_file in ("metrics.jsonl", "completions.jsonl"):  # a fresh run starts its logs anew
            truncate_metrics(out / log_file, start_step)
    tracker = Tracker(cfg, out, cfg.train.max_steps, start_step + 1) if backend.is_main_process else NullTracker()

    results: dict[str, float] = {}
    samples = {}  # greedy eval completions before and after training, printed at the end
    if run.eval_examples and start_step == 0:
        results["eval/accuracy_before"], samples["before"] = _evaluate(run, cfg, tracker, 0)

    nonfinite_in_a_row, step, training_seconds = 0, start_step, 0.0
    startup = {"startup/seconds": run.startup_seconds, "startup/engine_seconds": engine.startup_seconds}
    stop = StopRequest()
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        timer, started = PhaseTimer(), time.perf_counter()
        with backend.whole_model() as whole:
            with timer("weight_sync"):  # the engine samples from the weights of this step
                engine.sync_weights(whole)
            rollouts, scores, sampling_metrics = collect(engine, whole, run.sampler, run.scorer, hooks, backend,
                                                         cfg, step, timer)
        if scores.total.numel() == 0:  # dynamic sampling found no group with differing rewards: nothing to learn
            tracker.log({**sampling_metrics, **timer.metrics(), "step_time": time.perf_counter() - started}, step)
            continue
        with timer("reference"):
            batch, batch_metrics = make_batch(rollouts, scores, models, cfg, backend)
        with timer("update"):
            update_metrics = [update(models, batch, cfg, backend, hooks) for _ in range(cfg.algorithm.num_iterations)]
        if cfg.algorithm.ref_reset_every and step % cfg.algorithm.ref_reset_every == 0:
            models.reference.load_state_dict(models.model.state_dict())

        metrics = {
            **rollout_metrics(rollouts, scores, backend),
            **{k: backend.mean(v) for k, v in update_metrics[-1].items()},
            **sampling_metrics,
            **batch_metrics,
            "lr": models.scheduler.get_last_lr()[0],
            **timer.metrics(),
            "step_time": time.perf_counter() - started,
            **startup,  # the first step's record only
        }
        startup = {}
        tracker.log(metrics, step)
        if cfg.logging.completions_every and step % cfg.logging.completions_every == 0:
            tracker.log_completions(step, _group_sample(rollouts, scores, batch))
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if any(m["skipped_update"] for m in update_metrics) else 0
        if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            dump = _dump_rollouts(out / f"nonfinite-step-{step}.jsonl", rollouts, scores, batch.rewards)
            raise RuntimeError(f"step {step}: the loss or gradient was not finite for {nonfinite_in_a_row} steps in a "
                               f"row (train.max_nonfinite_steps); this step's rollouts are in {dump}")
        if backend.any(stop.requested is not None):  # all processes stop after the same step
            _save(run, cfg, out, step)
            stop.restore()
            tracker.finish()
            backend.print(f"stopped after step {step} ({stop.requested or 'another process'}); checkpoint saved. "
                          f"Continue with:\n    grpo train CONFIG --resume   (output_dir {out})")
            return results
        if cfg.train.save_every and step % cfg.train.save_every == 0:
            _save(run, cfg, out, step)
        if cfg.eval.every and run.eval_examples and step % cfg.eval.every == 0 and step != cfg.train.max_steps:
            _evaluate(run, cfg, tracker, step)
        results.update({k: v for k, v in metrics.items() if not k.startswith("time/")})
        training_seconds += metrics["step_time"]
        if cfg.train.time_limit and backend.any(training_seconds >= cfg.train.time_limit):
            backend.print(f"train.time_limit: {training_seconds:.0f} s of steps after step {step}; finishing")
            break

    stop.restore()
    if run.eval_examples:
        results["eval/accuracy_after"], samples["after"] = _evaluate(run, cfg, tracker, step)
        if backend.is_main_process:
            before = results.get("eval/accuracy_before")
            print(f"held-out accuracy ({len(run.eval_examples)} prompts, greedy): "
                  + (f"before {before:.3f}, " if before is not None else "")
                  + f"after {results['eval/accuracy_after']:.3f}\n" + format_samples(samples))
            (out / "eval_samples.json").write_text(json.dumps(samples, indent=1))
    weights = backend.whole_weights()  # collective when sharded
    if backend.is_main_process:
        save_model(out / "final", models.model, run.tokenizer, weights, merged=True)
        if run.mtp is not None:
            save_mtp(out / "final", run.mtp.module, models.model.config)
        print(f"final model saved to {out / 'final'}")
    backend.barrier()
    tracker.finish()
    return results


def _resettable(run: Run, cfg: Config):
    """The reference model when it is reset during the run (so checkpoints carry it), else None."""
    return run.models.reference if cfg.algorithm.ref_reset_every else None


def _save(run: Run, cfg: Config, out: Path, step: int) -> None:
    """checkpoint-<step>, refused when the weights are not finite. Collective."""
    backend, m = run.backend, run.models
    states = backend.checkpoint_states(out, step)  # collective when sharded or under DeepSpeed
    if backend.is_main_process:
        weights = states["model_state"]
        if not all(torch.isfinite(p).all() for p in (m.model.parameters() if weights is None else weights.values())):
            raise RuntimeError(f"step {step}: parameters are not finite; no checkpoint written")
        mtp = {} if run.mtp is None else {"mtp": run.mtp.module, "extra": {"mtp": run.mtp.state_dict()}}
        save_checkpoint(out, step, m.model, run.tokenizer, m.optimizer, m.scheduler, run.sampler.state_dict(),
                        to_yaml(cfg), _resettable(run, cfg), cfg.train.keep_last_n, **states, **mtp)
    backend.barrier()


def _evaluate(run: Run, cfg: Config, tracker, step: int) -> tuple[float, list[dict]]:
    """eval/accuracy and the sample completions, greedy, with whole weights; every eval metric is logged at `step`."""
    with run.backend.whole_model() as whole:
        run.engine.sync_weights(whole)
        evaluation = evaluate(run.engine, run.eval_examples, run.scorer, cfg.rollout, cfg.eval)
    tracker.log(evaluation.metrics, step)
    return evaluation.metrics["eval/accuracy"], evaluation.samples


def _group_sample(rollouts, scores, batch) -> list[dict]:
    """The first group of the step, one record per completion, for completions.jsonl."""
    lengths = rollouts.completion_mask.sum(dim=1).tolist()
    return [{"prompt": rollouts.prompts[0], "completion": rollouts.shown(i), "length": lengths[i],
             "reward": batch.rewards[i].item(), "advantage": batch.advantages[i].item(),
             "rewards": {k: v[i] for k, v in scores.per_rule.items()}}
            for i in range(min(batch.group_size, len(rollouts.texts)))]


def _dump_rollouts(path: Path, rollouts, scores, rewards: torch.Tensor) -> Path:
    with open(path, "w") as f:
        for i, text in enumerate(rollouts.texts):
            record = {"completion": text, "reward": rewards[i].item(), "truncated": bool(rollouts.truncated[i]),
                      **{f"reward/{k}": v[i] for k, v in scores.per_rule.items()}}
            f.write(json.dumps(record) + "\n")
    return path
