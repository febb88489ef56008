"""Time a GRPO step of this trainer and of TRL's GRPOTrainer on identical settings, in one invocation.

Both load the same weights (the built-in SmolLM2-135M-Instruct, written once to a Hugging Face folder, or the
model folder --model names),
train on the same GSM8K prompts with the tokenizer's chat template and the same accuracy reward, with the
same group size, lengths, beta, loss aggregation (grpo), AdamW settings and precision; gradient
checkpointing is off in both unless --gradient-checkpointing turns it on in both. Each trainer runs in its own
process (so peak RSS is its own): one warm-up step, then --steps timed steps. Needs TRL: `pip install -e .[bench]`.

Columns: s/step (mean wall time of a timed step); rollout s and rollout tok/s (the generation phase: completion
tokens generated per second of it; TRL's is its _generate); push s (grpo: time/weight_sync, the weights into the
rollout engine); start-up s (from loading the model to the first step: grpo's startup/seconds, which includes
starting the rollout engine; TRL: model load and GRPOTrainer construction); gen tok/s and train tok/s (completion
tokens, and prompt + completion tokens, per second of the whole step).

    python scripts/bench.py                       # fp32 and bf16 rows, 2 timed steps each
    python scripts/bench.py --precision bf16 --steps 3
    python scripts/bench.py --baseline HEAD~1     # also this trainer at another commit (a git worktree)
    python scripts/bench.py --engines builtin vllm  # grpo with each rollout engine (vllm: the vllm extra)
    python scripts/bench.py --lora 16             # also grpo training LoRA adapters (r 16, alpha 32, all linear layers)
    python scripts/bench.py --lora 16 --lora-adapted  # and LoRA decoding through the adapters, not merged weights
    python scripts/bench.py --gradient-checkpointing  # every trainer recomputes activations in the backward
    python scripts/bench.py --speculative runs/mtp_quickstart/sft/final   # rollouts with and without MTP drafts
    python scripts/bench.py --model DIR --precision bf16   # another model folder (on a GPU: scripts/gpu_check.sh)

Both trainers run on the GPU when torch sees one (this trainer through accelerate, TRL without use_cpu), else
on the CPU.

--speculative MODEL (a folder with an MTP module, configs/pipelines/mtp_quickstart.yaml) times rollouts alone, in
this process, on the quickstart's held-out prompts: for each --batches size and greedy / temperature 1, the
built-in engine without drafts, with MTP drafts (rollout.speculative: mtp), and transformers' generate (what TRL's
GRPOTrainer samples with when it does not use vLLM), each once to warm up and then --steps timed times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (B)")
    p.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--trainers", nargs="+", default=["grpo", "trl"], choices=["grpo", "trl"])
    p.add_argument("--engines", nargs="+", default=["builtin"], choices=["builtin", "vllm"],
                   help="rollout engines for the grpo rows (row grpo+vllm for vllm)")
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="also a grpo+lora row: LoRA adapters of rank R (alpha 2R) on every linear layer")
    p.add_argument("--lora-adapted", action="store_true",
                   help="also a grpo+lora-adapted row: the same, decoding through the adapters "
                        "(model.lora.merged_generation=false) rather than with them merged into the weights")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="every row with activation checkpointing (grpo: train.gradient_checkpointing; TRL: "
                        "gradient_checkpointing)")
    p.add_argument("--engine", default="builtin", help=argparse.SUPPRESS)
    p.add_argument("--lora-merged", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--lora-rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--baseline", help="a commit: also time grpo at that commit (row grpo@<commit>), in the same "
                                      "invocation, to compare a change against it")
    p.add_argument("--speculative", type=Path, metavar="MODEL",
                   help="time rollouts of MODEL (with an MTP module) with and without drafts (see above)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="--speculative: prompts per rollout")
    p.add_argument("--model", type=Path, help="a Hugging Face model folder to train instead of the built-in model")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=["grpo", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--one-precision", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(workdir: Path, n_prompts: int, model: Path | None) -> None:
    """The shared model folder (a copy of `model`, else the built-in model) and prompt file."""
    from grpo.io.checkpoint import save_model
    from grpo.config import ModelConfig
    from grpo.modeling.loading import load_model, load_tokenizer

    if model:
        shutil.copytree(model, workdir / "model")
    else:
        save_model(workdir / "model", load_model(ModelConfig()), load_tokenizer(ModelConfig()))
    rows = [json.loads(line) for line in open(ROOT / "data/gsm8k/train.jsonl")][:n_prompts]
    with open(workdir / "prompts.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({"question": row["question"], "answer": row["answer"]}) + "\n")


def run_grpo(args, workdir: Path, precision: str) -> dict:
    from grpo.config import load_config
    from grpo.trainer import train

    out = workdir / f"grpo-{precision}"
    cfg = load_config(None, [
        f"model.name_or_path={workdir / 'model'}", f"data.path={workdir / 'prompts.jsonl'}", "data.template=chat",
        "data.shuffle=false", "data.max_prompt_length=1024", f"rollout.num_generations={args.generations}",
        f"rollout.max_completion_length={args.max_new_tokens}", "rollout.temperature=1.0",
        "rewards=[{fn: accuracy}]", f"algorithm.beta={args.beta}", "algorithm.loss_type=grpo",
        "algorithm.scale_rewards=group", "optim.lr=1e-6", "optim.max_grad_norm=1.0",
        f"train.prompts_per_step={args.prompts}", f"train.micro_batch_size={args.generations}",
        f"train.max_steps={args.steps + 1}", f"train.mixed_precision={precision}", f"train.output_dir={out}",
        "logging.wandb=disabled", "scoring.canary=false",
        *(["train.gradient_checkpointing=true"] if args.gradient_checkpointing else []),
        *([f"rollout.engine={args.engine}", "rollout.vllm_kv_cache_gib=1.0"] if args.engine != "builtin" else []),
        *([f"model.lora={{r: {args.lora_rank}, alpha: {2 * args.lora_rank}, "
            f"merged_generation: {bool(args.lora_merged)}}}"] if args.lora_rank else []),
    ])
    train(cfg)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    startup_s = records[0].get("startup/seconds")  # models, data and rollout engine, before the first step
    records = records[1:]  # drop the warm-up step
    return {
        "startup_s": startup_s,
        "step_s": [r["step_time"] for r in records],
        "rollout_s": [r["time/rollout"] for r in records],
        "push_s": [r["time/weight_sync"] for r in records if "time/weight_sync" in r],
        "completion_tokens": [r["completion_length"] * args.prompts * args.generations for r in records],
        "loss": [r["loss"] for r in records], "kl": [r.get("kl") for r in records],
        "reward": [r["reward"] for r in records],
        "phases": {k: statistics.mean(r[k] for r in records) for k in records[0] if k.startswith("time/")},
    }


def run_trl(args, workdir: Path, precision: str) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.math import accuracy

    class StepTimer(TrainerCallback):
        """Each step's wall time, the time to the first step, and the generation time within each step."""

        def __init__(self):
            self.times, self.generation, self.started, self.first_step = [], [], None, None

        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()
            self.first_step = self.first_step or self.started
            self.generation.append(0.0)

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.started)

        def timed(self, generate):
            def wrapper(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return generate(*args, **kwargs)
                finally:
                    self.generation[-1] += time.perf_counter() - started
            return wrapper

    def reward(completions, answer, **kwargs):
        return [accuracy(c[0]["content"] if isinstance(c, list) else c, {"answer": a}) or 0.0
                for c, a in zip(completions, answer)]

    dataset = load_dataset("json", data_files=str(workdir / "prompts.jsonl"), split="train")
    dataset = dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["question"]}]})
    config = GRPOConfig(
        output_dir=str(workdir / f"trl-{precision}"), per_device_train_batch_size=args.generations,
        gradient_accumulation_steps=args.prompts, num_generations=args.generations,
        max_completion_length=args.max_new_tokens, temperature=1.0, beta=args.beta, loss_type="grpo",
        scale_rewards="group", learning_rate=1e-6, max_grad_norm=1.0, lr_scheduler_type="constant",
        gradient_checkpointing=args.gradient_checkpointing, bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        max_steps=args.steps + 1,
        logging_steps=1, report_to="none", save_strategy="no", seed=42, disable_dropout=True, shuffle_dataset=False,
    )
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    tokenizer.padding_side = "left"
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer._generate = timer.timed(trainer._generate)  # TRL's rollout: generation with its own decode
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h][1:]
    return {
        "startup_s": timer.first_step - started,
        "step_s": timer.times[1:],
        "rollout_s": timer.generation[1:],
        "push_s": None,
        "completion_tokens": [h["completions/mean_length"] * args.prompts * args.generations for h in logs],
        "loss": [h["loss"] for h in logs], "kl": [h.get("kl") for h in logs], "reward": [h["reward"] for h in logs],
    }


def worker(args) -> None:
    import torch

    result = (run_grpo if args.worker == "grpo" else run_trl)(args, args.workdir, args.one_precision)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def prompt_tokens(workdir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    rows = [json.loads(line) for line in open(workdir / "prompts.jsonl")]
    return [len(tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=True,
                                              add_generation_prompt=True, return_dict=True)["input_ids"]) for r in rows]


def speculative_bench(args) -> None:
    """--speculative: completion tokens per second of rollouts with and without MTP drafts, and of transformers'
    generate, on the same prompts and model (its CPU kernels installed as training installs them)."""
    import torch

    from grpo.backend import load_inference_model, load_inference_mtp
    from grpo.config import load_config
    from grpo.data import load_examples
    from grpo.modeling.loading import load_tokenizer
    from grpo.rollout import BuiltinEngine, Sampling
    from grpo.rollout.speculative import MTPDrafter

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/quickstart.yaml", [f"model.name_or_path={args.speculative}", "model.mtp={}",
                                                         "rollout.speculative=mtp"])
    tokenizer = load_tokenizer(cfg.model)
    model = load_inference_model(cfg.model, cfg.train, torch.device("cpu"))
    mtp = load_inference_mtp(cfg, cfg.model, model)
    examples, _ = load_examples(cfg.eval.path, "train", None, cfg.data, tokenizer)
    engines = {"grpo builtin": BuiltinEngine(tokenizer, model=model),
               "grpo builtin + MTP drafts": BuiltinEngine(tokenizer, model=model, drafter=MTPDrafter(mtp))}
    rows = []
    for batch in args.batches:
        prompts = [e["prompt"] for e in examples[:batch]]
        for mode in ("greedy", "temperature 1"):
            sampling = Sampling(n=1, max_completion_length=args.max_new_tokens, greedy=mode == "greedy",
                                seeds=tuple(range(batch)))
            for name, engine in engines.items():
                times, tokens, counts = [], [], []
                for i in range(args.steps + 1):
                    started = time.perf_counter()
                    out = engine.generate(prompts, sampling)
                    if i:  # the first is a warm-up
                        times.append(time.perf_counter() - started)
                        tokens.append(int(out.completion_mask.sum()))
                        counts.append(out.draft_counts)
                row = {"engine": name, "batch": batch, "mode": mode, "seconds": statistics.mean(times),
                       "tokens": statistics.mean(tokens), "tokens_per_s": sum(tokens) / sum(times)}
                if counts[0] is not None:
                    row["acceptance"] = sum(c["accepted"] for c in counts) / sum(c["drafted"] for c in counts)
                    row["tokens_per_forward"] = sum(c["tokens"] for c in counts) / sum(c["forwards"] for c in counts)
                rows.append(row)
            rows.append(_transformers_generate(model, tokenizer, prompts, mode, args))
            for row in rows[-3:]:
                print(f"batch {batch:>3}  {mode:<14} {row['engine']:<36} {row['tokens_per_s']:>8.1f} tok/s  "
                      f"{row['tokens']:>7.0f} tokens  acceptance {row.get('acceptance', float('nan')):.2f}  "
                      f"tokens/forward {row.get('tokens_per_forward', float('nan')):.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _transformers_generate(model, tokenizer, prompts: list[str], mode: str, args) -> dict:
    """transformers' generate on the same prompts: TRL's GRPOTrainer's rollout without vLLM."""
    import torch

    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = {"do_sample": False} if mode == "greedy" else {"do_sample": True, "temperature": 1.0, "top_k": 0,
                                                             "top_p": 1.0}
    times, tokens = [], []
    for i in range(args.steps + 1):
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 **kwargs)
        if i:
            from grpo.rollout import completion_mask, eos_token_ids

            times.append(time.perf_counter() - started)
            tokens.append(int(completion_mask(out[:, enc["input_ids"].shape[1]:], eos_token_ids(tokenizer, model))[0].sum()))
    return {"engine": "transformers generate (TRL's rollout)", "batch": len(prompts), "mode": mode,
            "seconds": statistics.mean(times), "tokens": statistics.mean(tokens), "tokens_per_s": sum(tokens) / sum(times)}


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    if args.speculative:
        return speculative_bench(args)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prepare(workdir, args.prompts * (args.steps + 1), args.model)
        lengths = prompt_tokens(workdir)
        rows = [f"grpo+{e}" if e != "builtin" else "grpo" for e in args.engines] if "grpo" in args.trainers else []
        rows += ["grpo+lora"] if args.lora and "grpo" in args.trainers else []
        rows += ["grpo+lora-adapted"] if args.lora and args.lora_adapted and "grpo" in args.trainers else []
        results, code = {}, {trainer: None for trainer in rows + [t for t in args.trainers if t != "grpo"]}
        if args.baseline:
            commit = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True,
                                    text=True, check=True).stdout.strip()
            subprocess.run(["git", "worktree", "add", "--detach", str(workdir / "baseline"), commit], cwd=ROOT,
                           check=True, capture_output=True)
            code = {f"grpo@{commit}": workdir / "baseline", **code}
        for precision in args.precision:
            for trainer, tree in code.items():
                print(f"--- {trainer} {precision} ---", flush=True)
                variant = trainer.split("+")[1] if "+" in trainer else "builtin"
                cmd = [sys.executable, __file__, "--worker", trainer.split("@")[0].split("+")[0],
                       "--engine", "builtin" if variant.startswith("lora") else variant,
                       "--lora-rank", str(args.lora if variant.startswith("lora") else 0),
                       "--lora-merged", str(int(variant != "lora-adapted")),
                       "--workdir", str(workdir),
                       "--one-precision", precision, "--steps", str(args.steps), "--prompts", str(args.prompts),
                       "--generations", str(args.generations), "--max-new-tokens", str(args.max_new_tokens),
                       "--beta", str(args.beta),
                       *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
                env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None  # grpo imported from the worktree
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
                line = next((l for l in done.stdout.splitlines() if l.startswith("BENCH_RESULT ")), None)
                if line is None:
                    sys.exit(f"{trainer} {precision} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
                results[(trainer, precision)] = json.loads(line.removeprefix("BENCH_RESULT "))
        if args.baseline:
            subprocess.run(["git", "worktree", "remove", "--force", str(workdir / "baseline")], cwd=ROOT,
                           capture_output=True)
    report(args, results, lengths)


def report(args, results: dict, lengths: list[int]) -> None:
    import torch

    B, G = args.prompts, args.generations
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"\nsettings: {args.model or 'SmolLM2-135M-Instruct'} on {where}, {B} GSM8K prompts x {G} completions, "
          f"<= {args.max_new_tokens} new tokens, beta {args.beta}, loss grpo, AdamW lr 1e-6, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}; "
          f"1 warm-up + {args.steps} timed steps")
    width = max(9, *(len(trainer) + 1 for trainer, _ in results))
    header = f"{'trainer':<{width}}{'precision':<10}{'s/step':>8}{'rollout s':>10}{'rollout tok/s':>14}" \
             f"{'push s':>8}{'start-up s':>11}{'gen tok/s':>11}{'train tok/s':>12}{'peak RSS MB':>13}" \
             f"{'loss':>10}{'kl':>9}{'speed-up':>10}{'RSS ratio':>10}"
    print(header)
    rows = []
    for (trainer, precision), r in results.items():
        step = statistics.mean(r["step_s"])
        steps_done = len(r["step_s"])
        generated = statistics.mean(r["completion_tokens"])
        # tokens through forward and backward: every completion with its prompt (the same count for both)
        mean_prompt = statistics.mean(lengths)
        trained = B * G * mean_prompt + generated
        baseline = results.get(("trl", precision))
        speedup = statistics.mean(baseline["step_s"]) / step if baseline else float("nan")
        rss_ratio = r["peak_rss_mb"] / baseline["peak_rss_mb"] if baseline else float("nan")
        kl = [k for k in r["kl"] if k is not None]
        rollout = statistics.mean(r["rollout_s"])
        push = statistics.mean(r["push_s"]) if r["push_s"] else float("nan")
        row = {"trainer": trainer, "precision": precision, "s_per_step": step, "timed_steps": steps_done,
               "rollout_s": rollout, "rollout_tokens_per_s": generated / rollout, "weight_push_s": push,
               "startup_s": r["startup_s"],
               "generated_tokens_per_s": generated / step, "trained_tokens_per_s": trained / step,
               "peak_rss_mb": r["peak_rss_mb"], "loss": statistics.mean(r["loss"]),
               "kl": statistics.mean(kl) if kl else None, "speedup_vs_trl": speedup, "rss_vs_trl": rss_ratio,
               "peak_gpu_mb": r.get("peak_gpu_mb")}
        rows.append(row)
        print(f"{trainer:<{width}}{precision:<10}{step:>8.1f}{rollout:>10.1f}{row['rollout_tokens_per_s']:>14.1f}"
              f"{push:>8.2f}{r['startup_s'] or float('nan'):>11.1f}{row['generated_tokens_per_s']:>11.1f}"
              f"{row['trained_tokens_per_s']:>12.1f}{row['peak_rss_mb']:>13.0f}{row['loss']:>10.4f}"
              f"{(row['kl'] or 0):>9.5f}{speedup:>10.2f}{rss_ratio:>10.2f}")
    for (trainer, precision), r in results.items():
        if trainer.startswith("grpo@") and ("grpo", precision) in results:
            ratio = statistics.mean(results[("grpo", precision)]["step_s"]) / statistics.mean(r["step_s"])
            print(f"grpo {precision}: s/step {ratio:.3f}x that of {trainer} ({(ratio - 1) * 100:+.1f}%)")
    for (trainer, precision), r in results.items():
        if r.get("phases"):
            print(f"{trainer} {precision} phases: " + ", ".join(f"{k[5:]} {v:.1f}s" for k, v in r["phases"].items()))
    for row in rows:
        if row["peak_gpu_mb"] is not None:
            print(f"{row['trainer']} {row['precision']}: peak GPU memory {row['peak_gpu_mb']:.0f} MB (torch's allocator)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
