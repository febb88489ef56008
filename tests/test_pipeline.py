"""DeepSeek-R1's other stages: SFT with response-only loss, and rejection sampling into a dataset."""

import json
from pathlib import Path

import pytest
import torch
from datasets import load_dataset

from grpo.commands.cli import main
from grpo.commands.rejection import select_samples
from grpo.commands.sft import IGNORE, collate, response_nll, sft_features

from conftest import ROOT, make_model, make_tokenizer


def test_response_only_labels_by_hand():
    tok = make_tokenizer()
    ids, labels = sft_features("ab", "cd", tok, max_length=100)
    a, b, c, d = (tok.convert_tokens_to_ids(ch) for ch in "abcd")
    assert ids == [a, b, c, d, tok.eos_token_id]
    assert labels == [IGNORE, IGNORE, c, d, tok.eos_token_id]
    ids, labels = sft_features("ab", "cd", tok, max_length=3)
    assert ids == [a, b, c] and labels == [IGNORE, IGNORE, c]


def test_response_nll_by_hand_and_micro_batches_sum_to_the_batch():
    tok = make_tokenizer()
    model = make_model(len(tok), seed=2)
    features = [sft_features("What is 2+2?", "4", tok, 64), sft_features("Hi", "hello there", tok, 64)]
    batch = collate(features, tok.pad_token_id)
    # by hand: positions t predict labels[t + 1]; only labelled positions count
    logprobs = torch.log_softmax(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, dim=-1)
    terms = [-logprobs[i, t, batch["labels"][i, t + 1]] for i in range(2) for t in range(batch["labels"].shape[1] - 1)
             if batch["labels"][i, t + 1] != IGNORE]
    assert len(terms) == 2 + 12  # "4" + EOS, "hello there" (11 characters) + EOS
    expected = torch.stack(terms).sum() / len(terms)
    full = response_nll(model, batch, len(terms))
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=0)
    parts = sum(response_nll(model, collate([f], tok.pad_token_id), len(terms)) for f in features)
    torch.testing.assert_close(parts, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("keep, max_per_prompt, expected", [
    ("threshold", 1, [0]), ("threshold", 5, [0, 3]), ("best", 1, [0]), ("all_passing", 1, [0, 3])])
def test_select_samples_keeps_exactly_the_passing_ones(keep, max_per_prompt, expected):
    assert select_samples(["a", "b", "a", "c"], [1.0, 0.0, 1.0, 1.0], keep, 1.0, max_per_prompt) == expected


def test_select_samples_best_and_nothing_passing():
    assert select_samples(["a", "b", "c"], [0.5, 2.0, 3.0], "best", 1.0, 1) == [2]
    assert select_samples(["a", "b"], [0.1, 0.2], "threshold", 1.0, 3) == []
    assert select_samples(["", " ", "c"], [1.0, 1.0, 1.0], "all_passing", 1.0, 3) == [2]


@pytest.mark.parametrize("packing", [False, True])
def test_sft_learns_the_responses(tiny_model_dir, tmp_path, packing):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a, "response": r}) + "\n" for q, a, r in
                            [("1+1", "2", "2"), ("2+2", "4", "4"), ("3+3", "6", "6"), ("4+4", "8", "8")]))
    assert main(["sft", str(ROOT / "configs/quickstart.yaml"), f"model.name_or_path={tiny_model_dir}",
                 f"data.path={data}", "eval.path=null", "sft.batch_size=4", "train.micro_batch_size=2",
                 "train.max_steps=12", "optim.lr=1e-2", f"train.output_dir={tmp_path / 'run'}",
                 "logging.wandb=disabled", "train.mixed_precision=fp32", "train.save_every=6",
                 f"sft.packing={str(packing).lower()}", "sft.max_length=64"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert records[0]["sft/response_tokens"] == 8  # one digit + EOS per example
    assert records[-1]["sft/loss"] < 0.5 * records[0]["sft/loss"]
    assert (tmp_path / "run/checkpoint-12/trainer_state.pt").is_file() and (tmp_path / "run/final").is_dir()


def test_generate_writes_a_filtered_dataset(tiny_model_dir, tmp_path):
    rules = tmp_path / "rules.py"
    rules.write_text("def short(completion, example):\n    return 1.0 if len(completion) < 6 else 0.0\n")
    assert main(["generate", str(ROOT / "configs/quickstart.yaml"), f"model.name_or_path={tiny_model_dir}",
                 f"data.path={ROOT / 'data/arithmetic/test.jsonl'}", "data.max_samples=6",
                 f"rewards=[{{fn: '{rules}:short'}}]", "eval.path=null", "rollout.max_completion_length=8",
                 "generate.num_samples=6", "generate.keep=all_passing", "generate.threshold=1.0",
                 "scoring.workers=0", "train.mixed_precision=fp32", f"train.output_dir={tmp_path / 'gen'}"]) == 0
    dataset = load_dataset("json", data_files=str(tmp_path / "gen/generated.jsonl"), split="train")
    assert len(dataset) > 0
    assert {"question", "answer", "prompt", "completion", "reward", "rewards", "model", "sampling"} <= set(dataset.column_names)
    assert all(len(c) < 6 and r == 1.0 for c, r in zip(dataset["completion"], dataset["reward"]))
    for question in set(dataset["question"]):
        texts = [c for c, q in zip(dataset["completion"], dataset["question"]) if q == question]
        assert len(texts) == len(set(texts))  # deduplicated per prompt


PIPELINE = """
model: {{name_or_path: {model}}}
data: {{path: {data}, max_samples: 16, prompt_format: "{{question}} Reply with the number only."}}
rollout: {{num_generations: 4, max_completion_length: 6}}
rewards: [{{fn: '{rules}:short'}}]
optim: {{lr: 1.0e-2}}
train: {{output_dir: {out}, prompts_per_step: 2, micro_batch_size: 4, max_steps: 2, mixed_precision: fp32}}
scoring: {{workers: 0}}
eval: {{path: {eval}, num_prompts: 4, reward: short}}
generate: {{num_samples: 4, keep: all_passing, threshold: 1.0}}
logging: {{wandb: disabled}}
distill: {{teacher: {model}}}
stages:
  - {{name: gen, run: generate}}
  - {{name: cold, run: sft, data: gen, set: {{sft.batch_size: 4}}}}
  - {{name: rl, run: train, model: cold}}
  - {{name: check, run: eval, model: rl}}
"""


@pytest.fixture
def pipeline_file(tiny_model_dir, tmp_path):
    rules = tmp_path / "rules.py"
    rules.write_text("def short(completion, example):\n    return 1.0 if len(completion) < 5 else 0.0\n")
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(model=tiny_model_dir, data=ROOT / "data/arithmetic/train.jsonl", rules=rules,
                                    out=tmp_path / "out", eval=ROOT / "data/arithmetic/test.jsonl"))
    return path


def test_pipeline_chains_stages_and_a_restart_skips_finished_ones(pipeline_file, tmp_path, capsys):
    assert main(["pipeline", str(pipeline_file)]) == 0
    out = tmp_path / "out"
    assert all((out / name / "DONE").is_file() for name in ["gen", "cold", "rl", "check"])
    assert f"name_or_path: {out / 'cold' / 'final'}" in (out / "rl" / "config.yaml").read_text()
    assert f"path: {out / 'gen' / 'generated.jsonl'}" in (out / "cold" / "config.yaml").read_text()
    assert "eval/accuracy" in json.loads((out / "check" / "DONE").read_text())
    first_done = (out / "gen" / "DONE").stat().st_mtime_ns
    (out / "rl" / "DONE").unlink()
    (out / "check" / "DONE").unlink()
    capsys.readouterr()
    assert main(["pipeline", str(pipeline_file)]) == 0
    printed = capsys.readouterr().out
    assert "stage 1/4 gen (generate): done before, skipped" in printed
    assert "stage 2/4 cold (sft): done before, skipped" in printed and "stage 3/4 rl (train) ->" in printed
    assert (out / "gen" / "DONE").stat().st_mtime_ns == first_done


def test_a_stage_override_applies_to_that_stage_after_its_set(pipeline_file):
    from grpo.config import ConfigError, load_pipeline

    stages = {s.name: s.config for s in load_pipeline(pipeline_file, [
        "train.seed=7", "stages.rl.train.max_steps=3", "stages.cold.sft.batch_size=2"])}
    assert stages["rl"].train.max_steps == 3 and stages["cold"].train.max_steps == 2  # 2: the file's
    assert stages["cold"].sft.batch_size == 2 and stages["rl"].sft.batch_size != 2  # the cold stage's set says 4
    assert all(c.train.seed == 7 for c in stages.values())
    with pytest.raises(ConfigError, match="stages.nope: no stage has that name"):
        load_pipeline(pipeline_file, ["stages.nope.train.max_steps=2"])


def test_pipeline_errors_name_the_stage(pipeline_file):
    from grpo.config import ConfigError, load_pipeline

    text = pipeline_file.read_text().replace("model: cold}", "model: nope}").replace("sft.batch_size: 4", "sft.batch: 4")
    pipeline_file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_pipeline(pipeline_file)
    message = str(info.value)
    assert "stages[2].model: 'nope' is not an earlier sft or train stage" in message
    assert "stages[1] (cold): sft.batch: unknown key; did you mean 'sft.batch_size'?" in message


def tiny_model_file(pipeline_file):
    import yaml

    return Path(yaml.safe_load(pipeline_file.read_text())["model"]["name_or_path"]) / "model.safetensors"


def test_distill_runs_teacher_student_and_evaluation(pipeline_file, tmp_path):
    assert main(["distill", str(pipeline_file)]) == 0
    out = tmp_path / "out"
    assert (out / "teacher" / "generated.jsonl").is_file() and (out / "student" / "final").is_dir()
    result = json.loads((out / "student_eval" / "DONE").read_text())
    # the evaluation is of the fine-tuned student: its greedy completions, scored by hand with the rule
    # (short: 1 when under 5 characters), give the logged accuracy; and the student is not the base model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.config import RolloutConfig
    from grpo.rollout import generate
    from safetensors.torch import load_file

    student = AutoModelForCausalLM.from_pretrained(out / "student" / "final").eval()
    tok = AutoTokenizer.from_pretrained(out / "student" / "final")
    tok.padding_side = "left"
    prompts = [json.loads(line) for line in open(ROOT / "data/arithmetic/test.jsonl")][:4]
    chat = [tok.apply_chat_template([{"role": "user", "content": p["question"] + " Reply with the number only."}],
                                    tokenize=False, add_generation_prompt=True) for p in prompts]
    texts = generate(student, tok, chat, 1, RolloutConfig(max_completion_length=6), greedy=True).texts
    assert result["eval/accuracy"] == pytest.approx(sum(len(t) < 5 for t in texts) / 4)
    base, tuned = load_file(tiny_model_file(pipeline_file)), load_file(out / "student/final/model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in tuned if k in base)


@pytest.mark.parametrize("path", sorted((ROOT / "configs/pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_pipelines_validate(path, monkeypatch):
    from grpo.config import load_pipeline

    monkeypatch.chdir(ROOT)
    stages = load_pipeline(path, distill="distill" in path.name)
    assert stages and all(s.config.train.output_dir.startswith("runs/") for s in stages)


def test_packed_examples_give_the_unpacked_loss_and_gradient():
    from grpo.commands.sft import collate_packed, pack

    tok = make_tokenizer()
    model = make_model(len(tok), seed=4)
    features = [sft_features(p, r, tok, 64) for p, r in [("What is 2+2?", "4"), ("Hi", "hello there"),
                                                          ("x", "yz"), ("a longer prompt here", "ok")]]
    rows = pack(features, 40)
    assert [len(r) for r in rows] == [3, 1]  # 14 + 14 + 4 tokens fit in 40; the 23-token example starts a row
    num = sum(sum(1 for label in labels[1:] if label != IGNORE) for _, labels in features)
    grads = []
    for batch in [collate(features, tok.pad_token_id), collate_packed(rows, tok.pad_token_id)]:
        model.zero_grad()
        loss = response_nll(model, batch, num)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (padded, g_padded), (packed, g_packed) = grads
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    for a, b in zip(g_padded, g_packed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
