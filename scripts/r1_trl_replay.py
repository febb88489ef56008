"""TRL's rollouts replayed through this trainer's update: does the same data give the same model?

`scripts/r1_trl_compare.py` runs the R1 GRPO stage with both trainers, each sampling its own rollouts. This
script separates the update from the sampling. It runs TRL 1.16's GRPOTrainer for one seed with the comparison's
settings and records every step's batch (prompt and completion tokens, masks, advantages, questions, answers)
and every step's weights. Then `grpo train` runs the same stage from the same SFT model, except that each
step's rollouts are TRL's batch of that step instead of its own samples (its scorer grades them again; its
advantages, loss, backward, clipping and AdamW are its own). After each step it reports how far its weights are
from TRL's after the same step:

    drift_k = ||w_k - w_k^TRL|| / ||w_k^TRL - w_0||     (all parameters as one vector; w_0 the SFT model)

and the largest |A - A^TRL| (advantages). Both trainers evaluate held-out accuracy (`grpo eval`, greedy, the
first 100 test questions) at the same steps. If the update is the same, the drift stays at rounding level and
the replayed model's held-out accuracy is TRL's; a difference between the trainers' own runs is then in the
rollouts they sampled.

    python scripts/r1_trl_replay.py --seed 0     # about 20 minutes on 2 cores: TRL's run, then the replay
    python scripts/r1_trl_replay.py --seed 0 --replay-only   # the replay again, from the recorded TRL run

Writes OUT/trl-SEED/ (TRL's run, its batches in batches/), OUT/replay-SEED/ (this trainer's run) and
OUT/replay-SEED.json (per step: drift, largest weight and advantage difference; held-out of both).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import r1_trl_compare as compare  # noqa: E402

OUT = ROOT / "runs" / "numbers" / "r1_replay"


def flat(state: dict, names: list[str]) -> torch.Tensor:
    return torch.cat([state[n].float().reshape(-1) for n in names])


def replay(seed: int, every: int, trl_out: Path, out: Path, max_steps: int | None) -> dict:
    """Run `grpo train` on the stage's config with TRL's recorded batches as its rollouts; returns the per-step
    comparison and the held-out accuracy."""
    from safetensors.torch import load_file

    import grpo.trainer
    from grpo.commands.cli import main as cli
    from grpo.rollout.base import Rollouts, completion_mask

    batches = trl_out / "batches"
    start = load_file(str(compare.PIPELINE / "cold_start" / "final" / "model.safetensors"))
    names = sorted(start)
    w0 = flat(start, names)
    steps: list[dict] = []
    plain_collect, plain_update = grpo.trainer.collect, grpo.trainer.update
    recorded_advantages = {}

    def replayed_collect(engine, model, sampler, scorer, hooks, backend, cfg, step, timer):
        rec = torch.load(batches / f"step-{step}.pt")
        by_text = {(cfg.data.prompt_format.format(**e), e["answer"]): e for e in sampler.examples}
        examples = [by_text[(p, a)] for p, a in zip(rec["prompts"], rec["answers"])]
        G = cfg.rollout.num_generations
        if [examples[i]["answer"] for i in range(0, len(examples), G)] != rec["answers"][::G]:
            raise AssertionError(f"step {step}: the recorded batch is not ordered group by group")
        mask, truncated = completion_mask(rec["completion_ids"], [engine.tokenizer.eos_token_id])
        if not torch.equal(mask, rec["completion_mask"].long()):
            raise AssertionError(f"step {step}: TRL's completion mask differs from the first-EOS mask")
        for i in range(0, len(examples), G):
            real = rec["prompt_ids"][i][rec["prompt_mask"][i].bool()].tolist()
            if real != engine.tokenizer(examples[i]["prompt"], add_special_tokens=False)["input_ids"]:
                raise AssertionError(f"step {step}, row {i}: TRL's prompt tokens differ from this trainer's")
        T = int(mask.sum(dim=1).max())
        ids = rec["completion_ids"][:, :T]
        texts = engine.tokenizer.batch_decode(ids.masked_fill(mask[:, :T] == 0, engine.tokenizer.pad_token_id),
                                              skip_special_tokens=True)
        rollouts = Rollouts(prompt_ids=rec["prompt_ids"], prompt_mask=rec["prompt_mask"].long(), completion_ids=ids,
                            completion_mask=mask[:, :T], truncated=truncated, texts=texts,
                            prompts=[e["prompt"] for e in examples])
        with timer("rewards"):
            scores = scorer(texts, examples, rollouts.model_tokens.sum(dim=1).tolist())
        recorded_advantages[step] = rec["advantages"]
        return rollouts, scores, {}

    def compared_update(models, batch, cfg, backend, hooks):
        metrics = plain_update(models, batch, cfg, backend, hooks)
        step = len(steps) + 1
        ours = {k: v.detach() for k, v in models.model.state_dict().items()}
        trl = load_file(str(trl_out / f"checkpoint-{step}" / "model.safetensors"))
        w, w_trl = flat(ours, names), flat(trl, names)
        advantages = batch.advantages.cpu()
        steps.append({"step": step, "drift": ((w - w_trl).norm() / (w_trl - w0).norm()).item(),
                      "max_weight_difference": (w - w_trl).abs().max().item(),
                      "trl_update_norm": (w_trl - w0).norm().item(),
                      "max_advantage_difference": (advantages - recorded_advantages[step]).abs().max().item()})
        print(json.dumps(steps[-1]), flush=True)
        return metrics

    grpo.trainer.collect, grpo.trainer.update = replayed_collect, compared_update
    try:
        config = str(compare.PIPELINE / "rl" / "stage_config.yaml")
        if cli(["train", config, f"train.seed={seed}", f"train.output_dir={out}", f"eval.every={every}",
                "logging.wandb=disabled", f"optim.adam_beta1={compare.ADAM_BETAS[0]}",
                f"optim.adam_beta2={compare.ADAM_BETAS[1]}", *([f"train.max_steps={max_steps}"] if max_steps else [])]):
            sys.exit("the replay run failed")
    finally:
        grpo.trainer.collect, grpo.trainer.update = plain_collect, plain_update
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"steps": steps, "held_out": {str(r["step"]): r["eval/accuracy"] for r in records if "eval/accuracy" in r}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--max-steps", type=int, help="fewer steps than the stage's (a quick check of the setup)")
    parser.add_argument("--replay-only", action="store_true", help="reuse the recorded TRL run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    trl_out = args.out / f"trl-{args.seed}"
    if args.worker:  # TRL's run in its own process
        compare.write_results(trl_out, compare.run_trl(args.seed, args.eval_every, trl_out, args.max_steps,
                                                       record=trl_out / "batches"))
        return
    if not args.replay_only:
        subprocess.run([sys.executable, __file__, "--worker", "--seed", str(args.seed), "--out", str(args.out),
                        "--eval-every", str(args.eval_every),
                        *(["--max-steps", str(args.max_steps)] if args.max_steps else [])], cwd=ROOT, check=True)
    result = replay(args.seed, args.eval_every, trl_out, args.out / f"replay-{args.seed}", args.max_steps)
    result["trl_held_out"] = json.loads((trl_out / "results.json").read_text())["held_out"]
    (args.out / f"replay-{args.seed}.json").write_text(json.dumps(result, indent=1) + "\n")
    worst = max(result["steps"], key=lambda s: s["drift"])
    print(f"largest drift {worst['drift']:.2e} (step {worst['step']}); largest advantage difference "
          f"{max(s['max_advantage_difference'] for s in result['steps']):.2e}")
    print("held-out accuracy, this trainer on TRL's rollouts: " + json.dumps(result["held_out"]))
    print("held-out accuracy, TRL:                           " + json.dumps(result["trl_held_out"]))


if __name__ == "__main__":
    main()
