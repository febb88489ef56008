"""Tools: the calculator, schemas, the runner's failure handling, and multi-turn rollouts token in, token out."""

import inspect
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from grpo.config import ConfigError, RolloutConfig, ToolSpec, load_config
from grpo.rollout.multiturn import generate_with_tools
from grpo.tools.builtin import ToolError, calculator
from grpo.tools.calls import parse_calls, result_text
from grpo.tools.registry import resolve_tool
from grpo.tools.runner import ToolRunner

from conftest import make_tokenizer

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'


@pytest.mark.parametrize("expression, value", [("123 * 45 + 6", "5541"), ("1/4", "0.25"), ("1/3", "1/3"),
                                               ("2**10 - (3 - 5)", "1026"), ("-7 // 2", "-4"), ("0.1 + 0.2", "0.3"),
                                               ("12 × 3 ÷ 4", "9"), ("7 % 3", "1")])
def test_calculator_is_exact(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression, why", [("1/0", "division by zero"), ("2**100000", "exponents"),
                                             ("__import__('os').system('true')", "unsupported"),
                                             ("x + 1", "unsupported"), ("1 +", "cannot parse")])
def test_calculator_refuses_what_is_not_arithmetic(expression, why):
    with pytest.raises(ToolError, match=why):
        calculator(expression)


def test_schemas_come_from_the_signature_and_docstring_without_bound_options():
    calc = resolve_tool(ToolSpec(fn="calculator")).schema["function"]
    assert calc["name"] == "calculator" and calc["description"] == "Evaluate an arithmetic expression exactly."
    assert calc["parameters"]["required"] == ["expression"]
    assert calc["parameters"]["properties"]["expression"]["type"] == "string"
    assert "e.g." in calc["parameters"]["properties"]["expression"]["description"]
    python = resolve_tool(ToolSpec(fn="python", kwargs={"timeout": 2.0, "memory_mb": 256, "max_output": 100}))
    assert list(python.schema["function"]["parameters"]["properties"]) == ["code"]
    with pytest.raises(ValueError, match="not parameters"):
        resolve_tool(ToolSpec(fn="python", kwargs={"seconds": 2}))
    with pytest.raises(ValueError, match="Did you mean 'calculator'"):
        resolve_tool(ToolSpec(fn="calculater"))


def test_calls_are_parsed_and_bad_ones_explained():
    calls = parse_calls(f"first {CALL} then <tool_call>not json</tool_call> <tool_call>[1]</tool_call>")
    assert calls[0].name == "calculator" and calls[0].arguments == {"expression": "6*7"}
    assert "not valid JSON" in calls[1].error and '{"name": TOOL' in calls[2].error


@pytest.fixture(scope="module")
def misbehaving_tools(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "bad_tools.py"
    path.write_text(
        "def boom(x: str) -> str:\n    \"\"\"Raises.\"\"\"\n    raise RuntimeError('tool broke')\n\n"
        "def hang(x: str) -> str:\n    \"\"\"Never returns.\"\"\"\n    while True:\n        pass\n\n"
        "def flood(x: str) -> str:\n    \"\"\"Returns 10 MB.\"\"\"\n    return 'y' * 10_000_000\n")
    return [ToolSpec(fn="calculator"), *(ToolSpec(fn=f"{path}:{name}") for name in ("boom", "hang", "flood"))]


@pytest.mark.parametrize("workers", [0, 2])
def test_failing_tools_become_results_the_model_reads_and_are_counted(misbehaving_tools, workers):
    from grpo.tools.calls import Call

    specs = misbehaving_tools if workers else [s for s in misbehaving_tools if not s.fn.endswith(":hang")]
    runner = ToolRunner(specs, workers=workers, timeout=2.0, max_result_chars=100)
    try:
        calls = [Call("calculator", {"expression": "6*7"}), Call("boom", {"x": "a"}), Call("flood", {"x": "a"}),
                 Call("calculator", {"expr": "1"}), Call("nope", {}), Call(None, None, "not JSON"),
                 *([Call("hang", {"x": "a"})] if workers else [])]
        results = runner.run(calls)
        assert results[0] == "42"
        assert results[1] == "error: RuntimeError: tool broke"
        assert results[2].startswith("y" * 100) and "[result truncated at 100 characters]" in results[2]
        assert results[3].startswith("error: calculator takes arguments ['expression']; unknown: ['expr']")
        assert "no tool named 'nope'" in results[4] and results[5] == "error: not JSON"
        if workers:
            assert results[6] == "error: the tool did not answer within 2 s and was stopped"
            assert runner.run([Call("calculator", {"expression": "1+1"})]) == ["2"]  # the pool recovered
        counts = runner.take_counts()
        assert counts["calculator/calls"] == 2 + bool(workers) and counts["calculator/errors"] == 1
        assert counts["boom/errors"] == 1 and counts["flood/errors"] == 0 and counts["invalid/calls"] == 2
        assert counts.get("hang/errors", 0) == bool(workers)
    finally:
        runner.close()


class Scripted(LlamaForCausalLM):
    """The tiny Llama with a bias towards a script: at absolute position p the token script[p] is favoured
    as the next token, so decoding follows the script while log-probs stay those of a real model."""

    script: dict = {}
    bias: float = 8.0

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        positions = kwargs["position_ids"][:, -out.logits.shape[1]:]
        for r, j in ((r, j) for r in range(positions.shape[0]) for j in range(positions.shape[1])):
            token = self.script.get(int(positions[r, j]))
            if token is not None:
                out.logits[r, j, token] += self.bias
        return out


Scripted.forward.__signature__ = inspect.signature(LlamaForCausalLM.forward)


@pytest.fixture(scope="module")
def scripted():
    """A model that, for a short prompt, calls the calculator for 6*7 and then answers from the result, and for
    a long prompt answers without a tool; the completions each should produce (text pieces, sampled or not)."""
    tok = make_tokenizer()
    tok.padding_side = "left"
    torch.manual_seed(0)
    from conftest import make_model

    base = make_model(len(tok), seed=3)
    model = Scripted(base.config)
    model.load_state_dict(base.state_dict())
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    short, long = "Q: 6*7?", "Q: " + "a" * 150 + "?"
    tool_text = result_text(["42"], "plain", tok)
    expected = {short: [(CALL, 1), (tool_text, 0), ("The answer is 42.<|im_end|>", 1)],
                long: [("No tool: 5.<|im_end|>", 1)]}
    script = {}
    for prompt, pieces in expected.items():
        ids = [t for text, _ in pieces for t in tok(text, add_special_tokens=False)["input_ids"]]
        start = len(tok(prompt, add_special_tokens=False)["input_ids"])
        script.update({start - 1 + k: token for k, token in enumerate(ids)})  # position p predicts token p + 1
    model.script = script
    return model, tok, expected


def run_scripted(scripted, greedy=True, **kw):
    model, tok, expected = scripted
    runner = ToolRunner([ToolSpec(fn="calculator")], workers=0, timeout=5.0)
    cfg = RolloutConfig(max_completion_length=kw.pop("max_completion_length", 160))
    rollouts = generate_with_tools(model, tok, list(expected), 2, cfg, runner, "plain", kw.pop("max_turns", 3),
                                   greedy=greedy, logprobs=True, seeds=list(range(4)), **kw)
    return rollouts, runner


def test_a_tool_worker_that_dies_at_startup_names_the_setting_that_shows_why(tmp_path):
    path = tmp_path / "dies_in_workers.py"  # imports in this process; a spawned worker exits while importing it
    path.write_text("import multiprocessing, os\nif multiprocessing.parent_process() is not None:\n    os._exit(3)\n\n"
                    "def echo(x: str) -> str:\n    \"\"\"Echoes.\"\"\"\n    return x\n")
    with pytest.raises(RuntimeError, match=r"worker process for tools died.*rollout\.tool_workers=0"):
        ToolRunner([ToolSpec(fn=f"{path}:echo")], workers=1, timeout=2.0)


def test_a_trajectory_is_the_sampled_and_tool_tokens_concatenated(scripted):
    _, tok, expected = scripted
    rollouts, _ = run_scripted(scripted)
    for row, pieces in zip((0, 1, 2, 3), [expected[p] for p in expected for _ in range(2)]):
        ids = [tok(text, add_special_tokens=False)["input_ids"] for text, _ in pieces]
        want = torch.tensor([t for piece in ids for t in piece])
        want_sampled = torch.tensor([s for piece, (_, s) in zip(ids, pieces) for _ in piece])
        n = len(want)
        assert torch.equal(rollouts.completion_ids[row, :n], want)
        assert torch.equal(rollouts.sampled_mask[row, :n], want_sampled)  # the loss counts exactly the sampled ones
        assert rollouts.completion_mask[row, :n].all() and not rollouts.completion_mask[row, n:].any()
        assert not rollouts.truncated[row]
    assert rollouts.texts[0] == CALL + "The answer is 42."  # what rules score: the model's own tokens
    assert "<tool_response>\n42\n</tool_response>" in rollouts.transcripts[0]
    assert rollouts.texts[2] == rollouts.transcripts[2] == "No tool: 5."
    counts = rollouts.tool_counts
    assert counts["tools/calculator/calls"] == 2 and counts["tools/_turns"] == 2 * 2 + 2 * 1


def test_multi_turn_log_probs_equal_one_forward_over_the_final_sequence(scripted):
    model, _, _ = scripted
    rollouts, _ = run_scripted(scripted)
    ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)
    mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask,
                       position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0)).logits
    T = rollouts.completion_ids.shape[1]
    full = torch.log_softmax(logits[:, -T - 1:-1].float(), dim=-1).gather(2, rollouts.completion_ids.unsqueeze(2)).squeeze(2)
    sampled = rollouts.sampled_mask.bool()
    assert rollouts.logprobs[sampled].abs().max() > 1e-3  # real log-probs, not a forced 0
    torch.testing.assert_close(rollouts.logprobs[sampled], full[sampled], atol=1e-5, rtol=0)


def test_a_call_in_the_last_turn_is_not_run_and_the_budget_holds(scripted):
    rollouts, runner = run_scripted(scripted, max_turns=1)
    assert rollouts.tool_counts["tools/calculator/calls"] == 0 and rollouts.texts[0] == CALL
    rollouts, _ = run_scripted(scripted, max_completion_length=len(CALL) + 5)  # no room after the result
    assert rollouts.truncated[0] and rollouts.completion_mask[0].sum() == len(CALL) + 5
    assert rollouts.sampled_mask[0].sum() == len(CALL)


def test_eval_counts_the_tool_calls_of_its_greedy_completions(scripted):
    from grpo.config import EvalConfig, RewardSpec, ScoringConfig
    from grpo.evaluate import evaluate
    from grpo.scoring.scorer import Scorer

    model, tok, expected = scripted

    class Engine:  # the scripted model through the multi-turn sampler, as the built-in engine runs it
        def generate(self, prompts, sampling):
            runner = ToolRunner([ToolSpec(fn="calculator")], workers=0, timeout=5.0)
            return generate_with_tools(model, tok, prompts, sampling.n, RolloutConfig(max_completion_length=160),
                                       runner, "plain", 3, greedy=True)

    examples = [{"prompt": p, "question": p, "answer": a} for p, a in zip(expected, ("42", "5"))]
    scorer = Scorer([RewardSpec(fn="accuracy")], ScoringConfig(workers=0))
    try:
        result = evaluate(Engine(), examples, scorer, RolloutConfig(), EvalConfig(batch_size=2))
    finally:
        scorer.close()
    # the short prompt calls the calculator once and answers 42; the long one answers 5 with no call
    assert result.metrics["eval/tool_calls_per_completion"] == 0.5
    assert result.metrics["eval/accuracy"] == 1.0
    assert "<tool_response>" in result.samples[0]["completion"]  # samples show the transcript


def test_tools_are_checked_when_the_config_loads(tmp_path):
    cfg = load_config(None, ["tools=[calculator, {fn: python, kwargs: {timeout: 3}}]", "rollout.max_turns=3"])
    assert [t.fn for t in cfg.tools] == ["calculator", "python"] and cfg.tools[1].kwargs == {"timeout": 3}
    with pytest.raises(ConfigError, match="no built-in tool named 'calc'"):
        load_config(None, ["tools=[calc]"])
    with pytest.raises(ConfigError, match="built-in engine"):
        load_config(None, ["tools=[calculator]", "rollout.engine=vllm"])
    with pytest.raises(ConfigError, match="routing_replay"):
        load_config(None, ["tools=[calculator]", "moe.routing_replay=true"])
    with pytest.raises(ConfigError, match="named 'calculator'"):
        load_config(None, ["tools=[calculator, calculator]"])
    assert json.loads(json.dumps(cfg.to_dict()))["tools"][0]["fn"] == "calculator"


def test_a_run_with_tools_logs_tool_metrics_and_its_prompts_describe_the_tools(tiny_model_dir, length_rule, tmp_path):
    from conftest import ROOT

    from grpo.commands.cli import main

    out = tmp_path / "run"
    args = [str(ROOT / "configs/quickstart.yaml"), f"model.name_or_path={tiny_model_dir}",
            f"data.path={ROOT / 'data/arithmetic/train.jsonl'}", "data.max_samples=16", "data.max_prompt_length=1000",
            "eval.path=null", f"rewards=[{{fn: '{length_rule}:length_reward'}}]", "tools=[calculator]",
            "rollout.tool_workers=1", "rollout.num_generations=4", "rollout.max_completion_length=8",
            "train.prompts_per_step=2", "train.micro_batch_size=4", "train.max_steps=2", "logging.wandb=disabled",
            "train.mixed_precision=fp32", "scoring.workers=0", f"train.output_dir={out}", "logging.completions_every=1"]
    assert main(["train", *args]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if "loss" in r)
    assert step["tools/calls_per_completion"] == 0.0 and step["tools/turns"] == 1.0  # a random model calls nothing
    assert step["tools/result_tokens_fraction"] == 0.0 and step["tools/calculator/errors"] == 0.0
    group = json.loads((out / "completions.jsonl").read_text().splitlines()[0])
    assert "<tool_call>" in group["prompt"] and '"name": "calculator"' in group["prompt"]


def test_sft_on_tool_traces_tokenizes_like_a_rollout_and_does_not_train_on_results():
    from grpo.commands.sft import IGNORE, sft_features

    tok = make_tokenizer()
    result = result_text(["42"], "plain", tok)
    pieces = [CALL, result, "The answer is 42."]
    ids, labels = sft_features("Q: 6*7?", "".join(pieces), tok, max_length=1000)
    prompt = len(tok("Q: 6*7?", add_special_tokens=False)["input_ids"])
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in pieces]
    want = [t for p in pieces for t in tok(p, add_special_tokens=False)["input_ids"]] + [tok.eos_token_id]
    assert ids[prompt:] == want  # each piece tokenized on its own, as generate_with_tools appends them
    trained = [label != IGNORE for label in labels[prompt:]]
    assert trained == [True] * lengths[0] + [False] * lengths[1] + [True] * (lengths[2] + 1)
    assert sft_features("p", "plain answer", tok, 1000) == (
        tok("p", add_special_tokens=False)["input_ids"] + tok("plain answer", add_special_tokens=False)["input_ids"] + [0],
        [IGNORE] + tok("plain answer", add_special_tokens=False)["input_ids"] + [0])


def test_the_cold_start_traces_are_what_a_rollout_with_the_calculator_writes():
    from conftest import ROOT, load_script
    from rewards.math import accuracy

    module = load_script("make_tool_traces")
    text = module.trace(347, 28)
    call_end = text.index("</tool_call>") + len("</tool_call>")
    call = parse_calls(text[:call_end])[0]
    assert resolve_tool(ToolSpec(fn="calculator")).fn(call.arguments) == ("ok", "9716")
    assert text[call_end:].startswith(result_text(["9716"], "plain", None))
    own = text[:call_end] + text[call_end + len(result_text(["9716"], "plain", None)):]  # what rules score
    assert accuracy(own, {"answer": "9716"}) == 1.0 and accuracy(own, {"answer": "9715"}) == 0.0
    rows = [json.loads(line) for line in (ROOT / "data/tools_multiply/sft.jsonl").read_text().splitlines()]
    assert all(r["response"] == module.trace(*map(int, r["question"][8:-1].split(" * "))) for r in rows)


def test_the_tools_pipeline_runs_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    from conftest import ROOT

    from grpo.commands.cli import main

    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    assert main(["pipeline", "configs/pipelines/tools_multiply.yaml", f"model.name_or_path={tiny_model_dir}",
                 f"train.output_dir={out}", "data.max_prompt_length=2000", "rollout.num_generations=2",
                 "rollout.max_completion_length=8", "rollout.tool_workers=0", "train.prompts_per_step=4",
                 "train.micro_batch_size=4", "train.mixed_precision=fp32", "eval.num_prompts=4", "eval.batch_size=4",
                 "scoring.workers=0", "logging.wandb=disabled"]) == 0
    for stage in ("base_eval", "cold_start", "rl", "no_tool_eval"):
        assert (out / stage / "DONE").is_file(), stage
    rl = [json.loads(line) for line in (out / "rl/metrics.jsonl").read_text().splitlines()]
    assert any("tools/calls_per_completion" in r for r in rl)
    # eval stages report tool use (none without tools) and keep their first greedy completions
    assert "eval/tool_calls_per_completion" in json.loads((out / "base_eval/DONE").read_text())
    assert "eval/tool_calls_per_completion" not in json.loads((out / "no_tool_eval/DONE").read_text())
    samples = json.loads((out / "base_eval/eval_samples.json").read_text())
    assert [s["question"] for s in samples] == ["What is 646 * 54?", "What is 662 * 70?"]


HERMES = ("{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
          "{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
          "</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_with_tools_lists_them_and_renders_results_as_tool_messages():
    from grpo.config import DataConfig
    from grpo.data import format_prompt
    from grpo.tools.calls import ToolPrompt, resolve_layout

    plain, hermes = make_tokenizer(), make_tokenizer()
    hermes.chat_template = HERMES
    assert resolve_layout("auto", plain) == "plain" and resolve_layout("auto", hermes) == "template"
    assert result_text(["42", "7"], "template", hermes) == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    schema = resolve_tool(ToolSpec(fn="calculator")).schema
    cfg = DataConfig(prompt_format="{question}")
    prompt = format_prompt({"question": "What is 6*7?"}, cfg, hermes, ToolPrompt((schema,), "template"))
    assert prompt.startswith("<|im_start|>system\nTools: [") and '"calculator"' in prompt
    prompt = format_prompt({"question": "What is 6*7?"}, cfg, plain, ToolPrompt((schema,), "plain"))
    assert prompt.startswith("<|im_start|>system\nYou can use tools.") and "<tool_call>" in prompt


def test_a_run_with_tools_resumes_bit_identically(tiny_model_dir, length_rule, tmp_path):
    from safetensors.torch import load_file

    from conftest import ROOT

    from grpo.trainer import train

    def run(out, steps, resume=False):
        cfg = load_config(str(ROOT / "configs/quickstart.yaml"), [
            f"model.name_or_path={tiny_model_dir}", f"data.path={ROOT / 'data/arithmetic/train.jsonl'}",
            "data.max_samples=16", "data.max_prompt_length=2000", "eval.path=null",
            f"rewards=[{{fn: '{length_rule}:length_reward'}}]", "tools=[calculator]", "rollout.tool_workers=0",
            "rollout.num_generations=4", "rollout.max_completion_length=8", "train.prompts_per_step=2",
            "train.micro_batch_size=4", f"train.max_steps={steps}", "train.save_every=1", "optim.lr=1e-2",
            "logging.wandb=disabled", "train.mixed_precision=fp32", "scoring.workers=0", f"train.output_dir={out}"])
        train(cfg, resume=resume)
        return load_file(out / "final/model.safetensors")

    whole = run(tmp_path / "whole", 3)
    run(tmp_path / "parts", 1)
    resumed = run(tmp_path / "parts", 3, resume=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
