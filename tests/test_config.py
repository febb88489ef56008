from pathlib import Path

import pytest

from grpo.commands.cli import main
from grpo.config import ConfigError, load_config, to_yaml

from conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    if path.name == "deepseek_v3_tiny.yaml" and not (ROOT / "runs/tiny-deepseek-v3").is_dir():
        with pytest.raises(ConfigError, match="model.name_or_path: runs/tiny-deepseek-v3 does not exist .*; make it "
                                              "first: python scripts/make_tiny_deepseek_v3.py --out runs/tiny-deepseek-v3"):
            load_config(path)
        (tmp_path / "model").mkdir()
        cfg = load_config(path, [f"model.name_or_path={tmp_path / 'model'}"])
    else:
        cfg = load_config(path)
    assert cfg.completions_per_step % cfg.train.micro_batch_size == 0


def test_overrides_are_typed_and_applied():
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["train.max_steps=5", "rollout.num_generations=4",
                                                         "optim.lr=3e-6", "eval.path=null"])
    assert cfg.train.max_steps == 5 and cfg.rollout.num_generations == 4
    assert cfg.optim.lr == 3e-6 and cfg.eval.path is None


def test_config_is_frozen_and_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/quickstart.yaml")
    with pytest.raises(AttributeError):
        cfg.train.max_steps = 3
    (tmp_path / "again.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "again.yaml") == cfg


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return path


def test_unknown_key_exits_2_naming_file_key_and_nearest(tmp_path, capsys):
    path = write(tmp_path, "rollout:\n  num_generation: 4\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "rollout.num_generation: unknown key; did you mean 'rollout.num_generations'?" in err


def test_all_problems_are_reported_together(tmp_path):
    path = write(tmp_path, """
trian: {max_steps: 3}
rollout: {num_generations: 1}
optim: {lr: fast}
train: {prompts_per_step: 3, micro_batch_size: 4}
rewards:
  - {fn: acuracy}
  - {fn: format, kwargs: {strictly: true}}
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "6 problems" in text, text
    assert "trian: unknown key; did you mean 'train'?" in text
    assert "optim.lr: expected float, got 'fast'" in text
    assert "num_generations: is 1; GRPO needs at least 2" in text
    assert "micro_batch_size: 4 does not divide the 3 completions per step" in text
    assert "no built-in rule named 'acuracy'. Did you mean 'accuracy'?" in text
    assert "rewards[1] (format): kwargs {'strictly': True} do not fit" in text and "['strict']" in text


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 3\n   bad: [\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_config(path)


def test_yaml_is_read_with_safe_load(tmp_path):
    path = write(tmp_path, "train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.max_steps"])


def test_user_reward_file_resolves(tmp_path):
    rules = tmp_path / "my_rules.py"
    rules.write_text("def short(completion, example, limit=10):\n    return float(len(completion) <= limit)\n")
    path = write(tmp_path, f"rewards:\n  - {{fn: '{rules}:short', kwargs: {{limit: 5}}, name: brevity}}\n"
                           f"  - {{fn: '{rules}:missing'}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "has no function 'missing'; it defines ['short']" in str(info.value)
    assert "problem in the config" in str(info.value)


def test_a_pipeline_file_is_named_as_such(tmp_path):
    path = write(tmp_path, "stages:\n  - {name: a, run: sft}\n")
    with pytest.raises(ConfigError, match="this is a pipeline file; run it with `grpo pipeline FILE`"):
        load_config(path)


def test_auto_precision_follows_the_hardware(monkeypatch):
    import torch

    from grpo.config import TrainConfig
    from grpo.backend.accelerator import resolved_precision

    cpu = TrainConfig(mixed_precision="auto", cpu=True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolved_precision(cpu) == "fp32"  # an AVX2 CPU emulates bf16, slower than fp32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolved_precision(cpu) == "bf16"
    assert resolved_precision(TrainConfig(mixed_precision="fp32", cpu=True)) == "fp32"


def test_fp16_on_a_cpu_is_refused_naming_bf16(tmp_path, capsys):
    assert main(["train", str(ROOT / "configs/quickstart.yaml"), "train.cpu=true", "train.mixed_precision=fp16",
                 f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "train.mixed_precision=fp16 needs a GPU" in err and "bf16" in err and "Traceback" not in err


@pytest.mark.parametrize("override, message", [
    ("data.path=/nonexistent.jsonl", "data.path: file /nonexistent.jsonl does not exist"),
    ("data.prompt_column=prompt", "data.path: the first row of data/arithmetic/train.jsonl has no column 'prompt'"),
    ("model.name_or_path=./no/such/model", "model.name_or_path: ./no/such/model does not exist"),
])
def test_validate_checks_inputs_without_loading_them(override, message, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["validate", "configs/quickstart.yaml", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("source, message", [
    ("def rule(completion, example)\n    return 1.0\n", "rules.py:1: syntax error: expected ':'"),
    ("import os\nx = 1 / 0\n", "rules.py:2: importing it raised ZeroDivisionError: division by zero"),
])
def test_a_broken_reward_file_is_named_by_file_and_line(tmp_path, monkeypatch, capsys, source, message):
    (tmp_path / "rules.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(ROOT / "configs/quickstart.yaml"), f"data.path={ROOT / 'data/arithmetic/train.jsonl'}",
                 "eval.path=null", "rewards=[{fn: 'rules.py:rule'}]", "eval.reward=rule"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_vllm_engine_is_refused_where_vllm_is_not_installed():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:  # the .venv-vllm environment
        assert load_config(None, ["rollout.engine=vllm"]).rollout.engine == "vllm"
    else:
        with pytest.raises(ConfigError, match=r"rollout.engine: vllm is not installed .* `make setup-vllm`"):
            load_config(None, ["rollout.engine=vllm"])


def test_the_r1_zero_config_passes_grpo_validate(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["validate", "configs/r1_zero_gsm8k.yaml"]) == 0
    header = (ROOT / "configs/r1_zero_gsm8k.yaml").read_text().split("model:")[0]
    assert "1.5B" in header and "GPU" in header and "74.4" in header
