"""scripts/r1_trl_replay.py on a tiny model: TRL 1.16's GRPOTrainer runs two steps and records its batches; this
trainer replays them and lands on TRL's weights after each step."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, load_script, save_tiny_model

pytest.importorskip("trl")


def varied_reward(completion: str, example: dict, strict: bool = False) -> float:
    """Stands in for the format rule: a random tiny model never writes R1's layout, and the replay needs groups
    whose rewards differ."""
    return (len(completion) % 3) / 2


def test_this_trainer_on_trls_batches_lands_on_trls_weights(tmp_path, monkeypatch):
    import rewards
    import rewards.format

    from grpo.config import load_config, to_yaml

    compare, replay = load_script("r1_trl_compare"), load_script("r1_trl_replay")
    pipeline = tmp_path / "pipeline"
    model = save_tiny_model(pipeline / "cold_start" / "final")
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"model.name_or_path={model}", f"data.path={ROOT / 'data/r1_cpu/train.jsonl'}", "data.max_samples=null",
        "data.max_prompt_length=256",
        "data.prompt_format='{question} Think inside <think> </think>, then answer inside <answer> </answer>.'",
        "rewards=[{fn: accuracy}, {fn: format, weight: 0.5, kwargs: {strict: true}}]",
        f"eval.path={ROOT / 'data/r1_cpu/test.jsonl'}", "eval.num_prompts=4", "eval.batch_size=4",
        "rollout.num_generations=4", "rollout.max_completion_length=8", "rollout.temperature=1.0",
        "train.prompts_per_step=2", "train.micro_batch_size=4", "train.max_steps=2", "train.mixed_precision=fp32",
        f"train.output_dir={pipeline / 'rl'}", "optim.lr=1e-3", "algorithm.beta=0.0", "scoring.workers=0",
        "scoring.canary=false"])
    (pipeline / "rl").mkdir()
    (pipeline / "rl" / "stage_config.yaml").write_text(to_yaml(cfg))
    monkeypatch.setattr(compare, "PIPELINE", pipeline)
    monkeypatch.setattr(replay, "compare", compare)
    monkeypatch.setattr(rewards.format, "format_reward", varied_reward)  # what TRL's run imports
    monkeypatch.setitem(rewards.BUILTINS, "format", varied_reward)  # what this trainer's scorer resolves

    trl_out = tmp_path / "trl-0"
    held_out = compare.run_trl(0, 2, trl_out, None, record=trl_out / "batches")["held_out"]
    assert sorted(p.name for p in (trl_out / "batches").iterdir()) == ["step-1.pt", "step-2.pt"]
    result = replay.replay(0, 2, trl_out, tmp_path / "replay-0", None)
    print(json.dumps(result))
    assert [s["step"] for s in result["steps"]] == [1, 2]
    for step in result["steps"]:
        assert step["trl_update_norm"] > 1e-3  # TRL's model moved: its batches had signal
        assert step["max_advantage_difference"] < 1e-5
        assert step["drift"] < 1e-3
    assert result["held_out"]["2"] == held_out["2"]
