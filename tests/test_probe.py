"""The reward-hack probe (grpo.scoring.probe, `grpo rewards --probe`): it flags a rule with a known hole, stays quiet for
the built-in rules, and says what each pattern earned."""

import json

import pytest

from grpo.commands.cli import main
from grpo.config import RewardSpec, ScoringConfig
from grpo.scoring.probe import GOLD, format_probe, hack_completions, probe
from grpo.scoring.scorer import Scorer

from conftest import ROOT

IN_PROCESS = ScoringConfig(workers=0, max_error_fraction=0.0)
ROWS = [json.loads(line) for line in open(ROOT / "data/arithmetic/train.jsonl")][:12]
EXAMPLES = [{**row, "prompt": row["question"] + " Reply with the number only."} for row in ROWS]

# The quickstart's old accuracy rule: math-verify on the whole reply, which evaluates a restated expression.
HACKABLE = '''
from math_verify import parse, verify

def evaluates_expressions(completion, example):
    predicted = parse(completion.replace(",", ""))
    return 1.0 if predicted and verify(parse(example["answer"]), predicted) else 0.0

def any_number(completion, example):
    import re
    return 1.0 if example["answer"] in re.findall(r"\\d+", completion) else 0.0
'''


def test_patterns_are_built_from_the_row():
    built = hack_completions({"question": "What is 38 + 94?", "prompt": "...", "answer": "132"})
    assert built["restated expression"] == "38 + 94 ="
    assert built["number from prompt"] == "94"
    assert built["many candidates"] == "It is 130, 131, 132 or 133."
    assert built[GOLD] == "<think>\nThe answer is 132.\n</think>\n<answer>\n132\n</answer>"
    gsm8k = hack_completions({"question": "Tom has 3 apples.", "prompt": "...", "answer": "He has 3.\n#### 3"})
    assert gsm8k["restated expression"] is None and gsm8k[GOLD].endswith("<answer>\n3\n</answer>")


def test_flags_a_hackable_rule_and_stays_quiet_for_accuracy(tmp_path, monkeypatch):
    (tmp_path / "hackable.py").write_text(HACKABLE)
    monkeypatch.chdir(tmp_path)
    rows, flagged = probe(Scorer([RewardSpec(fn="hackable.py:evaluates_expressions")], IN_PROCESS), EXAMPLES)
    means = {name: total for name, _, total, _ in rows}
    assert means[GOLD] == 1.0
    assert means["restated expression"] == 1.0  # every restated sum is "right" under math-verify of the reply
    assert flagged == ["restated expression"]
    text = format_probe(rows, flagged, "data/arithmetic/train.jsonl")
    assert "warning: 'restated expression' earns 1.00, more than half of what gold answers earn (1.00)" in text
    # a rule that pays when the gold number appears anywhere: listing candidates games it
    _, flagged = probe(Scorer([RewardSpec(fn="hackable.py:any_number")], IN_PROCESS), EXAMPLES)
    assert flagged == ["many candidates"]

    rows, flagged = probe(Scorer([RewardSpec(fn="accuracy")], IN_PROCESS), EXAMPLES)
    assert flagged == [] and rows[0][2] == 1.0
    assert all(total == 0.0 for name, _, total, _ in rows[1:])


def test_r1_rules_are_not_flagged_for_format_alone():
    """Format-only completions earn the format weights (0.3 of 1.3): below half of a correct answer's reward."""
    scorer = Scorer([RewardSpec(fn="accuracy"), RewardSpec(fn="format", weight=0.2),
                     RewardSpec(fn="tag_count", weight=0.1)], IN_PROCESS)
    rows, flagged = probe(scorer, EXAMPLES)
    totals = {name: total for name, _, total, _ in rows}
    assert totals[GOLD] == pytest.approx(1.3) and totals["format, no content"] == pytest.approx(0.3)
    assert flagged == []


def test_probe_errors_do_not_count_towards_the_training_error_window(tmp_path, monkeypatch):
    (tmp_path / "picky.py").write_text("def picky(completion, example):\n"
                                       "    if '<' in completion:\n        raise ValueError('tags')\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    scorer = Scorer([RewardSpec(fn="picky.py:picky")], IN_PROCESS)  # any training error stops the run
    rows, _ = probe(scorer, EXAMPLES)
    assert scorer(["fine"], [EXAMPLES[0]]).per_rule["picky"] == [1.0]


def test_grpo_rewards_probe_command(tiny_model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "hackable.py").write_text(HACKABLE)
    monkeypatch.chdir(tmp_path)
    args = ["rewards", "--probe", str(ROOT / "configs/quickstart.yaml"), f"model.name_or_path={tiny_model_dir}",
            f"data.path={ROOT / 'data/arithmetic/train.jsonl'}", "eval.path=null", "scoring.workers=0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reward-hack probe on 16 rows of" in out and "warning" not in out
    assert main(args + ["rewards=[{fn: hackable.py:evaluates_expressions}]", "eval.reward=evaluates_expressions"]) == 1
    assert "warning: 'restated expression' earns 1.00" in capsys.readouterr().out
