"""Regenerate the learning numbers quoted in README.md and docs/pipeline.md, with the commit and date they ran on.

    python scripts/learning_numbers.py quickstart           # -> docs/results/quickstart.md (--render: from the last run)
    python scripts/learning_numbers.py distill --seeds 3    # -> docs/results/distill.md (needs quickstart first)
    python scripts/learning_numbers.py moe                  # -> docs/results/moe.md
    python scripts/learning_numbers.py engines --seeds 2    # -> docs/results/engines.md (needs the vllm extra)
    python scripts/learning_numbers.py variants --seeds 2   # -> docs/results/variants.md
    python scripts/learning_numbers.py lora --seeds 2       # -> docs/results/lora.md
    python scripts/learning_numbers.py tools                # -> docs/results/tools.md
    python scripts/learning_numbers.py r1                   # -> docs/results/r1_cpu.md

Each table is measured by running the `grpo` commands a user runs, in fresh processes, on this machine; held-out
accuracy is `accuracy` (the value a completion states, docs/rewards.md) on the 100 held-out sums, greedy. Sample
completions are printed beside every number: a number without them is not a result.

quickstart: `grpo train configs/quickstart.yaml`, timed end to end (model loading and both evaluations included).
distill: for each seed, the quickstart's model (teacher) samples answers for 256 training questions, the best
correct one per question fine-tunes the base model (`grpo distill`); then GRPO trains the base model with the
same seed for the same wall-clock time as that distillation took (`train.time_limit`), and both are evaluated.
engines: the quickstart with each rollout engine (rollout.engine builtin and vllm) for each seed (train.seed).
variants: the quickstart with each policy-gradient variant (grpo, dapo, cispo, rloo, centred_batch) for each seed.
lora: the quickstart with full fine-tuning and with LoRA (model.lora r 16, alpha 32, lr --lr) for each seed.

variants and lora run their `grpo train` commands through one pool: `--parallel N` runs N at a time with
`--threads T` torch threads each (learning numbers do not depend on it; step times do, so they are reported with
it); `--reuse` keeps runs an earlier invocation finished (each finished run writes `numbers.json`, with its commit).
tools: `grpo pipeline configs/pipelines/tools_multiply.yaml` (cold-start SFT on calculator traces, then GRPO with
the calculator) on 3-digit x 2-digit products; held-out accuracy of each stage, tool calls, trajectories.
r1: `grpo pipeline configs/pipelines/r1_cpu.yaml` (DeepSeek-R1's cold-start SFT on <think>/<answer> traces, then
GRPO with the accuracy and strict format rules) on sums of three numbers; per stage held-out accuracy, format
compliance (the strict `format` rule), completion length, wall time and a greedy completion.
moe: configs/deepseek_v3_tiny.yaml on the tiny random DeepSeek-V3, 20 steps without and with auxiliary-loss-free
balancing (moe.bias_update_speed=0.01): routing metrics and rewards, mean of steps 1-5 and 16-20.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "numbers"
RESULTS = ROOT / "docs" / "results"


def grpo(*args: str) -> tuple[float, str]:
    """Run `grpo ARGS` in a fresh process from the repository root; (wall seconds, its output). Fails loudly."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "grpo", *args, "logging.wandb=disabled"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"grpo {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def claim(folder: Path) -> bool:
    """Claim FOLDER for this process (FOLDER.claim holds the pid); False when a live process holds it."""
    import os

    path = Path(f"{folder}.claim")
    for _ in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = int(path.read_text() or 0)
            if owner and Path(f"/proc/{owner}").exists():
                return False
            path.unlink(missing_ok=True)  # its process is gone: take the run over
            continue
        os.write(handle, str(os.getpid()).encode())
        os.close(handle)
        return True
    return False


def train_pool(jobs: dict[Path, list[str]], args) -> dict[Path, dict]:
    """Run `grpo train configs/quickstart.yaml train.output_dir=FOLDER ARGS` for each FOLDER, `args.parallel` at a
    time with OMP_NUM_THREADS=`args.threads` each; returns each folder's `numbers.json` (seconds, commit, threads).

    With `args.reuse`, a folder whose `numbers.json` exists is not run again, and a folder another invocation is
    running (FOLDER.claim) is waited for, so several invocations can share the work. A failed run stops the pool
    and exits with its log's tail (the log is FOLDER.log)."""
    import os

    def finished(folder: Path) -> bool:
        return args.reuse and (folder / "numbers.json").exists()

    todo, elsewhere = list(jobs), []
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    running: dict[Path, tuple[subprocess.Popen, float, str]] = {}
    RUNS.mkdir(parents=True, exist_ok=True)
    while todo or running:
        while todo and len(running) < args.parallel:
            folder = todo.pop(0)
            if finished(folder):
                continue
            if args.reuse and not claim(folder):
                elsewhere.append(folder)
                continue
            (folder / "numbers.json").unlink(missing_ok=True)
            command = [sys.executable, "-m", "grpo", "train", "configs/quickstart.yaml", f"train.output_dir={folder}",
                       *jobs[folder], "logging.wandb=disabled"]
            print(f"started {folder.name}: {' '.join(command[3:])}", flush=True)
            with open(f"{folder}.log", "w") as log:
                running[folder] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                                   time.perf_counter(), head())
        time.sleep(2)
        for folder, (process, started, commit) in list(running.items()):
            if process.poll() is None:
                continue
            del running[folder]
            if process.returncode != 0:
                for other, *_ in running.values():
                    other.terminate()
                sys.exit(f"{folder.name} failed ({process.returncode}); {folder}.log ends:\n"
                         + Path(f"{folder}.log").read_text()[-3000:])
            seconds = time.perf_counter() - started
            (folder / "numbers.json").write_text(json.dumps(
                {"seconds": seconds, "commit": commit, "threads": args.threads or "default",
                 "parallel": args.parallel}))
            Path(f"{folder}.claim").unlink(missing_ok=True)
            print(f"finished {folder.name} in {seconds / 60:.1f} min", flush=True)
    for folder in elsewhere:
        print(f"waiting for {folder.name} (claimed by another invocation)", flush=True)
        while not (folder / "numbers.json").exists():
            if claim(folder):  # its owner died without finishing
                Path(f"{folder}.claim").unlink()
                sys.exit(f"{folder.name}: the invocation running it stopped; run this command again")
            time.sleep(10)
    return {f: json.loads((f / "numbers.json").read_text()) for f in jobs}


def pool_note(done: dict[Path, dict]) -> str:
    commits = sorted({d["commit"] for d in done.values()})
    if len(commits) > 1:
        commits = [f"{f.name} {d['commit']}" for f, d in done.items()]
    ways = sorted({f"{d['parallel']} at a time, {d['threads']} threads each" for d in done.values()})
    return f"Runs from commit {', '.join(commits)} (`+`: with local changes); {'; '.join(ways)}."


def head() -> str:
    """The checked-out commit, with `+` when tracked files differ from it."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return commit + ("+" if dirty else "")


def provenance() -> str:
    commit = head()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import torch

    return (f"Generated by `python scripts/{Path(__file__).name} {' '.join(sys.argv[1:])}` on "
            f"{datetime.date.today()} at commit {commit.rstrip('+')}{' (with local changes)' if commit.endswith('+') else ''}; "
            f"{cpu}, {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}.")


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def held_out(run: Path) -> tuple[float, float]:
    evals = [r["eval/accuracy"] for r in records(run) if "eval/accuracy" in r]
    return evals[0], evals[-1]


def sample_lines(samples: dict[str, list[dict]]) -> list[str]:
    lines = []
    for i, first in enumerate(next(iter(samples.values()))):
        lines.append(f"- {first['question']} (gold {first['answer']})")
        lines += [f"  - {label}: `{s[i]['completion']!r}` scored {s[i]['score']}" for label, s in samples.items()]
    return lines


def quickstart(args) -> None:
    run = RUNS / "quickstart"
    if not args.render:
        seconds, out = grpo("train", "configs/quickstart.yaml", f"train.output_dir={run}")
        (run / "command.json").write_text(json.dumps({"seconds": seconds, "stdout": out, "provenance": provenance()}))
    command = json.loads((run / "command.json").read_text())
    seconds = command["seconds"]
    steps = [r for r in records(run) if "loss" in r]
    before, after = held_out(run)
    device = next(line for line in command["stdout"].splitlines() if line.startswith("device "))
    precision = device.split("mixed precision ")[1].split(";")[0]
    reward_at = {r["step"]: r["reward"] for r in steps}
    last_group = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()][-1]
    question = last_group["prompt"].split("user\n")[-1].split("<|im_end|>")[0]
    text = [
        "# The quickstart, measured", "", command["provenance"], "",
        f"`make quickstart` = `grpo train configs/quickstart.yaml`: {len(steps)} steps, mixed precision {precision}.", "",
        "| | held-out accuracy (100 sums, greedy, `accuracy`) |", "|---|---|",
        f"| before training | {before:.2f} |", f"| after {len(steps)} steps | {after:.2f} |", "",
        "Training reward (mean of 64 sampled completions) by step: "
        + ", ".join(f"{s}: {reward_at[s]:.2f}" for s in sorted(reward_at) if s == 1 or s % 5 == 0) + ".",
        f"Completion length {steps[0]['completion_length']:.1f} tokens at step 1, "
        f"{steps[-1]['completion_length']:.1f} at step {steps[-1]['step']}.",
        f"Mean step {statistics.mean(r['step_time'] for r in steps):.1f} s; the whole command "
        f"{int(seconds // 60)} min {seconds % 60:.0f} s.", "",
        "Greedy completions on held-out sums, before and after:", "",
        *sample_lines(json.loads((run / "eval_samples.json").read_text())), "",
        f"Sampled completions at step {last_group['step']} ({question!r}):", "",
        *[f"- `{c['completion']!r}` reward {c['reward']}" for c in last_group["completions"]], "",
    ]
    write("quickstart.md", text)


def distill(args) -> None:
    teacher = RUNS / "quickstart" / "final"
    if not teacher.is_dir():
        sys.exit(f"{teacher} is missing: run `python scripts/learning_numbers.py quickstart` first")
    rows = []
    for seed in range(args.seeds):
        folder = RUNS / f"distill-seed{seed}"
        grpo("distill", "configs/pipelines/distill_arithmetic.yaml", f"distill.teacher={teacher}",
             f"train.output_dir={folder}", f"train.seed={seed}")
        stage = {name: json.loads((folder / name / "DONE").read_text()) for name in ("teacher", "student", "student_eval")}
        kept = sum(1 for _ in open(folder / "teacher" / "generated.jsonl"))
        budget = stage["teacher"]["seconds"] + stage["student"]["seconds"]
        grpo_run = RUNS / f"grpo-seed{seed}"
        grpo("train", "configs/quickstart.yaml", f"train.output_dir={grpo_run}", f"train.seed={seed}",
             f"train.time_limit={budget:.0f}", "train.max_steps=1000")
        base, grpo_after = held_out(grpo_run)
        grpo_steps = [r for r in records(grpo_run) if "loss" in r]
        rows.append({"seed": seed, "kept": kept, "generate_s": stage["teacher"]["seconds"],
                     "sft_s": stage["student"]["seconds"], "distilled": stage["student_eval"]["eval/accuracy"],
                     "grpo_steps": len(grpo_steps), "grpo_s": sum(r["step_time"] for r in grpo_steps),
                     "grpo": grpo_after, "base": base,
                     "grpo_samples": json.loads((grpo_run / "eval_samples.json").read_text())["after"]})
    teacher_acc = held_out(RUNS / "quickstart")[1]

    def spread(key: str) -> str:
        values = [r[key] for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f} (min {min(values):.2f}, max {max(values):.2f})"

    text = [
        "# Distillation against GRPO at equal wall-clock time", "", provenance(), "",
        f"Teacher: the quickstart's model (`runs/numbers/quickstart/final`), held-out accuracy {teacher_acc:.2f}. "
        f"Student: the base model, held-out accuracy {rows[0]['base']:.2f}. Held-out: 100 sums, greedy, `accuracy`.",
        "", "| seed | teacher answers kept (of 256) | generation + SFT | distilled student | GRPO steps in that time "
            "| GRPO student |", "|---|---|---|---|---|---|",
        *[f"| {r['seed']} | {r['kept']} | {r['generate_s']:.0f} s + {r['sft_s']:.0f} s | {r['distilled']:.2f} | "
          f"{r['grpo_steps']} ({r['grpo_s']:.0f} s) | {r['grpo']:.2f} |" for r in rows], "",
        f"Distilled: {spread('distilled')}. GRPO: {spread('grpo')} (mean ± sample std over {len(rows)} seeds).", "",
        "GRPO student's greedy completions (seed 0):", "",
        *sample_lines({"after": rows[0]["grpo_samples"]}), "",
    ]
    write("distill.md", text)


def engines(args) -> None:
    rows, samples = [], {}
    for seed in range(args.seeds):
        for engine in ("builtin", "vllm"):
            run = RUNS / f"engine-{engine}-seed{seed}"
            seconds, _ = grpo("train", "configs/quickstart.yaml", f"train.output_dir={run}", f"train.seed={seed}",
                              f"rollout.engine={engine}")
            steps = [r for r in records(run) if "loss" in r]
            before, after = held_out(run)
            rows.append(f"| {seed} | {engine} | {before:.2f} | {after:.2f} | {steps[-1]['reward']:.2f} | "
                        f"{steps[0]['startup/engine_seconds']:.1f} s | "
                        f"{statistics.mean(r['time/weight_sync'] for r in steps):.2f} s | "
                        f"{statistics.mean(r['time/rollout'] for r in steps):.1f} s | "
                        f"{statistics.mean(r['step_time'] for r in steps):.1f} s | {seconds / 60:.1f} min |")
            if seed == 0:
                samples[engine] = json.loads((run / "eval_samples.json").read_text())["after"][:4]
    text = ["# The quickstart with each rollout engine", "", provenance(), "",
            f"`grpo train configs/quickstart.yaml train.seed=SEED rollout.engine=ENGINE` ({len(rows) // 2} seeds). "
            "Held-out accuracy: `accuracy` (the value a completion states must equal the sum) on the 100 held-out "
            "sums, greedy, before and after training; reward: the last step's mean over its 64 samples. "
            "Engine start-up, weight push and rollout are the run's own `startup/engine_seconds`, `time/weight_sync` "
            "and `time/rollout` (means over the steps).", "",
            "| seed | engine | held-out before | held-out after | last reward | engine start-up | weight push "
            "| rollout | step | whole command |", "|---" * 10 + "|", *rows, "",
            "Greedy held-out completions after training (seed 0):", "", *sample_lines(samples), ""]
    write("engines.md", text)


VARIANTS = {
    "grpo": [],
    "dapo": ["algorithm.loss_type=dapo"],
    "cispo": ["algorithm.loss_type=cispo", "algorithm.epsilon_high=5.0"],
    "rloo": ["algorithm.baseline=rloo"],
    "centred_batch": ["algorithm.scale_rewards=centred_batch"],
}


def compare(runs: list[tuple[str, int, Path]]) -> tuple[list[str], dict[str, list[dict]]]:
    """Table rows (one per (label, seed, folder), then each label's mean) and seed 0's greedy samples per label."""
    rows, samples = [], {}
    for label, seed, run in runs:
        steps = [r for r in records(run) if "loss" in r]
        reward = {r["step"]: r["reward"] for r in steps}
        before, after = held_out(run)
        rows.append((label, seed, before, after, [reward[s] for s in (10, 20, 30)],
                     statistics.mean(r["step_time"] for r in steps)))
        if seed == 0:
            samples[label] = json.loads((run / "eval_samples.json").read_text())["after"][:3]
    table = [f"| {label} | {seed} | {before:.2f} | {after:.2f} | " + " | ".join(f"{r:.2f}" for r in rewards)
             + f" | {step:.1f} s |" for label, seed, before, after, rewards, step in rows]
    labels = list(dict.fromkeys(r[0] for r in rows))
    table += [f"| {label} | mean | | {statistics.mean(r[3] for r in rows if r[0] == label):.2f} | "
              + " | ".join(f"{statistics.mean(r[4][k] for r in rows if r[0] == label):.2f}" for k in range(3))
              + " | |" for label in labels]
    header = ["| run | seed | held-out before | held-out after | reward step 10 | step 20 | step 30 | mean step |",
              "|---" * 8 + "|"]
    return header + table, samples


GRADING = ("Held-out accuracy: `accuracy` (the value a completion states must equal the sum) on the 100 held-out "
           "sums, greedy. Reward: the step's mean over its 64 samples. Mean step: seconds, with the threads above.")


def variants(args) -> None:
    jobs = {RUNS / f"variant-{name}-seed{seed}": [f"train.seed={seed}", *overrides]
            for seed in range(args.seeds) for name, overrides in VARIANTS.items()}
    done = train_pool(jobs, args)
    table, samples = compare([(name, seed, RUNS / f"variant-{name}-seed{seed}")
                              for name in VARIANTS for seed in range(args.seeds)])
    text = ["# Policy-gradient variants on the quickstart", "", provenance(), pool_note(done), "",
            "`grpo train configs/quickstart.yaml train.seed=SEED` with each variant's overrides: "
            + "; ".join(f"{name}: {' '.join(o) or '(none)'}" for name, o in VARIANTS.items()) + ". " + GRADING, "",
            *table, "", "Greedy held-out completions after training (seed 0):", "", *sample_lines(samples), ""]
    write("variants.md", text)


def lora(args) -> None:
    adapters = ["model.lora={r: 16, alpha: 32}", f"optim.lr={args.lr}"]
    jobs = {}
    for seed in range(args.seeds):  # full fine-tuning is the variants table's grpo run (same folder, reusable)
        jobs[RUNS / f"lora-lr{args.lr:g}-seed{seed}"] = [f"train.seed={seed}", *adapters]
        jobs[RUNS / f"variant-grpo-seed{seed}"] = [f"train.seed={seed}"]
    done = train_pool(jobs, args)
    table, samples = compare([(label, seed, RUNS / f"{folder}-seed{seed}") for seed in range(args.seeds)
                              for label, folder in (("full", "variant-grpo"), ("lora", f"lora-lr{args.lr:g}"))])
    text = ["# LoRA against full fine-tuning on the quickstart", "", provenance(), pool_note(done), "",
            "`grpo train configs/quickstart.yaml train.seed=SEED` (full: lr 1e-5, as shipped) and the same with "
            f"`{' '.join(adapters)}` (lora: r 16 on all linear layers). " + GRADING, "",
            *table, "", "Greedy held-out completions after training (seed 0):", "", *sample_lines(samples), ""]
    write("lora.md", text)


def tools(args) -> None:
    out = RUNS / "tools"
    if not args.render:
        seconds, _ = grpo("pipeline", "configs/pipelines/tools_multiply.yaml", f"train.output_dir={out}")
        (out / "command.json").write_text(json.dumps({"seconds": seconds, "provenance": provenance()}))
    command = json.loads((out / "command.json").read_text())
    done = {stage: json.loads((out / stage / "DONE").read_text()) for stage in ("base_eval", "cold_start", "rl",
                                                                              "no_tool_eval")}
    rl = records(out / "rl")
    evals = [r for r in rl if "eval/accuracy" in r]  # the SFT model (step 0), then the RL model
    steps = [r for r in rl if "loss" in r]
    traces = yaml.safe_load((out / "cold_start/stage_config.yaml").read_text())["data"]["max_samples"]
    rows = [("base model, with the calculator", done["base_eval"]),
            (f"after cold-start SFT ({traces} traces), with the calculator", evals[0]),
            (f"after GRPO ({len(steps)} steps), with the calculator", evals[-1]),
            ("after GRPO, calculator removed", done["no_tool_eval"])]
    rl_samples = json.loads((out / "rl/eval_samples.json").read_text())
    samples = {"base": json.loads((out / "base_eval/eval_samples.json").read_text()),
               "cold start": rl_samples["before"], "GRPO": rl_samples["after"],
               "GRPO, no calculator": json.loads((out / "no_tool_eval/eval_samples.json").read_text())}
    stage_seconds = " + ".join(f"{done[s]['seconds']:.0f} s ({s})" for s in done)
    by_step = [r for r in steps if r["step"] == 1 or r["step"] % 5 == 0 or r is steps[-1]]
    text = ["# GRPO with a calculator: 3-digit x 2-digit products", "", command["provenance"], "",
            "`grpo pipeline configs/pipelines/tools_multiply.yaml`: SmolLM2-135M-Instruct, told about the `calculator` "
            "tool in its system prompt; cold-start SFT on traces from `scripts/make_tool_traces.py`, then GRPO with the "
            "calculator and the `accuracy` rule. Held-out: the first 100 products of data/tools_multiply/test.jsonl, "
            "greedy, graded by `accuracy` on the model's own tokens (the tool's result is in the context, not in "
            "the graded text: the model must state the product).", "",
            "| model | held-out accuracy | tool calls per completion |", "|---|---|---|",
            *[f"| {label} | {r['eval/accuracy']:.2f} | {r.get('eval/tool_calls_per_completion', 0.0):.2f} |"
              for label, r in rows], "",
            "GRPO by step: " + "; ".join(f"step {r['step']} reward {r['reward']:.2f}, "
                                         f"{r['tools/calls_per_completion']:.2f} calls" for r in by_step) + ".",
            f"Time: {command['seconds'] / 60:.1f} min for the whole command ({stage_seconds}).", "",
            "Greedy held-out trajectories (tool results included; the graded text is the model's own):", "",
            *sample_lines(samples), ""]
    write("tools.md", text)


def r1(args) -> None:
    out = RUNS / "r1_cpu"
    config = ROOT / "configs/pipelines/r1_cpu.yaml"
    if not args.render:
        seconds, _ = grpo("pipeline", str(config.relative_to(ROOT)), f"train.output_dir={out}")
        (out / "command.json").write_text(json.dumps({"seconds": seconds, "provenance": provenance()}))
    command = json.loads((out / "command.json").read_text())
    rows, samples = [], {}
    for stage in yaml.safe_load(config.read_text())["stages"]:
        name = stage["name"]
        done = json.loads((out / name / "DONE").read_text())
        stage_cfg = yaml.safe_load((out / name / "stage_config.yaml").read_text())
        if stage["run"] == "eval":
            rows.append((f"{name}: {stage.get('model', 'base')} model", done, done["seconds"]))
            samples[name] = json.loads((out / name / "eval_samples.json").read_text())
        elif stage["run"] == "train":
            run = records(out / name)
            evals = [r for r in run if "eval/accuracy" in r]  # before training, then after
            steps = [r for r in run if "loss" in r]
            rows.append((f"{name}, before: the {stage['model']} model", evals[0], None))
            rows.append((f"{name}, after {len(steps)} GRPO steps", evals[-1], done["seconds"]))
            both = json.loads((out / name / "eval_samples.json").read_text())
            samples[f"{name} before"], samples[f"{name} after"] = both["before"], both["after"]
        elif stage["run"] == "generate":
            kept = len(Path(done["dataset"]).read_text().splitlines())
            rows.append((f"{name}: samples from the {stage['model']} model, the best right one in R1's layout "
                         f"kept for {kept} of {stage_cfg['data']['max_samples']} training questions", None,
                         done["seconds"]))
        else:  # sft: on the traces, or on an earlier stage's samples (`data: stage`)
            source = (f"SFT of the {stage['model']} model on the {stage['data']} stage's "
                      f"{len((ROOT / stage_cfg['data']['path']).read_text().splitlines())} samples" if "data" in stage
                      else f"SFT on {stage_cfg['data']['max_samples']} traces")
            rows.append((f"{name}: {source}, {stage_cfg['train']['max_steps']} steps of "
                         f"{stage_cfg['sft']['batch_size']} (its model is evaluated in the row below)", None,
                         done["seconds"]))
    total = sum(r[2] or 0 for r in rows)

    def eval_cells(r: dict | None) -> str:  # accuracy, format, true working lines, length; blank without an eval
        if r is None:
            return "| | | | "
        steps = f"{r['eval/reward/true_steps']:.2f}" if "eval/reward/true_steps" in r else "-"
        return (f"{r['eval/accuracy']:.2f} | {r['eval/reward/format']:.2f} | {steps} | "
                f"{r['eval/completion_length']:.1f} | ")

    text = ["# DeepSeek-R1's recipe on a CPU: sums of three numbers, worked step by step", "",
            command["provenance"], "",
            "`grpo pipeline configs/pipelines/r1_cpu.yaml` (data: `python scripts/make_r1_traces.py`). Held-out: the "
            "first 100 questions of data/r1_cpu/test.jsonl (sums of three two-digit numbers, "
            "\"What is 95 + 60 + 10?\"), greedy. Accuracy: the `accuracy` rule (the value stated in the last "
            "<answer> block, else the last number; restating the question earns nothing). Format: the strict "
            "`format` rule (`<think>`, working, `</think>`, `<answer>`, the answer, `</answer>`, each tag on its own "
            "line, nothing around). True working lines: the `true_steps` monitor (weight 0), the share of the "
            "`a + b = c` lines inside <think> that are true.", "",
            "| stage | held-out accuracy | format compliance | true working lines | mean completion tokens | wall time |",
            "|---|---|---|---|---|---|",
            *[f"| {label} | {eval_cells(r)}" + (f"{t:.0f} s |" if t is not None else "(in the row below) |")
              for label, r, t in rows], "",
            f"Whole command: {command['seconds'] / 60:.1f} min (stages {total / 60:.1f} min, the rest is start-up).",
            "", "Greedy held-out completions, one per stage:", "",
            *[f"- {label}: {s[0]['question']} (gold {s[0]['answer']}): `{s[0]['completion']!r}` scored "
              f"{s[0]['score']}" for label, s in samples.items()], ""]
    write("r1_cpu.md", text)


def moe(_args) -> None:
    model = RUNS / "tiny-deepseek-v3"
    if not model.is_dir():
        subprocess.run([sys.executable, "scripts/make_tiny_deepseek_v3.py", "--out", str(model)], cwd=ROOT, check=True)
    keys = ["reward", "reward/target_length", "moe/load_imbalance", "moe/router_entropy", "moe/max_load",
            "moe/routing_drift", "grad_norm"]
    rows = []
    for label, extra in [("no balancing", []), ("moe.bias_update_speed=0.01", ["moe.bias_update_speed=0.01"])]:
        run = RUNS / f"moe-{'balanced' if extra else 'plain'}"
        grpo("train", "configs/deepseek_v3_tiny.yaml", f"model.name_or_path={model}",
                          f"train.output_dir={run}", "train.max_steps=20", *extra)
        steps = [r for r in records(run) if "loss" in r]
        early, late = steps[:5], steps[-5:]
        rows.append(f"| {label} | " + " | ".join(
            f"{statistics.mean(r[k] for r in early):.3g} -> {statistics.mean(r[k] for r in late):.3g}" for k in keys)
            + " |")
    text = ["# DeepSeek-V3 (tiny, random weights) under GRPO: routing with and without balancing", "", provenance(), "",
            "`grpo train configs/deepseek_v3_tiny.yaml train.max_steps=20` on the model "
            "`scripts/make_tiny_deepseek_v3.py` writes; each cell is the mean of steps 1-5 -> the mean of steps 16-20.",
            "", "| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|", *rows, ""]
    write("moe.md", text)


def write(name: str, lines: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written to {RESULTS / name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="table", required=True)
    q = sub.add_parser("quickstart")
    q.add_argument("--render", action="store_true", help="write the table from the last run, without training")
    q.set_defaults(run=quickstart)
    d = sub.add_parser("distill")
    d.add_argument("--seeds", type=int, default=3)
    d.set_defaults(run=distill)
    sub.add_parser("moe").set_defaults(run=moe)
    t = sub.add_parser("tools")
    t.add_argument("--render", action="store_true", help="write the table from the last run, without running")
    t.set_defaults(run=tools)
    r = sub.add_parser("r1")
    r.add_argument("--render", action="store_true", help="write the table from the last run, without running")
    r.set_defaults(run=r1)
    v = sub.add_parser("variants")
    v.add_argument("--seeds", type=int, default=2)
    v.set_defaults(run=variants)
    lo = sub.add_parser("lora")
    lo.add_argument("--seeds", type=int, default=2)
    lo.add_argument("--lr", type=float, default=4e-4, help="the LoRA runs' optim.lr (full fine-tuning: 1e-5)")
    lo.set_defaults(run=lora)
    for pooled in (v, lo):
        pooled.add_argument("--parallel", type=int, default=1, help="runs at a time")
        pooled.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
        pooled.add_argument("--reuse", action="store_true", help="keep runs that have a numbers.json")
    e = sub.add_parser("engines")
    e.add_argument("--seeds", type=int, default=2)
    e.set_defaults(run=engines)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
