"""The GRPO stage of configs/pipelines/r1_cpu.yaml, run by this trainer and by TRL's GRPOTrainer, side by side.

Both start from the same cold-start SFT model (the pipeline's cold_start/final, written by
`python scripts/learning_numbers.py r1`) and use the rl stage's settings as the pipeline wrote them
(rl/stage_config.yaml): the same prompts (chat template, same user text), rewards (`accuracy` weight 1 and the
strict `format` rule weight 0.5, the same Python functions), G, completion length, temperature, learning rate,
beta, clip range, loss aggregation (grpo), group-scaled advantages, AdamW with betas (0.9, 0.999) (TRL's
defaults; the pipeline's rl stage uses 0.99), gradient clipping, prompts per step,
steps, seed and precision (the mixed precision this trainer resolves the stage's train.mixed_precision to). Each
run is its own process. Held-out accuracy: `grpo eval` (greedy, the first 100 questions of
data/r1_cpu/test.jsonl, the `accuracy` rule) on each trainer's model every `--eval-every` steps (TRL saves its
model then; this trainer evaluates itself with eval.every).

    python scripts/r1_trl_compare.py --seeds 0 1 2    # -> docs/results/r1_trl.md and docs/results/r1_trl.png
    python scripts/r1_trl_compare.py --render         # the page and plot from the runs already made

A run that finished is not run again: its results go to results.json beside it and into r1_trl.json beside the
page (docs/results/ for the default --out), which keeps them across clones together with the hash of the SFT
model each started from and of the stage's settings (a rerun of the pipeline must give the same model, and the
settings must be the same, for them to count; the same pipeline on another CPU can give a model that differs in
its last bits: `--same-sft-as SHA256` accepts such a build after a check that it behaves the same, and the page
says which runs started from which build). A TRL run that was
stopped continues from its latest checkpoint (saved every step; its wall time then includes the earlier
attempt's). Needs TRL:
`pip install -e .[bench]`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "runs" / "numbers" / "r1_cpu"
RUNS = ROOT / "runs" / "numbers" / "r1_trl"  # --out
RESULTS = ROOT / "docs" / "results"
# AdamW's betas in both trainers: TRL's defaults, which the stage's (0.9, 0.99) differ from; set explicitly in both
ADAM_BETAS = (0.9, 0.999)


def stage_config() -> dict:
    path = PIPELINE / "rl" / "stage_config.yaml"
    if not path.is_file():
        sys.exit(f"{path} is missing: run `python scripts/learning_numbers.py r1` first (it writes the SFT model and "
                 "the GRPO stage's settings)")
    return yaml.safe_load(path.read_text())


def run_grpo(seed: int, every: int, out: Path, max_steps: int | None) -> dict:
    started = time.perf_counter()
    fewer = [f"train.max_steps={max_steps}"] if max_steps else []
    subprocess.run([sys.executable, "-m", "grpo", "train", str(PIPELINE / "rl" / "stage_config.yaml"),
                    f"train.seed={seed}", f"train.output_dir={out}", f"eval.every={every}", "logging.wandb=disabled",
                    f"optim.adam_beta1={ADAM_BETAS[0]}", f"optim.adam_beta2={ADAM_BETAS[1]}", *fewer],
                   cwd=ROOT, check=True, capture_output=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {"seconds": time.perf_counter() - started,
            "reward": [r["reward"] for r in steps], "accuracy": [r["reward/accuracy"] for r in steps],
            "format": [r["reward/format"] for r in steps], "step_time": [r["step_time"] for r in steps],
            "held_out": {str(r["step"]): r["eval/accuracy"] for r in records if "eval/accuracy" in r}}


def run_trl(seed: int, every: int, out: Path, max_steps: int | None, record: Path | None = None) -> dict:
    """One TRL run; with `record`, each step's batch (prompt and completion tokens, masks, advantages, the
    questions and answers) goes to record/step-K.pt and every step's model weights are kept
    (scripts/r1_trl_replay.py feeds them to this trainer)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.format import format_reward
    from rewards.math import accuracy

    from grpo.backend.accelerator import resolved_precision
    from grpo.config import load_config

    cfg = stage_config()
    data, rollout, algo, optim, train = cfg["data"], cfg["rollout"], cfg["algorithm"], cfg["optim"], cfg["train"]
    precision = resolved_precision(load_config(PIPELINE / "rl" / "stage_config.yaml").train)  # what grpo computes in
    if precision not in ("fp32", "bf16"):
        sys.exit(f"train.mixed_precision {precision}: the comparison runs TRL in fp32 or bf16 only")
    rows = [json.loads(line) for line in (ROOT / data["path"]).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": data["prompt_format"].format(**row)}],
                                  "answer": row["answer"]} for row in rows])

    def accuracy_reward(completions, answer, **kwargs):
        return [accuracy(c[0]["content"], {"answer": a}) or 0.0 for c, a in zip(completions, answer)]

    def format_strict(completions, **kwargs):
        return [format_reward(c[0]["content"], {}, strict=True) for c in completions]

    weights = {spec["fn"]: spec["weight"] for spec in cfg["rewards"]}
    G, B = rollout["num_generations"], train["prompts_per_step"]

    every_eval, total = every, max_steps or train["max_steps"]

    class KeepEvalCheckpoints(TrainerCallback):
        """After each save (every step, the whole state, so a stopped run continues where it was): the older
        checkpoints go, except those the held-out evaluation reads, which keep their weights only."""

        def on_save(self, args, state, control, **kwargs):
            for folder in out.glob("checkpoint-*"):
                step = int(folder.name.split("-")[1])
                if step == state.global_step:
                    continue
                if step % every_eval and step != total and record is None:
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    for name in ("optimizer.pt", "scheduler.pt", "scaler.pt"):
                        (folder / name).unlink(missing_ok=True)

    class RecordingTrainer(GRPOTrainer):
        """GRPOTrainer that writes each generation batch to `record` (one per optimizer step here)."""

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            record.mkdir(parents=True, exist_ok=True)
            kept = {k: output[k].cpu() for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                                 "advantages")}
            kept.update(prompts=[x["prompt"][-1]["content"] for x in inputs], answers=[x["answer"] for x in inputs])
            torch.save(kept, record / f"step-{self.state.global_step + 1}.pt")
            return output

    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=G, gradient_accumulation_steps=B, num_generations=G,
        max_completion_length=rollout["max_completion_length"], temperature=rollout["temperature"],
        beta=algo["beta"], epsilon=algo["epsilon"], loss_type=algo["loss_type"], scale_rewards="group",
        learning_rate=optim["lr"], adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1],
        weight_decay=optim["weight_decay"], max_grad_norm=optim["max_grad_norm"],
        lr_scheduler_type="constant", warmup_steps=0, max_steps=max_steps or train["max_steps"], seed=seed,
        use_cpu=True,
        reward_weights=[weights["accuracy"], weights["format"]], disable_dropout=True, logging_steps=1,
        report_to="none", save_strategy="steps", save_steps=1, save_only_model=False, bf16=precision == "bf16",
        gradient_checkpointing=False)  # off in this trainer too
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(PIPELINE / "cold_start" / "final", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(PIPELINE / "cold_start" / "final")
    tokenizer.padding_side = "left"
    trainer = (GRPOTrainer if record is None else RecordingTrainer)(
        model=model, reward_funcs=[accuracy_reward, format_strict], args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[KeepEvalCheckpoints()])
    resumed = any(out.glob("checkpoint-*/trainer_state.json"))
    if resumed:
        print(f"continuing from the latest checkpoint in {out}", flush=True)
    trainer.train(resume_from_checkpoint=True if resumed else None)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    held_out = {}
    evaluated = [c for c in out.glob("checkpoint-*") if int(c.name.split("-")[1]) % every == 0
                 or int(c.name.split("-")[1]) == trainer.state.global_step]
    for checkpoint in sorted(evaluated, key=lambda p: int(p.name.split("-")[1])):
        done = subprocess.run([sys.executable, "-m", "grpo", "eval", str(PIPELINE / "rl" / "stage_config.yaml"),
                               "--checkpoint", str(checkpoint), "logging.wandb=disabled"], cwd=ROOT,
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"grpo eval of {checkpoint} failed:\n{done.stderr[-2000:]}")
        held_out[checkpoint.name.split("-")[1]] = json.loads(done.stdout)["eval/accuracy"]
    return {"seconds": time.perf_counter() - started, "reward": [h["reward"] for h in logs],
            "accuracy": [h["rewards/accuracy_reward/mean"] for h in logs],
            "format": [h["rewards/format_strict/mean"] for h in logs], "step_time": [h["step_time"] for h in logs],
            "held_out": held_out}


def page_folder(runs: Path) -> Path:
    """Where the page, plot and r1_trl.json go: docs/results/ for the default runs folder, else `runs`."""
    return RESULTS if runs.resolve() == RUNS.resolve() else runs


def stage_settings() -> str:
    """sha256 of the GRPO stage's settings both trainers take (rl/stage_config.yaml without its paths, and the
    AdamW betas): runs made with other settings do not count."""
    cfg = stage_config()
    cfg["model"].pop("name_or_path")
    cfg["train"].pop("output_dir")
    return hashlib.sha256(json.dumps([cfg, ADAM_BETAS], sort_keys=True).encode()).hexdigest()


@functools.cache  # the SFT model does not change while the script runs; finished() asks before every run
def sft_model_hash() -> str:
    digest = hashlib.sha256()
    with open(PIPELINE / "cold_start" / "final" / "model.safetensors", "rb") as weights:
        for block in iter(lambda: weights.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# builds of the SFT model other than the present one whose runs count (--same-sft-as): the same pipeline, rebuilt
# on another CPU, can differ in the last bits of its weights
SAME_SFT_AS: set[str] = set()


def finished(runs: Path) -> dict:
    """{"grpo-0": results, ...}: the runs kept in r1_trl.json, then those in `runs` (results.json). Each run carries
    the sha256 of the SFT model it started from; runs from another build than the present one (or SAME_SFT_AS)
    are refused."""
    archive = page_folder(runs) / "r1_trl.json"
    kept = json.loads(archive.read_text()) if archive.is_file() else {"runs": {}}
    if kept["runs"] and kept.get("stage_settings_sha256") != stage_settings():
        sys.exit(f"{archive} holds runs made with other GRPO settings than {PIPELINE / 'rl' / 'stage_config.yaml'} "
                 "(or ADAM_BETAS): restore them, or delete the file to start the comparison over")
    for run in kept["runs"].values():  # runs archived before each run kept its own hash: the archive's
        run.setdefault("sft_model_sha256", kept.get("sft_model_sha256"))
    for folder in sorted(runs.glob("*-*")) if runs.is_dir() else []:
        if (folder / "results.json").is_file():
            kept["runs"][folder.name] = {"sft_model_sha256": sft_model_hash(),
                                         **json.loads((folder / "results.json").read_text())}
    other = sorted({r["sft_model_sha256"] for r in kept["runs"].values()} - {sft_model_hash()} - SAME_SFT_AS)
    if other:
        sys.exit(f"{archive} holds runs from another SFT model than {PIPELINE / 'cold_start' / 'final'} (sha256 "
                 f"{', '.join(other)}; this one is {sft_model_hash()}): rerun the pipeline as it was, or delete the "
                 "file to start the comparison over. If only the bits differ (the same pipeline on another CPU), "
                 "check that both builds behave the same (the SFT model's held-out evaluation; the first steps of "
                 "a seed of this trainer) and pass --same-sft-as with the other hash")
    return kept["runs"]


def write_results(out: Path, result: dict) -> None:
    """A finished run's results.json, with the hash of the SFT model it started from."""
    (out / "results.json").write_text(json.dumps({"sft_model_sha256": sft_model_hash(), **result}))


def keep(runs: Path) -> None:
    """Write every finished run into r1_trl.json (each with the SFT model's hash), so they outlive the runs folder."""
    results = finished(runs)
    page_folder(runs).mkdir(parents=True, exist_ok=True)
    (page_folder(runs) / "r1_trl.json").write_text(json.dumps(
        {"stage_settings_sha256": stage_settings(), "runs": results}, indent=1) + "\n")


def rank_sum_p(a: list[float], b: list[float]) -> float:
    """Exact two-sided p-value of the Wilcoxon rank-sum (Mann-Whitney) test, ties given mid-ranks.

    W = sum of the ranks of `a` in a + b. Under the null hypothesis (both samples from one distribution) each of
    the C(n, n_a) ways to pick n_a of the pooled ranks as `a`'s is equally likely, and E[W] = n_a (n + 1) / 2;
    p = the share of those picks with |W' - E[W]| >= |W - E[W]|. Enumerated (C(18, 9) = 48620 for 9 seeds each).
    """
    pooled = sorted(a + b)
    rank = {v: statistics.mean(i + 1 for i, w in enumerate(pooled) if w == v) for v in set(pooled)}
    ranks = [rank[v] for v in a + b]
    expected = len(a) * (len(ranks) + 1) / 2
    observed = abs(sum(rank[v] for v in a) - expected)
    picks = list(itertools.combinations(ranks, len(a)))
    return sum(abs(sum(pick) - expected) >= observed - 1e-9 for pick in picks) / len(picks)


def render(seeds: list[int], runs: Path) -> None:
    """The page and plot (page_folder)."""
    into = page_folder(runs)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = stage_config()
    done = finished(runs)
    before = {r["held_out"]["0"] for r in done.values() if "0" in r["held_out"]}  # this trainer evaluates at step 0
    if len(before) != 1:
        sys.exit(f"the runs' held-out accuracy of the SFT model (step 0) is {sorted(before) or 'missing'}: one value "
                 "expected (every run of this trainer evaluates it before its first step)")
    sft_accuracy = before.pop()
    results = {(t, s): done[f"{t}-{s}"] for t in ("grpo", "trl") for s in seeds if f"{t}-{s}" in done}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lines = []
    for trainer, colour in (("grpo", "tab:blue"), ("trl", "tab:orange")):
        runs = [r for (t, _), r in results.items() if t == trainer]
        if not runs:
            continue
        steps = range(1, min(len(r["reward"]) for r in runs) + 1)
        mean = [statistics.mean(r["reward"][i - 1] for r in runs) for i in steps]
        low = [min(r["reward"][i - 1] for r in runs) for i in steps]
        high = [max(r["reward"][i - 1] for r in runs) for i in steps]
        label = "this trainer" if trainer == "grpo" else "TRL 1.16"
        left.plot(steps, mean, color=colour, label=f"{label} (mean of {len(runs)} seeds)")
        left.fill_between(steps, low, high, color=colour, alpha=0.2)
        evals = sorted(set.intersection(*[{int(k) for k in r["held_out"]} for r in runs]) | {0})
        held = [statistics.mean(sft_accuracy if e == 0 else r["held_out"][str(e)] for r in runs) for e in evals]
        right.plot(evals, held, "o-", color=colour, label=label)
        for r in runs:
            right.plot(evals, [sft_accuracy if e == 0 else r["held_out"][str(e)] for e in evals], ".", color=colour,
                       alpha=0.4)
        lines.append((label, runs, steps, mean, low, high, evals, held))
    left.set(xlabel="step", ylabel="mean reward (accuracy + 0.5 format)", title="training reward, min-max of seeds")
    right.set(xlabel="step", ylabel="held-out accuracy (greedy, 100)", title="held-out accuracy (dots: seeds)")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(into / "r1_trl.png")
    text = ["# The R1 recipe's GRPO stage: this trainer and TRL 1.16 side by side", "",
            f"`python scripts/{Path(__file__).name}` with seeds {', '.join(map(str, seeds))}: both trainers start "
            "from the pipeline's cold-start SFT model with the rl stage's settings "
            f"({cfg['train']['max_steps']} steps, {cfg['train']['prompts_per_step']} prompts x "
            f"{cfg['rollout']['num_generations']} completions, lr {cfg['optim']['lr']}, beta {cfg['algorithm']['beta']}, "
            f"AdamW betas {ADAM_BETAS} in both).",
            "", "![reward and held-out accuracy](r1_trl.png)", ""]
    for label, runs, steps, mean, low, high, evals, held in lines:
        text += [f"## {label}", "",
                 "Mean reward by step (min-max over seeds): " + ", ".join(
                     f"{s}: {mean[s - 1]:.2f} ({low[s - 1]:.2f}-{high[s - 1]:.2f})" for s in steps)
                 + f"; over all steps and seeds {statistics.mean(mean):.3f}.", "",
                 "Held-out accuracy (mean of seeds): " + ", ".join(f"step {e}: {h:.2f}" for e, h in zip(evals, held))
                 + f". Mean step {statistics.mean(t for r in runs for t in r['step_time']):.1f} s.", ""]
    ours = [r for (t, _), r in results.items() if t == "grpo"]
    theirs = [r for (t, _), r in results.items() if t == "trl"]
    if len(ours) > 1 and len(theirs) > 1:
        differences = []
        for i in range(min(len(r["reward"]) for r in ours + theirs)):
            a, b = [r["reward"][i] for r in ours], [r["reward"][i] for r in theirs]
            error = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
            differences.append(f"{i + 1}: {statistics.mean(a) - statistics.mean(b):+.2f} ({2 * error:.2f})")
        text += ["## The difference by step", "", "Mean reward of this trainer's seeds minus TRL's, and in brackets "
                 "twice its standard error (sqrt(var_a / n_a + var_b / n_b) over the seeds): " + ", ".join(differences)
                 + ".", ""]
    evals = sorted({int(e) for r in results.values() for e in r["held_out"]} - {0})
    if len(ours) > 1 and len(theirs) > 1:
        rows = []
        for e in evals:
            a = [r["held_out"][str(e)] for r in ours if str(e) in r["held_out"]]
            b = [r["held_out"][str(e)] for r in theirs if str(e) in r["held_out"]]
            rows.append(f"| {e} | {statistics.mean(a):.3f} ({len(a)}) | {statistics.mean(b):.3f} ({len(b)}) | "
                        f"{statistics.median(a):.2f} | {statistics.median(b):.2f} | {rank_sum_p(a, b):.3f} |")
        text += ["## Held-out accuracy, this trainer against TRL", "", "Mean (seeds) and median of each trainer's "
                 "seeds, and the exact two-sided p-value of the rank-sum test that both come from one distribution.",
                 "", "| step | this trainer | TRL 1.16 | median, this trainer | median, TRL | rank-sum p |",
                 "|---|---|---|---|---|---|", *rows, ""]
    builds = sorted({r["sft_model_sha256"] for r in results.values()})
    text += ["## Each run", "", f"Held-out accuracy by step (step 0, the SFT model: {sft_accuracy:.2f})."
             + (f" The runs started from {len(builds)} builds of the SFT model by the same pipeline on different "
                "machines (the last column: the first 8 hex digits of its sha256)." if len(builds) > 1 else ""), "",
             "| trainer | seed | " + " | ".join(f"step {e}" for e in evals) + " | mean reward, steps 1-"
             f"{cfg['train']['max_steps']} |" + (" SFT build |" if len(builds) > 1 else ""),
             "|---|---|" + "---|" * (len(evals) + 1 + (len(builds) > 1))]
    for (trainer, seed), r in sorted(results.items()):
        cells = [f"{r['held_out'][str(e)]:.2f}" if str(e) in r["held_out"] else "-" for e in evals]
        text.append(f"| {'this trainer' if trainer == 'grpo' else 'TRL 1.16'} | {seed} | {' | '.join(cells)} | "
                    f"{statistics.mean(r['reward']):.2f} |" + (f" {r['sft_model_sha256'][:8]} |" if len(builds) > 1
                                                                else ""))
    text.append("")
    (into / "r1_trl.md").write_text("\n".join(text))
    print("\n".join(text))


def main() -> None:
    global PIPELINE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trainers", nargs="+", default=["grpo", "trl"], choices=["grpo", "trl"])
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--max-steps", type=int, help="fewer steps than the rl stage's (a quick check of the setup)")
    parser.add_argument("--out", type=Path, default=RUNS, help="folder of the runs")
    parser.add_argument("--pipeline", type=Path, default=PIPELINE,
                        help="the pipeline run whose cold_start model and rl settings both trainers use")
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--same-sft-as", nargs="+", default=[], metavar="SHA256",
                        help="other builds of the SFT model whose runs count (the same pipeline on another CPU)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    PIPELINE = args.pipeline.resolve()
    SAME_SFT_AS.update(args.same_sft_as)
    if args.worker:  # one TRL run in its own process
        trainer, seed = args.worker
        out = args.out / f"{trainer}-{seed}"
        write_results(out, run_trl(int(seed), args.eval_every, out, args.max_steps))
        return
    if not args.render:
        for seed in args.seeds:
            for trainer in args.trainers:
                out = args.out / f"{trainer}-{seed}"
                if f"{trainer}-{seed}" in finished(args.out):
                    continue
                print(f"--- {trainer} seed {seed} ---", flush=True)
                if trainer == "grpo":
                    write_results(out, run_grpo(seed, args.eval_every, out, args.max_steps))
                else:
                    subprocess.run([sys.executable, __file__, "--worker", trainer, str(seed), "--out", str(args.out),
                                    "--pipeline", str(PIPELINE),
                                    "--eval-every", str(args.eval_every),
                                    *(["--max-steps", str(args.max_steps)] if args.max_steps else [])],
                                   cwd=ROOT, check=True)
                keep(args.out)
    render(args.seeds, args.out)


if __name__ == "__main__":
    main()
