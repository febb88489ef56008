"""DeepSeek-R1's recipe on a CPU (configs/pipelines/r1_cpu.yaml): its synthetic traces and a smoke run."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT, load_script

from grpo.commands.cli import main
from rewards.format import format_reward
from rewards.math import accuracy

DATA = ROOT / "data/r1_cpu"


def _traces_module():
    return load_script("make_r1_traces")


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]


def test_traces_pass_the_strict_format_and_accuracy_rules_and_their_working_is_right():
    module = _traces_module()
    rng = random.Random(1)
    problems = [module.sum_of_three(rng, minus) for minus in (0.0, 0.5) for _ in range(150)]
    problems += [module.product(a, d) for a in (11, 47, 99) for d in range(2, 10)]
    for question, steps, answer in problems:
        text = module.trace(steps, answer)
        assert format_reward(text, {}, strict=True) == 1.0, text
        assert accuracy(text, {"answer": str(answer)}) == 1.0 and accuracy(text, {"answer": str(answer + 1)}) == 0.0
        for line in steps:  # every line of working is a true equation
            left, right = line.split(" = ")
            assert eval(left) == int(right), line
        operands = [int(n) for n in re.findall(r"\d+", question)]
        assert eval(question.removeprefix("What is ").removesuffix("?")) == answer >= 0, question
        assert len(operands) in (2, 3) and all(2 <= n <= 99 for n in operands), question
    assert module.trace(["20 * 6 = 120", "4 * 6 = 24", "120 + 24 = 144"], 144) == (
        "<think>\n20 * 6 = 120\n4 * 6 = 24\n120 + 24 = 144\n</think>\n<answer>\n144\n</answer>")


def test_the_shipped_data_is_the_generator_output_with_no_question_in_two_files(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts/make_r1_traces.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("sft", "train", "test"):
        assert (tmp_path / f"{name}.jsonl").read_text() == (DATA / f"{name}.jsonl").read_text(), name
    sft, train, test = _rows("sft"), _rows("train"), _rows("test")
    assert (len(sft), len(train), len(test)) == (300, 1000, 200)
    questions = [{r["question"] for r in rows} for rows in (sft, train, test)]
    assert sum(map(len, questions)) == len(set().union(*questions)) == 1500
    assert not any("*" in r["question"] for rows in (sft, train, test) for r in rows)
    for row in sft:
        assert format_reward(row["response"], {}, strict=True) == 1.0
        assert accuracy(row["response"], row) == 1.0


def test_the_pipeline_runs_end_to_end_on_a_tiny_model_in_two_rl_steps(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    assert main(["pipeline", "configs/pipelines/r1_cpu.yaml", f"model.name_or_path={tiny_model_dir}",
                 f"train.output_dir={out}", "rollout.num_generations=2", "rollout.max_completion_length=8",
                 "train.prompts_per_step=8", "train.micro_batch_size=16", "train.mixed_precision=fp32",
                 "eval.num_prompts=4", "eval.batch_size=4", "scoring.workers=0", "logging.wandb=disabled",
                 "stages.cold_start.train.max_steps=2", "stages.rl.train.max_steps=2",
                 "stages.rejection.data.max_samples=8", "stages.sft2.train.max_steps=1", "stages.rl2.train.max_steps=2",
                 "stages.rejection.generate.threshold=0.0"]) == 0  # a random model earns 0: keep its samples
    stages = [s["name"] for s in yaml.safe_load((ROOT / "configs/pipelines/r1_cpu.yaml").read_text())["stages"]]
    for stage in stages:
        assert (out / stage / "DONE").is_file(), stage
    evaluation = json.loads((out / "base_eval/DONE").read_text())
    assert {"eval/accuracy", "eval/reward/accuracy", "eval/reward/format", "eval/completion_length"} <= set(evaluation)
    rl = [json.loads(line) for line in (out / "rl/metrics.jsonl").read_text().splitlines()]
    assert any("reward/format" in r for r in rl) and any("eval/reward/format" in r for r in rl)
    assert max(r["step"] for r in rl) == 2
    kept = [json.loads(line) for line in (out / "rejection/generated.jsonl").read_text().splitlines()]
    assert 0 < len(kept) <= 8 and all(Path(row["model"]) == out / "rl" / "final" for row in kept)
    sft2 = yaml.safe_load((out / "sft2/stage_config.yaml").read_text())
    assert (sft2["model"]["name_or_path"], sft2["data"]["path"]) == (str(out / "rl/final"),
                                                                    str(out / "rejection/generated.jsonl"))
    rl2 = [json.loads(line) for line in (out / "rl2/metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rl2) == 2
    assert yaml.safe_load((out / "rl2/stage_config.yaml").read_text())["model"]["name_or_path"] == str(out / "sft2/final")
    config = yaml.safe_load((ROOT / "configs/pipelines/r1_cpu.yaml").read_text())
    assert config["generate"]["threshold"] == 1.5  # in the real run: a right answer (1) in R1's layout (0.5)
