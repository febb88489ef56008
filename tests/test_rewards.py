import json

import pytest
import torch

from grpo.config import RewardSpec
from grpo.scoring import Scorer
from rewards.format import format_reward, tag_count
from rewards.math import accuracy, gold_text

from conftest import GSM8K


@pytest.mark.parametrize("completion, gold, expected", [
    ("23 + 45 = 68", "68", 1.0),
    ("23 + 45 = 78", "68", 0.0),
    ("The answer is 1,234.", "1234", 1.0),
    ("<think>2 * 617</think><answer>1,234</answer>", "1,234", 1.0),
    ("<answer>$18.00</answer>", "Janet sells 16 - 3 - 4 = 9 eggs... 9 * 2 = $18 per day.\n#### 18", 1.0),
    ("so x = \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("I do not know", "7", 0.0),
    ("18", "", None),  # unparseable gold: the row cannot be scored
])
def test_accuracy_table(completion, gold, expected):
    assert accuracy(completion, {"answer": gold}) == expected


def test_accuracy_on_real_gsm8k_answers():
    rows = [json.loads(line) for line in open(GSM8K / "test.jsonl")][:20]
    for row in rows:
        final = gold_text(row["answer"])
        assert accuracy(f"So the answer is {final}.", row) == 1.0, row["answer"]
        assert accuracy(f"<answer>{float(final) + 1}</answer>", row) == 0.0


@pytest.mark.parametrize("completion, strict, expected", [
    ("<think>\nadd\n</think>\n<answer>\n5\n</answer>", True, 1.0),
    ("<think>add</think> <answer>5</answer>", True, 0.0),
    ("<think>add</think> <answer>5</answer>", False, 1.0),
    ("sure <think>add</think><answer>5</answer> bye", False, 1.0),
    ("<answer>5</answer><think>x</think>", False, 0.0),
])
def test_format_table(completion, strict, expected):
    assert format_reward(completion, {}, strict=strict) == expected


def test_format_reads_the_think_tag_from_an_r1_zero_prompt():
    example = {"prompt": "... Assistant: <think>"}
    assert format_reward(" add</think> <answer>5</answer>", example) == 1.0


def test_tag_count_partial_credit():
    assert tag_count("<think>a</think>", {}) == 0.5
    assert tag_count("<think><think></think><answer>1</answer>", {}) == 0.75


def boom(completion, example):
    if "x" in completion:
        raise RuntimeError("cannot score x")
    return 1.0


def test_scorer_weights_rules_and_isolates_a_raising_rule(capsys, monkeypatch):
    import rewards

    monkeypatch.setitem(rewards.BUILTINS, "boom", boom)
    scorer = Scorer([RewardSpec(fn="accuracy", weight=1.0), RewardSpec(fn="boom", weight=0.5)])
    scores = scorer(["5", "x 5", "7"], [{"answer": "5"}] * 3)
    assert scores.per_rule == {"accuracy": [1.0, 1.0, 0.0], "boom": [1.0, None, 1.0]}
    assert scores.errors == {"accuracy": 0, "boom": 1}
    torch.testing.assert_close(scores.total, torch.tensor([1.5, 1.0, 0.5]))
    assert "cannot score x" in capsys.readouterr().err
    m = scores.metrics()
    assert m["reward/boom"] == 1.0 and m["reward/boom/errors"] == 1.0 and m["reward"] == pytest.approx(1.0)


@pytest.mark.parametrize("bad, message", [("yes", "returned 'yes'"), (float("nan"), "finite"), (True, "bool")])
def test_scorer_refuses_wrong_return_values(bad, message, monkeypatch):
    import rewards

    monkeypatch.setitem(rewards.BUILTINS, "bad", lambda completion, example: bad)
    with pytest.raises((TypeError, ValueError), match=message):
        Scorer([RewardSpec(fn="bad")])(["a"], [{}])
