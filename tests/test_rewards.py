import json
import os
import time

import pytest
import torch

from grpo.config import RewardSpec, ScoringConfig
from grpo.scoring.scorer import RewardRuleError, Scorer
from rewards.format import format_reward, reasoning_steps, tag_count
from rewards.length import cosine_length, repetition_penalty, soft_overlong, target_length
from rewards.math import accuracy, countdown, gold_text, true_steps

from conftest import GSM8K

IN_PROCESS = ScoringConfig(workers=0)


@pytest.mark.parametrize("completion, gold, expected", [
    # the value a completion states, never an expression it leaves unevaluated
    ("38 + 94 =", "132", 0.0),  # restating the question
    ("38 + 94 = 132", "132", 1.0),
    ("The sum is 132.", "132", 1.0),
    ("<answer>535 + 5</answer>", "540", 0.0),
    ("<answer>540</answer>", "540", 1.0),
    ("So we compute 188 + 5.", "193", 0.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("The answer is $1,200.", "1200", 1.0),
    ("38 + 94 = 131", "132", 0.0),
    ("To solve 13 + 40 with the number only, I will first calculate the result with the", "53", 0.0),
    ("<answer>38 + 94 =</answer>", "132", 0.0),
    ("\\boxed{38+94}", "132", 0.0),
    ("<answer>2 \\times 3</answer>", "6", 0.0),
    ("<answer>\\frac{1}{2} + 1</answer>", "1.5", 0.0),
    ("<answer>1080/2</answer>", "540", 0.0),  # a division left undone
    ("<answer>\\frac{1080}{2}</answer>", "540", 0.0),
    ("<answer>\\int_0^1 x dx</answer>", "0.5", 0.0),
    ("1/2", "0.5", 1.0),
    ("<answer>x = 5</answer>", "5", 1.0),  # an equation states its right-hand side
    ("x=-5", "-5", 1.0),
    # commas: thousands groups only
    ("(1, 2)", "12", 0.0),
    ("3,4", "34", 0.0),
    ("<answer>(1, 2)</answer>", "(1, 2)", 1.0),
    ("<answer>\\$1,200</answer>", "1200", 1.0),
    # LaTeX values compared mathematically
    ("<answer>2\\sqrt{3}</answer>", "2\\sqrt{3}", 1.0),
    ("<answer>\\{1, 2\\}</answer>", "\\{1,2\\}", 1.0),
    ("<answer>x^2+1</answer>", "x^2 + 1", 1.0),
    # formats kept from before
    ("23 + 45 = 68", "68", 1.0),
    ("23 + 45 = 78", "68", 0.0),
    ("The answer is 1,234.", "1234", 1.0),
    ("<think>2 * 617</think><answer>1,234</answer>", "1,234", 1.0),
    ("<answer>$18.00</answer>", "Janet sells 16 - 3 - 4 = 9 eggs... 9 * 2 = $18 per day.\n#### 18", 1.0),
    ("It costs $18.0 in total", "#### 18", 1.0),
    ("so x = \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("the result is \\boxed{12}, not 13", "12", 1.0),
    ("<answer>7</answer> but maybe 9", "7", 1.0),
    ("I do not know", "7", 0.0),
    ("18", "", None),  # unparseable gold: the row cannot be scored
])
def test_accuracy_table(completion, gold, expected):
    assert accuracy(completion, {"answer": gold}) == expected


def test_accuracy_on_real_gsm8k_answers():
    rows = [json.loads(line) for line in open(GSM8K / "test.jsonl")][:30]
    for row in rows:
        final = gold_text(row["answer"])
        assert accuracy(f"So the answer is {final}.", row) == 1.0, row["answer"]
        assert accuracy(f"<answer>{int(final) + 1:,}</answer>", row) == 0.0
        assert accuracy(f"<answer>\\boxed{{{final}}}</answer>", row) == 1.0


@pytest.mark.parametrize("completion, expected", [
    ("<answer>(3 + 5) * 2</answer>", 1.0),
    ("<answer>2 * (5 + 3) = 16</answer>", 1.0),
    ("<answer>3 + 5 + 2</answer>", 0.0),         # 10, not 16
    ("<answer>(3 + 5) * 2 * 1</answer>", 0.0),   # 1 is not a given number
    ("<answer>(3 + 3) * 2</answer>", 0.0),       # 3 used twice, 5 unused
    ("<answer>__import__('os')</answer>", 0.0),  # not arithmetic: never evaluated
    ("<answer>16 / (5 - 3 - 2)</answer>", 0.0),  # division by zero
    ("no answer", 0.0),
])
def test_countdown_table(completion, expected):
    assert countdown(completion, {"nums": [2, 3, 5], "target": 16}) == expected


@pytest.mark.parametrize("completion, strict, expected", [
    ("<think>\nadd\n</think>\n<answer>\n5\n</answer>", True, 1.0),
    ("<think>add</think> <answer>5</answer>", True, 0.0),
    ("<think>add</think> <answer>5</answer>", False, 1.0),
    ("sure <think>add</think><answer>5</answer> bye", False, 1.0),
    ("<answer>5</answer><think>x</think>", False, 0.0),
    ("<think>\nadd\n</think>\n<answer>\n5\n</answer>\n</answer>", True, 0.0),  # a tag after the answer block
    ("<think>\nadd\n</think>\n<answer>\n5\n</answer>\n<answer>\n6\n</answer>", True, 0.0),  # two answers
    ("<think>\na\n</think>\n<think>\nb\n</think>\n<answer>\n5\n</answer>", True, 0.0),  # two think blocks
    ("<think>\n1 < 2 and 3 > 2\n</think>\n<answer>\n5\n</answer>", True, 1.0),  # < and > alone are fine
])
def test_format_table(completion, strict, expected):
    assert format_reward(completion, {}, strict=strict) == expected


def test_format_reads_the_think_tag_from_an_r1_zero_prompt():
    assert format_reward(" add</think> <answer>5</answer>", {"prompt": "... Assistant: <think>"}) == 1.0


def test_tag_count_and_reasoning_steps():
    assert tag_count("<think>a</think>", {}) == 0.5
    assert tag_count("<think><think></think><answer>1</answer>", {}) == 0.75
    assert reasoning_steps("Step 1: a. Step 2: b.", {}) == pytest.approx(2 / 3)
    assert reasoning_steps("First, a.\n1. b\n2. c\n- d", {}) == 1.0
    assert reasoning_steps("42", {}) == 0.0


def test_cosine_length_by_hand():
    right, wrong = {"answer": "42", "completion_tokens": 0}, {"answer": "41", "completion_tokens": 0}
    assert cosine_length("42", right, max_length=100) == pytest.approx(1.0)
    assert cosine_length("42", {**right, "completion_tokens": 50}, max_length=100) == pytest.approx(0.75)
    assert cosine_length("42", {**right, "completion_tokens": 100}, max_length=100) == pytest.approx(0.5)
    assert cosine_length("42", wrong, max_length=100) == pytest.approx(-1.0)
    assert cosine_length("42", {**wrong, "completion_tokens": 50}, max_length=100) == pytest.approx(-0.75)
    assert cosine_length("42", {**wrong, "completion_tokens": 200}, max_length=100) == pytest.approx(-0.5)


def test_repetition_penalty_and_soft_overlong_by_hand():
    assert repetition_penalty("a b c d e", {}) == 0.0
    # words a b a b a b: trigrams (a b a), (b a b), (a b a), (b a b): 2 distinct of 4 -> -0.5
    assert repetition_penalty("a b a b a b", {}) == pytest.approx(-0.5)
    assert repetition_penalty("a b", {}) == 0.0
    assert [soft_overlong("", {"completion_tokens": n}, max_length=100, buffer=20) for n in (70, 80, 90, 100, 120)] == \
        [0.0, 0.0, -0.5, -1.0, -1.0]


def boom(completion, example):
    if "x" in completion:
        raise RuntimeError("cannot score x")
    return 1.0


def test_scorer_weights_rules_and_isolates_a_raising_rule(capsys, monkeypatch):
    import rewards

    monkeypatch.setitem(rewards.BUILTINS, "boom", boom)
    scorer = Scorer([RewardSpec(fn="accuracy", weight=1.0), RewardSpec(fn="boom", weight=0.5)],
                    ScoringConfig(workers=0, max_error_fraction=0.9))
    scores = scorer(["5", "x 5", "7"], [{"answer": "5"}] * 3)
    assert scores.per_rule == {"accuracy": [1.0, 1.0, 0.0], "boom": [1.0, None, 1.0]}
    assert scores.errors == {"accuracy": 0, "boom": 1}
    torch.testing.assert_close(scores.total, torch.tensor([1.5, 1.0, 0.5]))
    assert "cannot score x" in capsys.readouterr().err
    scorer(["x"], [{"answer": "5"}])
    assert capsys.readouterr().err == ""  # the first traceback only
    m = scores.metrics()
    assert m["reward/boom"] == 1.0 and m["reward/boom/errors"] == 1.0 and m["reward"] == pytest.approx(1.0)


def test_too_many_errors_over_the_window_stop_the_run(monkeypatch):
    import rewards

    monkeypatch.setitem(rewards.BUILTINS, "boom", boom)
    scorer = Scorer([RewardSpec(fn="boom")], ScoringConfig(workers=0, max_error_fraction=0.5, error_window=3))
    scorer(["x", "a", "a", "a"], [{}] * 4)  # 1 of 4
    scorer(["x", "x", "a", "a"], [{}] * 4)  # 3 of 8
    with pytest.raises(RewardRuleError, match=r"'boom' failed on 7 of 12 samples over the last 3 steps(.|\n)*cannot score x"):
        scorer(["x", "x", "x", "x"], [{}] * 4)


@pytest.mark.parametrize("bad, message", [("yes", "returned 'yes'"), (float("nan"), "finite"), (True, "bool"),
                                          ((1.0, 2.0), "sub-metrics")])
def test_scorer_refuses_wrong_return_values(bad, message, monkeypatch):
    import rewards

    monkeypatch.setitem(rewards.BUILTINS, "bad", lambda completion, example: bad)
    with pytest.raises(RewardRuleError, match=message):
        Scorer([RewardSpec(fn="bad")], IN_PROCESS)(["a"], [{}])


def test_sub_metrics_batched_rules_and_token_counts(tmp_path, monkeypatch):
    (tmp_path / "my_rules.py").write_text('''
from rewards.base import rule

def with_parts(completion, example):
    return 1.0, {"chars": len(completion), "tokens": example["completion_tokens"]}

@rule(batched=True)
def batch_len(completions, examples):
    return [float(len(c)) for c in completions]

@rule(batched=True)
def short_batch(completions, examples):
    return [1.0]
''')
    monkeypatch.chdir(tmp_path)
    scorer = Scorer([RewardSpec(fn="my_rules.py:with_parts"), RewardSpec(fn="my_rules.py:batch_len", weight=0.1)],
                    IN_PROCESS)
    scores = scorer(["ab", "abcd"], [{}, {}], num_tokens=[3, 5])
    m = scores.metrics()
    assert m["reward/with_parts/chars"] == 3.0 and m["reward/with_parts/tokens"] == 4.0
    assert scores.per_rule["batch_len"] == [2.0, 4.0]
    torch.testing.assert_close(scores.total, torch.tensor([1.2, 1.4]))
    with pytest.raises(RewardRuleError, match="returned 1 values for 2 completions"):
        Scorer([RewardSpec(fn="my_rules.py:short_batch")], IN_PROCESS)(["a", "b"], [{}, {}])


def test_canaries_catch_a_rule_that_scores_everything_the_same(monkeypatch):
    Scorer([RewardSpec(fn=name) for name in ["accuracy", "format", "countdown", "cosine_length",
                                             "repetition_penalty", "soft_overlong", "reasoning_steps", "tag_count",
                                             "target_length"]],
           IN_PROCESS).check_canaries()
    import rewards
    from rewards.base import rule

    monkeypatch.setitem(rewards.BUILTINS, "flat", rule(correct=("42", {}), wrong=("41", {}))(lambda c, e: 0.0))
    with pytest.raises(RewardRuleError, match="'flat' .* failed its canary: it should score '42' above '41' but gave 0.0 and 0.0"):
        Scorer([RewardSpec(fn="flat")], IN_PROCESS).check_canaries()


HANGING_RULES = '''
import os, time

def slow(completion, example):
    if completion == "hang":
        time.sleep(600)
    if completion == "die":
        os._exit(3)
    if completion == "raise":
        raise ValueError("bad sample")
    return float(len(completion))

def pid(completion, example):
    return float(os.getpid())
'''


def test_worker_pool_kills_hanging_rules_and_leaves_no_processes(tmp_path, monkeypatch):
    (tmp_path / "hang.py").write_text(HANGING_RULES)
    monkeypatch.chdir(tmp_path)
    scorer = Scorer([RewardSpec(fn="hang.py:slow"), RewardSpec(fn="hang.py:pid", weight=0.0)],
                    ScoringConfig(workers=2, timeout=1.0, max_error_fraction=1.0))
    started = time.monotonic()
    scores = scorer(["ab", "hang", "abc", "die", "raise", "abcd"], [{}] * 6)
    assert time.monotonic() - started < 30
    assert scores.per_rule["slow"] == [2.0, None, 3.0, None, None, 4.0]
    assert scores.errors["slow"] == 3
    pids = {int(p) for p in scores.per_rule["pid"]}
    assert os.getpid() not in pids and len(pids) >= 1  # scored in worker processes
    # the pool keeps working after kills
    assert scorer(["abcde"], [{}]).per_rule["slow"] == [5.0]
    processes = [p for p, _ in scorer.pool._workers]
    scorer.close()
    assert all(not p.is_alive() for p in processes)


def test_accuracy_canary_fails_a_rule_that_pays_for_a_restated_question(monkeypatch):
    """A checker that evaluates whatever expression the completion holds (the quickstart's old hole) earns 1
    for "38 + 4 =" against gold 42; accuracy's canary stops such a rule before training."""
    import rewards
    from math_verify import parse, verify

    def evaluates_expressions(completion, example):
        predicted = parse(completion.replace(",", ""))
        return 1.0 if predicted and verify(parse(example["answer"]), predicted) else 0.0

    assert evaluates_expressions("What is 38 + 4? 38 + 4 =", {"answer": "42"}) == 1.0  # the hole
    monkeypatch.setitem(rewards.BUILTINS, "hackable", _with_canary_of(accuracy, evaluates_expressions))
    with pytest.raises(RewardRuleError, match=r"'hackable' .* failed its canary: it should score 'so the answer is 42\.' "
                                              r"above 'What is 38 \+ 4\? 38 \+ 4 =' but gave 1\.0 and 1\.0"):
        Scorer([RewardSpec(fn="hackable")], IN_PROCESS).check_canaries()


def _with_canary_of(declared, fn):
    fn.reward_batched, fn.reward_canary = False, declared.reward_canary
    return fn


def test_math_verify_failures_are_errors_not_wrong_answers(monkeypatch):
    """A timeout inside math-verify has not judged the sample: reward/accuracy/errors counts it."""
    import rewards.math
    from math_verify.errors import TimeoutException

    def timing_out(*args, **kwargs):
        raise TimeoutException("Operation timed out!")

    monkeypatch.setattr(rewards.math, "parse", timing_out)
    scores = Scorer([RewardSpec(fn="accuracy")], ScoringConfig(workers=0, max_error_fraction=1.0))(
        ["<answer>\\frac{1}{2}</answer>", "<answer>7</answer>"], [{"answer": "0.5"}, {"answer": "7"}])
    assert scores.per_rule["accuracy"] == [None, 1.0]  # the plain number needs no math-verify
    assert scores.metrics()["reward/accuracy/errors"] == 1.0


def test_worker_start_up_is_never_charged_to_a_sample(tmp_path, monkeypatch):
    """Importing this rule takes 1.5 s, longer than the 1 s timeout: the pool warms its worker before the first
    task and a replacement before its next one, so only the hanging sample times out."""
    (tmp_path / "slow_import.py").write_text(
        "import time\ntime.sleep(1.5)\n\ndef rule(completion, example):\n"
        "    if completion == 'hang':\n        time.sleep(600)\n    return float(len(completion))\n")
    monkeypatch.chdir(tmp_path)
    scorer = Scorer([RewardSpec(fn="slow_import.py:rule")], ScoringConfig(workers=1, timeout=1.0,
                                                                           max_error_fraction=1.0))
    try:
        assert scorer(["a", "hang", "abc", "hang", "abcd"], [{}] * 5).per_rule["rule"] == [1.0, None, 3.0, None, 4.0]
    finally:
        scorer.close()


def test_a_rule_that_does_not_apply_is_counted_apart_from_errors():
    """None from the rule (an unparseable gold answer) is logged as reward/<rule>/none; a raising rule's None
    is an error; neither is a wrong answer."""
    scores = Scorer([RewardSpec(fn="accuracy")], IN_PROCESS)(["5", "5", "6"], [{"answer": "5"}, {"answer": ""},
                                                                                  {"answer": "5"}])
    m = scores.metrics()
    assert scores.per_rule["accuracy"] == [1.0, None, 0.0]
    assert m["reward/accuracy/none"] == 1.0 and m["reward/accuracy/errors"] == 0.0
    assert m["reward/accuracy"] == 0.5


@pytest.mark.parametrize("tokens, expected", [(8, 1.0), (6, 0.75), (12, 0.5), (0, 0.0), (16, 0.0), (40, 0.0)])
def test_target_length_by_hand(tokens, expected):
    assert target_length("x", {"completion_tokens": tokens}, target=8) == expected
    assert target_length("x" * tokens, {"completion_tokens": 1}, target=8, unit="chars") == expected


def test_true_steps_counts_the_true_working_lines_inside_think():
    assert true_steps("<think>\n47 + 38 = 85\n85 + 19 = 114\n</think>\n<answer>\n114\n</answer>", {}) == (
        0.5, {"lines": 2.0})
    assert true_steps("<think>\n9 - 12 = -3\n3 * 4 = 12\n</think>", {}) == (1.0, {"lines": 2.0})
    assert true_steps("<think>\nadd them\n</think>\n<answer>\n12 + 30 = 42\n</answer>", {}) is None  # outside think
    assert true_steps("12 + 30 = 42\n42 + 1 = 44", {}) == (0.5, {"lines": 2.0})  # no think block: the whole text
    assert true_steps("9" * 5000 + " + 1 = 2\n1 + 1 = 2", {}) == (1.0, {"lines": 1.0})  # a huge number is no step
