"""wandb offline runs, completions logging, evaluation numbers, and `grpo report`."""

import json
import subprocess
import sys

import pytest

from grpo.commands.cli import main
from grpo.config import EvalConfig, RewardSpec, RolloutConfig, ScoringConfig
from grpo.evaluate import evaluate
from grpo.rollout import BuiltinEngine, generate
from grpo.scoring.scorer import Scorer

from conftest import ROOT, make_model, make_tokenizer

@pytest.fixture(scope="module")
def offline_run(tiny_model_dir, length_rule, tmp_path_factory):
    out = tmp_path_factory.mktemp("watched")
    assert main(["train", str(ROOT / "configs/quickstart.yaml"), f"model.name_or_path={tiny_model_dir}",
                 f"data.path={ROOT / 'data/arithmetic/train.jsonl'}", "data.max_samples=32",
                 f"eval.path={ROOT / 'data/arithmetic/test.jsonl'}", "eval.num_prompts=4", "eval.every=2",
                 "eval.pass_k=2", f"rewards=[{{fn: accuracy}}, {{fn: '{length_rule}:length_reward'}}]",
                 "rollout.num_generations=4", "rollout.max_completion_length=6", "train.prompts_per_step=2",
                 "train.micro_batch_size=8", "train.max_steps=3", f"train.output_dir={out / 'run'}",
                 "logging.wandb=offline", "logging.run_name=watched", "train.mixed_precision=fp32",
                 "scoring.workers=0"]) == 0
    return out / "run"


def test_offline_wandb_run_holds_the_metrics(offline_run):
    run_dirs = list((offline_run / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    dump = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dirs[0])],
                          capture_output=True, text=True, timeout=120)
    history = [json.loads(line)["history"]["item"] for line in dump.stdout.splitlines() if '"type":"history"' in line]
    local = [json.loads(line) for line in (offline_run / "metrics.jsonl").read_text().splitlines()]
    logged = {(h["_step"], k): v for h in history for k, v in h.items() if not k.startswith("_")}
    for record in local:
        for key in ["reward", "reward/accuracy", "loss", "eval/accuracy", "eval/pass@2"]:
            if key in record:
                assert logged[(record["step"], key)] == pytest.approx(record[key]), key


def test_completions_and_eval_records(offline_run):
    groups = [json.loads(line) for line in (offline_run / "completions.jsonl").read_text().splitlines()]
    assert [g["step"] for g in groups] == [1, 2, 3]
    first = groups[0]
    assert "<|im_start|>user" in first["prompt"] and len(first["completions"]) == 4
    assert set(first["completions"][0]) == {"completion", "length", "reward", "advantage", "rewards"}
    assert sum(c["advantage"] for c in first["completions"]) == pytest.approx(0.0, abs=1e-5)
    evals = [json.loads(line) for line in (offline_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "eval/accuracy" in r] == [0, 2, 3]
    assert all(0.0 <= r["eval/pass@2"] <= 1.0 for r in evals if "eval/pass@2" in r)


def test_report_writes_images_and_html(offline_run, capsys):
    assert main(["report", str(offline_run)]) == 0
    folder = offline_run / "report"
    images = sorted(p.name for p in folder.glob("*.png"))
    assert {"reward.png", "eval_accuracy.png", "entropy.png", "completion_length.png", "step_time.png"} <= set(images)
    assert all((folder / name).stat().st_size > 5000 for name in images)
    page = (folder / "index.html").read_text()
    assert "reward.png" in page and "Completions at step 3" in page
    # what the page says comes from the run: first and last reward, every eval accuracy, the last group's text
    import html as html_lib

    records = [json.loads(line) for line in (offline_run / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records if "reward" in r]
    assert f"<tr><td>reward</td><td>{rewards[0]:.4g}</td><td>{rewards[-1]:.4g}</td></tr>" in page
    evals = [r for r in records if "eval/accuracy" in r]
    for r in (evals[0], evals[-1]):  # the first and the last evaluation
        assert f"eval/accuracy at step {r['step']}</td><td colspan=2>{r['eval/accuracy']:.4g}" in page
    last = json.loads((offline_run / "completions.jsonl").read_text().splitlines()[-1])
    with open(folder / "index.html", newline="") as f:  # as written: a completion may hold a carriage return
        raw_page = f.read()
    for c in last["completions"]:
        assert f"<pre>{html_lib.escape(c['completion'])}</pre>" in raw_page
    assert main(["report", str(offline_run / "nope")]) == 2


def test_eval_numbers_match_a_hand_checked_case(tmp_path):
    tok = make_tokenizer()
    tok.padding_side = "left"
    model = make_model(len(tok), seed=5)
    examples = [{"prompt": p, "answer": "1"} for p in ["ab", "What is 2?", "x", "hello there"]]
    rollout = RolloutConfig(max_completion_length=5)
    rule = tmp_path / "first_char_rule.py"
    greedy = generate(model, tok, [e["prompt"] for e in examples], 1, rollout, greedy=True)
    # by hand: a completion scores 1 when its first character is a letter, else 0
    by_hand = [1.0 if t[:1].isalpha() else 0.0 for t in greedy.texts]
    rule.write_text("def first_letter(completion, example):\n    return 1.0 if completion[:1].isalpha() else 0.0\n"
                    "def long(completion, example):\n    return 1.0 if len(completion) >= 3 else 0.0\n")
    scorer = Scorer([RewardSpec(fn=f"{rule}:first_letter"), RewardSpec(fn=f"{rule}:long", weight=0.5)],
                    ScoringConfig(workers=0))
    evaluation = evaluate(BuiltinEngine(tok, model=model), examples, scorer, rollout,
                          EvalConfig(reward="first_letter", batch_size=3))
    metrics = evaluation.metrics
    assert metrics["eval/accuracy"] == pytest.approx(sum(by_hand) / 4)
    long_by_hand = [1.0 if len(t) >= 3 else 0.0 for t in greedy.texts]
    assert metrics["eval/reward/first_letter"] == pytest.approx(sum(by_hand) / 4)
    assert metrics["eval/reward/long"] == pytest.approx(sum(long_by_hand) / 4)
    assert metrics["eval/reward"] == pytest.approx((sum(by_hand) + 0.5 * sum(long_by_hand)) / 4)
    lengths = greedy.completion_mask.sum(dim=1).float()
    assert metrics["eval/completion_length"] == pytest.approx(lengths.mean().item())
    assert [(s["question"], s["completion"], s["score"]) for s in evaluation.samples] == [
        ("ab", greedy.texts[0], by_hand[0]), ("What is 2?", greedy.texts[1], by_hand[1])]


def test_grpo_eval_command(tiny_model_dir, capsys):
    assert main(["eval", str(ROOT / "configs/quickstart.yaml"), f"eval.path={ROOT / 'data/arithmetic/test.jsonl'}",
                 "eval.num_prompts=3", "scoring.workers=0", "train.mixed_precision=fp32",
                 "--checkpoint", str(tiny_model_dir)]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    assert set(result) == {"eval/accuracy", "eval/errors", "eval/reward", "eval/completion_length",
                           "eval/reward/accuracy"}
    # what the model wrote, beside the number: two held-out questions with their greedy completions
    err = printed.err.splitlines()
    lines = err[err.index("greedy completions (accuracy score):"):]
    assert lines[1].startswith("  'What is ") and "(gold " in lines[1]
    assert lines[2].startswith(f"    {tiny_model_dir}  '") and " -> " in lines[2]
    assert lines[3].startswith("  'What is ") and len(lines) == 5
